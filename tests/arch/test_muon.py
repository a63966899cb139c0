"""Tests for arch/muon.py against definitions: Newton-Schulz, torch.optim.Muon, a float64 Muon written
here, torch.optim.AdamW, QK-Clip on the real attention modules, and 2-process gloo against 1 process."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.multiprocessing as mp

from arch.muon import Muon, adjust_lr, enable_max_logit_tracking, qk_clip_, zeropower_via_newtonschulz5

A, B, C = 3.4445, -4.7750, 2.0315


def _poly5(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """What NS does to each singular value (of G / ||G||_F): the scalar quintic, iterated."""
    for _ in range(steps):
        x = A * x + B * x**3 + C * x**5
    return x


def _ns_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Float64 definition through the SVD: U diag(p(s / ||G||_F)) V^T."""
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ torch.diag(_poly5(s / G.double().norm(), steps)) @ Vh


def _rank_deficient(m: int, n: int, r: int) -> torch.Tensor:
    return torch.randn(m, r, dtype=torch.float64) @ torch.randn(r, n, dtype=torch.float64)


# ----------------------------------------------------------------------------- Newton-Schulz

# Band asserted for singular values s of G with s / ||G||_F >= 2e-3: the iterated quintic maps
# [2e-3, 1] into [0.6818, 1.2024] (computed on a 2e5-point grid), so [0.65, 1.21] in fp64 and
# [0.6, 1.25] in bf16. Below 2e-3 five steps cannot lift a direction to ~1 (p(1e-4) = 0.048), which is
# why a random square matrix's smallest singular values may stay small: checked against p itself.
CASES = {
    "square": lambda: torch.randn(64, 64, dtype=torch.float64),
    "tall": lambda: torch.randn(128, 32, dtype=torch.float64),
    "wide": lambda: torch.randn(32, 128, dtype=torch.float64),
    "rank_deficient": lambda: _rank_deficient(48, 40, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ns_singular_values(case):
    torch.manual_seed(0)
    G = CASES[case]()
    O = zeropower_via_newtonschulz5(G, dtype=torch.float64)
    assert O.shape == G.shape and O.dtype == torch.float64
    torch.testing.assert_close(O, _ns_reference(G), atol=1e-10, rtol=0)  # exactly p on each s
    s_in = torch.linalg.svdvals(G) / G.norm()  # descending
    s_out = torch.linalg.svdvals(O)
    n_big = int((s_in >= 2e-3).sum())
    if case in ("tall", "wide"):  # well conditioned: every singular value is in the band
        assert n_big == 32
    if case == "rank_deficient":  # the 6 nonzero ones are in the band, the zero ones stay 0 (p is odd)
        assert n_big == 6 and s_out[6:].max() < 1e-8
    if case == "square":
        assert n_big >= 60
    assert s_out.max() <= 1.21
    # O's singular values are p(s_in): the n_big images of s_in >= 2e-3 are all >= 0.68, so O has at
    # least n_big singular values in the band
    assert s_out[:n_big].min() >= 0.65


@pytest.mark.parametrize("case", ["tall", "wide", "rank_deficient"])
def test_ns_bf16_band(case):
    torch.manual_seed(1)
    G = CASES[case]().float()
    O = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
    assert O.dtype == torch.bfloat16
    s_out = torch.linalg.svdvals(O.double())
    k = 6 if case == "rank_deficient" else 32
    assert s_out[:k].min() >= 0.6 and s_out.max() <= 1.25, s_out


def test_ns_default_dtype_cpu_is_fp32():
    assert zeropower_via_newtonschulz5(torch.randn(8, 4)).dtype == torch.float32


def test_ns_batched_is_per_matrix():
    """[E, m, n]: each matrix normalized and orthogonalized on its own (scales 1e-3..1e3 would break a
    joint normalization), tall stacks transposed per matrix too."""
    torch.manual_seed(2)
    for m, n in [(16, 24), (24, 16)]:
        scales = torch.tensor([1.0, 1e3, 1e-3], dtype=torch.float64)[:, None, None]
        G = torch.randn(3, m, n, dtype=torch.float64) * scales
        O = zeropower_via_newtonschulz5(G, dtype=torch.float64)
        for e in range(3):
            torch.testing.assert_close(O[e], zeropower_via_newtonschulz5(G[e], dtype=torch.float64), atol=1e-12, rtol=0)
            torch.testing.assert_close(O[e], _ns_reference(G[e]), atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- Muon vs references


def _muon_reference(ws, grads_per_step, lr, wd, mu, nesterov, fn):
    """Float64 Muon from the definition (momentum as an EMA, as torch.optim.Muon keeps it)."""
    ps = [w.double().clone() for w in ws]
    bufs = [torch.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for p, buf, g in zip(ps, bufs, grads, strict=True):
            g = g.double()
            buf.mul_(mu).add_((1 - mu) * g)
            u = (1 - mu) * g + mu * buf if nesterov else buf
            rows, cols = p.shape[-2:]
            scale = max(1.0, rows / cols) ** 0.5 if fn == "original" else 0.2 * math.sqrt(max(rows, cols))
            p.mul_(1 - lr * wd).sub_(lr * scale * _ns_reference(u))
    return ps


def _run(opt_factory, ws, grads_per_step, dtype=torch.float32):
    ps = [torch.nn.Parameter(w.to(dtype).clone()) for w in ws]
    opt = opt_factory(ps)
    for grads in grads_per_step:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.to(dtype).clone()
        opt.step()
    return ps, opt


def _problem(seed=0, shapes=((64, 32), (32, 96), (48, 48)), steps=4):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return ws, grads


# two shapes repeated: the batched default stacks them into [2, m, n] Newton-Schulz calls
BUCKETED_SHAPES = ((64, 32), (32, 96), (48, 48), (64, 32), (48, 48))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("batched_ns", [True, False], ids=["batched_default", "per_matrix"])
@pytest.mark.parametrize("fn", ["original", "match_rms_adamw"])
def test_matches_torch_optim_muon_bf16(fn, batched_ns):
    """Same dtype (bf16 NS, as torch.optim.Muon always does): equal to 1e-6 (bit-equal on CPU), on the
    per-matrix path (torch's ops) and the batched default (the same math on stacked matrices)."""
    ws, grads = _problem(shapes=BUCKETED_SHAPES)
    ref, _ = _run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1, adjust_lr_fn=fn), ws, grads)
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=fn, ns_dtype="bfloat16", batched_ns=batched_ns)
    ours, _ = _run(lambda ps: Muon(ps, **kw), ws, grads)
    for a, b in zip(ref, ours, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("fn", ["original", "match_rms_adamw"])
def test_matches_float64_definition(fn, nesterov):
    ws, grads = _problem(seed=3)
    ref = _muon_reference(ws, grads, lr=0.02, wd=0.1, mu=0.95, nesterov=nesterov, fn=fn)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=fn)
    f64, _ = _run(lambda ps: Muon(ps, ns_dtype="float64", **kw), ws, grads, dtype=torch.float64)
    f32, _ = _run(lambda ps: Muon(ps, **kw), ws, grads)  # CPU default: fp32 NS
    for r, a, b in zip(ref, f64, f32, strict=True):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=0)
        torch.testing.assert_close(b.double(), r, atol=1e-5, rtol=0)  # fp32: ~1e-6 measured


