"""What each `kimi-bench` command does, as library functions (cli.py only parses options and calls these):
run (and --dry-run), params, list, data prepare|info."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.errors import UserError


@dataclass(kw_only=True)
class RunOptions:
    """The options of `kimi-bench run`, one field per parameter of cli.run (same names, same defaults), built
    from that command's own arguments by name (`RunOptions.of(locals())`), never by position."""

    matrix: Path
    sets: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    out: Path = Path("runs")
    cache_dir: str | None = None
    tuned: bool = False
    study_storage: str | None = None
    study_prefix: str | None = None
    dry_run: bool = False
    device: str | None = None
    steps: int | None = None
    nproc: int = 1
    peak_tflops: float | None = None
    keep_state: bool = False
    executor: str = "local"
    ray_address: str | None = None

    @classmethod
    def of(cls, options: dict) -> RunOptions:
        """From the run command's arguments by name (typer gives None for an unset repeatable --set)."""
        return cls(**{**options, "sets": list(options.get("sets") or [])})


def user_errors(fn):
    """Run fn; UserError passes through, an unwritable cache or a bad path becomes one line too."""
    try:
        return fn()
    except PermissionError as e:
        raise UserError(f"--cache-dir / --out: {e.filename}: permission denied; choose a writable folder") from None


def check_out_dir(out: Path) -> None:
    """--out must be creatable before any MLflow run exists (a failure later would leave a partial run)."""
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"--out: cannot create {str(out)!r} ({probe} is not a writable folder); choose another --out")


def check_tracking(uri: str | None) -> None:
    """--dry-run reaches the tracking store too: a server must answer (a sqlite file is not created)."""
    from harness.stores.tracking import Tracker, resolve_tracking_uri

    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("record:"):  # a portable record (harness.stores.runrecord): created on first use
        return
    if resolved.startswith("sqlite:///"):
        parent = Path(resolved.removeprefix("sqlite:///")).parent
        if not parent.is_dir():
            raise UserError(f"--tracking-uri: folder {parent} does not exist; create it or pick another path")
        return
    Tracker(resolved)


def _check_run_options(o: RunOptions) -> None:
    if o.device is not None and not o.device.startswith(("cpu", "cuda", "auto")):
        raise UserError(f"--device: unknown device {o.device!r}; use cpu, cuda, cuda:N or auto")
    if o.steps is not None and o.steps < 1:
        raise UserError(f"--steps: must be >= 1, got {o.steps}; give a positive step budget")
    if o.nproc < 1:
        raise UserError(f"--nproc: must be >= 1, got {o.nproc}")


def _train_overrides(o: RunOptions) -> dict:
    overrides: dict = {"device": o.device}
    if o.steps is not None:
        overrides.update(steps=o.steps, tokens=None, seconds=None)
    return overrides


def dry_run(o: RunOptions, console: Console) -> None:
    """Validate and size every trial and print what it will cost; offline (no data is read or downloaded
    unless only a local corpus can give the vocabulary), nothing trained, no store created."""
    from harness.plan import show_plan, vocab_size_for
    from harness.spec.matrix import load_matrix

    _check_run_options(o)
    ray_options = ray_options_for(o.executor, o.ray_address, o.nproc)  # checked before anything runs
    spec = load_matrix(o.matrix, o.sets)
    if ray_options is not None:
        ray_options = ray_options.from_matrix(spec.spec.ray, str(o.matrix), address=o.ray_address, nproc=o.nproc)
    vocab = user_errors(lambda: vocab_size_for(spec.data_fields(), o.cache_dir))
    tuned = _load_tuned(spec, o) if o.tuned else None
    trials = spec.expand(vocab[0], tuned=tuned, **_train_overrides(o))
    check_tracking(o.tracking_uri)
    costs = show_plan(
        trials,
        f"{spec.name}: {len(trials)} trials (dry run, nothing trained)",
        console,
        vocab,
        o.device,
        o.peak_tflops,
        o.nproc,
    )
    if spec.spec.tune is not None and not o.tuned:  # [tune]: the studies run first (harness/tune/declared.py)
        from harness.tune.declared import tuning_plan

        tuning_plan(spec, trials, costs, console)


def _load_tuned(spec, o: RunOptions) -> dict:
    from harness.tune import best_params_for_arms

    storage = o.study_storage or (spec.spec.tune.storage if spec.spec.tune is not None else None)
    return best_params_for_arms(spec, storage, o.study_prefix)


