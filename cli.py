"""`kimi-bench`: run, tune, report, list, params, data, generate, bench-infer, status.

Every user error is one line, `kimi-bench: error: <field>: <what is wrong>; <fix>`, exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import UserError

# Piped output (logs, CI) gets a wide console so tables are not squeezed into rich's 80-column default.
console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=160)
err_console = Console(stderr=True)


class App(typer.Typer):
    """Typer app that turns UserError into one line on stderr instead of a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except UserError as e:
            err_console.print(f"kimi-bench: error: {e}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)


app = App(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Prepare and inspect corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")

TrackingUri = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: "
                                                 "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")]
CacheDir = Annotated[str | None, typer.Option("--cache-dir", help="token cache (default ./.kimi-cache)")]
MatrixOpt = Annotated[Path, typer.Option("--matrix", "-m", help="matrix TOML file")]


def _user_errors(fn):
    """Run fn; UserError passes through, an unwritable cache or a bad path becomes one line too."""
    try:
        return fn()
    except PermissionError as e:
        raise UserError(f"{e.filename}: permission denied; choose a writable --cache-dir / --out") from None


@app.command()
def run(
    matrix: MatrixOpt,
    tracking_uri: TrackingUri = None,
    out: Annotated[Path, typer.Option(help="checkpoints and per-trial files")] = Path("runs"),
    cache_dir: CacheDir = None,
    tuned: Annotated[bool, typer.Option("--tuned", help="use each arm's best params from its study")] = False,
    study_storage: Annotated[str | None, typer.Option(help="Optuna storage for --tuned")] = None,
    study_prefix: Annotated[str | None, typer.Option(help="study name prefix for --tuned (default: the "
                                                             "matrix name)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and size everything, train nothing")] = False,
    device: Annotated[str | None, typer.Option(help="override train.device (cpu, cuda, cuda:1)")] = None,
    steps: Annotated[int | None, typer.Option(help="override the step budget")] = None,
    nproc: Annotated[int, typer.Option(help="processes (GPUs) per trial, via torchrun")] = 1,
    peak_tflops: Annotated[float | None, typer.Option(help="device peak for MFU (default: table)")] = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
) -> None:
    """Run a matrix of trials and log them to MLflow (finished trials are skipped on a rerun)."""
    from harness.dist import init_distributed, shutdown
    from harness.matrix import load_matrix
    from harness.runner import check_trials, prepare_data, run_matrix, summary_table

    ray_options = _ray_options(executor, ray_address, nproc)  # --executor ray: checked before anything runs
    if nproc > 1 and "LOCAL_RANK" not in os.environ and ray_options is None:
        _relaunch_with_torchrun(nproc)
    spec = load_matrix(matrix)
    if ray_options is not None:
        ray_options = ray_options.from_matrix(spec.spec.ray, str(matrix), address=ray_address, nproc=nproc)
    if device is not None and not device.startswith(("cpu", "cuda", "auto")):
        raise UserError(f"--device: unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if steps is not None and steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}; give a positive step budget")
    _check_out_dir(out)
    data = _user_errors(lambda: prepare_data(spec.data_fields(), cache_dir, console))
    tuned_params = _load_tuned(spec, study_storage, study_prefix) if tuned else None
    overrides = {"device": device}
    if steps is not None:
        overrides.update(steps=steps, tokens=None, seconds=None)
    trials = spec.expand(data.vocab_size, tuned=tuned_params, **overrides)
    check_trials(trials)
    if dry_run:
        _check_tracking(tracking_uri)
        console.print(_params_table(trials, title=f"{spec.name}: {len(trials)} trials (dry run, nothing trained)"))
        return
    dist_info = init_distributed()
    try:
        outcome = run_matrix(spec, trials, data, tracking_uri, out, console, dist_info, peak_tflops,
                             executor=executor, ray_options=ray_options, cache_dir=cache_dir)
    finally:
        shutdown()
    if dist_info.is_main:
        console.print(summary_table(outcome))
        console.print(f"report: kimi-bench report --experiment {spec.name}    "
                      f"browse: mlflow ui --backend-store-uri {_display_uri(tracking_uri)}")
    if outcome.interrupted:
        raise typer.Exit(130)


# --- executor options (--executor local|ray, --ray-address, --n-workers; harness/executors/) ---
ExecutorOpt = Annotated[str, typer.Option("--executor", help="local (this process, the default) | ray (every "
                                          "trial a Ray task; pip install -e '.[ray]')")]
