"""kimi-bench: does a Kimi-K2-style model (MLA + MoE, Muon) beat a nanoGPT dense GPT (AdamW) at the same
parameter budget? Run a matrix of trials into MLflow, then report.

Every user error is one line, `kimi-bench: error: <field>: <what is wrong>; <fix>`, exit code 2.

Each command parses its options and calls one library function (harness.commands and friends).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from harness.console import console, print_error
from harness.errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _label(e: typer.TyperException) -> str:
    """A usage error (typer's click) as `--flag: what` (the CLI's label style), on one line."""
    param = getattr(e, "param", None)
    if isinstance(e, typer.BadParameter) and param is not None and getattr(param, "opts", None):
        flag = max(param.opts, key=len)
        missing = type(e).__name__ == "MissingParameter"
        return f"{flag}: " + ("missing; this option is required" if missing else " ".join(e.message.split()))
    return " ".join(e.format_message().split())


class App(typer.Typer):
    """Typer app whose errors are one line on stderr: UserError, and click's usage errors (no help box)."""

    def __call__(self, args=None, prog_name: str | None = None, **kwargs):
        command = typer.main.get_command(self)
        try:
            code = command.main(args=args, prog_name=prog_name or "kimi-bench", standalone_mode=False, **kwargs)
        except UserError as e:
            print_error(str(e))
            sys.exit(2)
        except typer.Abort:
            print_error("interrupted")
            sys.exit(130)
        except typer.TyperException as e:  # click's usage errors: bad/missing/unknown option
            print_error(_label(e))
            sys.exit(getattr(e, "exit_code", 2))
        if isinstance(code, int) and code:
            sys.exit(code)
        return code


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"kimi-bench {version('kimi-bench')}", highlight=False)
        except PackageNotFoundError:
            console.print("kimi-bench (not installed: no package metadata)", highlight=False)
        raise typer.Exit()


app = App(
    help=__doc__,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)
data_app = typer.Typer(
    help="Prepare and inspect corpora.", no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT
)
app.add_typer(data_app, name="data")


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """kimi-bench: Kimi-K2-style MLA + MoE (Muon) vs nanoGPT (AdamW) at matched parameter budgets."""


TrackingUri = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
]
CacheDir = Annotated[str | None, typer.Option("--cache-dir", help="token cache (default ./.kimi-cache)")]
MatrixOpt = Annotated[Path, typer.Option("--matrix", "-m", help="matrix TOML file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="override a matrix field, e.g. --set train.steps=5 "
        "--set optim.adamw.lr=3e-4 (repeatable; validated like the file; part of the trial key)",
    ),
]

ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor", help="local (this process, the default) | ray (every trial a Ray task; pip install -e '.[ray]')"
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="--executor ray: auto | HOST:PORT of a "
        "running cluster (default: $RAY_ADDRESS, else a local "
        "cluster on 127.0.0.1)",
    ),
]


@app.command(context_settings=CONTEXT)
def run(
    matrix: MatrixOpt,
    sets: SetOpt = None,
    tracking_uri: TrackingUri = None,
    out: Annotated[Path, typer.Option(help="checkpoints and per-trial files")] = Path("runs"),
    cache_dir: CacheDir = None,
    tuned: Annotated[bool, typer.Option("--tuned", help="use each arm's best params from its study")] = False,
    study_storage: Annotated[str | None, typer.Option(help="Optuna storage for --tuned")] = None,
    study_prefix: Annotated[
        str | None, typer.Option(help="study name prefix for --tuned (default: the matrix name)")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="validate and size everything and print steps, "
            "tokens, FLOPs, bytes and time per trial; offline, trains nothing",
        ),
    ] = False,
    device: Annotated[str | None, typer.Option(help="override train.device (cpu, cuda, cuda:1)")] = None,
    steps: Annotated[int | None, typer.Option(help="override the step budget")] = None,
    nproc: Annotated[int, typer.Option(help="processes (GPUs) per trial, via torchrun")] = 1,
    peak_tflops: Annotated[float | None, typer.Option(help="device peak for MFU (default: table)")] = None,
    keep_state: Annotated[
        bool,
        typer.Option(
            "--keep-state", help="keep trial_state.pt (optimizer state) after a trial ended; by default it is deleted"
        ),
    ] = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
) -> None:
    """Run a matrix of trials and log them to MLflow (finished trials are skipped on a rerun)."""
    options = dict(locals())  # every option by name: RunOptions has one field per parameter of this command
    from harness.commands import RunOptions
    from harness.commands import run as run_matrix_command
    from harness.signals import terminate_like_ctrl_c

    terminate_like_ctrl_c()  # schedulers stop jobs with SIGTERM: mark the trial killed, as Ctrl-C does

    if nproc > 1 and "LOCAL_RANK" not in os.environ and not dry_run and executor == "local":
        from harness.commands import relaunch_with_torchrun

        raise typer.Exit(
            relaunch_with_torchrun(nproc, sys.argv[1:])
        )  # --executor ray runs multi-process trials through Ray Train instead
    code = run_matrix_command(RunOptions.of(options), console)
    if code:
        raise typer.Exit(code)


