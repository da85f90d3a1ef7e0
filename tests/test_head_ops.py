"""The reverse step's hand-written pieces against plain autograd in fp64 (head_ops.py, target.py)."""

import pytest
import torch
import torch.nn.functional as F


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("with_bias,h_dot,t_weight", [(True, True, True), (False, True, False), (True, False, True)])
def test_head_objective_and_its_gradient_match_autograd(with_bias, h_dot, t_weight):
    """Σ c·d and d per token, and the objective's gradient in (h, ḣ, W, b), against autograd
    of the direct formula d = softmax(z)·ż − ż_y, over several chunks (n = 11, chunk 4)."""
    from dpg.metagrad.head_ops import HeadObjective

    g = torch.Generator().manual_seed(3)
    n, d_model, vocab = 11, 5, 13

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    h, hd, w, tw = rand(n, d_model), rand(n, d_model), rand(vocab, d_model), rand(vocab, d_model)
    b, tb = rand(vocab), rand(vocab)
    labels, c = torch.randint(0, vocab, (n,), generator=g), rand(n).abs()
    hd, tw = (hd if h_dot else None), (tw if t_weight else None)
    b, tb = (b, tb) if with_bias else (None, None)
    leaves = [x.clone().requires_grad_(True) for x in (h, hd, w, b) if x is not None]

    def direct(h, hd, w, b):
        z_dot = (h @ tw.T if tw is not None else 0) + (hd @ w.T if hd is not None else 0)
        z_dot = z_dot + (tb if tb is not None else 0)
        p = torch.softmax(F.linear(h, w, b), -1)
        return (p * z_dot).sum(-1) - z_dot.gather(1, labels[:, None]).squeeze(1)

    def split(xs):
        it = iter(xs)
        return [next(it) if x is not None else None for x in (h, hd, w, b)]

    ref_d = direct(*split(leaves))
    ref_grads = torch.autograd.grad((c * ref_d).sum(), leaves)
    mine = [x.clone().requires_grad_(True) for x in leaves]
    needs = (True, hd is not None, True, b is not None)
    obj, d, *_ = HeadObjective.apply(*split(mine), tw, tb, labels, c, needs, 4)
    assert rel_err(d, ref_d.detach()) < 1e-13 and abs(obj.item() - (c * ref_d).sum().item()) < 1e-12
    assert not d.requires_grad  # the scores are an output, not differentiated
    for got, ref in zip(torch.autograd.grad(3.0 * obj, mine), ref_grads):
        assert rel_err(got, 3.0 * ref) < 1e-13