RayAddressOpt = Annotated[str | None, typer.Option("--ray-address", help="--executor ray: auto | HOST:PORT of a "
                                                   "running cluster (default: $RAY_ADDRESS, else a local "
                                                   "cluster on 127.0.0.1)")]


def _ray_options(executor: str, ray_address: str | None, nproc: int = 1):
    """RayOptions for --executor ray (Ray imported here, with a one-line fix when missing), else None."""
    from harness.executors import check_executor

    if check_executor(executor) == "local":
        if ray_address is not None:
            raise UserError("--ray-address: only with --executor ray; add --executor ray or drop it")
        return None
    from harness.executors.ray import RayOptions, import_ray

    import_ray()
    return RayOptions(address=ray_address, nproc=nproc)
# --- end executor options ---


def _check_out_dir(out: Path) -> None:
    """--out must be creatable before any MLflow run exists (a failure later would leave a partial run)."""
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"--out: cannot create {str(out)!r} ({probe} is not a writable folder); "
                        "choose another --out")


def _check_tracking(uri: str | None) -> None:
    """--dry-run reaches the tracking store too: a server must answer (a sqlite file is not created)."""
    from harness.tracking import Tracker, resolve_tracking_uri

    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///"):
        parent = Path(resolved.removeprefix("sqlite:///")).parent
        if not parent.is_dir():
            raise UserError(f"--tracking-uri: folder {parent} does not exist; create it or pick another path")
        return
    Tracker(resolved)


def _relaunch_with_torchrun(nproc: int) -> None:
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:  # drop --nproc: torchrun would read it as an abbreviation of its own option
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cli", *args]
    raise typer.Exit(subprocess.call(cmd))


def _display_uri(uri: str | None) -> str:
    from harness.tracking import resolve_tracking_uri, strip_credentials

    return strip_credentials(resolve_tracking_uri(uri))


def _load_tuned(spec, storage: str | None, prefix: str | None) -> dict:
    from harness.tune import best_params_for_arms

    return best_params_for_arms(spec, storage, prefix)


def _params_table(trials, title: str) -> Table:
    from arch.counting import count_params, flops_per_token, kv_cache_bytes_per_token
    from harness.registry import build_model, variant_params

    table = Table(title=title, header_style="bold")
    for col in ("arm", "preset", "seeds", "total params", "active params", "embedding", "GFLOP/token",
                "KV B/token", "dims"):
        table.add_column(col, justify="left" if col in ("arm", "preset", "dims") else "right")
    seen: dict[tuple[str, str], list[int]] = {}
    for t in trials:
        seen.setdefault((t.arm, t.preset), []).append(t.seed)
    shown = set()
    for t in trials:
        if (t.arm, t.preset) in shown:
            continue
        shown.add((t.arm, t.preset))
        import torch

        with torch.device("meta"):
            model = build_model(t.variant, t.dims)
        c = count_params(model)
        fields = variant_params(t.variant, t.dims)
        dims = " ".join(f"{k}={fields[k]}" for k in ("n_layer", "dim", "n_heads", "moe_inter_dim",
                                                        "n_routed_experts", "kv_lora_rank") if k in fields)
        table.add_row(t.arm, t.preset, ",".join(map(str, seen[(t.arm, t.preset)])), f"{c.total:,}",
                      f"{c.active:,}", f"{c.embedding:,}", f"{flops_per_token(model, t.dims.block_size) / 1e9:.4f}",
                      f"{kv_cache_bytes_per_token(model, 2):,}", dims)
    return table


