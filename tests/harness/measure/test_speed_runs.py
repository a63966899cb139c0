"""Controlled speed/memory runs: shape keys, exact memory facts, order-independent CPU peak memory, the cache
rewind of the decode timer, throughput spread, and the speed runs as MLflow children of the matrix run."""

import dataclasses
import hashlib
import json

import pytest
import torch

from arch.counting import count_params, kv_cache_bytes_per_token
from harness.measure.bench.timing import Timing
from harness.measure.inference import InferenceShape, decode_fn, throughput
from harness.measure.speed_runs import (
    frozen_optimizer,
    group_shapes,
    log_speed,
    measure_speed,
    step_peak_bytes,
    train_step_fns,
)
from harness.spec.registry import (
    TrainConfig,
    TrialSpec,
    build_model,
    resolve_dims,
    resolve_optimizer,
    shape_key,
    variant_params,
)
from harness.trial.metrics import memory_facts

VOCAB = 256
BATCH_SIZES = (1, 2)


def make_spec(variant="gpt", optimizer="adamw", micro_batch_size=4, **dims) -> TrialSpec:
    d = dataclasses.replace(resolve_dims("tiny", VOCAB), block_size=32, **dims)
    return TrialSpec(
        experiment="m",
        variant=variant,
        optimizer=optimizer,
        preset="tiny",
        seed=0,
        dims=d,
        optim=resolve_optimizer(optimizer, {"lr": 3e-3}),
        train=TrainConfig(
            steps=2, micro_batch_size=micro_batch_size, infer_batch_sizes=BATCH_SIZES, infer_new_tokens=4
        ),
    )


def batch(spec: TrialSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, VOCAB, (spec.train.micro_batch_size, spec.dims.block_size + 1), generator=g)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def test_shape_key_is_the_variant_and_logged_model_params():
    a, b = make_spec("gpt", "adamw"), make_spec("gpt", "muon")
    assert shape_key(a.variant, a.dims) == shape_key(b.variant, b.dims)  # two optimizers, one shape
    blob = {"variant": "gpt", **{f"model.{k}": v for k, v in variant_params("gpt", a.dims).items()}}
    by_hand = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert shape_key("gpt", a.dims) == by_hand and len(by_hand) == 12
    wider = make_spec("gpt", dim=96)
    assert shape_key("gpt", wider.dims) != by_hand
    assert shape_key("kimi", a.dims) != by_hand
    # a field gpt does not use (MoE experts) does not change gpt's shape
    assert shape_key("gpt", make_spec("gpt", n_routed_experts=8).dims) == by_hand


def test_group_shapes_one_group_per_shape_with_its_optimizers():
    trials = [make_spec(v, o) for v in ("gpt", "kimi") for o in ("adamw", "muon", "muonclip")]
    trials.append(make_spec("gpt", "adamw"))  # a second seed of an arm: same shape, same optimizer
    groups = group_shapes(trials)
    assert [g.variant for g in groups] == ["gpt", "kimi"]
    assert [list(g.optims) for g in groups] == [["adamw", "muon", "muonclip"]] * 2


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_memory_facts_equal_a_hand_count(optimizer):
    spec = make_spec("gpt", optimizer)
    model = build_model(spec.variant, spec.dims)
    opt = spec.optim.build(model)
    fns = train_step_fns(model, opt, *batch(spec), None, 1.0, False)
    fns["step"]()
    facts = memory_facts(model, opt)
    n_params = count_params(model).total  # tied embedding counted once
    assert facts["mem/param_bytes"] == 4 * n_params
    assert facts["mem/grad_bytes"] == 4 * n_params
    # by hand from the param groups: AdamW keeps exp_avg, exp_avg_sq (fp32) and a 4-byte step per tensor;
    # Muon keeps one momentum buffer per matrix
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            expected += 4 * p.numel() if group.get("use_muon") else 8 * p.numel() + 4
    assert facts["mem/optim_state_bytes"] == expected


