"""harness/trial/metrics.py: perplexity, gradient-norm stability, loss spikes, peak FLOP/s and MFU, against hand
counts."""

from __future__ import annotations

import math

import pytest
import torch

from harness import schema
from harness.trial import metrics


def test_perplexity_is_exp_of_the_mean_nll_and_inf_past_float_range():
    assert metrics.perplexity(math.log(10.0)) == pytest.approx(10.0, rel=1e-12)
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(800.0) == float("inf")  # exp(800) overflows a float: inf, not an error


def test_grad_norm_summary_by_hand():
    # x = 1 2 3 4 10: median 3; mean 4; population std sqrt((9+4+1+0+36)/5) = sqrt(10);
    # p99 by linear interpolation at rank 0.99 * 4 = 3.96: 4 + 0.96 * (10 - 4) = 9.76
    s = metrics.grad_norm_summary([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s[schema.GRAD_NORM_MEDIAN] == 3.0
    assert s[schema.GRAD_NORM_CV] == pytest.approx(math.sqrt(10) / 4, rel=1e-12)
    assert s[schema.GRAD_NORM_P99_OVER_MEDIAN] == pytest.approx(9.76 / 3, rel=1e-12)
    assert s[schema.GRAD_NORM_SPIKES] == 0.0  # 10 < 5 x median(1, 2, 3, 4) = 12.5


def test_grad_norm_summary_drops_non_finite_norms_but_an_inf_is_a_spike():
    # finite values 1, 3: median 2, mean 2, std 1 -> CV 0.5; p99 = 1 + 0.99 * 2 = 2.98
    s = metrics.grad_norm_summary([1.0, float("nan"), 3.0, float("inf")])
    assert s[schema.GRAD_NORM_MEDIAN] == 2.0
    assert s[schema.GRAD_NORM_CV] == pytest.approx(0.5, rel=1e-12)
    assert s[schema.GRAD_NORM_P99_OVER_MEDIAN] == pytest.approx(2.98 / 2, rel=1e-12)
    assert s[schema.GRAD_NORM_SPIKES] == 1.0  # inf > 5 x median(1, 3); nan compares false
    assert metrics.grad_norm_summary([float("nan")]) == {}
    assert metrics.grad_norm_summary([]) == {}


def test_spikes_are_strictly_above_factor_times_the_rolling_median():
    # step 4: 6 > 5 x median(1, 1, 1, 1) = 5; step 7: 30 > 5 x median(1, 1, 1, 1, 6, 1, 1) = 5
    assert metrics.rolling_median_spikes([1, 1, 1, 1, 6, 1, 1, 30]) == 2
    assert metrics.rolling_median_spikes([1, 5]) == 0  # equal to 5x is not a spike
    assert metrics.rolling_median_spikes([100]) == 0  # the first step has no history
    # the window: over the last 2 steps (1, 1) the 6 is a spike; over all five (median 10) it is not
    values = [10, 10, 10, 1, 1, 6]
    assert metrics.rolling_median_spikes(values, window=2) == 1
    assert metrics.rolling_median_spikes(values) == 0


def test_loss_spikes_are_jumps_above_the_rolling_median_plus_threshold():
    # step 2: 2.6 > median(2, 2) + 0.5; step 4: 2.4 <= median(2, 2, 2.6, 2) + 0.5 = 2.5
    assert metrics.loss_spike_count([2.0, 2.0, 2.6, 2.0, 2.4]) == 1
    assert metrics.loss_spike_count([2.0, 2.0, 2.6, 2.0, 2.4], threshold=0.3) == 2  # 2.4 > 2.3 now
    assert metrics.loss_spike_count([3.0, 2.0, 1.0]) == 0  # falling losses never spike


def test_mfu_is_model_flops_per_second_over_the_peak():
    assert metrics.mfu(6e6, 1000.0, 1e12) == pytest.approx(6e-3, rel=1e-12)
    assert metrics.mfu(6e6, 1000.0, None) is None


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Some Future GPU", None),
    ],
)
def test_device_peak_flops_reads_the_specific_name_first(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.device_peak_flops(torch.device("cuda")) == peak


def test_device_peak_flops_on_cpu_and_with_an_override():
    assert metrics.device_peak_flops(torch.device("cpu")) is None
    assert metrics.device_peak_flops(torch.device("cpu"), override_tflops=100.0) == 100e12
