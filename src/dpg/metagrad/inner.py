"""The inner run's steps, carried out along a checkpoint schedule (schedule.py).

One function, `train_step`, makes every step: the forward run, any recomputation from a
saved state during the reverse sweep, and plain `fine_tune`. A recomputed step therefore
runs the same code on the same inputs (same microbatch order, same arithmetic) and
reproduces the saved run's record bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from dpg.metagrad import optim
from dpg.metagrad.parallel import all_reduce_sum
from dpg.metagrad.schedule import Action, is_direct
from dpg.metagrad.store import Record, StepStore
from dpg.metagrad.target import Microbatch, Target, batch_loss_grad

Params = dict[str, Tensor]


class Step(NamedTuple):
    size: int  # |B_t|, the divisor of the batch loss
    microbatches: list[Microbatch]


class Stepped(NamedTuple):
    params: Params  # θ_t
    state: optim.AdamState | None  # optimizer state after step t
    grads: Params  # g_t = ∇L_t(θ_{t−1})
    loss: float  # L_t(θ_{t−1}), weighted batch loss
    hidden: dict[str, Tensor]  # the training pass's hidden states, per microbatch (when asked)
    at_embeds: dict[str, Tensor]  # and, on a tied head, its gradient at the embedding's output


def train_step(
    target: Target, opt: optim.Optimizer, step: Step, params: Params, state: optim.AdamState | None, bar: tqdm,
    stash_hidden: bool = False, group: dist.ProcessGroup | None = None, keep_state: bool = True,
) -> Stepped:  # fmt: skip
    """One inner step. `keep_state=False`: no optimizer state after it (None), for a step
    whose state nothing reads (the last one; after step 1 the reverse sweep recomputes m, v from g)."""
    grads, loss, hidden, at_embeds = _batch_grad(target, params, step, bar, stash_hidden, group)
    new_params, new_state = optim.step(opt, params, state, grads, keep_state=keep_state)
    return Stepped(new_params, new_state, grads, loss, hidden, at_embeds)


def _batch_grad(
    target: Target, params: Params, step: Step, bar: tqdm, stash_hidden: bool, group: dist.ProcessGroup | None
) -> tuple[Params, float, dict[str, Tensor], dict[str, Tensor]]:
    total, loss, stash, at_embeds = None, torch.zeros((), dtype=torch.float64), {}, {}
    for j, mb in enumerate(step.microbatches):
        grads, ex_losses, hidden, embeds_grad = batch_loss_grad(target, params, mb, step.size, embed_grad=stash_hidden)
        total = grads if total is None else {k: total[k].add_(grads[k]) for k in total}
        # summed where it is computed: one wait for the device per step, not per microbatch
        loss = loss.to(ex_losses.device) + (mb.weights * ex_losses).sum().double() / step.size
        if stash_hidden:
            stash[str(j)] = hidden
            if embeds_grad is not None:
                at_embeds[str(j)] = embeds_grad
        bar.update(1)
    if total is None:  # this rank holds no example of this step
        total = {k: torch.zeros_like(p) for k, p in params.items()}
    if group is not None:
        total = all_reduce_sum(total | {"\0loss": loss.to(next(iter(total.values())))}, group)
        loss = total.pop("\0loss").double()
    return total, loss.item(), stash, at_embeds


class ScheduledRun:
    """Carries out a schedule's actions: `forward()` up to θ_M, then `reversed_records()`."""

    def __init__(
        self, target: Target, opt: optim.Optimizer, plan: list[Step], actions: tuple[Action, ...], store: StepStore,
        bar: tqdm, timings: dict[str, float], stash_hidden: bool = False, group: dist.ProcessGroup | None = None,
    ):  # fmt: skip
        self.target, self.opt, self.plan, self.actions, self.store = target, opt, plan, actions, store
        self.bar, self.timings, self.stash_hidden, self.group = bar, timings, stash_hidden, group
        self.position = 0  # the next action
        self.current: tuple[Params, optim.AdamState | None] | None = None  # the state the next run starts from
        self.direct: Record | None = None  # a record handed straight to the next reverse

    def forward(self) -> tuple[Params, list[float]]:
        """The forward run: every action before the first reverse. Returns θ_M and the losses."""
        losses = []
        while self.actions[self.position][0] != "reverse":
            losses.extend(self._do(self.position))
            self.position += 1
        return self.current[0], losses

    def reversed_records(self) -> Iterator[tuple[int, Record]]:
        """(t, record) for t = M..1, recomputing what the schedule did not keep."""
        self.current = None  # θ_M is no longer needed on the device
        for i in range(self.position, len(self.actions)):
            act = self.actions[i]
            if act[0] != "reverse":
                start = time.perf_counter()
                self._do(i)
                self.timings["replay"] = self.timings.get("replay", 0.0) + _synced(start, self.target)
                continue
            self.current = None
            if self.direct is not None:  # the step just run: its record never left the device
                record, self.direct = self.direct, None
            else:
                record = self.store.pop(("record", act[1]))
            yield act[1], record

    def _do(self, i: int) -> list[float]:
        act = self.actions[i]
        if act[0] == "restore":
            self.current = self._restore(act[1])
        elif act[0] == "free":
            self.store.drop(("state", act[1]))
        else:  # run
            t, save = act[1], act[2]
            params, state = self.current
            # A record of step 1 holds only g (m, v are functions of it): its state is needed
            # only by a later step or a saved state. For M = 1 that spares two parameter copies.
            keep = t < len(self.plan) or save == "state" or (save == "record" and t > 1)
            out = train_step(
                self.target, self.opt, self.plan[t - 1], params, state, self.bar, self.stash_hidden and t == 1,
                self.group, keep_state=keep,
            )  # fmt: skip
            if save == "record":
                record = _record(t, params, out, isinstance(self.opt, optim.AdamW))
                if is_direct(self.actions, i):
                    self.direct = record
                else:
                    self.store.put(("record", t), record)
            elif save == "state":
                self.store.put(("state", t), _state(out))
            self.current = (out.params, out.state)
            return [out.loss]
        return []

    def _restore(self, c: int) -> tuple[Params, optim.AdamState | None]:
        if c == 0:
            return self.target.params, optim.init(self.opt, self.target.params)
        saved = self.store.get(("state", c))
        return saved["theta"], optim.AdamState(c, saved["m"], saved["v"]) if "m" in saved else None


def _record(t: int, params: Params, out: Stepped, adamw: bool) -> Record:
    """What step t's adjoint needs. θ_0 is target.params, always at hand; step 1's moments
    are functions of its gradient, recomputed by the adjoint (optim.step_adjoint)."""
    record = {"theta": params} if t > 1 else {}
    if adamw:
        record["g"] = out.grads
        if t > 1:
            record |= {"m": out.state.m, "v": out.state.v}
    if out.hidden:
        record["hidden"] = out.hidden
    if out.at_embeds:
        record["at_embeds"] = out.at_embeds
    return record


def _state(out: Stepped) -> Record:
    state = {"theta": out.params}
    if out.state is not None:
        state |= {"m": out.state.m, "v": out.state.v}
    return state


def _synced(start: float, target: Target) -> float:
    device = next(iter(target.params.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