def test_moonlight_update_rms():
    """match_rms_adamw: update RMS per unit lr = 0.2 * RMS of O's singular values (exactly), and O's
    singular values from the quintic NS average below 1, so on Gaussian gradients it is 0.17..0.19
    (measured), not 0.2: asserted in [0.16, 0.21]."""
    torch.manual_seed(4)
    for shape in [(256, 64), (64, 256), (128, 128), (384, 512), (4, 96, 64)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        g = torch.randn(shape)
        opt = Muon([p], lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        p.grad = g
        opt.step()
        rms = p.detach().double().pow(2).mean().sqrt().item()
        O = zeropower_via_newtonschulz5(g).double()
        sv_rms = torch.linalg.svdvals(O).pow(2).mean().sqrt().item()
        assert rms == pytest.approx(0.2 * sv_rms, rel=1e-5)
        assert 0.16 <= rms <= 0.21, (shape, rms)


@pytest.mark.parametrize("fn", ["original", "match_rms_adamw"])
def test_3d_expert_tensor_equals_per_expert_matrices(fn):
    torch.manual_seed(5)
    E, m, n = 4, 24, 16
    w = torch.randn(E, m, n, dtype=torch.float64)
    grads = [torch.randn(E, m, n, dtype=torch.float64) for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=fn, ns_dtype="float64")
    (stacked,), _ = _run(lambda ps: Muon(ps, **kw), [w], [[g] for g in grads], dtype=torch.float64)
    apart, _ = _run(lambda ps: Muon(ps, **kw), list(w), [list(g) for g in grads], dtype=torch.float64)
    for e in range(E):
        torch.testing.assert_close(stacked[e], apart[e], atol=1e-12, rtol=0)


def test_split_equals_separate_matrices():
    """split=3 on a fused [3C, C] weight == Muon on W_q, W_k, W_v stored apart."""
    torch.manual_seed(6)
    Cd = 16
    w = torch.randn(3 * Cd, Cd, dtype=torch.float64)
    grads = [torch.randn(3 * Cd, Cd, dtype=torch.float64) for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype="float64")
    (fused,), _ = _run(
        lambda ps: Muon([dict(params=ps, split=3)], **kw), [w], [[g] for g in grads], dtype=torch.float64
    )
    apart, _ = _run(
        lambda ps: Muon(ps, **kw), list(w.split(Cd)), [list(g.split(Cd)) for g in grads], dtype=torch.float64
    )
    torch.testing.assert_close(fused, torch.cat(apart), atol=1e-12, rtol=0)


def _mixed_groups(ps):
    """A split-3 fused weight whose [16, 16] blocks share a bucket with two plain [16, 16] weights, a 3-D
    expert stack, a tall and a wide matrix, and an AdamW group: every bucketing case of batched_ns."""
    return [
        dict(params=[ps[0]], split=3),
        dict(params=ps[1:6]),
        dict(params=ps[6:7], nesterov=False),
        dict(params=ps[7:], use_muon=False),
    ]


MIXED_SHAPES = ((48, 16), (16, 16), (4, 16, 16), (40, 16), (16, 40), (16, 16), (24, 24), (16,))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_batched_ns_equals_per_matrix_path(dtype, tol, monkeypatch):
    """The default (batched) path: the same parameters and momentum buffers as batched_ns=False after
    several steps (fp32: within 1e-6, as batched and single matmuls may round differently; fp64: 1e-12),
    with one Newton-Schulz call per bucket: [16, 16] (3 + 1 + 4 + 1 matrices), [40, 16], [16, 40], [24, 24]."""
    import arch.muon as muon_module

    ws, grads = _problem(seed=8, shapes=MIXED_SHAPES, steps=3)
    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype={torch.float32: "float32", torch.float64: "float64"}[dtype])
    per_matrix, opt_a = _run(lambda ps: Muon(_mixed_groups(ps), batched_ns=False, **kw), ws, grads, dtype=dtype)
    calls = []
    original = muon_module.zeropower_via_newtonschulz5
    monkeypatch.setattr(
        muon_module, "zeropower_via_newtonschulz5", lambda G, **kw: calls.append(tuple(G.shape)) or original(G, **kw)
    )
    batched, opt_b = _run(lambda ps: Muon(_mixed_groups(ps), **kw), ws, grads, dtype=dtype)
    assert sorted(calls[:4]) == [(1, 16, 40), (1, 24, 24), (1, 40, 16), (9, 16, 16)] and len(calls) == 3 * 4
    for a, b in zip(per_matrix, batched, strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    for a, b in zip(per_matrix, batched, strict=True):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], atol=tol, rtol=tol)


