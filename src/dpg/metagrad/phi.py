"""The engine's metric passes: Φ(θ_0) before the inner run, and Φ(θ_M) with its gradient λ.

Φ(θ_0) is only reported (MetagradResult.metric_before), and which trainable parameters Φ
reads only decides whether an M = 1 head metric may reuse the training pass's hidden
states. A GRPO reward calls the engine every step with the same metric and the same target,
so both are kept from the last call and reused while the metric object, the target's
parameters and buffers (the same tensors, none edited in place: `tensor._version`, the
counter autograd's own checks read), the dtype, device and matmul precision are all
unchanged. A metric is a function of the parameters it is given (metrics.py); one that
changes with anything else must be a new object to be measured afresh.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dpg.errors import DpgError
from dpg.metagrad.precision import matmul_precision
from dpg.metagrad.records import check_metric_value, proxy_figures
from dpg.metagrad.target import Target

Params = dict[str, Tensor]
Metric = Callable[[Params], Tensor]


class _Probe(NamedTuple):
    metric: weakref.ref  # the metric measured (weakly held: the cache keeps nothing alive)
    tensors: tuple[weakref.ref, ...]  # the model's parameters and buffers it was measured on
    key: tuple  # their identities and versions, and the settings Φ's rounding depends on
    phi: float  # Φ(θ_0)
    support: frozenset[str] | None  # trainable parameters Φ reads; None: not asked for


_last: list[_Probe] = []  # the last probe (one slot: a GRPO run has one metric and one target)


def metric_before(metric: Metric, model: nn.Module, target: Target, want_support: bool) -> tuple[float, set[str]]:
    """Φ(θ_0), and (if `want_support`) the trainable parameters Φ depends on; else an empty set.
    `model` is the caller's model, whose tensors the target's θ_0 are (or are copied from)."""
    tensors = [t for _, t in (*model.named_parameters(), *model.named_buffers())]
    first = next(iter(target.params.values()))
    key = (
        tuple((id(t), t._version, t.requires_grad) for t in tensors),
        first.dtype, first.device, matmul_precision(),
    )  # fmt: skip
    if _last:
        hit = _last[0]
        same = hit.metric() is metric and hit.key == key and all(r() is t for r, t in zip(hit.tensors, tensors))
        if same and (hit.support is not None or not want_support):
            return hit.phi, set(hit.support or ())
    if want_support:
        phi, support = _probe(metric, target)
    else:  # the value alone: no graph, and a checkpointed metric runs its plain forward
        with torch.no_grad():
            value = metric({**target.frozen, **target.params})
        check_metric_value(value, "the metric", "before the inner run", needs_grad=False)
        phi, support = value.item(), None
    _last[:] = []
    try:
        _last.append(_Probe(weakref.ref(metric), tuple(weakref.ref(t) for t in tensors), key, phi,
                            None if support is None else frozenset(support)))  # fmt: skip
    except TypeError:  # a metric that cannot be weakly referenced is measured every call
        pass
    return phi, set(support or ())


def _probe(metric: Metric, target: Target) -> tuple[float, set[str]]:
    """Φ(θ_0) and the trainable parameters Φ depends on, from the forward graph alone."""
    phi, leaves = _forward(metric, target, target.params, "before the inner run")
    reached, seen, stack = set(), set(), [phi.grad_fn]
    while stack:  # AccumulateGrad nodes hold the leaves the graph reaches
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            reached.add(id(node.variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return phi.item(), {k for k, v in leaves.items() if id(v) in reached}


def _forward(metric: Metric, target: Target, params: Params, when: str) -> tuple[Tensor, Params]:
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        phi = metric({**target.frozen, **leaves})
    check_metric_value(phi, "the metric", when)
    return phi, leaves


def value_and_grad(metric: Metric, target: Target, params: Params) -> tuple[float, Params, dict[str, Any]]:
    """Φ(θ_M), λ = ∇Φ(θ_M) over the trainable parameters Φ reads, and the proxy figures. A metric
    with its own `value_and_grad(params, names) -> (Φ, {name: gradient or None})` gives both
    (lm_loss: chunk by chunk, no recomputed forward); any other goes through autograd."""
    own = getattr(metric, "value_and_grad", None)
    if callable(own):
        phi, grads = own({**target.frozen, **params}, list(params))
        check_metric_value(phi, "the metric", "after the inner run", needs_grad=False)
        adj = {k: g for k, g in grads.items() if g is not None}
    else:
        phi, leaves = _forward(metric, target, params, "after the inner run")
        grads = torch.autograd.grad(phi.reshape(()), list(leaves.values()), allow_unused=True)
        adj = {k: g for k, g in zip(leaves, grads) if g is not None}
    if not adj:
        raise DpgError("the metric does not depend on any trainable weight of the target")
    finite = torch.stack([torch.isfinite(g).all() for g in adj.values()])  # one wait for the device, not one a tensor
    if not finite.all():
        bad = [k for k, ok in zip(adj, finite.tolist()) if not ok]
        raise DpgError(f"the metric's gradient is not finite in {bad[:3]}")
    return phi.item(), adj, proxy_figures(metric, {**target.frozen, **params}, phi.item())
