"""Functional optimizers: the update against torch.optim, the adjoint against autograd."""

import pytest
import torch

from dpg.metagrad import optim


def random_params(seed=0, shapes=((3, 4), (5,))):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw_over_several_steps(weight_decay):
    params = random_params()
    ours = dict(params)
    theirs = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    opt = optim.AdamW(lr=0.05, b1=0.8, b2=0.95, eps=1e-6, eps_root=0.0, weight_decay=weight_decay)
    torch_opt = torch.optim.AdamW(theirs.values(), lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    state = optim.init(opt, ours)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
        grads["p1"][0] = 0.0  # a coordinate that never sees a gradient: v stays 0
        ours, state = optim.step(opt, ours, state, grads)
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        torch_opt.step()
    for k in params:
        torch.testing.assert_close(ours[k], theirs[k].detach(), rtol=1e-12, atol=1e-14)
    assert state.count == 5


def test_sgd_step_by_hand():
    p = {"a": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    g = {"a": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    new, state = optim.step(optim.SGD(lr=0.1, weight_decay=0.5), p, None, g)
    # θ − lr·(g + wd·θ) = [1 − 0.1·(0.5 + 0.5), −2 − 0.1·(0.25 − 1)]
    torch.testing.assert_close(new["a"], torch.tensor([0.9, -1.925], dtype=torch.float64))
    assert state is None


@pytest.mark.parametrize(
    "opt",
    [
        optim.SGD(lr=0.3, weight_decay=0.2),
        optim.AdamW(lr=0.05, b1=0.9, b2=0.99, eps=1e-3, eps_root=0.0, weight_decay=0.1),
        optim.AdamW(lr=0.05, b1=0.7, b2=0.9, eps=1e-4, eps_root=1e-6, weight_decay=0.0),
    ],
)
def test_step_adjoint_matches_autograd_vjp(opt):
    """The hand-written adjoint of step 3 equals autograd's VJP of the same update."""
    params = random_params(2)
    state = optim.init(opt, params)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # reach a non-trivial state at t = 3
        grads = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
        params, state = optim.step(opt, params, state, grads)
    grads = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    grads["p0"][1, 2] = 0.0

    leaves = [*params.values(), *grads.values()]
    if state is not None:
        leaves += [*state.m.values(), *state.v.values()]
    leaves = [x.clone().requires_grad_(True) for x in leaves]
    names = list(params)
    P, G = dict(zip(names, leaves[:2])), dict(zip(names, leaves[2:4]))
    S = None if state is None else optim.AdamState(state.count, dict(zip(names, leaves[4:6])),
                                                   dict(zip(names, leaves[6:8])))  # fmt: skip
    new_p, new_s = optim.step(opt, P, S, G)
    outs = [*new_p.values()] + ([] if new_s is None else [*new_s.m.values(), *new_s.v.values()])
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    ref = torch.autograd.grad(outs, leaves, cots, allow_unused=True)

    adj_p = dict(zip(names, cots[:2]))
    adj_s = None if new_s is None else optim.AdamAdjoint(dict(zip(names, cots[2:4])), dict(zip(names, cots[4:6])))
    after = None
    if new_s is not None:
        after = optim.AdamState(
            new_s.count, {k: x.detach() for k, x in new_s.m.items()}, {k: x.detach() for k, x in new_s.v.items()}
        )
    adj_g, adj_prev, adj_state = optim.step_adjoint(opt, after, grads, adj_p, adj_s)
    for i, k in enumerate(names):
        torch.testing.assert_close(adj_prev[k], ref[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(adj_g[k], ref[2 + i], rtol=1e-10, atol=1e-12)
        if state is not None:
            torch.testing.assert_close(adj_state.m[k], ref[4 + i], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(adj_state.v[k], ref[6 + i], rtol=1e-10, atol=1e-12)


def test_adamw_adjoint_is_finite_where_v_is_zero():
    """eps_root = 0 and a coordinate with no gradient ever: d√v/dv = ∞ there, but the true
    derivative is 0 (m = 0 too); the guard must give a finite, correct adjoint."""
    opt = optim.AdamW(lr=0.1)
    p = {"a": torch.zeros(3, dtype=torch.float64)}
    grads = {"a": torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)}
    _, state = optim.step(opt, p, optim.init(opt, p), grads)
    adj_g, _, adj_s = optim.step_adjoint(opt, state, grads, {"a": torch.ones(3, dtype=torch.float64)}, None)
    assert torch.isfinite(adj_g["a"]).all() and torch.isfinite(adj_s.v["a"]).all()
    # t = 1: u = g/(|g| + eps) ⇒ du/dg = eps/(|g| + eps)²; at g = 0 that is 1/eps.
    eps = opt.eps
    expected = -opt.lr * eps / (grads["a"].abs() + eps) ** 2
    torch.testing.assert_close(adj_g["a"], expected, rtol=1e-6, atol=0)
