"""harness/trial/step.py: the autocast rule, the device resolver, and the one train step checked against the
same arithmetic written out by hand (micro-batch shares, the MoE aux loss, clipping, the optimizer step)."""

import math

import torch
from torch import nn

from harness.trial.step import autocast_dtype, forward_backward, resolve_device, train_step


class Tiny(nn.Module):
    """The model protocol in miniature: (logits, loss) and an aux loss the step must add."""

    def __init__(self, aux: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5)
        self.aux_scale = aux
        self.aux_loss = torch.zeros(())

    def forward(self, x, y):
        logits = self.head(self.emb(x))
        self.aux_loss = self.aux_scale * (self.emb.weight**2).sum()
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def test_autocast_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16 and autocast_dtype("float32", cuda) is None


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 5, (2, 4), generator=g), torch.randint(0, 5, (2, 4), generator=g)) for _ in range(2)]


def test_two_micro_batches_equal_the_mean_loss_step_by_hand():
    torch.manual_seed(0)
    a = Tiny(aux=0.01)
    b = Tiny(aux=0.01)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    loss, norm = train_step(a, opt_a, batches(), None, grad_clip=0.0, n_micro=2, moe=[])
    by_hand = []
    for x, y in batches():  # (loss + aux) / 2 per micro-batch, summed gradients, no clip, one SGD step
        _, lm = b(x, y)
        ((lm + b.aux_loss) / 2).backward()
        by_hand.append(lm.item())
    hand_norm = math.sqrt(sum(float((p.grad**2).sum()) for p in b.parameters()))
    opt_b.step()
    assert abs(loss.item() - sum(by_hand) / 2) < 1e-6
    assert abs(norm.item() - hand_norm) < 1e-5
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7)
        assert p.grad is None  # zero_grad(set_to_none=True) after the step


def test_clip_scales_the_step_and_reports_the_norm_before_clipping():
    torch.manual_seed(0)
    m = Tiny()
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    x, y = batches()[0]
    _, norm = train_step(m, opt, [(x, y)], None, grad_clip=1e-3, moe=[], zero_grad=False)
    step = math.sqrt(sum(float(((p - q) ** 2).sum()) for p, q in zip(m.parameters(), before, strict=True)))
    assert norm.item() > 1e-3  # the norm as it was, before clipping
    assert abs(step - 1e-3) < 1e-6  # lr 1: the parameters moved by exactly the clipped norm


def test_forward_backward_returns_the_lm_loss_and_adds_the_aux_loss_to_the_gradient():
    torch.manual_seed(0)
    m = Tiny(aux=1.0)
    x, y = batches()[0]
    loss = forward_backward(m, x, y, None)
    _, lm = Tiny.forward(m, x, y)
    assert abs(loss.item() - lm.item()) < 1e-6
    emb_grad_without_aux = torch.autograd.grad(lm, m.emb.weight)[0]
    assert torch.allclose(m.emb.weight.grad, emb_grad_without_aux + 2 * m.emb.weight, atol=1e-6)


def test_a_compiled_forward_wrapper_is_called_not_tested_for_truth():
    """torch.compile's OptimizedModule proxies len() to its module, so `forward or model` raised "GPT does not
    support len()" on the first H200 run (every compiled train step). The eager backend builds the same wrapper
    in milliseconds; the step through it equals the step without it."""
    torch.manual_seed(0)
    a, b = Tiny(aux=0.01), Tiny(aux=0.01)
    b.load_state_dict(a.state_dict())
    wrapper = torch.compile(a, backend="eager")
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    loss_a, norm_a = train_step(a, opt_a, batches(), None, 1.0, n_micro=2, forward=wrapper, moe=[])
    loss_b, norm_b = train_step(b, opt_b, batches(), None, 1.0, n_micro=2, moe=[])
    assert torch.equal(loss_a, loss_b) and torch.equal(norm_a, norm_b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
