"""Tests for arch/moe.py: sparse dispatch vs a dense reference, router math, balancing, aux loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from arch.moe import MoE, MoEConfig, grouped_mm_supported, load_stats, moe_modules


def make_moe(dtype=torch.float64, seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    cfg = dict(dim=16, n_routed_experts=6, n_activated_experts=2, moe_inter_dim=8)
    cfg.update(kw)
    m = MoE(MoEConfig(**cfg)).to(dtype)
    with torch.no_grad():  # router weights large enough that the scores are far from uniform
        m.gate.weight.normal_(0, 0.5)
    return m


def dense_reference(m: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert on every token, weighted by a dense [N, E] gate matrix built by hand from the router.
    Returns (output [B, T, dim], dense gates [N, E])."""
    c = m.config
    flat = x.reshape(-1, c.dim)
    logits = flat @ m.gate.weight.T
    gates = torch.zeros_like(logits)
    for n in range(flat.size(0)):
        if c.score_func == "sigmoid":
            s = torch.sigmoid(logits[n])
            chosen = torch.topk(s + m.gate.bias, c.n_activated_experts).indices
            gates[n, chosen] = s[chosen] / s[chosen].sum() * c.route_scale
        else:
            s = torch.softmax(logits[n], dim=-1)
            chosen = torch.topk(s, c.n_activated_experts).indices
            gates[n, chosen] = s[chosen] * c.route_scale
    out = torch.zeros_like(flat)
    for e in range(c.n_routed_experts):
        w1, w3, w2 = m.experts.w1[e], m.experts.w3[e], m.experts.w2[e]
        out = out + gates[:, e : e + 1] * ((F.silu(flat @ w1.T) * (flat @ w3.T)) @ w2.T)
    if m.shared is not None:
        sh = m.shared
        out = out + (F.silu(flat @ sh.w1.weight.T) * (flat @ sh.w3.weight.T)) @ sh.w2.weight.T
    return out.view_as(x), gates


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_sparse_matches_dense_reference(score_func, n_shared):
    m = make_moe(score_func=score_func, n_shared_experts=n_shared, route_scale=2.5)
    with torch.no_grad():
        m.gate.bias.normal_(0, 0.3)  # selection bias must change the choice but not the weights
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    ref, gates = dense_reference(m, x)
    torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=0)
    assert m.last_dispatch == "loop"  # fp64 cannot use grouped_mm
    torch.testing.assert_close(m.last_load, (gates != 0).sum(0).float(), atol=0, rtol=0)
    assert m.last_load.sum().item() == 14 * 2


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_sparse_matches_dense_with_idle_experts(score_func):
    m = make_moe(score_func=score_func)
    u = torch.randn(16, dtype=torch.float64)
    u = u / u.norm()
    with torch.no_grad():  # experts 0 and 3 point away from every input: they receive no token
        m.gate.weight[0] = -20 * u
        m.gate.weight[3] = -20 * u
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 0.1 + 2 * u
    ref, _ = dense_reference(m, x)
    torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=0)
    assert m.last_load[0] == 0 and m.last_load[3] == 0


def test_gradients_match_dense_reference():
    m = make_moe(aux_loss_alpha=0.0)
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    (m(x) ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    gx = x.grad.clone()
    m.zero_grad()
    x.grad = None
    (dense_reference(m, x)[0] ** 2).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-10, rtol=0, msg=n)
    torch.testing.assert_close(gx, x.grad, atol=1e-10, rtol=0)