def test_batched_ns_moves_every_muon_parameter():
    """Guard against a bucket silently dropped (default, batched path): each Muon matrix changes, the AdamW
    one too."""
    ws, grads = _problem(seed=9, shapes=MIXED_SHAPES, steps=1)
    ps, _ = _run(lambda ps: Muon(_mixed_groups(ps)), ws, grads)
    for w, p in zip(ws, ps, strict=True):
        assert not torch.equal(p.detach(), w), tuple(w.shape)


def test_adjust_lr_uses_last_two_dims():
    assert adjust_lr(0.02, "original", torch.Size([8, 64, 16])) == pytest.approx(0.02 * 2.0)
    assert adjust_lr(0.02, "original", torch.Size([16, 64])) == pytest.approx(0.02)
    assert adjust_lr(1.0, "match_rms_adamw", torch.Size([8, 64, 16])) == pytest.approx(0.2 * 8.0)


def _moved_rel_error(w: torch.Tensor, got: torch.Tensor, ref: torch.Tensor) -> float:
    """||(got - w) - (ref - w)|| / ||ref - w||: two updates of the same weight compared."""
    moved, moved_ref = (got - w).double(), (ref - w).double()
    return float((moved - moved_ref).norm() / moved_ref.norm())


@pytest.mark.cuda
def test_cuda_defaults_bf16_ns_and_fused_adamw():
    """On CUDA the defaults are torch's fast paths: bf16 NS and fused AdamW. The per-matrix path is
    torch.optim.Muon op for op (1e-6); the batched default may take other bf16 matmul kernels, so its
    updates agree to bf16 precision (3e-2 relative, as tests/test_cuda.py bounds batched vs per-matrix)."""
    dev = torch.device("cuda")
    ws, grads = _problem(shapes=BUCKETED_SHAPES)
    ws, grads = [w.to(dev) for w in ws], [[g.to(dev) for g in gs] for gs in grads]
    if hasattr(torch.optim, "Muon"):
        ref, _ = _run(lambda ps: torch.optim.Muon(ps, lr=0.02), ws, grads)
        per_matrix, _ = _run(lambda ps: Muon(ps, lr=0.02, batched_ns=False), ws, grads)
        batched, _ = _run(lambda ps: Muon(ps, lr=0.02), ws, grads)
        for w, a, b, c in zip(ws, ref, per_matrix, batched, strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
            assert _moved_rel_error(w, c.detach(), a.detach()) < 3e-2
    kw = dict(lr=1e-3, weight_decay=0.01)
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, betas=(0.9, 0.95), fused=True, **kw), ws, grads)
    ours, opt = _run(lambda ps: Muon([dict(params=ps, use_muon=False, **kw)]), ws, grads)
    assert opt.param_groups[0]["fused"] is None and opt.state[ours[0]]["step"].device.type == "cuda"
    for a, b in zip(ref, ours, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- AdamW groups, state


def _adamw_problem(seed=7, steps=5):
    g = torch.Generator().manual_seed(seed)
    shapes = [(10, 6), (6,), (3, 4, 5)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    muon_w = torch.randn(12, 8, generator=g)
    grads = [([torch.randn(s, generator=g) for s in shapes], torch.randn(12, 8, generator=g)) for _ in range(steps)]
    return ws, muon_w, grads


def test_adamw_groups_equal_torch_adamw():
    ws, muon_w, grads = _adamw_problem()
    hyper = [dict(lr=1e-3, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0)]
    ref_ps = [torch.nn.Parameter(w.clone()) for w in ws]
    ref = torch.optim.AdamW(
        [dict(params=[ref_ps[0], ref_ps[2]], **hyper[0]), dict(params=[ref_ps[1]], **hyper[1])],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    pm = torch.nn.Parameter(muon_w.clone())
    pm_alone = torch.nn.Parameter(muon_w.clone())
    ours = Muon(
        [
            dict(params=[pm]),
            dict(params=[ps[0], ps[2]], use_muon=False, **hyper[0]),
            dict(params=[ps[1]], use_muon=False, **hyper[1]),
        ],
        lr=0.02,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
    )
    alone = Muon([pm_alone], lr=0.02)
    for adam_grads, mg in grads:
        for p, q, g in zip(ref_ps, ps, adam_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        pm.grad, pm_alone.grad = mg.clone(), mg.clone()
        ref.step()
        ours.step()
        alone.step()
    for p, q in zip(ref_ps, ps, strict=True):
        assert torch.equal(p, q)  # same functional AdamW, same inputs: bit-equal
    assert torch.equal(pm, pm_alone)  # the AdamW groups do not disturb the Muon group
    st = ours.state[ps[0]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"].item() == len(grads)


def test_state_dict_round_trip_resumes_exactly():
    ws, muon_w, grads = _adamw_problem(seed=8, steps=5)

    def make():
        ps = [torch.nn.Parameter(w.clone()) for w in ws] + [torch.nn.Parameter(muon_w.clone())]
        opt = Muon([dict(params=[ps[3]]), dict(params=ps[:3], use_muon=False, lr=1e-3, weight_decay=0.1)])
        return ps, opt

    def steps(ps, opt, grad_list):
        for adam_grads, mg in grad_list:
            for p, g in zip(ps, [*adam_grads, mg], strict=True):
                p.grad = g.clone()
            opt.step()

    full_ps, full_opt = make()
    steps(full_ps, full_opt, grads)
    ps, opt = make()
    steps(ps, opt, grads[:3])
    saved_params = [p.detach().clone() for p in ps]
    saved = copy.deepcopy(opt.state_dict())
    ps2, opt2 = make()
    with torch.no_grad():
        for p, s in zip(ps2, saved_params, strict=True):
            p.copy_(s)
    opt2.load_state_dict(saved)
    steps(ps2, opt2, grads[3:])
    for a, b in zip(full_ps, ps2, strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_scales_every_group():
    p_m, p_a = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    opt = Muon([dict(params=[p_m]), dict(params=[p_a], use_muon=False, lr=1e-3)], lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 5e-4])
    del sched


def test_params_without_grad_are_skipped():
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    before = q.detach().clone()
    opt = Muon([p, q])
    p.grad = torch.randn(4, 4)
    opt.step()
    assert torch.equal(q, before) and q not in opt.state


def test_generator_params_are_kept():
    lin = torch.nn.Linear(4, 4, bias=False)
    for opt in (Muon(lin.parameters()), Muon([dict(params=lin.parameters())])):
        assert opt.param_groups[0]["params"] == [lin.weight]


def test_bad_groups_raise():
    with pytest.raises(ValueError, match="not 2-D or 3-D"):
        Muon([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], adjust_lr_fn="bogus")
    with pytest.raises(ValueError, match="split"):
        Muon([dict(params=[torch.nn.Parameter(torch.randn(4, 4))], split=3)])


# ----------------------------------------------------------------------------- QK-Clip


def _gpt_attention():
    from arch.gpt import CausalSelfAttention, GPTConfig

    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=4, n_embd=32)
    attn = CausalSelfAttention(cfg).double()
    hd = attn.head_dim

    def q_rows(h):
        return attn.c_attn.weight[h * hd : (h + 1) * hd]

    def head_weights(h):  # q rows, k rows and their biases: what QK-Clip may touch for head h
        C = attn.n_embd
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd), C + torch.arange(h * hd, (h + 1) * hd)])
        return [attn.c_attn.weight[rows].clone(), attn.c_attn.bias[rows].clone()]

    return attn, 4, q_rows, head_weights


def _mla_attention():
    from arch.mla import MLA, MLAConfig

    attn = MLA(
        MLAConfig(
            dim=32,
            n_heads=4,
            q_lora_rank=16,
            kv_lora_rank=12,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            max_seq_len=16,
        )
    ).double()

    def q_rows(h):  # all of head h's query rows (nope and rope): scaling them scales every logit
        return attn.wq_b.weight.view(4, 12, -1)[h]

    def head_weights(h):
        return [attn.wq_b.weight.view(4, 12, -1)[h].clone(), attn.wkv_b.weight.view(4, 16, -1)[h].clone()]

    return attn, 4, q_rows, head_weights


@pytest.mark.parametrize("make", [_gpt_attention, _mla_attention], ids=["gpt_mha", "mla"])
def test_qk_clip_on_real_attention(make):
    torch.manual_seed(9)
    attn, H, q_rows, head_weights = make()
    scaled = [0, 2]
    with torch.no_grad():
        for h in scaled:
            q_rows(h).mul_(400.0)  # every logit of head h times 400
    assert enable_max_logit_tracking(attn) == 1
    attn.train()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    attn(x)
    before = attn.max_logit.clone()
    tau = 5.0 * float(before[[h for h in range(H) if h not in scaled]].max())
    over = before > tau
    assert over.tolist() == [h in scaled for h in range(H)], (before, tau)  # precondition
    untouched = {h: head_weights(h) for h in range(H) if not over[h]}
    others = {n: p.detach().clone() for n, p in attn.named_parameters()}
    stats = qk_clip_(attn, tau)
    assert stats["heads_clipped"] == len(scaled) and stats["modules"] == 1
    assert stats["max_logit"] == pytest.approx(float(before.max()))
    attn(x)  # the same batch again
    after = attn.max_logit
    assert (after[over] <= tau + 1e-3).all()
    torch.testing.assert_close(
        after[over].double(), torch.full((len(scaled),), tau, dtype=torch.float64), rtol=1e-6, atol=0
    )  # gamma * S_max = tau: the clip is exact
    assert torch.equal(after[~over], before[~over])
    for h, ws in untouched.items():
        for a, b in zip(ws, head_weights(h), strict=True):
            assert torch.equal(a, b), f"head {h} changed"
    for name, p in attn.named_parameters():  # only the q/k projections may change
        if not any(k in name for k in ("c_attn", "wq_b", "wkv_b")):
            assert torch.equal(p, others[name]), name
    # the re-run was a training forward, so the next clip reads it; then nothing is left to read
    assert qk_clip_(attn, tau)["max_logit"] == pytest.approx(float(after.max()))
    assert qk_clip_(attn, tau) == {
        "max_logit": pytest.approx(float("nan"), nan_ok=True),
        "heads_clipped": 0,
        "modules": 0,
    }


def test_qk_clip_running_max_over_micro_batches():
    """Under gradient accumulation the step's S_max is the max over all micro-batches' forwards."""
    from arch.gpt import CausalSelfAttention, GPTConfig

    torch.manual_seed(10)
    cfg = GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16)
    attn = CausalSelfAttention(cfg).double()
    enable_max_logit_tracking(attn)
    attn.train()
    xs = [torch.randn(1, 8, 16, dtype=torch.float64) * s for s in (3.0, 1.0)]
    per_batch = []
    for x in xs:
        attn(x)
        per_batch.append(attn.max_logit.clone())
    attn.eval()
    attn(torch.randn(1, 8, 16, dtype=torch.float64) * 100)  # eval forwards do not count
    expected = torch.maximum(*per_batch)
    stats = qk_clip_(attn, tau=1e9)
    assert stats["max_logit"] == pytest.approx(float(expected.max()))
    enable_max_logit_tracking(attn, on=False)
    assert not attn.track_max_logit and "_qk_clip_hook" not in attn.__dict__
    assert not attn._forward_hooks


