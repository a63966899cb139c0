"""One training trial: build, train on the budget, evaluate, checkpoint, log.

The loop is the same on CPU and CUDA (bf16 autocast there). Per-step values stay on the device and are read
once per `log_interval` steps, so the hot path has no host-device sync. A trial ends in one status:
finished | diverged (non-finite loss; the step is recorded) | oom | killed (Ctrl-C: re-raised so the matrix
stops) | failed (any other error) | pruned (Optuna). Checkpoints are written to a temporary file and renamed,
so a kill at any moment leaves either the old or the new checkpoint, never a torn one.

Speed and CPU memory are not measured here: a trial's wall clock depends on what else the machine runs, so
`harness.measure.speed_runs` benchmarks every model shape of a matrix once, under control (the speed runs). A trial logs
what it observes (`train/tokens_per_s`, observed during training), the exact memory facts of its model and
optimizer (`mem/param_bytes`, `mem/grad_bytes`, `mem/optim_state_bytes`) and, on CUDA, `mem/peak_bytes`
(torch.cuda.max_memory_allocated since the trial's start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from arch.counting import count_params, flops_per_token
from arch.moe import load_stats, moe_modules
from arch.muon import enable_max_logit_tracking
from harness import schema
from harness.data import PreparedData, TokenBatches
from harness.schema import TAG_MODEL_PATH
from harness.spec.registry import TrialSpec, build_model, shape_key
from harness.stores.curves import write_curves
from harness.stores.tracking import TrackingLost, TrialRun
from harness.trial.dist import DistInfo, all_reduce_
from harness.trial.evaluation import LoadMeter, evaluate
from harness.trial.files import HISTORY_KEYS, TrainState, atomic_save, save_loss_curve
from harness.trial.metrics import device_peak_flops, grad_norm_summary, loss_spike_count, memory_facts, mfu
from harness.trial.schedule import lr_factor
from harness.trial.step import autocast_dtype, resolve_device, synchronize, train_step

STATE_FILE = "trial_state.pt"  # resume point: model, optimizer, step, RNG, histories
MODEL_FILE = "model.pt"  # final weights + config: what `ckpt/bytes` measures and `generate` loads


class Diverged(Exception):
    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite training loss {value} at step {step}")
        self.step = step


class Pruned(Exception):
    """Raised by an on_eval callback (Optuna) to stop a trial early."""


@dataclass
class TrialResult:
    status: str
    trial_key: str
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    error: str | None = None
    out_dir: Path | None = None


class Trainer:
    """Holds the pieces of one trial so the loop reads top to bottom."""

    def __init__(
        self,
        spec: TrialSpec,
        data: PreparedData,
        out_dir: Path,
        run: TrialRun | None,
        dist_info: DistInfo = DistInfo(),
        progress: Callable[[int, int | None, dict], None] | None = None,
        on_eval: Callable[[int, dict], None] | None = None,
        peak_tflops: float | None = None,
    ):
        self.spec, self.data, self.out_dir, self.run = spec, data, out_dir, run
        out_dir.mkdir(parents=True, exist_ok=True)
        self.dist, self.progress, self.on_eval = dist_info, progress, on_eval
        self.device = resolve_device(spec.train.device)
        if self.device.type == "cuda" and dist_info.enabled:
            self.device = torch.device("cuda", dist_info.local_rank)
        self.amp = autocast_dtype(spec.train.dtype, self.device)
        self.peak_flops = device_peak_flops(self.device, peak_tflops)
        self.total_steps = spec.train.total_steps(spec.dims.block_size, dist_info.world_size)
        self.state = TrainState()

        torch.manual_seed(spec.seed)  # init seed; data order has its own seed (TokenBatches)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = build_model(spec.variant, spec.dims).to(self.device)
        self.optimizer = spec.optim.build(self.model)
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        enable_max_logit_tracking(self.model, spec.optimizer == "muonclip")
        self.train_model = self.model
        if dist_info.enabled:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            if moe_modules(self.model):  # experts that get no token in a step have no gradient
                ddp_kwargs["find_unused_parameters"] = True
            self.train_model = nn.parallel.DistributedDataParallel(self.model, **ddp_kwargs)
        if spec.train.compile:
            self.train_model = torch.compile(self.train_model)
        self.batches = TokenBatches(
            data.train,
            spec.dims.block_size,
            spec.train.micro_batch_size,
            spec.train.grad_accum,
            spec.effective_data_seed,
            dist_info.world_size,
        )
        self.tokens_per_step = spec.train.tokens_per_step(spec.dims.block_size, dist_info.world_size)
        self.moe = moe_modules(self.model)
        self.load_meter = LoadMeter(self.model)
        self.counts = count_params(self.model)
        self.flops_per_token = flops_per_token(self.model, spec.dims.block_size)

    # ------------------------------------------------------------------ checkpoint / resume
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    def save_state(self) -> None:
        if not self.dist.is_main:
            return
        if self.run is not None:
            self.run.flush()  # metrics up to this step reach MLflow before the resume point moves past them
        atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "train_state": dataclasses.asdict(self.state),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "trial_key_spec": json.dumps(self.spec.flat_params(), sort_keys=True, default=str),
            },
            self.state_path(),
        )

    def load_state(self) -> bool:
        path = self.state_path()
        if not path.is_file():
            return False
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["train_state"])
        for key in HISTORY_KEYS:  # a checkpoint of an older version kept fewer curves
            self.state.history.setdefault(key, [])
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if ckpt["rng_cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])
        return True

    # ------------------------------------------------------------------ the loop
    def budget_progress(self) -> float:
        if self.total_steps is not None:
            return self.state.step / self.total_steps
        return self.state.train_seconds / self.spec.train.seconds

    def done(self) -> bool:
        return self.budget_progress() >= 1.0

    def set_lr(self) -> float:
        t = self.spec.train
        use_steps = t.warmup_steps is not None and self.total_steps
        warmup = t.warmup_steps / self.total_steps if use_steps else t.warmup_frac
        factor = lr_factor(self.budget_progress(), warmup, t.min_lr_ratio, t.schedule, t.cooldown_frac)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches (harness.trial.step.train_step); returns (mean loss,
        grad norm) on device."""
        accum = self.spec.train.grad_accum
        micro_batches = (self.batch(micro) for micro in range(accum))
        loss_mean, grad_norm = train_step(
            self.model,
            self.optimizer,
            micro_batches,
            self.amp,
            self.spec.train.grad_clip,
            n_micro=accum,
            forward=self.train_model,
            moe=self.moe,
            no_sync=self.train_model.no_sync if self.dist.enabled else None,
            on_micro=self.load_meter.add if self.moe else None,
            reduce=all_reduce_,
        )
        if self.dist.enabled:
            loss_mean = all_reduce_(loss_mean) / self.dist.world_size
        return loss_mean, grad_norm

    def batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.get(self.state.step, micro, self.dist.rank)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def log(self, step: int, metrics: dict[str, float], final: bool = False) -> None:
        if self.run is not None and self.dist.is_main:
            self.run.log(step, metrics, final=final)

    def flush_window(self, pending: list, window_start: float, window_tokens: int) -> None:
        """Read the window's per-step values (one sync), check divergence, log step metrics."""
        synchronize(self.device)
        now = time.perf_counter()
        window_seconds = now - window_start
        base_seconds = self.state.train_seconds
        self.state.train_seconds += window_seconds
        if window_seconds > 0 and window_tokens:
            self.state.window_rates.append(window_tokens / window_seconds)
        values = torch.stack([torch.stack([loss, norm.float()]) for _, loss, norm, _, _ in pending]).cpu()
        for (step, _, _, lr_factor_, t_step), (loss, norm) in zip(pending, values.tolist(), strict=True):
            if not math.isfinite(loss):
                raise Diverged(step, loss)
            self.state.losses.append(loss)
            self.state.grad_norms.append(norm)
            tokens = step * self.tokens_per_step
            elapsed = base_seconds + (t_step - window_start)
            self.state.history[schema.TRAIN_LOSS].append((step, loss))
            self.state.history[schema.TRAIN_ELAPSED].append((step, elapsed))
            self.log(
                step,
                {
                    schema.TRAIN_LOSS: loss,
                    schema.GRAD_NORM: norm,
                    schema.TRAIN_LR_FACTOR: lr_factor_,
                    schema.TRAIN_LR: lr_factor_ * self.optimizer.param_groups[0]["base_lr"],
                    schema.TRAIN_TOKENS: tokens,
                    schema.TRAIN_ELAPSED: elapsed,
                    schema.TRAIN_TOKENS_PER_S: self.state.window_rates[-1] if self.state.window_rates else None,
                },
            )

    def run_eval(self) -> dict[str, float]:
        metrics = evaluate(self.model, self.data, self.spec, self.device, self.amp)
        if self.moe:
            loads = self.load_meter.read()
            stats = [load_stats(load) for load in loads if load.sum() > 0]
            if stats:
                metrics[schema.MOE_LOAD_CV] = sum(s["load_cv"] for s in stats) / len(stats)
                metrics[schema.MOE_MAX_LOAD] = max(s["max_load"] for s in stats)
            for layer, load in enumerate(loads):
                total = float(load.sum())
                if total == 0:  # nothing routed since the last eval (the step-0 eval)
                    continue
                for expert, value in enumerate(load.tolist()):
                    self.state.moe_rows.append((self.state.step, layer, expert, value / total))
        self.state.history[schema.VAL_LOSS].append((self.state.step, metrics[schema.VAL_LOSS]))
        self.state.last_eval = metrics
        self.log(self.state.step, metrics)
        if self.run is not None and self.dist.is_main:
            self.run.flush(wait=False)
        if self.on_eval is not None:
            self.on_eval(self.state.step, metrics)
        return metrics

    def train(self) -> None:
        t = self.spec.train
        pending: list = []
        window_start = time.perf_counter()
        window_steps = 0
        while not self.done():
            lr = self.set_lr()
            loss, norm = self.train_step()
            self.state.step += 1
            self.state.tokens += self.tokens_per_step
            window_steps += 1
            pending.append((self.state.step, loss, norm, lr, time.perf_counter()))
            last = self.done() if self.total_steps is not None else False
            if (
                self.total_steps is None
                or len(pending) >= t.log_interval
                or last
                or self.state.step % t.eval_interval == 0
            ):
                self.flush_window(pending, window_start, window_steps * self.tokens_per_step)
                pending, window_steps = [], 0
                last = self.done()
                if self.progress:
                    self.progress(
                        self.state.step,
                        self.total_steps,
                        {
                            "loss": self.state.losses[-1],
                            "tok/s": self.state.window_rates[-1] if self.state.window_rates else 0.0,
                        },
                    )
                if self.state.step % t.eval_interval == 0 or last:
                    self.run_eval()
                if t.checkpoint_interval and self.state.step % t.checkpoint_interval == 0 and not last:
                    self.save_state()
                window_start = time.perf_counter()

    # ------------------------------------------------------------------ after training
    def final_metrics(self) -> dict[str, float]:
        s = self.state
        rates = s.window_rates[1:] or s.window_rates  # the first window holds warm-up / compilation
        tokens_per_s = sum(rates) / len(rates) if rates else 0.0
        out: dict[str, float] = {
            schema.PARAMS_TOTAL: self.counts.total,
            schema.PARAMS_ACTIVE: self.counts.active,
            schema.PARAMS_EMBEDDING: self.counts.embedding,
            schema.FLOPS_PER_TOKEN: self.flops_per_token,
            schema.TRAIN_TOKENS_PER_S: tokens_per_s,
            schema.TRAIN_SECONDS: s.train_seconds,
            schema.TRAIN_TOKENS: s.tokens,
            schema.TRAIN_LOSS_SPIKES: float(loss_spike_count(s.losses)),
        }
        out.update(grad_norm_summary(s.grad_norms))
        out.update(memory_facts(self.model, self.optimizer))
        if s.last_eval:
            out[schema.VAL_LOSS_FINAL] = s.last_eval[schema.VAL_LOSS]
            out[schema.VAL_PPL_FINAL] = s.last_eval[schema.VAL_PPL]
            if schema.VAL_BPB in s.last_eval:
                out[schema.VAL_BPB_FINAL] = s.last_eval[schema.VAL_BPB]
            for key in (schema.MOE_LOAD_CV, schema.MOE_MAX_LOAD, schema.ATTN_MAX_LOGIT):
                if key in s.last_eval:
                    out[key] = s.last_eval[key]
        if self.moe:
            out[schema.MOE_DROPPED] = 0.0  # dropless dispatch: every routed (token, expert) pair is computed
        achieved = mfu(self.flops_per_token, tokens_per_s, self.peak_flops)
        if achieved is not None:
            out[schema.TRAIN_MFU] = achieved
        return out

    def save_model(self) -> int:
        payload = {
            "model": self.model.state_dict(),
            "variant": self.spec.variant,
            "dims": dataclasses.asdict(self.spec.dims),
            "data": self.spec.data,
            "data_hash": self.data.data_hash,
        }
        return atomic_save(payload, self.out_dir / MODEL_FILE)

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """(step, value) per key of CURVE_KEYS: the kept histories, plus grad norms (logged with each loss, in the
        same order) and tokens (step x tokens per step), derived rather than stored twice."""
        h = self.state.history
        steps = [step for step, _ in h[schema.TRAIN_LOSS]]
        return {
            **h,
            schema.GRAD_NORM: list(zip(steps, self.state.grad_norms, strict=True)),
            schema.TRAIN_TOKENS: [(step, step * self.tokens_per_step) for step in steps],
        }

    def log_curves(self) -> None:
        """The thinned curves artifact and the `kb.curves` tag (harness/stores/curves.py), whatever the status, so
        that a report reads a diverged or killed run's curves as it reads a finished one's."""
        if self.run is None or not self.dist.is_main or not self.state.step:
            return
        path = write_curves(self.out_dir / schema.ARTIFACT_CURVES, self.curves())
        self.run.log_artifact(path)
        self.run.set_tags({schema.TAG_CURVES: schema.ARTIFACT_CURVES})

    def write_artifacts(self, final: dict[str, float]) -> None:
        if self.run is None or not self.dist.is_main:
            return
        config = self.out_dir / "config.json"
        config.write_text(
            json.dumps({"spec": self.spec.flat_params(), "final": final}, indent=2, sort_keys=True, default=str)
        )
        self.run.log_artifact(config)
        curve = self.out_dir / "loss_curve.png"
        save_loss_curve(self.state.history, curve, f"{self.spec.name}")
        self.run.log_artifact(curve)
        if self.state.moe_rows:
            csv = self.out_dir / schema.ARTIFACT_MOE_LOAD
            csv.write_text(
                "step,layer,expert,load\n"
                + "".join(f"{s},{layer},{e},{v:.6g}\n" for s, layer, e, v in self.state.moe_rows)
            )
            self.run.log_artifact(csv)