def test_only_routed_pairs_are_computed():
    """FLOPs of the loop dispatch = router + k routed SwiGLUs per token + shared, not E experts per token."""
    m = make_moe(dispatch="loop", n_shared_experts=1)
    N, D, I, E, k = 40, 16, 8, 6, 2
    x = torch.randn(1, N, D, dtype=torch.float64)
    with FlopCounterMode(display=False) as fc:
        m(x)
    swiglu = 3 * 2 * D * I
    assert fc.get_total_flops() == 2 * N * D * E + N * k * swiglu + N * swiglu


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_grouped_mm_matches_loop(score_func):
    kw = dict(dim=32, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=16, score_func=score_func)
    u = torch.randn(32)
    u = u / u.norm()
    x = torch.randn(2, 9, 32) * 0.3 + u
    if not grouped_mm_supported(x, 32, 16):
        pytest.skip("grouped_mm not supported for fp32 on this build")
    results = {}
    for dispatch in ("grouped_mm", "loop"):
        m = make_moe(torch.float32, dispatch=dispatch, **kw)
        with torch.no_grad():
            m.gate.weight[5] = -20 * u  # an idle expert: an empty group
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        assert m.last_dispatch == dispatch
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        results[dispatch] = (y, xi.grad, {n: p.grad for n, p in m.named_parameters()}, m.last_load)
    (yg, gxg, pg, lg), (yl, gxl, pl, ll) = results["grouped_mm"], results["loop"]
    assert ll[5] == 0
    torch.testing.assert_close(lg, ll, atol=0, rtol=0)
    torch.testing.assert_close(yg, yl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gxg, gxl, atol=1e-5, rtol=1e-5)
    for n in pg:
        torch.testing.assert_close(pg[n], pl[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("align", [1, 8, 16])
def test_grouped_padding_matches_loop(align):
    """The aligned-group padding used on CUDA, exercised on CPU: same outputs and gradients as the loop."""
    m = make_moe(torch.float32, dim=32, n_routed_experts=5, moe_inter_dim=16)
    counts = torch.tensor([3, 0, 7, 1, 5])  # includes an empty group
    xs = torch.randn(16, 32, requires_grad=True)
    g = torch.randn(16, 32)
    res = []
    for run in (
        lambda: m.experts.forward_grouped(xs, counts, align=align),
        lambda: m.experts.forward_loop(xs, counts.tolist()),
    ):
        m.zero_grad()
        xs.grad = None
        y = run()
        (y * g).sum().backward()
        res.append([y.detach(), xs.grad.clone()] + [p.grad.clone() for p in m.experts.parameters()])
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_mm_unsupported_raises_and_auto_falls_back():
    m = make_moe(dispatch="grouped_mm")
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 16, dtype=torch.float64))
    m = make_moe(dispatch="auto")
    m(torch.randn(1, 3, 16, dtype=torch.float64))
    assert m.last_dispatch == "loop"


def test_aux_loss_matches_hand_computation():
    m = make_moe(aux_loss_alpha=0.01, n_routed_experts=5, n_activated_experts=2)
    with torch.no_grad():
        m.gate.bias.normal_(0, 0.2)
    B, T, E, K = 3, 7, 5, 2
    x = torch.randn(B, T, 16, dtype=torch.float64)
    m(x)
    total = 0.0
    for b in range(B):
        s = torch.sigmoid(x[b] @ m.gate.weight.T).detach()  # [T, E]
        chosen = [set(torch.topk(s[t] + m.gate.bias, K).indices.tolist()) for t in range(T)]
        for i in range(E):
            f_i = E / (K * T) * sum(i in chosen[t] for t in range(T))
            p_i = sum((s[t, i] / s[t].sum()).item() for t in range(T)) / T
            total += f_i * p_i
    assert m.aux_loss.item() == pytest.approx(0.01 * total / B, rel=1e-12)
    m.aux_loss.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    # uniform scores (zero router): P_i = 1/E and sum_i f_i = E, so the loss is exactly alpha
    with torch.no_grad():
        m.gate.weight.zero_()
    m(x)
    assert m.aux_loss.item() == pytest.approx(0.01, rel=1e-12)


def test_aux_loss_zero_when_disabled():
    m = make_moe(aux_loss_alpha=0.0)
    m(torch.randn(2, 3, 16, dtype=torch.float64))
    assert m.aux_loss.item() == 0.0 and not m.aux_loss.requires_grad