def test_qk_clip_without_tracking_modules():
    stats = qk_clip_(torch.nn.Linear(3, 3), tau=1.0)
    assert stats["heads_clipped"] == 0 and stats["modules"] == 0 and math.isnan(stats["max_logit"])


def test_qk_clip_reads_each_max_logit_once():
    """Without our hook (track_max_logit set by hand) a max_logit is used once: calling qk_clip_ twice
    after one forward (optimizer step + trainer) must not clip twice with the same pre-clip logits."""
    fake = _FakeAttention([300.0, 50.0])
    first = qk_clip_(fake, tau=100.0)
    assert first["heads_clipped"] == 1 and torch.equal(fake.gamma, torch.tensor([1 / 3, 1.0]))
    fake.gamma = None
    assert qk_clip_(fake, tau=100.0)["modules"] == 0 and fake.gamma is None
    fake.max_logit = torch.tensor([120.0, 50.0])  # a new forward
    assert qk_clip_(fake, tau=100.0)["heads_clipped"] == 1


def test_muonclip_step_clips_after_update():
    """Muon(qk_clip_model=...) runs QK-Clip at the end of step() and keeps its stats."""
    from arch.gpt import GPT, GPTConfig

    torch.manual_seed(11)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    enable_max_logit_tracking(model)
    params = [p for p in model.parameters() if p.ndim == 2]
    opt = Muon(params, lr=0.02, qk_clip_model=model, qk_clip_tau=1e-3)  # tiny tau: every head clips
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    assert opt.last_qk_clip["heads_clipped"] == 4 and opt.last_qk_clip["modules"] == 2