def run(o: RunOptions, console: Console) -> int:
    """`kimi-bench run`: the matrix's trials, logged to MLflow; -> the exit code (130 when interrupted)."""
    if o.dry_run:
        dry_run(o, console)
        return 0
    from harness.console import browse_lines, report_hint, status_hint
    from harness.data.bar import prepare_data
    from harness.executors import run_matrix
    from harness.executors.matrix_run import check_trials, summary_table
    from harness.spec.matrix import load_matrix
    from harness.stores.tracking import resolve_tracking_uri, strip_credentials
    from harness.trial.dist import init_distributed, shutdown

    _check_run_options(o)
    ray_options = ray_options_for(o.executor, o.ray_address, o.nproc)  # checked before anything runs
    spec = load_matrix(o.matrix, o.sets)
    if ray_options is not None:
        ray_options = ray_options.from_matrix(spec.spec.ray, str(o.matrix), address=o.ray_address, nproc=o.nproc)
    check_out_dir(o.out)
    check_tracking(o.tracking_uri)  # a wrong login, server or database: one line before any data or folder
    data = user_errors(lambda: prepare_data(spec.data_fields(), o.cache_dir, console))
    tuned = _load_tuned(spec, o) if o.tuned else None
    declared = None
    if spec.spec.tune is not None and not o.tuned:  # [tune]: every arm's study first (harness/tune/declared.py)
        from harness.tune.declared import check_single_process, run_declared

        check_single_process(o.matrix)

        declared = run_declared(
            spec,
            console,
            storage=o.study_storage,
            study_prefix=o.study_prefix,
            tracking_uri=o.tracking_uri,
            cache_dir=o.cache_dir,
            out=o.out,
            train_overrides=_train_overrides(o),
        )
        if declared.interrupted:
            return 130
        tuned = declared.tuned
    trials = spec.expand(data.vocab_size, tuned=tuned, **_train_overrides(o))
    if declared is not None:
        trials = declared.keep(trials)
        if not trials:
            raise UserError(
                f"tune: no arm of {spec.name} finished a tuning trial ({', '.join(declared.failed)}); "
                "see the messages above and the trials' error.txt"
            )
    check_trials(trials)
    dist_info = init_distributed()
    try:
        outcome = run_matrix(
            spec,
            trials,
            data,
            o.tracking_uri,
            o.out,
            console,
            dist_info,
            o.peak_tflops,
            keep_state=o.keep_state,
            executor=o.executor,
            ray_options=ray_options,
            cache_dir=o.cache_dir,
        )
    finally:
        shutdown()
    if dist_info.is_main:
        console.print(summary_table(outcome))
        shown_uri = strip_credentials(o.tracking_uri) if o.tracking_uri else None
        console.print(f"report: {report_hint(spec.name, shown_uri)}", markup=False, highlight=False)
        console.print(f"status: {status_hint(o.matrix, shown_uri)}", markup=False, highlight=False)
        display = strip_credentials(resolve_tracking_uri(o.tracking_uri))
        from harness.stores.views import view_key

        key = view_key(outcome.parent_run_id) if outcome.parent_run_id and not display.startswith("record:") else None
        for line in browse_lines(display, outcome.experiment_id, key):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 130 if outcome.interrupted else 1 if declared is not None and declared.failed else 0


def params(
    matrix: Path | None,
    sets: list[str],
    preset: str | None,
    vocab_size: int,
    cache_dir: str | None,
    device: str | None,
    console: Console,
) -> None:
    """`kimi-bench params`: counts, FLOPs and KV bytes per arm, and per trial the cost of a matrix (offline)."""
    from harness.plan import params_table, show_plan, vocab_size_for
    from harness.spec.registry import (
        OPTIMIZER_DEFAULTS,
        VARIANTS,
        TrainConfig,
        TrialSpec,
        resolve_dims,
        resolve_optimizer,
    )

    if matrix is not None:
        from harness.spec.matrix import load_matrix

        spec = load_matrix(matrix, sets)
        vocab = user_errors(lambda: vocab_size_for(spec.data_fields(), cache_dir))
        trials = spec.expand(vocab[0], device=device)
        show_plan(trials, f"{spec.name}: matched configs", console, vocab, device)
        return
    if sets:
        raise UserError("--set: needs --matrix (it overrides fields of a matrix file)")
    if preset is None:
        raise UserError("--matrix / --preset: give --matrix FILE or --preset NAME")
    from harness.spec.registry import PRESETS, check_choice

    check_choice("--preset", preset, PRESETS)
    trials = [
        TrialSpec(
            "params",
            v,
            "adamw",
            preset,
            0,
            resolve_dims(preset, vocab_size),
            resolve_optimizer("adamw", OPTIMIZER_DEFAULTS["adamw"]),
            TrainConfig(steps=1),
        )
        for v in VARIANTS
    ]
    console.print(params_table(trials, title=f"preset {preset}"))


