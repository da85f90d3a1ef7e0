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


@pytest.mark.parametrize("eps,eps_root", [(1e-3, 0.0), (1e-8, 1e-9), (1e-4, 1e-6)])
@pytest.mark.parametrize("upstream", [True, False])
def test_first_step_adjoint_matches_autograd_vjp(eps, eps_root, upstream):
    """t = 1 takes its own closed form for the update's route to g; with cotangents on the new
    state as well (what step 2 hands back when M > 1), it equals autograd's VJP of step."""
    opt = optim.AdamW(lr=0.05, b1=0.8, b2=0.95, eps=eps, eps_root=eps_root, weight_decay=0.1)
    params = random_params(4)
    g = torch.Generator().manual_seed(5)
    grads = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) * 10.0 ** (2 * i - 3)
             for i, (k, p) in enumerate(params.items())}  # |g| from ~√eps_root to far past it  # fmt: skip
    # (g = 0 with eps_root = 0 is test_adamw_adjoint_is_finite_where_v_is_zero's: autograd gives NaN there)
    leaves = [x.clone().requires_grad_(True) for x in (*params.values(), *grads.values())]
    names = list(params)
    new_p, new_s = optim.step(opt, dict(zip(names, leaves[:2])), optim.init(opt, params), dict(zip(names, leaves[2:])))
    outs = [*new_p.values(), *new_s.m.values(), *new_s.v.values()]
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    ref = torch.autograd.grad(outs, leaves, cots)
    after = optim.AdamState(1, {k: x.detach() for k, x in new_s.m.items()}, {k: x.detach() for k, x in new_s.v.items()})
    adj_s = optim.AdamAdjoint(dict(zip(names, cots[2:4])), dict(zip(names, cots[4:6])))
    adj_g, adj_prev, _ = optim.step_adjoint(opt, after, grads, dict(zip(names, cots[:2])), adj_s, upstream=upstream)
    for i, k in enumerate(names):
        torch.testing.assert_close(adj_g[k], ref[2 + i], rtol=1e-10, atol=1e-12)
        if upstream:
            torch.testing.assert_close(adj_prev[k], ref[i], rtol=1e-10, atol=1e-12)


def test_first_step_adjoint_keeps_fp32_precision_where_the_update_saturates():
    """|g| far past √eps_root: the first update is ±lr and du/dg = (eps_root + s·eps)/(s·d²),
    tiny. Computed as 1/d − g²/(s·d²), fp32 kept it only to ~6e-8·g²/eps_root (12 % at
    1,000·√eps_root); the closed form keeps fp32's rounding. Reference: autograd in fp64."""
    opt = optim.AdamW(lr=5e-6, b1=0.9, b2=0.95, eps=1e-8, eps_root=1e-9, weight_decay=1e-4)
    ratios = torch.tensor([0.1, 1.0, 10.0, 100.0, 1e3, 3e3, 1e4, -1e3], dtype=torch.float64)
    g64 = {"w": ratios * opt.eps_root**0.5}
    p64 = {"w": torch.linspace(-1, 1, len(ratios), dtype=torch.float64)}
    a64 = {"w": torch.linspace(0.5, 2.0, len(ratios), dtype=torch.float64)}
    leaf = g64["w"].clone().requires_grad_(True)
    new_p, _ = optim.step(opt, p64, optim.init(opt, p64), {"w": leaf}, keep_state=False)
    (ref,) = torch.autograd.grad(new_p["w"], leaf, a64["w"])
    as32 = {k: {"w": d["w"].float()} for k, d in (("g", g64), ("p", p64), ("a", a64))}
    _, state = optim.step(opt, as32["p"], optim.init(opt, as32["p"]), as32["g"])
    adj_g, _, _ = optim.step_adjoint(opt, state, as32["g"], as32["a"], None, upstream=False)
    rel = (adj_g["w"].double() - ref).abs() / ref.abs()
    assert rel.max() < 1e-6, rel.tolist()