@app.command("tune", context_settings=CONTEXT)
def tune_command(
    matrix: MatrixOpt,
    sets: SetOpt = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials",
            help="trials this worker adds to each arm's study (default: until each holds [tune] trials, else 20)",
        ),
    ] = None,
    total_trials: Annotated[
        int | None,
        typer.Option(
            "--total-trials",
            help="stop once each study holds this many complete + pruned (+ running) trials, over all workers",
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage: sqlite file (default ./optuna.db), SQLAlchemy URL, or journal:PATH"),
    ] = None,
    study_prefix: Annotated[
        str | None, typer.Option(help="study names are PREFIX/<variant>+<optimizer> (default: the matrix name)")
    ] = None,
    tracking_uri: TrackingUri = None,
    cache_dir: CacheDir = None,
    out: Annotated[Path, typer.Option(help="per-trial files (checkpoints are deleted after each trial)")] = Path(
        "runs"
    ),
    sampler_seed: Annotated[int, typer.Option(help="TPE seed (re-seeded per trial with the trial number)")] = 0,
    pruner: Annotated[str, typer.Option(help="median | hyperband | none (prunes on eval val loss)")] = "median",
    arms: Annotated[
        list[str] | None, typer.Option("--arms", help="only these arms, e.g. --arms gpt+adamw,kimi+muon (repeatable)")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds; no new trial starts after it")] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="tune at this seed instead of the matrix's first (e.g. one the matrix does not run)"),
    ] = None,
    heartbeat: Annotated[
        int, typer.Option(help="seconds between worker heartbeats; a RUNNING trial silent for 2x this is failed")
    ] = 60,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    n_workers: Annotated[
        int,
        typer.Option(
            "--n-workers",
            help="--executor ray: Optuna workers run as Ray tasks at once; together they add --n-trials per arm",
        ),
    ] = 1,
) -> None:
    """Tune each arm with its own Optuna study: equal trials, same kind of search space, shared storage."""
    import shlex

    from harness.commands import tune as tune_matrix
    from harness.signals import terminate_like_ctrl_c
    from harness.tune import best_params_lines, summary_table

    terminate_like_ctrl_c()
    outcome = tune_matrix(
        matrix,
        list(sets or []),
        console,
        executor=executor,
        ray_address=ray_address,
        n_workers=n_workers,
        n_trials=n_trials,
        total_trials=total_trials,
        storage=storage,
        study_prefix=study_prefix,
        tracking_uri=tracking_uri,
        cache_dir=cache_dir,
        out=out,
        sampler_seed=sampler_seed,
        pruner=pruner,
        arms=arms,
        timeout=timeout,
        seed=seed,
        heartbeat_s=heartbeat,
    )
    console.print(summary_table(outcome))
    for line in best_params_lines(outcome):
        console.print(line, markup=False, highlight=False)
    storage_arg = f" --study-storage {shlex.quote(outcome.storage)}" if storage else ""
    tracking_arg = f" --tracking-uri {shlex.quote(tracking_uri)}" if tracking_uri else ""
    sets_arg = "".join(f" --set {shlex.quote(s)}" for s in sets or [])
    console.print(
        f"next: kimi-bench run --matrix {matrix}{sets_arg} --tuned{storage_arg}{tracking_arg}",
        markup=False,
        highlight=False,
    )
    if outcome.interrupted:
        raise typer.Exit(130)


