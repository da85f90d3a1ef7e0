"""The reverse sweep: from λ = ∇Φ(θ_M) back through the inner steps t = M..1 (engine.py).

At step t: the optimizer's adjoint (optim.step_adjoint) gives γ_t, the adjoint of the
gradient g_t; one reverse-over-forward pass per microbatch (target.hvp_and_tangent_scores)
gives every example's score γ_t·∇l_i/|B_t| and the Hessian-vector product ∇²L_t·γ_t, which
joins λ on its way to θ_{t−1}. Step 1 needs no Hessian term. `reverse_step` is one step
t > 1, as the sweep runs it (benchmarks/reverse_profile.py times it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from dpg.metagrad import optim
from dpg.metagrad.inner import ScheduledRun, Step
from dpg.metagrad.parallel import all_reduce_sum
from dpg.metagrad.store import Record
from dpg.metagrad.target import (
    Target, embedding_scores, head_tangent_scores, hvp_and_tangent_scores, tangent_scores,
)  # fmt: skip

Params = dict[str, Tensor]


def reverse_sweep(target: Target, run: ScheduledRun, adj: Params, n: int, hvp_plan: list[Step]) -> Tensor:
    """Every example's dΦ/dw_i (float64, (n,)), from λ = `adj` at θ_M and the run's records."""
    scores = torch.zeros(n, dtype=torch.float64, device=next(iter(adj.values())).device)
    adj_state = None
    for t, record in run.reversed_records():
        if t == 1:  # nothing upstream of θ_0 is wanted: scores only, no Hessian term
            _first_step_scores(target, run, record, adj, adj_state, scores)
            break
        adj, adj_state = reverse_step(
            target, run.opt, t, record, run.plan[t - 1].size, hvp_plan[t - 1], adj, adj_state, scores, run.bar,
            run.group,
        )  # fmt: skip
    return scores


def _adjoints(
    opt: optim.Optimizer, t: int, record: Record, adj: Params, adj_state: optim.AdamAdjoint | None
) -> tuple[Params, Params, optim.AdamAdjoint | None]:
    """Step t's optimizer adjoint: (γ_t, λ through the update alone, the state's adjoint)."""
    adamw = isinstance(opt, optim.AdamW)
    state_after = optim.AdamState(t, record.pop("m", {}), record.pop("v", {})) if adamw else None
    out = optim.step_adjoint(opt, state_after, record.pop("g", {}), adj, adj_state, upstream=t > 1)
    adj.clear()  # λ is consumed (the caller's dict too): its memory is free for the passes that follow
    return out


def reverse_step(
    target: Target, opt: optim.Optimizer, t: int, record: Record, size: int, hvp_step: Step, adj: Params,
    adj_state: optim.AdamAdjoint | None, scores: Tensor, bar: tqdm | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Params, optim.AdamAdjoint | None]:  # fmt: skip
    """Reverse step t > 1: the optimizer adjoint, then one reverse-over-forward pass per HVP
    microbatch adding γ_t·∇l_i/|B_t| into `scores` and summing H·γ_t. Consumes `record` and
    `adj` (emptied); returns (λ_{t−1}, the adjoint of the state before step t)."""
    theta = record.pop("theta", target.params)
    gamma, adj_direct, adj_state = _adjoints(opt, t, record, adj, adj_state)
    hv_sum = None
    for mb in hvp_step.microbatches:
        hv, dl = hvp_and_tangent_scores(target, theta, gamma, mb, size)
        hv_sum = hv if hv_sum is None else {k: hv_sum[k] + hv[k] for k in hv_sum}
        scores.index_add_(0, mb.index, dl.double() / size)
        if bar is not None:
            bar.update(1)
    if hv_sum is None:  # this rank holds no example of this step
        hv_sum = {k: torch.zeros_like(p) for k, p in theta.items()}
    if group is not None:
        hv_sum = all_reduce_sum(hv_sum, group)
    return {k: (hv_sum[k] + adj_direct[k]) if k in adj_direct else hv_sum[k] for k in hv_sum}, adj_state


def _first_step_scores(
    target: Target, run: ScheduledRun, record: Record, adj: Params, adj_state: optim.AdamAdjoint | None,
    scores: Tensor,
) -> None:  # fmt: skip
    """Reverse step 1: the scores alone, one forward-mode pass per training microbatch, or
    none where Φ reads the LM head alone and the training pass kept what the scores need."""
    step, theta = run.plan[0], record.pop("theta", target.params)
    gamma, _, _ = _adjoints(run.opt, 1, record, adj, adj_state)
    stash = record.get("hidden") if head_only(target, gamma) else None
    at_embeds = record.get("at_embeds") or {}
    for j, mb in enumerate(step.microbatches):
        # a tied head's lookups: from the gradient at the embedding's output, when every w_i ≠ 0
        tied_ok = not target.head_tied or (str(j) in at_embeds and bool((mb.weights != 0).all()))
        if stash and tied_ok:  # the training pass's hidden states: no second trunk pass at all
            dl = head_tangent_scores(target, theta, gamma, stash[str(j)], mb)
            if target.head_tied:
                dl = dl + embedding_scores(target, gamma, at_embeds[str(j)], mb, step.size)
        else:
            dl = tangent_scores(target, theta, gamma, mb)
        scores.index_add_(0, mb.index, dl.double() / step.size)
        run.bar.update(1)


def head_only(target: Target, support: Params | set[str]) -> bool:
    """Whether `support` (parameter names) is the LM head alone on a split target whose M = 1
    scores the training pass can give: an untied head (from its hidden states), or a tied one
    whose lookups can be made outside the trunk (and the gradient at their output)."""
    head = {target.head, target.head_bias} - {None}
    by_pass = not target.head_tied or target.embeds is not None
    return target.trunk is not None and by_pass and bool(head) and set(support) <= head