def test_first_step_adjoint_is_nan_where_g_squared_overflows():
    """fp32, |g| = 1e20: v = (1−b2)·g² is ∞, the update there is 0 instead of ±lr, and no
    derivative of it holds: NaN (the engine's finiteness check then names the cause), while
    the other coordinates keep their value."""
    opt = optim.AdamW(lr=1e-3, eps_root=1e-9)
    p = {"a": torch.zeros(2)}
    grads = {"a": torch.tensor([1e20, 1e-3])}
    _, state = optim.step(opt, p, optim.init(opt, p), grads)
    adj_g, _, _ = optim.step_adjoint(opt, state, grads, {"a": torch.ones(2)}, None, upstream=False)
    s = (1e-6 + 1e-9) ** 0.5  # √(g² + eps_root) at g = 1e-3
    assert torch.isnan(adj_g["a"][0])
    assert adj_g["a"][1].item() == pytest.approx(-1e-3 * (1e-9 + s * 1e-8) / (s * (s + 1e-8) ** 2), rel=1e-5)


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


def one_by_one(fn, rows):
    """The reference: `fn` on each parameter's own tensors (in CHUNK pieces), as before packing."""
    return [optim.map_chunks(fn, *row) for row in rows]


def test_map_params_packs_parameters_and_gives_each_parameters_numbers_bit_for_bit(monkeypatch):
    """Packed groups (CHUNK shrunk to 64 elements, so rows group, fill groups and split into
    chunks; odd sizes shift every row's place in the vector lanes), mixed None patterns and
    dtypes: every output equals `fn` on that parameter alone, bit for bit, in a new tensor."""
    monkeypatch.setattr(optim, "CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (64,), (2, 40), (1,), (5, 5), (150,), (4,)]
    rows = []
    for i, s in enumerate(shapes):
        dtype = torch.float32 if i % 3 == 0 else torch.float64
        x, y = (torch.randn(s, generator=g, dtype=dtype) for _ in range(2))
        rows.append((x, y, None if i % 2 else torch.rand(s, generator=g, dtype=dtype)))

    def fn(a, b, c):  # an input returned as it is, a None output, and Adam-like arithmetic
        d = torch.sqrt(b * b + 1e-9) + 1e-8
        return a, (a / d if c is None else torch.lerp(a, c, 0.9) / d), None

    packed, reference = optim.map_params(fn, rows), one_by_one(fn, rows)
    for row, got, want in zip(rows, packed, reference):
        assert got[2] is None
        for x, y in zip(got[:2], want[:2]):
            assert x.shape == row[0].shape and x.dtype == row[0].dtype and torch.equal(x, y)
        assert got[0].data_ptr() != row[0].data_ptr()  # never the caller's own tensor
    groups = optim._packed(rows)
    assert sorted(i for grp in groups for i in grp) == list(range(len(rows)))
    for grp in groups:
        keys = {(rows[i][0].dtype, rows[i][2] is None) for i in grp}
        assert len(keys) == 1 and (len(grp) == 1 or sum(rows[i][0].numel() for i in grp) <= 64)
    # by hand: 7 + 25 + 4 share a group; a full group (64) and rows over 64 (chunked) stand alone
    assert groups == [[0], [1, 5, 7], [2], [3], [4], [6]]


def test_update_makes_far_fewer_op_calls_than_one_parameter_at_a_time():
    """What packing is for: an AdamW update of 60 small parameters (a 30-layer model's norms and
    biases) dispatches a fraction of the computing op calls (each a kernel launch on a GPU) of
    60 one-parameter updates, with the same numbers bit for bit. Views (reshape, split) are
    left out: per-row metadata, no kernel."""
    from torch.profiler import ProfilerActivity, profile

    params = random_params(shapes=[(64,)] * 60)
    grads = {k: torch.randn_like(p) for k, p in params.items()}
    opt = optim.AdamW(lr=1e-3, b2=0.95, eps_root=1e-9, weight_decay=1e-4)
    state = optim.step(opt, params, optim.init(opt, params), grads)[1]  # a second step: m and v in play

    def calls(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn()
        views = {"aten::view", "aten::reshape", "aten::as_strided", "aten::split_with_sizes", "aten::_reshape_alias"}
        return out, sum(e.count for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in views)

    packed, n_packed = calls(lambda: optim.step(opt, params, state, grads)[0])
    alone, n_alone = calls(lambda: {k: optim.step(opt, {k: p}, optim.AdamState(1, {k: state.m[k]}, {k: state.v[k]}),
                                                  grads)[0][k] for k, p in params.items()})  # fmt: skip
    for k in params:
        assert torch.equal(packed[k], alone[k])
    assert n_packed * 20 < n_alone, (n_packed, n_alone)