@app.command("tune")
def tune_command(
    matrix: Annotated[Path, typer.Option("--matrix", "-m", help="matrix TOML file")],
    n_trials: Annotated[int | None, typer.Option(
        "--n-trials", help="trials this worker adds to each arm's study (default 20 "
                           "unless --total-trials is given)")] = None,
    total_trials: Annotated[int | None, typer.Option(
        "--total-trials", help="stop once each study holds this many complete + pruned (+ running) trials, "
                               "over all workers")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage: sqlite file (default ./optuna.db), SQLAlchemy URL, or journal:PATH")] = None,
    study_prefix: Annotated[str | None, typer.Option(
        help="study names are PREFIX/<variant>+<optimizer> (default: the matrix name)")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")] = None,
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="token cache (default ./.kimi-cache)")
                         ] = None,
    out: Annotated[Path, typer.Option(help="per-trial files (checkpoints are deleted after each trial)")
                   ] = Path("runs"),
    sampler_seed: Annotated[int, typer.Option(help="TPE seed (re-seeded per trial with the trial number)")
                            ] = 0,
    pruner: Annotated[str, typer.Option(help="median | hyperband | none (prunes on eval val loss)")
                      ] = "median",
    arms: Annotated[list[str] | None, typer.Option(
        "--arms", help="only these arms, e.g. --arms gpt+adamw,kimi+muon (repeatable)")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds; no new trial starts after it")] = None,
    seed: Annotated[int | None, typer.Option(
        help="tune at this seed instead of the matrix's first (e.g. one the matrix does not run)")] = None,
    heartbeat: Annotated[int, typer.Option(
        help="seconds between worker heartbeats; a RUNNING trial silent for 2x this is failed")
                         ] = 60,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    n_workers: Annotated[int, typer.Option("--n-workers", help="--executor ray: Optuna workers run as Ray "
                                           "tasks at once; together they add --n-trials per arm")] = 1,
) -> None:
    """Tune each arm with its own Optuna study: equal trials, same kind of search space, shared storage."""
    import shlex

    from harness.tune import best_params_lines, summary_table, tune

    ray_options = _ray_options(executor, ray_address)
    if ray_options is None and n_workers != 1:
        raise UserError("--n-workers: only with --executor ray; add --executor ray or start more workers by hand")
    if ray_options is not None:  # --- executor dispatch: N Optuna workers as Ray tasks ---
        from harness.executors.ray import tune_ray

        outcome = tune_ray(matrix, n_workers=n_workers, opts=ray_options, n_trials=n_trials,
                           total_trials=total_trials, storage=storage, study_prefix=study_prefix,
                           tracking_uri=tracking_uri, cache_dir=cache_dir, out=out, sampler_seed=sampler_seed,
                           pruner=pruner, arms=arms, timeout=timeout, seed=seed, heartbeat_s=heartbeat,
                           console=console)
    else:
        outcome = tune(matrix, n_trials=n_trials, total_trials=total_trials, storage=storage,
                       study_prefix=study_prefix, tracking_uri=tracking_uri, cache_dir=cache_dir, out=out,
                       sampler_seed=sampler_seed, pruner=pruner, arms=arms, timeout=timeout, seed=seed,
                       heartbeat_s=heartbeat, console=console)
    console.print(summary_table(outcome))
    for line in best_params_lines(outcome):
        console.print(line, markup=False, highlight=False)
    storage_arg = f" --study-storage {shlex.quote(outcome.storage)}" if storage else ""
    console.print(f"next: kimi-bench run --matrix {matrix} --tuned{storage_arg}")
    if outcome.interrupted:
        raise typer.Exit(130)


@app.command()
def params(
    matrix: Annotated[Path | None, typer.Option("--matrix", "-m", help="matrix TOML file")] = None,
    preset: Annotated[str | None, typer.Option(help="a size preset (all variants)")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary when the preset has none")] = 256,
    cache_dir: CacheDir = None,
) -> None:
    """Show parameter counts, FLOPs and KV bytes per token of every arm (matched when the matrix asks)."""
    from harness.matrix import load_matrix
    from harness.registry import (
        OPTIMIZER_DEFAULTS,
        VARIANTS,
        TrainConfig,
        TrialSpec,
        resolve_dims,
        resolve_optimizer,
    )

    if matrix is not None:
        spec = load_matrix(matrix)
        from harness.runner import prepare_data

        data = _user_errors(lambda: prepare_data(spec.data_fields(), cache_dir, console))
        trials = spec.expand(data.vocab_size)
        console.print(_params_table(trials, title=f"{spec.name}: matched configs"))
        return
    if preset is None:
        raise UserError("params: give --matrix FILE or --preset NAME")
    trials = [TrialSpec("params", v, "adamw", preset, 0, resolve_dims(preset, vocab_size),
                        resolve_optimizer("adamw", OPTIMIZER_DEFAULTS["adamw"]), TrainConfig(steps=1))
              for v in VARIANTS]
    console.print(_params_table(trials, title=f"preset {preset}"))


@app.command("list")
def list_cmd() -> None:
    """List variants, optimizers and presets."""
    from arch.optimizers import OPTIMIZERS
    from harness.registry import PRESETS, VARIANTS

    table = Table(title="registry", header_style="bold")
    table.add_column("kind")
    table.add_column("names")
    table.add_row("variants", ", ".join(VARIANTS))
    table.add_row("optimizers", ", ".join(OPTIMIZERS))
    for name, dims in PRESETS.items():
        table.add_row(f"preset {name}", f"n_layer={dims.n_layer} dim={dims.dim} n_heads={dims.n_heads} "
                      f"block={dims.block_size} experts={dims.n_routed_experts}x{dims.moe_inter_dim} "
                      f"top{dims.n_activated_experts} vocab={dims.vocab_size or 'tokenizer'}")
    console.print(table)


def _data_fields(corpus: str, tokenizer: str, vocab_size: int | None, max_chars: int | None) -> dict:
    return {"corpus": corpus, "tokenizer": tokenizer, "vocab_size": vocab_size, "max_chars": max_chars}


@data_app.command("prepare")
def data_prepare(
    corpus: Annotated[str, typer.Option(help="python-stdlib | text:PATH | tinyshakespeare | tinystories | "
                                              "bin:DIR")] = "python-stdlib",
    tokenizer: Annotated[str, typer.Option(help="byte | char | bpe | gpt2")] = "byte",
    vocab_size: Annotated[int | None, typer.Option(help="BPE vocabulary")] = None,
    max_chars: Annotated[int | None, typer.Option(help="cap the corpus")] = None,
    matrix: Annotated[Path | None, typer.Option("--matrix", "-m", help="take [data] from a matrix")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Tokenize a corpus into the token cache (idempotent: the same inputs give the same hash)."""
    from harness.matrix import load_matrix
    from harness.runner import prepare_data

    fields = load_matrix(matrix).data_fields() if matrix else _data_fields(corpus, tokenizer, vocab_size, max_chars)
    data = _user_errors(lambda: prepare_data(fields, cache_dir, console))
    _print_info(data.info())


@data_app.command("info")
def data_info(
    corpus: Annotated[str, typer.Option(help="corpus name")] = "python-stdlib",
    tokenizer: Annotated[str, typer.Option(help="tokenizer")] = "byte",
    vocab_size: Annotated[int | None, typer.Option(help="BPE vocabulary")] = None,
    max_chars: Annotated[int | None, typer.Option(help="cap the corpus")] = None,
    matrix: Annotated[Path | None, typer.Option("--matrix", "-m", help="take [data] from a matrix")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Show a prepared corpus: hash, token counts, vocabulary, cache path."""
    data_prepare(corpus, tokenizer, vocab_size, max_chars, matrix, cache_dir)


def _print_info(info: dict) -> None:
    table = Table(title="data", header_style="bold", show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


def _load_checkpoint(path: Path, device: str):
    """Our model.pt, or a nanoGPT ckpt.pt; weights only (no pickled code is ever executed)."""
    import torch

    from harness.registry import ModelDims, build_model

    if not path.is_file():
        raise UserError(f"--checkpoint: no file at {path}; pass runs/<experiment>/<trial>/model.pt or a "
                        "nanoGPT ckpt.pt")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"--checkpoint {path}: not a loadable weights-only checkpoint ({type(e).__name__})") from None
    if "model_args" in payload:  # nanoGPT's ckpt.pt
        from arch.gpt import load_nanogpt_checkpoint

        return load_nanogpt_checkpoint(path).to(device), None
    if "variant" not in payload:
        raise UserError(f"--checkpoint {path}: neither a kimi-bench model.pt nor a nanoGPT ckpt.pt")
    model = build_model(payload["variant"], ModelDims(**payload["dims"]))
    model.load_state_dict(payload["model"])
    return model.to(device), payload.get("data")


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Option(help="model.pt or a nanoGPT ckpt.pt")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "\n",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to sample")] = 200,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="sample from the k most likely")] = 200,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    tokenizer: Annotated[str | None, typer.Option(help="override the checkpoint's tokenizer")] = None,
    cache_dir: CacheDir = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Sample text from a trained checkpoint with the KV cache."""
    import torch

    from arch.common import generate as generate_tokens
    from harness.runner import prepare_data

    model, data_fields = _load_checkpoint(checkpoint, device)
    fields = dict(data_fields or {"corpus": "python-stdlib", "tokenizer": "gpt2"})
    if tokenizer:
        fields["tokenizer"] = tokenizer
    data = _user_errors(lambda: prepare_data(fields, cache_dir, console))
    idx = torch.tensor([data.tokenizer.encode(prompt) or [0]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    console.print(data.tokenizer.decode(out[0].tolist()), markup=False, highlight=False)


@app.command("bench", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """GPU speed suite: train tokens/s and MFU, MoE vs dense, MLA vs MHA decode, Muon share (see --help)."""
    import typer.main

    from harness.bench.suite import bench_command  # torch-heavy: imported only for this command

    suite = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    suite.command()(bench_command)
    typer.main.get_command(suite).main(args=ctx.args, prog_name="kimi-bench bench", standalone_mode=True)


@app.command("bench-infer")
def bench_infer(
    checkpoint: Annotated[Path, typer.Option(help="model.pt or a nanoGPT ckpt.pt")],
    batch_sizes: Annotated[str, typer.Option(help="comma-separated")] = "1,8",
    new_tokens: Annotated[int, typer.Option(help="decode steps")] = 32,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    repeats: Annotated[int, typer.Option(help="timed repeats (median)")] = 5,
) -> None:
    """Inference benchmark of a checkpoint alone: prefill/decode tokens/s, TTFT, KV and checkpoint bytes."""
    import torch

    from harness.inference import benchmark_inference

    model, _ = _load_checkpoint(checkpoint, device)
    sizes = tuple(int(b) for b in batch_sizes.split(","))
    amp = torch.bfloat16 if device.startswith("cuda") else None
    result = benchmark_inference(model, model.config.vocab_size, model.config.block_size, sizes, new_tokens,
                                 repeats=repeats, autocast_dtype=amp)
    result["ckpt/bytes"] = checkpoint.stat().st_size
    table = Table(title=f"inference: {checkpoint}", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:,.4g}")
    console.print(table)


@app.command()
def report(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the matrix name)")],
    tracking_uri: TrackingUri = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default reports/out/<experiment>)")] = None,
    log: Annotated[bool, typer.Option("--log/--no-log", help="also attach report.md, summary.csv and "
                                      "figures/ to the newest matrix run in MLflow")] = True,
) -> None:
    """Write report.md + figures from what MLflow holds (tables, intervals, claims vs measured)."""
    from harness.tracking import resolve_tracking_uri
    from reports.collect import collect
    from reports.markdown import write_report

    uri = resolve_tracking_uri(tracking_uri)
    out = out or Path("reports/out") / experiment
    with console.status("collecting runs from MLflow"):
        collected = collect(uri, experiment)
    with console.status("rendering report"):
        path = write_report(collected, out, command=" ".join(["kimi-bench", *sys.argv[1:]]))
    console.print(f"wrote {path}")
    if log and (run_id := _log_report(collected, path.parent)):
        console.print(f"logged report.md, summary.csv, figures/ to the matrix run {run_id}")


def _log_report(collected, out_dir: Path) -> str | None:
    """Attach the report to the newest matrix (parent) run, so `mlflow ui` shows it beside the trials."""
    if collected.matrix_runs.empty:
        return None
    run_id = str(collected.matrix_runs.run_id.iloc[-1])  # sorted by start_time: the newest invocation
    for name in ("report.md", "summary.csv"):
        if (out_dir / name).is_file():
            collected.client.log_artifact(run_id, str(out_dir / name))
    if (out_dir / "figures").is_dir():
        collected.client.log_artifacts(run_id, str(out_dir / "figures"), "figures")
    return run_id


@app.command()
def status(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the matrix name)")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Each trial's state from MLflow: finished, running, diverged, oom, killed, failed."""
    from harness.tracking import Tracker

    tracker = Tracker(tracking_uri)
    exp = tracker.client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in tracker.client.search_experiments()) or "none"
        raise UserError(f"--experiment: no experiment {experiment!r}; existing: {names}")
    table = Table(title=f"{experiment}: trials", header_style="bold")
    for col in ("trial", "status", "step", "val ppl", "run id", "trial key"):
        table.add_column(col)
    for r in sorted(tracker.trials(exp.experiment_id), key=lambda r: r.info.run_name or ""):
        ppl = r.data.metrics.get("val/ppl_final")
        table.add_row(r.info.run_name, r.data.tags.get("kb.status", "?"), r.data.tags.get("kb.final_step", ""),
                      f"{ppl:.3f}" if ppl else "", r.info.run_id[:12], r.data.tags.get("kb.trial_key", ""))
    console.print(table)


if __name__ == "__main__":
    app()