@pytest.mark.slow
def test_frozen_optimizer_keeps_the_weights_fixed_across_repeats():
    spec = make_spec("kimi", "muonclip")
    model = build_model(spec.variant, spec.dims)
    before = {k: v.clone() for k, v in model.state_dict().items() if "bias" not in k and "load" not in k}
    fns = train_step_fns(model, frozen_optimizer(spec.optim, model), *batch(spec), None, 1.0, True)
    for _ in range(3):
        fns["step"]()
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_cpu_peak_memory_is_independent_of_order_and_of_what_ran_before():
    """The same shape measured twice gives the same peak (within 5%), in either order, even after the process
    allocated (and freed) far more than one step needs; a bigger batch needs more."""
    a, b = make_spec("gpt", "adamw"), make_spec("kimi", "muon")
    cpu = torch.device("cpu")

    def peak(spec):
        return step_peak_bytes(group_shapes([spec])[0], spec.optimizer, *batch(spec), cpu, None)

    first = {"a": peak(a), "b": peak(b)}
    junk = torch.ones(64 * 2**20 // 4)  # 64 MiB the process holds, then frees: RSS would remember it
    del junk
    second = {"b": peak(b), "a": peak(a)}
    for name in ("a", "b"):
        assert second[name] == pytest.approx(first[name], rel=0.05), (name, first, second)
    # the peak holds at least the parameters, one gradient each, the optimizer state and the logits
    model = build_model(a.variant, a.dims)
    opt = a.optim.build(model)
    train_step_fns(model, opt, *batch(a), None, 1.0, False)["step"]()
    facts = memory_facts(model, opt)
    logits = 4 * a.train.micro_batch_size * a.dims.block_size * VOCAB
    assert first["a"] > facts["mem/param_bytes"] + facts["mem/grad_bytes"] + facts["mem/optim_state_bytes"] + logits
    big = dataclasses.replace(a, train=dataclasses.replace(a.train, micro_batch_size=16))
    assert peak(big) > first["a"] + 3 * logits  # 4x the batch: at least 3 more logits tensors at the peak


@pytest.mark.slow
def test_matrix_measures_each_shape_once_and_cpu_peak_does_not_depend_on_order():
    """measure_speed on the matrix (gpt, kimi) x (adamw, muon) and on the same trials in the opposite order."""
    trials = [make_spec(v, o) for v in ("gpt", "kimi") for o in ("adamw", "muon")]
    kwargs = {"min_rounds": 2, "max_seconds": 0.0, "sample_s": 0.0, "warmup": 1}
    forward = measure_speed(trials, VOCAB, torch.device("cpu"), **kwargs)
    backward = measure_speed(trials[::-1], VOCAB, torch.device("cpu"), **kwargs)
    assert [r.group.variant for r in forward] == ["gpt", "kimi"]
    assert [r.group.variant for r in backward] == ["kimi", "gpt"]
    by_variant = {r.group.variant: r.metrics for r in backward}
    for r in forward:
        other = by_variant[r.group.variant]
        for opt in ("adamw", "muon"):
            key = f"speed/{opt}/peak_bytes"
            assert other[key] == pytest.approx(r.metrics[key], rel=0.05), key
        m = r.metrics
        model = build_model(r.group.variant, r.group.dims)
        assert m["speed/kv_bytes_per_token"] == kv_cache_bytes_per_token(model, 4)  # fp32 cache on CPU
        expected = ["speed/prefill_tokens_per_s", "speed/ttft_s"]
        expected += [f"speed/decode_tokens_per_s_b{b}" for b in BATCH_SIZES]
        expected += [
            f"speed/{o}/{k}"
            for o in ("adamw", "muon")
            for k in ("step_s", "fwd_bwd_s", "optim_s", "train_tokens_per_s")
        ]
        for key in expected:
            assert m[key] > 0 and m[f"{key}_iqr"] >= 0 and m[f"{key}_n"] >= 1, key
        tokens = trials[0].train.micro_batch_size * trials[0].dims.block_size
        assert m["speed/adamw/train_tokens_per_s"] == pytest.approx(tokens / m["speed/adamw/step_s"])
        assert m["speed/prefill_tokens_per_s"] == pytest.approx(r.settings["prompt_len"] / m["speed/ttft_s"])
        assert r.threads == 1 and m["speed/rounds"] == 2 and m["speed/timing_s"] > 0  # CPU: one thread
        # ratios against the other shape, n = 2 rounds (no interval yet): one per kind, steps of any optimizer
        other = next(o.group.key for o in forward if o is not r)
        ratios = {k for k in m if k.startswith("speed/ratio/") and not k.endswith(("_n", "_lo", "_hi"))}
        kinds = ["prefill_tokens_per_s"] + [f"decode_tokens_per_s_b{b}" for b in BATCH_SIZES]
        expected_ratios = {f"speed/ratio/{k}/vs/{other}/{k}" for k in kinds}
        expected_ratios |= {
            f"speed/ratio/{a}/train_tokens_per_s/vs/{other}/{b}/train_tokens_per_s"
            for a in ("adamw", "muon")
            for b in ("adamw", "muon")
        }
        assert ratios == expected_ratios
        for k in ratios:
            assert m[k] > 0 and m[k + "_n"] == 2 and k + "_lo" not in m
    # A/B on A's run is 1 / (B/A) on B's: the same rounds
    g, k = forward[0], forward[1]
    key = f"speed/ratio/decode_tokens_per_s_b1/vs/{k.group.key}/decode_tokens_per_s_b1"
    back = f"speed/ratio/decode_tokens_per_s_b1/vs/{g.group.key}/decode_tokens_per_s_b1"
    assert g.metrics[key] == pytest.approx(1 / k.metrics[back])


def test_throughput_spread_maps_the_iqr_through_tokens_over_time():
    rate, spread = throughput(100.0, Timing(median_s=0.1, iqr_s=0.02, n=9))
    assert rate == pytest.approx(1000.0)
    assert spread == pytest.approx(100 / 0.09 - 100 / 0.11)
    assert throughput(100.0, Timing(0.1, 0.0, 1)) == (pytest.approx(1000.0), 0.0)


def test_throughput_spread_of_skewed_times_uses_the_real_quartiles():
    """A few slow blocks (a busy host): IQR > 2 x median, so median - IQR/2 < 0; the real quartiles keep the
    spread finite (it was logged as inf, which MLflow stores as 1.8e308 and the report printed in full)."""
    t = Timing.of([0.01, 0.01, 0.012, 0.2, 0.3])
    assert (t.q1_s, t.median_s, t.q3_s) == (0.01, 0.012, 0.2) and t.iqr_s > 2 * t.median_s
    rate, spread = throughput(100.0, t)
    assert rate == pytest.approx(100 / 0.012) and spread == pytest.approx(100 / 0.01 - 100 / 0.2)


@pytest.mark.parametrize("variant", ["gpt", "kimi"])
def test_decode_timer_rewinds_the_cache_to_the_same_state(variant):
    """Every timed decode call starts from the prompt's cache: the logits of its last step are the same on each
    call and equal the uncached forward of the whole sequence (prompt + the repeated decode token)."""
    spec = make_spec(variant)
    torch.manual_seed(0)
    model = build_model(variant, spec.dims).eval()
    shape = InferenceShape.for_block(spec.dims.block_size, 4)
    prompt = torch.randint(0, VOCAB, (2, shape.prompt_len), generator=torch.Generator().manual_seed(1))
    captured = []
    model.register_forward_hook(lambda m, args, out: captured.append(out[0][:, -1].detach().clone()))
    run = decode_fn(model, prompt, shape, None)
    run()
    first = captured[-1]
    run()
    torch.testing.assert_close(captured[-1], first, rtol=0, atol=0)
    full = torch.cat([prompt, prompt[:, -1:].expand(2, shape.new_tokens)], dim=1)
    with torch.no_grad():
        reference = model(full)[0][:, -1]
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_speed_runs_are_children_of_the_matrix_run(tmp_path):
    from harness.stores.tracking import Tracker

    trials = [make_spec("gpt", "adamw"), make_spec("gpt", "muon")]
    results = measure_speed(trials, VOCAB, torch.device("cpu"), min_rounds=1, max_seconds=0.0, warmup=1, memory=False)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker.ensure_experiment("m")
    parent = tracker.start_parent(exp, "m", "kimi-bench run", {"kb.device": "cpu"})
    (run_id,) = log_speed(tracker, exp, parent, results, {"kb.device": "cpu"})
    run = tracker.client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["kb.kind"] == "speed" and tags["mlflow.parentRunId"] == parent and tags["kb.parent_run"] == parent
    assert tags["kb.shape"] == shape_key("gpt", trials[0].dims) and tags["kb.optimizers"] == "adamw,muon"
    assert tags["kb.threads"] == "1" and tags["kb.status"] == "finished"
    assert tags["kb.cpus"] == results[0].cpus
    assert tags["kb.variant"] == "gpt" and tags["kb.preset"] == "tiny" and tags["kb.device"] == "cpu"
    assert run.data.params["model.dim"] == str(trials[0].dims.dim)
    assert metrics == results[0].metrics
    assert run.info.status == "FINISHED"


def test_cpu_measurement_pins_one_thread_and_restores():
    import os

    from harness.measure.speed_runs import _pinned

    before_threads = torch.get_num_threads()
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with _pinned(torch.device("cpu"), 1) as cpus:
        assert torch.get_num_threads() == 1
        if before is not None:
            assert cpus == str(max(before)) and os.sched_getaffinity(0) == {max(before)}
    assert torch.get_num_threads() == before_threads
    if before is not None:
        assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("text, expected", [(None, 30.0), ("5", 5.0), ("0", 0.0), ("-1", 30.0), ("soon", 30.0)])
def test_max_seconds_setting_from_the_environment(monkeypatch, text, expected):
    from rich.console import Console

    from harness.measure.speed_runs import MAX_SECONDS, max_seconds_setting

    assert MAX_SECONDS == 30.0
    if text is None:
        monkeypatch.delenv("KB_SPEED_MAX_SECONDS", raising=False)
    else:
        monkeypatch.setenv("KB_SPEED_MAX_SECONDS", text)
    console = Console(record=True, width=200)
    assert max_seconds_setting(console) == expected
    said = console.export_text()
    assert ("KB_SPEED_MAX_SECONDS" in said) == (text in ("-1", "soon"))
