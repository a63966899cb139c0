"""The trial loop: perplexity by hand, schedule, resume equals uninterrupted, divergence and failure states."""

import dataclasses
import math

import pytest
import torch

from harness.data import DataConfig, prepare
from harness.spec.registry import TrainConfig, TrialSpec, resolve_dims, resolve_optimizer, shape_key
from harness.trial.evaluation import evaluate
from harness.trial.loop import Trainer, lr_factor, run_trial


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "kimi", "muon", "latent", "expert"]
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (20000,), generator=rng))
    corpus.write_text(text)
    return prepare(DataConfig(corpus=f"text:{corpus}", tokenizer="byte", cache_dir=tmp_path_factory.mktemp("cache")))


def make_spec(variant="kimi", optimizer="adamw", steps=6, **train) -> TrialSpec:
    fields = dict(
        steps=steps,
        micro_batch_size=4,
        eval_interval=3,
        eval_tokens=1024,
        log_interval=2,
        infer_batch_sizes=(1,),
        infer_new_tokens=4,
        warmup_steps=1,
    )
    fields.update(train)
    dims = dataclasses.replace(resolve_dims("tiny", 256), block_size=32)
    return TrialSpec(
        experiment="t",
        variant=variant,
        optimizer=optimizer,
        preset="tiny",
        seed=0,
        dims=dims,
        optim=resolve_optimizer(optimizer, {"lr": 3e-3}),
        train=TrainConfig(**fields),
    )