def registry_table() -> Table:
    """`kimi-bench list`: variants, optimizers, presets."""
    from arch.optimizers import OPTIMIZERS
    from harness.spec.registry import PRESETS, VARIANTS

    table = Table(title="registry", header_style="bold")
    table.add_column("kind")
    table.add_column("names")
    table.add_row("variants", ", ".join(VARIANTS))
    table.add_row("optimizers", ", ".join(OPTIMIZERS))
    for name, dims in PRESETS.items():
        table.add_row(
            f"preset {name}",
            f"n_layer={dims.n_layer} dim={dims.dim} n_heads={dims.n_heads} "
            f"block={dims.block_size} experts={dims.n_routed_experts}x{dims.moe_inter_dim} "
            f"top{dims.n_activated_experts} vocab={dims.vocab_size or 'tokenizer'}",
        )
    return table


def data_info(fields: dict | None, matrix: Path | None, cache_dir: str | None, console: Console) -> Table:
    """`kimi-bench data prepare|info`: tokenize into the cache (idempotent) and show hash, counts, paths."""
    from harness.data.bar import prepare_data

    if matrix is not None:
        from harness.spec.matrix import load_matrix

        fields = load_matrix(matrix).data_fields()
    data = user_errors(lambda: prepare_data(fields, cache_dir, console))
    table = Table(title="data", header_style="bold", show_header=False)
    for key, value in data.info().items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    return table


def ray_options_for(executor: str, ray_address: str | None, nproc: int = 1):
    """RayOptions for --executor ray (Ray imported only then, with a one-line fix when missing), else None."""
    from harness.executors import check_executor

    if check_executor(executor) == "local":
        if ray_address is not None:
            raise UserError("--ray-address: only with --executor ray; add --executor ray or drop it")
        return None
    from harness.executors.ray.options import RayOptions, import_ray

    import_ray()
    return RayOptions(address=ray_address, nproc=nproc)


def tune(
    matrix: Path,
    sets: list[str],
    console: Console,
    *,
    executor: str = "local",
    ray_address: str | None = None,
    n_workers: int = 1,
    **tune_kwargs,
):
    """`kimi-bench tune`: one study per arm, in this process or as N Optuna workers on Ray; -> TuneOutcome."""
    from harness.spec.matrix import load_matrix

    ray_options = ray_options_for(executor, ray_address)
    if ray_options is None and n_workers != 1:
        raise UserError("--n-workers: only with --executor ray; add --executor ray or start more workers by hand")
    spec = load_matrix(matrix, sets)
    declared = spec.spec.tune
    if declared is not None and tune_kwargs.get("n_trials") is None and tune_kwargs.get("total_trials") is None:
        # TuneConfig takes the matrix's own budget: each study ends holding [tune] trials, as `run --matrix` leaves it
        console.print(
            f"tuning until each study holds {declared.trials} trials ([tune] trials of {spec.name})", markup=False
        )
    if ray_options is not None:
        from harness.executors.ray.tuning import tune_ray

        return tune_ray(spec, n_workers=n_workers, opts=ray_options, console=console, **tune_kwargs)
    from harness.tune import tune as tune_local

    return tune_local(spec, console=console, **tune_kwargs)


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """This command again under torchrun on `nproc` processes (without --nproc); its exit code."""
    import subprocess

    args, skip = [], False
    for a in argv:  # drop --nproc: torchrun would read it as an abbreviation of its own option
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        args.append(a)
    from harness.stores.tracking import resolve_tracking_uri

    # the ranks inherit the login through MLflow's variables: no password on their command lines
    args = [
        a.partition("=")[0] + "=" + resolve_tracking_uri(a.partition("=")[2])
        if a.startswith("--tracking-uri=")
        else resolve_tracking_uri(a)
        if a.startswith(("http://", "https://"))
        else a
        for a in args
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "cli",
        *args,
    ]
    return subprocess.call(cmd)