@app.command(context_settings=CONTEXT)
def params(
    matrix: Annotated[Path | None, typer.Option("--matrix", "-m", help="matrix TOML file")] = None,
    sets: SetOpt = None,
    preset: Annotated[str | None, typer.Option(help="a size preset (all variants)")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary when the preset has none")] = 256,
    cache_dir: CacheDir = None,
    device: Annotated[
        str | None, typer.Option(help="device of the time estimate (default: the matrix's train.device)")
    ] = None,
) -> None:
    """Parameter counts, FLOPs and KV bytes per token of every arm; with a matrix also each trial's steps,
    tokens, training FLOPs, checkpoint and optimizer bytes and estimated time (offline)."""
    from harness.commands import params as show_params

    show_params(matrix, list(sets or []), preset, vocab_size, cache_dir, device, console)


@app.command("list", context_settings=CONTEXT)
def list_cmd() -> None:
    """List variants, optimizers and presets."""
    from harness.commands import registry_table

    console.print(registry_table())


DataCorpus = Annotated[str, typer.Option(help="python-stdlib | text:PATH | tinyshakespeare | tinystories | bin:DIR")]
DataTokenizer = Annotated[str, typer.Option(help="byte | char | bpe | gpt2")]
DataVocab = Annotated[int | None, typer.Option(help="BPE vocabulary")]
DataMaxChars = Annotated[int | None, typer.Option(help="cap the corpus")]
DataMatrix = Annotated[Path | None, typer.Option("--matrix", "-m", help="take the [data] table from a matrix")]


@data_app.command("prepare", context_settings=CONTEXT)
def data_prepare(
    corpus: DataCorpus = "python-stdlib",
    tokenizer: DataTokenizer = "byte",
    vocab_size: DataVocab = None,
    max_chars: DataMaxChars = None,
    matrix: DataMatrix = None,
    cache_dir: CacheDir = None,
) -> None:
    """Tokenize a corpus into the token cache (idempotent: the same inputs give the same hash)."""
    from harness.commands import data_info

    fields = {"corpus": corpus, "tokenizer": tokenizer, "vocab_size": vocab_size, "max_chars": max_chars}
    console.print(data_info(fields, matrix, cache_dir, console))


@data_app.command("info", context_settings=CONTEXT)
def data_info_cmd(
    corpus: DataCorpus = "python-stdlib",
    tokenizer: DataTokenizer = "byte",
    vocab_size: DataVocab = None,
    max_chars: DataMaxChars = None,
    matrix: DataMatrix = None,
    cache_dir: CacheDir = None,
) -> None:
    """Show a prepared corpus: hash, token counts, vocabulary, cache path (prepares it when missing)."""
    data_prepare(corpus, tokenizer, vocab_size, max_chars, matrix, cache_dir)


Checkpoint = Annotated[Path, typer.Option(help="model.pt or a nanoGPT ckpt.pt")]


@app.command(context_settings=CONTEXT)
def generate(
    checkpoint: Checkpoint,
    prompt: Annotated[str, typer.Option(help="text to continue (default: a newline)", show_default=False)] = "\n",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to sample")] = 200,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="sample from the k most likely")] = 200,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    tokenizer: Annotated[str | None, typer.Option(help="override the checkpoint's tokenizer")] = None,
    cache_dir: CacheDir = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Sample text from a trained checkpoint with the KV cache."""
    from harness.measure.trained import sample_text

    text = sample_text(
        checkpoint, prompt, max_new_tokens, temperature, top_k, seed, tokenizer, cache_dir, device, console
    )
    console.print(text, markup=False, highlight=False)


@app.command(
    "bench", add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def bench(ctx: typer.Context) -> None:
    """GPU speed suite: train tokens/s and MFU, MoE vs dense, MLA vs MHA decode, Muon share (bench --help)."""
    from harness.measure.bench.suite import bench_command  # torch-heavy: imported only for this command

    suite = typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, context_settings=CONTEXT
    )
    suite.command()(bench_command)
    typer.main.get_command(suite).main(args=ctx.args, prog_name="kimi-bench bench", standalone_mode=True)


@app.command("bench-infer", context_settings=CONTEXT)
def bench_infer(
    checkpoint: Checkpoint,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated")] = "1,8",
    new_tokens: Annotated[int, typer.Option(help="decode steps")] = 32,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    repeats: Annotated[int, typer.Option(help="timed repeats (median)")] = 5,
) -> None:
    """Inference benchmark of a checkpoint alone: prefill/decode tokens/s, TTFT, KV and checkpoint bytes."""
    from harness.measure.trained import benchmark_table

    console.print(benchmark_table(checkpoint, batch_sizes, new_tokens, device, repeats))


@app.command(context_settings=CONTEXT)
def report(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the matrix name)")],
    tracking_uri: TrackingUri = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default reports/out/<experiment>)")] = None,
    log: Annotated[
        bool,
        typer.Option(
            "--log/--no-log", help="also attach report.md, summary.csv and figures/ to the newest matrix run in MLflow"
        ),
    ] = True,
    all_runs: Annotated[
        bool,
        typer.Option(
            "--all-runs",
            help="show every group of runs (configurations that "
            "differ in more than the seed), each as its own block; default: the "
            "newest matrix invocation",
        ),
    ] = False,
) -> None:
    """Write report.md + figures from what MLflow holds (tables, intervals, claims vs measured)."""
    from harness.stores.tracking import resolve_tracking_uri, strip_credentials
    from reports.publish import publish_report

    publish_report(
        experiment,
        resolve_tracking_uri(tracking_uri),
        out,
        log,
        strip_credentials(" ".join(["kimi-bench", *sys.argv[1:]])),
        console,
        all_runs=all_runs,
    )


@app.command(context_settings=CONTEXT)
def status(
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (the matrix name)")] = None,
    matrix: Annotated[
        Path | None,
        typer.Option("--matrix", "-m", help="matrix TOML file: also lists the trials not started (pending)"),
    ] = None,
    sets: SetOpt = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Each trial's state, last logged step and elapsed time: finished, running, stale (its process is
    gone), killed, failed, diverged, oom, and with --matrix pending (trials matched by trial key)."""
    from harness.status import browse_lines_for, planned_trials, status_table

    console.print(status_table(experiment, matrix, tracking_uri, list(sets or [])))
    for line in browse_lines_for(experiment or planned_trials(matrix)[0], tracking_uri):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("import", context_settings=CONTEXT)
def import_command(
    record: Annotated[Path, typer.Argument(help="a folder written by `run --tracking-uri record:DIR`")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Replay a portable run record into MLflow (idempotent: runs already imported are skipped)."""
    from harness.stores.runrecord import import_record

    with console.status("importing the record") as spinner:
        summary = import_record(
            record, tracking_uri, progress=lambda i, n, name: spinner.update(f"importing run {i}/{n}: {name}")
        )
    console.print(
        f"imported {len(summary.added)} runs, skipped {len(summary.skipped)} already imported, "
        f"redid {len(summary.redone)} half-imported; next: kimi-bench report --experiment NAME"
    )


@app.command(context_settings=CONTEXT)
def export(
    out: Annotated[Path, typer.Option(help="folder to write")],
    run_id: Annotated[str | None, typer.Option("--run", help="a finished trial's MLflow run id")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="model.pt or a nanoGPT ckpt.pt")] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors (every variant) or hf (transformers: "
            "gpt -> GPT2LMHeadModel, kimi -> DeepseekV3ForCausalLM)",
        ),
    ] = "hf",
    tracking_uri: TrackingUri = None,
    cache_dir: CacheDir = None,
) -> None:
    """Write a trained model as safetensors + config, or as a folder transformers' from_pretrained loads."""
    from harness.export import checkpoint_of_run
    from harness.export import export as export_model

    if (run_id is None) == (checkpoint is None):
        raise UserError("--run / --checkpoint: give exactly one (a trial's run id, or a model.pt path)")
    source = checkpoint if checkpoint is not None else checkpoint_of_run(run_id, tracking_uri)
    for line in export_model(source, fmt, out, cache_dir):
        console.print(line, markup=False, highlight=False)


if __name__ == "__main__":
    app()
