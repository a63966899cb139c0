"""Helpers of paper-h200-run.sh: derive a matrix variant, size the token budget on the device.

    python harness/measure/paper_h200.py derive IN OUT [--seed S] [--rehearse]
    python harness/measure/paper_h200.py size --matrix FILE --window-s 180 [--device cuda] [--out size.json]
    python harness/measure/paper_h200.py preflight --matrix FILE [--device cuda]

`derive` writes IN with only seed S (the run script runs one seed at a time, so a run cut short keeps every
arm of the first seed; the trial keys are those of the full matrix) and, with --rehearse, the tiny preset on
the CPU (align 16, 5%: at the tiny preset, byte vocabulary, steps of 64 cannot reach the budget).

`size` measures each arm's training tokens/s in its first steps (the trial loop's own Trainer: same model,
optimizer, micro-batches, autocast, compile flag; 2 warm-up and 5 timed steps on the real data) and prints the
step count whose trials fit the window: steps = window / sum over trials of (seconds per step + eval seconds
per step), rounded down to the eval grid, capped at half an epoch of the train split. It is a script of the
run (reports/results/paper-h200-run.sh), in the measurement package because it drives the trial loop, which
reports/ never imports.

`preflight` takes, per arm of the matrix, one train step of the trial loop's own Trainer and one cached decode
step of its inference path, in bf16 (harness/measure/preflight.py), before the sizing: exit 1 and one line
naming every failed check, so a broken CUDA path costs seconds, not the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MAX_EPOCHS = 0.5  # random windows: at 0.5 epoch ~21% of the drawn tokens repeat a position, at 0.35 ~16%


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def dump_toml(doc: dict) -> str:
    """TOML of a matrix document (scalars, lists and nested tables; all a matrix file holds)."""
    lines, tables = [], []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix:
            tables.append(f"\n[{prefix}]")
            tables.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        else:
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", doc)
    return "\n".join(lines + tables) + "\n"


def derive(src: Path, dest: Path, seed: int | None, rehearse: bool, corpus: str | None) -> None:
    doc = tomllib.loads(src.read_text())
    if seed is not None:
        doc["matrix"]["seeds"] = [seed]
    if corpus:
        doc["data"]["corpus"] = corpus
    if rehearse:  # the whole path on a CPU in about a minute: tiny models, a few steps, small evals
        doc["matrix"]["presets"] = ["tiny"]
        doc["data"].pop("vocab_size", None)  # the rehearsal bin's own (bytes: 256), not 50257 padded ids
        doc["match"].update(align=16, tolerance=0.05)
        doc["train"].update(
            tokens=8 * 16 * 2 * 64,
            micro_batch_size=16,
            eval_interval=4,
            eval_tokens=4096,
            log_interval=2,
            infer_batch_sizes=[1],
            infer_new_tokens=4,
            dtype="float32",
        )
    dest.write_text(dump_toml(doc))


def measure_rate(spec, data, steps: int = 5, warmup: int = 2) -> float:
    """Training tokens/s of one arm: the Trainer's own train_step, synchronized, after warm-up steps."""
    import torch

    from harness.trial.loop import Trainer
    from harness.trial.step import synchronize

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, data, Path(tmp), None)
        for _ in range(warmup):
            trainer.set_lr()
            trainer.train_step()
            trainer.state.step += 1
        synchronize(trainer.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.set_lr()
            trainer.train_step()
            trainer.state.step += 1
        synchronize(trainer.device)
        rate = steps * trainer.tokens_per_step / (time.perf_counter() - t0)
        del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rate


def size(matrix_path: Path, window_s: float, device: str | None, cache_dir: str | None) -> dict:
    import torch
    from rich.console import Console

    from arch.counting import count_params, flops_per_token
    from harness.data.bar import prepare_data
    from harness.spec.matching import describe_shape
    from harness.spec.matrix import load_matrix
    from harness.spec.registry import build_model
    from harness.trial.metrics import device_peak_flops

    console = Console(stderr=True)
    matrix = load_matrix(matrix_path)
    data = prepare_data(matrix.data_fields(), cache_dir, console)
    trials = matrix.expand(data.vocab_size, device=device)
    train = trials[0].train
    block = trials[0].dims.block_size
    tokens_per_step = train.tokens_per_step(block)
    arms: dict[str, dict] = {}
    for spec in trials:
        if spec.arm in arms:
            arms[spec.arm]["trials"] += 1
            continue
        with torch.device("meta"):
            model = build_model(spec.variant, spec.dims)
        rate = measure_rate(spec, data)
        fpt = flops_per_token(model, block)
        peak = device_peak_flops(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        arms[spec.arm] = {
            "trials": 1,
            "tokens_per_s": rate,
            "flops_per_token": fpt,
            "mfu": fpt * rate / peak if peak else None,
            "params_total": count_params(model).total,
            "shape": describe_shape(spec.variant, spec.dims),
        }
        console.print(f"size: {spec.arm} {arms[spec.arm]['shape']}: {rate:,.0f} tok/s")
    # seconds per training step of every trial together, evals included (forward only: ~1/3 of a train token)
    evals_per_step = train.eval_tokens / train.eval_interval
    per_step = sum(a["trials"] * (tokens_per_step + evals_per_step / 3) / a["tokens_per_s"] for a in arms.values())
    fit = int(window_s / per_step)
    cap = int(MAX_EPOCHS * data.n_train_tokens // tokens_per_step)
    steps = max(train.eval_interval, min(fit, cap) // train.eval_interval * train.eval_interval)
    tokens = steps * tokens_per_step
    params = max(a["params_total"] for a in arms.values())
    lam = tokens / data.n_train_tokens
    return {
        "steps": steps,
        "tokens_per_trial": tokens,
        "tokens_per_step": tokens_per_step,
        "fraction_of_20_tokens_per_param": tokens / (20 * params),
        "epochs_of_train_split": lam,
        "expected_repeat_share": 1 - (1 - math.exp(-lam)) / lam if lam > 0 else 0.0,
        "n_train_tokens": data.n_train_tokens,
        "n_val_tokens": data.n_val_tokens,
        "window_s": window_s,
        "predicted_train_s": steps * per_step,
        "limited_by": "window" if fit <= cap else "half an epoch",
        "arms": arms,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def preflight(matrix_path: Path, device: str | None, cache_dir: str | None) -> int:
    """One bf16 train step (the Trainer's own) and one decode step per arm of the matrix, on `device`."""
    import torch
    from rich.console import Console

    from harness.data.bar import prepare_data
    from harness.measure.preflight import Arm, run_preflight
    from harness.spec.matrix import load_matrix
    from harness.trial.loop import Trainer

    matrix = load_matrix(matrix_path)
    data = prepare_data(matrix.data_fields(), cache_dir, Console(stderr=True))
    specs = {}
    for spec in matrix.expand(data.vocab_size, device=device):
        specs.setdefault(spec.arm, spec)  # one trial per arm: the seeds differ only in their numbers
    tmp = tempfile.TemporaryDirectory()

    def build(spec) -> Arm:
        trainer = Trainer(spec, data, Path(tmp.name) / spec.arm, None)
        trainer.amp = torch.bfloat16  # the GPU run's autocast, also where the rehearsal trains in float32

        def step() -> torch.Tensor:
            trainer.set_lr()
            loss, _ = trainer.train_step()
            trainer.state.step += 1
            return loss

        return Arm(
            spec.arm, trainer.model, step, spec.dims.vocab_size, spec.dims.block_size, max(spec.train.infer_batch_sizes)
        )

    with tmp:
        return run_preflight(
            [(arm, lambda s=spec: build(s)) for arm, spec in specs.items()],
            torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        )


def main(argv: list[str] | None = None) -> None:
    from harness.errors import UserError

    try:
        _main(argv)
    except UserError as e:
        print(f"paper_h200: error: {e}", file=sys.stderr)
        sys.exit(2)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("derive")
    d.add_argument("src", type=Path)
    d.add_argument("dest", type=Path)
    d.add_argument("--seed", type=int)
    d.add_argument("--rehearse", action="store_true")
    d.add_argument("--corpus")
    s = sub.add_parser("size")
    s.add_argument("--matrix", type=Path, required=True)
    s.add_argument("--window-s", type=float, required=True)
    s.add_argument("--device")
    s.add_argument("--cache-dir")
    s.add_argument("--out", type=Path)
    p = sub.add_parser("preflight")
    p.add_argument("--matrix", type=Path, required=True)
    p.add_argument("--device")
    p.add_argument("--cache-dir")
    args = parser.parse_args(argv)
    if args.cmd == "derive":
        derive(args.src, args.dest, args.seed, args.rehearse, args.corpus)
        return
    if args.cmd == "preflight":
        sys.exit(preflight(args.matrix, args.device, args.cache_dir))
    result = size(args.matrix, args.window_s, args.device, args.cache_dir)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(result["steps"])


if __name__ == "__main__":
    main()