# ----------------------------------------------------------------------------- distributed


def _dist_problem():
    g = torch.Generator().manual_seed(12)
    # 5 same-shape matrices (uneven split over 2 ranks), other shapes, a 3-D stack, an AdamW tensor
    shapes = [(16, 8)] * 5 + [(8, 24), (12, 12), (3, 10, 6)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    bias = torch.randn(7, generator=g)
    bias_grads = [torch.randn(7, generator=g) for _ in range(4)]
    return ws, grads, bias, bias_grads


def _dist_train() -> list[torch.Tensor]:
    ws, grads, bias, bias_grads = _dist_problem()
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    pb = torch.nn.Parameter(bias.clone())
    opt = Muon(
        [
            dict(params=ps[:-1]),
            dict(params=[ps[-1]], adjust_lr_fn="match_rms_adamw"),
            dict(params=[pb], use_muon=False, lr=1e-2),
        ],
        lr=0.02,
        weight_decay=0.1,
    )
    for step_grads, bg in zip(grads, bias_grads, strict=True):
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        pb.grad = bg.clone()
        opt.step()
    assert all("momentum_buffer" in opt.state[p] for p in ps)  # every rank keeps every buffer
    return [p.detach().clone() for p in [*ps, pb]]


class _FakeAttention(torch.nn.Module):
    """A model following the protocol (docs/design.md) with a rank-dependent max_logit, to test the MAX all-reduce."""

    def __init__(self, logits):
        super().__init__()
        self.track_max_logit = True
        self.max_logit = torch.tensor(logits)
        self.gamma = None

    def qk_clip_(self, gamma):
        self.gamma = gamma.clone()


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = _dist_train()
        fake = _FakeAttention([50.0, 200.0] if rank == 0 else [150.0, 20.0])
        stats = qk_clip_(fake, tau=100.0)
        torch.save({"params": params, "gamma": fake.gamma, "stats": stats}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _dist_train()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(single, got["params"], strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        # max over ranks is [150, 200]: both heads clipped, with the same gamma on every rank
        torch.testing.assert_close(got["gamma"], torch.tensor([100 / 150, 100 / 200]))
        assert got["stats"]["heads_clipped"] == 2 and got["stats"]["max_logit"] == 200.0