def test_update_bias_rule_and_reset():
    m = make_moe(bias_update_speed=0.01, n_routed_experts=4)
    with torch.no_grad():
        m.load_accum.copy_(torch.tensor([5, 1, 3, 3]))
    m.update_bias()
    torch.testing.assert_close(m.gate.bias, torch.tensor([-0.01, 0.01, 0.0, 0.0], dtype=torch.float64))
    assert m.load_accum.sum() == 0
    m(torch.randn(2, 5, 16, dtype=torch.float64))
    m(torch.randn(1, 5, 16, dtype=torch.float64))
    assert m.load_accum.sum().item() == 15 * 2  # accumulates over forwards


@pytest.mark.slow
def test_bias_balancing_lowers_load_cv_of_skewed_router():
    torch.manual_seed(0)
    E = 8
    m = make_moe(torch.float32, n_routed_experts=E, n_activated_experts=2, bias_update_speed=2e-3)
    u = torch.randn(16)
    u = u / u.norm()
    with torch.no_grad():  # inputs share a direction u that experts 0 and 1 like and the rest ignore
        m.gate.weight.normal_(0, 0.1)
        m.gate.weight[0] += 1.5 * u
        m.gate.weight[1] += 1.0 * u
    weights_before = {n: p.detach().clone() for n, p in m.named_parameters()}
    gen = torch.Generator().manual_seed(1)

    def step() -> float:
        with torch.no_grad():
            m(torch.randn(4, 32, 16, generator=gen) + u)
        m.update_bias()
        return m.load_stats()["load_cv"]

    first = sum(step() for _ in range(10)) / 10
    for _ in range(280):
        step()
    last = sum(step() for _ in range(10)) / 10
    assert first > 1.0  # genuinely skewed to start with
    print(f"load cv: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last < 0.35 * first, (first, last)
    for n, p in m.named_parameters():  # only the bias buffer moved
        assert torch.equal(p, weights_before[n]), n


def test_load_stats():
    assert load_stats(torch.tensor([3.0, 3.0, 3.0, 3.0])) == {"load_cv": 0.0, "max_load": 1.0, "dropped": 0.0}
    s = load_stats(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    assert s["max_load"] == pytest.approx(4.0) and s["load_cv"] == pytest.approx(math.sqrt(3))


def test_names_shapes_and_helpers():
    m = make_moe(n_shared_experts=1)
    names = {n for n, _ in m.named_parameters()}
    assert names == {
        "gate.weight",
        "experts.w1",
        "experts.w2",
        "experts.w3",
        "shared.w1.weight",
        "shared.w2.weight",
        "shared.w3.weight",
    }
    assert m.experts.w1.shape == (6, 8, 16) and m.experts.w3.shape == (6, 8, 16)
    assert m.experts.w2.shape == (6, 16, 8)
    assert m.shared.w1.weight.shape == (8, 16)
    assert "gate.bias" in dict(m.named_buffers()) and "gate.bias" in m.state_dict()
    assert "load_accum" not in m.state_dict()
    m.to(torch.bfloat16)
    assert m.gate.bias.dtype == torch.float32 and m.load_accum.dtype == torch.int64
    container = torch.nn.Sequential(make_moe(), torch.nn.Linear(2, 2), make_moe())
    assert len(moe_modules(container)) == 2


def test_config_validation():
    with pytest.raises(ValueError):
        MoEConfig(dim=8, n_routed_experts=2, n_activated_experts=3, moe_inter_dim=4)
    with pytest.raises(ValueError):
        MoEConfig(dim=8, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=4, score_func="relu")
    with pytest.raises(ValueError):
        MoEConfig(dim=8, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=4, dispatch="dense")


def test_eval_forward_does_not_feed_the_balancing_bias():
    moe = MoE(MoEConfig(dim=16, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=8))
    x = torch.randn(2, 5, 16)
    moe.eval()
    moe(x)
    assert moe.last_load.sum() == 2 * 5 * 2  # the load is still observed ...
    assert int(moe.load_accum.sum()) == 0  # ... but only training forwards reach update_bias
    moe.train()
    moe(x)
    assert int(moe.load_accum.sum()) == 2 * 5 * 2