def run_trial(
    spec: TrialSpec,
    data: PreparedData,
    out_dir: Path,
    run: TrialRun | None = None,
    dist_info: DistInfo = DistInfo(),
    progress=None,
    on_eval=None,
    resume: bool = True,
    peak_tflops: float | None = None,
) -> TrialResult:
    """Train one trial to its budget and log everything; never raises except KeyboardInterrupt."""
    key = spec.key(data.data_hash)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = TrialResult(status=schema.FAILED, trial_key=key, run_id=run.run_id if run else None, out_dir=out_dir)
    trainer = None
    try:
        trainer = Trainer(spec, data, out_dir, run, dist_info, progress, on_eval, peak_tflops)
        if trainer.device.type == "cuda":  # this trial's peak alone, not the process's
            torch.cuda.reset_peak_memory_stats(trainer.device)
        resumed = resume and trainer.load_state()
        if run is not None and dist_info.is_main:
            # CPU results depend on the thread count (reduction order), e.g. 2 threads locally, 1 in a Ray task
            tags = {schema.TAG_SHAPE: shape_key(spec.variant, spec.dims), schema.TAG_THREADS: torch.get_num_threads()}
            if resumed:
                tags[schema.TAG_RESUMED_FROM_STEP] = trainer.state.step
            run.set_tags(tags)
        if trainer.state.step == 0:  # every rank: the eval's MoE load stats are all-reduced
            trainer.run_eval()  # step 0: the untrained model (loss should be near ln(vocab))
        trainer.train()
        final = trainer.final_metrics()
        if trainer.device.type == "cuda":
            final[schema.MEM_PEAK] = float(torch.cuda.max_memory_allocated(trainer.device))
        if dist_info.is_main:
            final[schema.CKPT_BYTES] = trainer.save_model()
            if run is not None:
                run.set_tags({TAG_MODEL_PATH: str((out_dir / MODEL_FILE).absolute())})
                run.flush()
                final[schema.TRACK_LOG_S] = run.log_seconds
                final[schema.TRACK_OVERHEAD_FRAC] = run.log_seconds / max(trainer.state.train_seconds, 1e-9)
        trainer.log(trainer.state.step, final, final=True)
        trainer.write_artifacts(final)
        trainer.save_state()  # the finished state: a rerun with a longer budget could continue from it
        result.status, result.metrics = schema.FINISHED, final
    except Diverged as e:
        result.status, result.error = schema.DIVERGED, str(e)
        result.metrics = {schema.TRAIN_DIVERGED_STEP: e.step}
        if trainer is not None:
            trainer.log(e.step, result.metrics, final=True)
    except Pruned as e:
        result.status, result.error = schema.PRUNED, str(e)
    except torch.OutOfMemoryError as e:
        result.status, result.error = schema.OOM, str(e).splitlines()[0]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except KeyboardInterrupt:
        from harness.signals import interrupt_name

        result.status, result.error = schema.KILLED, f"interrupted ({interrupt_name()})"
        _finish_run(run, result, trainer)
        raise
    except TrackingLost as e:  # the store is gone: nothing more can be logged; the caller stops the matrix
        result.status, result.error = schema.FAILED, str(e)
    except Exception as e:  # isolate the failure: the matrix goes on with the next trial
        result.status = schema.FAILED
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        (out_dir / "error.txt").write_text(traceback.format_exc())
        if run is not None:
            with contextlib.suppress(Exception):
                run.log_artifact(out_dir / "error.txt")
    _finish_run(run, result, trainer)
    return result


def _finish_run(run: TrialRun | None, result: TrialResult, trainer: Trainer | None) -> None:
    if trainer is not None:
        result.step = trainer.state.step
    if run is None:
        return
    if trainer is not None:
        with contextlib.suppress(Exception):  # never lose the status over a figure's data
            trainer.log_curves()
    tags = {schema.TAG_FINAL_STEP: result.step}
    if result.error:
        tags[schema.TAG_ERROR] = result.error[: schema.ERROR_CHARS]
    with contextlib.suppress(Exception):
        run.set_tags(tags)
    try:
        run.end(result.status)
    except TrackingLost as e:  # the run stays RUNNING in the store; the next `run` resumes it from its checkpoint
        if result.status != schema.KILLED:
            result.status = schema.FAILED
        result.error = result.error if result.error and TrackingLost.PREFIX in result.error else str(e)