def test_val_ppl_is_exp_of_mean_token_nll_by_hand(data, tmp_path):
    spec = make_spec("gpt")
    trainer = Trainer(spec, data, tmp_path, run=None)
    got = evaluate(trainer.model, data, spec, trainer.device, None)
    # by hand: every val block of the fixed set, log-softmax, pick the target, average over all tokens
    T, n_tokens = 32, spec.train.eval_tokens
    val = torch.from_numpy(data.val[: (min(n_tokens, len(data.val) - 1) // T) * T + 1].astype("int64"))
    nll, count = 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for start in range(0, len(val) - 1 - T + 1, T):
            x, y = val[start : start + T][None], val[start + 1 : start + T + 1][None]
            logits, _ = trainer.model(x)
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll -= logp[0, torch.arange(T), y[0]].sum().item()
            count += T
    assert count > 0
    assert got["val/loss"] == pytest.approx(nll / count, rel=1e-6)
    assert got["val/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_lr_schedule_warmup_then_cosine_to_min():
    assert lr_factor(0.0, 0.1, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(0.05, 0.1, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(1.0, 0.1, 0.1) == pytest.approx(0.1)


def test_lr_schedule_wsd_by_hand():
    """Warmup 10%, stable at 1 until 80%, then linear to 0.1 over the last 20%: at 90%, 1 - 0.9 * 0.5 = 0.55."""
    wsd = dict(schedule="wsd", cooldown=0.2)
    assert lr_factor(0.05, 0.1, 0.1, **wsd) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.1, **wsd) == 1.0
    assert lr_factor(0.5, 0.1, 0.1, **wsd) == 1.0 and lr_factor(0.8, 0.1, 0.1, **wsd) == 1.0
    assert lr_factor(0.9, 0.1, 0.1, **wsd) == pytest.approx(0.55, abs=1e-12)
    assert lr_factor(0.95, 0.1, 0.1, **wsd) == pytest.approx(1 - 0.9 * 0.75, abs=1e-12)
    assert lr_factor(1.0, 0.1, 0.1, **wsd) == pytest.approx(0.1, abs=1e-12)
    assert lr_factor(0.9, 0.1, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 8 / 9)))  # default


@pytest.mark.parametrize("variant,optimizer", [("kimi", "muonclip"), ("gpt", "adamw")])
def test_resume_from_checkpoint_equals_uninterrupted(data, tmp_path, variant, optimizer):
    straight = run_trial(make_spec(variant, optimizer, steps=6), data, tmp_path / "a", resume=False)
    assert straight.status == "finished", straight.error
    # first half with a checkpoint at step 3, then a "killed" process resumes from it
    half = make_spec(variant, optimizer, steps=6, checkpoint_interval=3)
    trainer = Trainer(half, data, tmp_path / "b", run=None)
    while trainer.state.step < 3:  # the loop of Trainer.train, stopped (as by a kill) after step 3
        trainer.set_lr()
        trainer.train_step()
        trainer.state.step += 1
    trainer.save_state()
    resumed = run_trial(half, data, tmp_path / "b", resume=True)
    assert resumed.status == "finished", resumed.error
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert resumed.metrics["val/loss_final"] == pytest.approx(straight.metrics["val/loss_final"], abs=1e-6)


def test_final_metrics_cover_the_design_names(data, tmp_path):
    result = run_trial(make_spec("kimi", "muonclip"), data, tmp_path, resume=False)
    assert result.status == "finished", result.error
    for key in (
        "params/total",
        "params/active",
        "params/embedding",
        "ckpt/bytes",
        "mem/param_bytes",
        "mem/grad_bytes",
        "mem/optim_state_bytes",
        "train/tokens_per_s",
        "grad/norm_median",
        "grad/norm_p99_over_median",
        "grad/norm_cv",
        "grad/norm_spikes",
        "val/ppl_final",
        "val/bpb_final",
        "moe/load_cv",
        "moe/max_load",
        "attn/max_logit",
    ):
        assert key in result.metrics and math.isfinite(result.metrics[key]), key
    assert result.metrics["params/active"] < result.metrics["params/total"]
    assert result.metrics["ckpt/bytes"] == (tmp_path / "model.pt").stat().st_size
    assert result.metrics["mem/param_bytes"] == 4 * result.metrics["params/total"]  # fp32, tied once
    # speed and CPU memory come from the controlled speed runs, not from a trial
    assert not [k for k in result.metrics if k.startswith("infer/")]
    assert "mem/peak_bytes" not in result.metrics


class FakeRun:
    """What run_trial logs, without a store."""

    run_id = "fake"
    log_seconds = 0.0

    def __init__(self):
        self.tags, self.metrics = {}, []

    def log(self, step, metrics, final=False):
        self.metrics.append((step, dict(metrics), final))

    def set_tags(self, tags):
        self.tags.update(tags)

    def flush(self, wait=True):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def end(self, status):
        self.tags["kb.status"] = status


def test_trial_run_gets_its_shape_tag_and_bpb_at_every_eval(data, tmp_path):
    spec = make_spec("gpt", "muon")
    run = FakeRun()
    result = run_trial(spec, data, tmp_path, run=run, resume=False)
    assert result.status == "finished", result.error
    assert run.tags["kb.shape"] == shape_key("gpt", spec.dims)
    assert run.tags["kb.threads"] == torch.get_num_threads()
    evals = [(step, m) for step, m, final in run.metrics if "val/loss" in m and not final]
    assert [step for step, _ in evals] == [0, 3, 6]
    for _, m in evals:  # byte tokenizer: one byte per token, so bpb is the loss in bits
        assert m["val/bpb"] == pytest.approx(m["val/loss"] / math.log(2), rel=1e-12)
    assert result.metrics["val/bpb_final"] == evals[-1][1]["val/bpb"]


def test_bits_per_byte_equals_a_hand_computation_on_a_multibyte_corpus(tmp_path):
    """A char tokenizer over text with 1- to 4-byte UTF-8 characters: tokens and bytes differ, and
    bpb = sum of token NLLs (nats) / UTF-8 bytes of the evaluated text / ln 2."""
    corpus = tmp_path / "text.txt"
    rng = torch.Generator().manual_seed(0)
    words = ["a", "é", "λόγος", "日本", "🙂", "kimi", "ß"]
    corpus.write_text(
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (6000,), generator=rng)), encoding="utf-8"
    )
    prepared = prepare(DataConfig(corpus=f"text:{corpus}", tokenizer="char", cache_dir=tmp_path / "cache"))
    spec = make_spec("gpt")
    spec = dataclasses.replace(spec, dims=dataclasses.replace(spec.dims, vocab_size=prepared.vocab_size))
    trainer = Trainer(spec, prepared, tmp_path / "out", run=None)
    got = evaluate(trainer.model, prepared, spec, trainer.device, None)
    T = spec.dims.block_size
    n_tokens = (min(spec.train.eval_tokens, len(prepared.val) - 1) // T) * T
    val = torch.from_numpy(prepared.val[: n_tokens + 1].astype("int64"))
    nll = 0.0
    trainer.model.eval()
    with torch.no_grad():
        for start in range(0, n_tokens, T):
            x, y = val[start : start + T][None], val[start + 1 : start + T + 1][None]
            logp = torch.log_softmax(trainer.model(x)[0].double(), dim=-1)
            nll -= logp[0, torch.arange(T), y[0]].sum().item()
    text = "".join(prepared.tokenizer.chars[i] for i in prepared.val[:n_tokens].tolist())
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > 1.3 * n_tokens  # the corpus really is multi-byte
    assert got["val/bpb"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-6)


def test_diverging_lr_ends_as_diverged_with_step(data, tmp_path):
    spec = make_spec("gpt", "adamw", steps=40, grad_clip=0.0, log_interval=1)
    spec = dataclasses.replace(spec, optim=resolve_optimizer("adamw", {"lr": 1e6, "weight_decay": 0.0}))
    result = run_trial(spec, data, tmp_path, resume=False)
    assert result.status == "diverged", (result.status, result.error)
    assert 1 <= result.metrics["train/diverged_step"] <= 40


def test_other_errors_end_as_failed_not_raised(data, tmp_path, monkeypatch):
    import harness.trial.loop as trial

    def boom(*a, **k):
        raise RuntimeError("simulated crash\nsecond line")

    monkeypatch.setattr(trial.Trainer, "save_model", boom)
    result = run_trial(make_spec("gpt", "adamw", steps=2), data, tmp_path, resume=False)
    assert result.status == "failed" and result.error == "RuntimeError: simulated crash"
    assert "Traceback" in (tmp_path / "error.txt").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trial_logs_its_own_peak_memory(data, tmp_path):
    result = run_trial(make_spec("kimi", "adamw", device="cuda"), data, tmp_path, resume=False)
    assert result.status == "finished", result.error
    m = result.metrics
    assert m["mem/peak_bytes"] > m["mem/param_bytes"] + m["mem/grad_bytes"] + m["mem/optim_state_bytes"]


def test_a_compiled_trial_trains_through_the_wrapper(data, tmp_path, monkeypatch):
    """train.compile = true wraps the model in torch.compile's OptimizedModule; on CPU the eager backend builds
    that wrapper without inductor's minutes of codegen, and the trial must train through it to the eager
    trial's val loss (the wrapper once broke every compiled step: bool() on it raised). gpt: on CPU, tracing
    the MoE's grouped_mm with fake tensors has no meta kernel; tests/test_cuda.py compiles the MoE on a GPU."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    compiled = run_trial(make_spec("gpt", "muon", steps=4, compile=True), data, tmp_path / "c", resume=False)
    eager = run_trial(make_spec("gpt", "muon", steps=4), data, tmp_path / "e", resume=False)
    assert compiled.status == "finished", compiled.error
    assert compiled.metrics["val/loss_final"] == pytest.approx(eager.metrics["val/loss_final"], abs=1e-5)
