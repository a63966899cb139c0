import time

import pytest

from harness.errors import suggest
from harness.measure.bench.timing import NOISY_REL_IQR, Timing, time_interleaved


def test_timing_of_matches_hand_quantiles():
    t = Timing.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t.median_s == 3.0
    assert t.iqr_s == pytest.approx(2.0)  # inclusive quartiles of 1..5: 2 and 4
    assert t.n == 5
    assert t.rel_iqr == pytest.approx(2 / 3)


def test_noisy_flag_threshold():
    steady = Timing(median_s=1.0, iqr_s=NOISY_REL_IQR * 0.9, n=10)
    noisy = Timing(median_s=1.0, iqr_s=NOISY_REL_IQR * 1.1, n=10)
    assert not steady.noisy and noisy.noisy


def test_interleaved_ranks_a_slower_call_slower():
    out = time_interleaved(
        {"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.001)}, rounds=2, min_run_time=0.02
    )
    assert out["slow"].median_s > 2 * out["fast"].median_s
    assert out["slow"].median_s == pytest.approx(0.004, rel=0.5)
    assert all(t.n >= 2 for t in out.values())


def test_suggest_names_the_closest():
    assert suggest("kimmi", ["gpt", "kimi"]).startswith("did you mean 'kimi'?")
    assert suggest("zzz", ["gpt"]) == "(choices: gpt)"


def test_time_phases_splits_a_call_into_its_phases():
    from harness.measure.bench.timing import time_phases

    calls = []

    def step(mark):
        calls.append(1)
        time.sleep(0.002)
        mark()
        time.sleep(0.006)
        mark()

    out = time_phases(step, ("short", "long"), repeats=3, warmup=2)
    assert len(calls) == 5 and out["short"].n == out["long"].n == out["total"].n == 3
    assert out["long"].median_s > 2 * out["short"].median_s
    assert out["total"].median_s == pytest.approx(out["short"].median_s + out["long"].median_s, rel=0.3)
    with pytest.raises(ValueError, match="marked 1 phase ends, expected 2"):
        time_phases(lambda mark: mark(), ("a", "b"), repeats=1, warmup=0)


def test_time_rounds_times_everything_for_min_rounds_then_what_select_names():
    from harness.measure.bench.timing import time_rounds

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    asked = []

    def select(rounds):
        asked.append(rounds.rounds)
        return ["a", "c"] if rounds.rounds < 5 else []

    out = time_rounds(fns, select, min_rounds=3, max_seconds=60, sample_s=0.0, warmup=2)
    assert out.rounds == 5 and asked == [3, 4, 5]  # asked after each round past the minimum
    assert [t is None for t in out.times["b"]] == [False, False, False, True, True]
    assert all(t is not None and t > 0 for t in out.times["a"] + out.times["c"])
    # warm-up: 2 calls each (block size 1 here); then a, b, c forward and reversed every other round
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:15] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert calls[15:] == ["c", "a", "a", "c"]  # rounds 4 and 5: b skipped
    assert out.timing("b").n == 3 and out.seconds > 0


def test_time_rounds_stops_at_the_time_cap_and_sizes_blocks():
    from harness.measure.bench.timing import block_size, time_rounds

    assert block_size(0.001, 0.01) == 10 and block_size(0.05, 0.01) == 1 and block_size(0.0, 0.01) >= 1
    fns = {"slow": lambda: time.sleep(0.01), "fast": lambda: time.sleep(0.001)}
    start = time.perf_counter()
    out = time_rounds(fns, lambda rounds: list(fns), min_rounds=2, max_seconds=0.3, sample_s=0.005)
    took = time.perf_counter() - start
    assert 0.3 <= took < 1.5 and out.seconds == pytest.approx(took, abs=0.05)
    assert 2 < out.rounds < 30
    assert out.numbers["slow"] == 1 and out.numbers["fast"] >= 3  # 1 ms calls: blocks of >= 5 ms
    assert out.timing("slow").median_s == pytest.approx(0.01, rel=0.5)
    assert (
        time_rounds(fns, lambda rounds: ["fast"], min_rounds=1, max_rounds=4, max_seconds=60, sample_s=0.0).rounds == 4
    )
