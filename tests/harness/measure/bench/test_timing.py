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
    out = time_interleaved({"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.001)},
                           rounds=2, min_run_time=0.02)
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
