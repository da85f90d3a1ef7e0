"""Functional SGD and AdamW: init, step, and the hand-written adjoint of step.

An optimizer is a frozen record of hyper-parameters; its state is an explicit value passed
in and out (optax / torchopt style). Nothing here holds an autograd graph: the metagradient
engine differentiates through a step with `step_adjoint`, a closed-form vector-Jacobian
product, instead of asking autograd to remember every step.

Parameters, gradients and adjoints are dicts name -> tensor. An adjoint dict may omit a name:
a missing entry means an exactly-zero adjoint, which lets the engine skip work for
parameters the metric does not reach (for example everything but the LM head after the last
step of a head metric).

Update rules (the engine contract in DESIGN.md):
    SGD:    θ ← θ − lr·(g + wd·θ)
    AdamW:  m ← b1·m + (1−b1)·g,  v ← b2·v + (1−b2)·g²,  m̂ = m/(1−b1^t),  v̂ = v/(1−b2^t)
            u = m̂/(√(v̂ + eps_root) + eps) + wd·θ,  θ ← θ − lr·u
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]


class SGD(NamedTuple):
    lr: float
    weight_decay: float = 0.0


class AdamW(NamedTuple):
    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    weight_decay: float = 0.0


Optimizer = SGD | AdamW


class AdamState(NamedTuple):
    count: int  # steps taken so far (t after the update that produced m, v)
    m: Params  # first moment
    v: Params  # second moment


class AdamAdjoint(NamedTuple):
    m: Params  # adjoint of the first moment (missing name = zero)
    v: Params  # adjoint of the second moment (missing name = zero)


def init(opt: Optimizer, params: Params) -> AdamState | None:
    """Fresh optimizer state (the inner run always starts from it)."""
    if isinstance(opt, SGD):
        return None
    zeros = {k: torch.zeros_like(p) for k, p in params.items()}
    return AdamState(0, zeros, {k: torch.zeros_like(p) for k, p in params.items()})


def step(
    opt: Optimizer, params: Params, state: AdamState | None, grads: Params
) -> tuple[Params, AdamState | None]:
    """One update; returns new tensors and never writes into its inputs."""
    if isinstance(opt, SGD):
        return {k: p - opt.lr * (grads[k] + opt.weight_decay * p) for k, p in params.items()}, None
    t = state.count + 1
    c1, c2 = 1.0 / (1.0 - opt.b1**t), 1.0 / (1.0 - opt.b2**t)
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = torch.lerp(g, state.m[k], opt.b1)  # b1·m + (1−b1)·g
        v = torch.lerp(g * g, state.v[k], opt.b2)
        u = (c1 * m) / (torch.sqrt(c2 * v + opt.eps_root) + opt.eps)
        if opt.weight_decay:
            u = u + opt.weight_decay * p
        new_p[k], new_m[k], new_v[k] = p - opt.lr * u, m, v
    return new_p, AdamState(t, new_m, new_v)


def step_adjoint(
    opt: Optimizer,
    state_after: AdamState | None,
    grads: Params,
    adj_params: Params,
    adj_state: AdamAdjoint | None,
) -> tuple[Params, Params, AdamAdjoint | None]:
    """Vector-Jacobian product of `step`.

    Given the adjoints of a step's outputs (new params, new state), return
    (adjoint of the gradient g, adjoint of the old params through the update alone,
    adjoint of the old state). The engine adds the Hessian term H·(adjoint of g) to the
    old params' adjoint itself: that part goes through the model, not the optimizer.
    `state_after` is the state the step produced (its m, v and count t).
    """
    if isinstance(opt, SGD):
        adj_g = {k: -opt.lr * a for k, a in adj_params.items()}
        decay = 1.0 - opt.lr * opt.weight_decay
        return adj_g, {k: decay * a for k, a in adj_params.items()}, None

    t = state_after.count
    c1, c2 = 1.0 / (1.0 - opt.b1**t), 1.0 / (1.0 - opt.b2**t)
    adj_state = adj_state or AdamAdjoint({}, {})
    adj_g, adj_p, adj_m, adj_v = {}, {}, {}, {}
    for k in set(adj_params) | set(adj_state.m) | set(adj_state.v):
        g, m, v = grads[k], state_after.m[k], state_after.v[k]
        a_m = adj_state.m.get(k)
        a_v = adj_state.v.get(k)
        a_p = adj_params.get(k)
        if a_p is not None:
            s = torch.sqrt(c2 * v + opt.eps_root)
            d = s + opt.eps
            # θ' = θ − lr·(c1·m/d + wd·θ): d/dm = −lr·c1/d,  d/dv = lr·c1·m·c2/(2·s·d²).
            from_m = (-opt.lr * c1) * a_p / d
            # Guard: where v = 0 (and eps_root = 0) the coordinate never saw a gradient, so
            # m = 0 too; the true derivative through v is 0 there, not 0·∞ = NaN.
            from_v = torch.where(s > 0, (opt.lr * c1 * c2 * 0.5) * a_p * m / (s * d * d), 0.0)
            a_m = from_m if a_m is None else a_m + from_m
            a_v = from_v if a_v is None else a_v + from_v
            if opt.weight_decay:
                adj_p[k] = (1.0 - opt.lr * opt.weight_decay) * a_p
            else:
                adj_p[k] = a_p
        # m' = b1·m + (1−b1)·g,  v' = b2·v + (1−b2)·g²
        terms = []
        if a_m is not None:
            terms.append((1.0 - opt.b1) * a_m)
            adj_m[k] = opt.b1 * a_m
        if a_v is not None:
            terms.append((2.0 * (1.0 - opt.b2)) * g * a_v)
            adj_v[k] = opt.b2 * a_v
        adj_g[k] = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return adj_g, adj_p, AdamAdjoint(adj_m, adj_v)
