"""example_metagrads: the exact derivative of a metric Φ, measured after M steps of
fine-tuning, with respect to each training example's loss weight.

    scores[i] = dΦ(θ_M)/dw_i   where step t minimises  L_t(θ) = Σ_{i∈B_t} w_i·l_i(θ) / |B_t|

Method (reverse-mode through the inner run, with closed-form optimizer adjoints):

  forward   θ_t, s_t = step(θ_{t−1}, s_{t−1}, g_t),  g_t = ∇L_t(θ_{t−1});  saved per step
  metric    λ = ∇Φ(θ_M)
  reverse   for t = M..1:  γ_t = adjoint of g_t (optimizer adjoint, elementwise)
                           scores[i] += γ_t·∇l_i(θ_{t−1}) / |B_t|      (forward mode, per microbatch)
                           λ ← (∂step/∂θ)ᵀλ + ∇²L_t(θ_{t−1})·γ_t         (reverse-over-forward HVP)

Step 1 needs no Hessian term (nothing upstream of θ_0 is wanted), so for M = 1 the reverse
sweep is a single forward-mode pass, and parameters whose adjoint is zero carry no tangent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpg.errors import DpgError
from dpg.metagrad import optim, schedule
from dpg.metagrad.inner import ScheduledRun, Step, train_step
from dpg.metagrad.phi import metric_before, value_and_grad
from dpg.metagrad.precision import tf32_matmuls
from dpg.metagrad.parallel import smallest, summed
from dpg.metagrad.records import (
    Examples,
    MetagradResult,
    Recipe,
    TrainResult,
    check_hvp_microbatch_size,
    check_inputs,
    check_scores,
    explain_not_finite,
    make_examples,
)
from dpg.metagrad.reverse import head_only, reverse_sweep
from dpg.metagrad.store import StepStore, free_bytes
from dpg.metagrad.target import (
    Target,
    make_microbatch,
    prepared,
)

__all__ = [  # the engine's records live in records.py; importable from here too
    "Examples", "MetagradResult", "Recipe", "TrainResult", "check_inputs", "make_examples",
    "example_metagrads", "fine_tune", "plan_steps",
]  # fmt: skip

Params = dict[str, Tensor]
Metric = Callable[[Params], Tensor]
log = logging.getLogger("dpg")


def example_metagrads(
    model: nn.Module,
    examples: Examples,
    recipe: Recipe,
    metric: Metric,
    weights: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    offload: str = "cpu",
    progress: bool = False,
    on_trained: Callable[[Params], None] | None = None,
    group: dist.ProcessGroup | None = None,
    hvp_microbatch_size: int | None = None,
    checkpoint_k: int | None = None,
) -> MetagradResult:
    """Exact dΦ/dw_i for every example after the inner run `recipe` on `examples`.

    `model` (an HF causal LM or any module with the same call signature) is left unmodified;
    its parameters with requires_grad are the ones trained. `metric` maps a dict of all
    parameters (names as in `model.named_parameters()`) to a scalar, higher is better; it
    may carry a `proxy(params) -> dict` for readable figures. `offload` says where each
    step's saved state waits for the reverse sweep: "cpu" (default), "disk" or "device";
    `recipe.state_budget_gb` bounds it (schedule.py: what does not fit is recomputed, same
    scores). `on_trained`, if given, sees every parameter at θ_M before the reverse sweep.

    `group` (a torch.distributed process group, e.g. `dist.group.WORLD`): data-parallel.
    Every rank passes its own share of the examples (and weights); inner step t trains on
    the union of the ranks' batch t, with the batch gradient and the Hessian-vector
    products all-reduced, so θ_t, Φ and every score equal those of one process holding all
    the examples (up to the order of floating-point sums). Each rank gets its own
    examples' scores. Every rank must call with the same model, recipe and metric.

    `hvp_microbatch_size`: examples per Hessian-vector-product pass (M > 1 only), which holds
    about twice a training pass's activations; None: `recipe.microbatch_size`. Only memory
    and speed depend on it, never the result. `checkpoint_k` forces the checkpoint tree's
    branching (k ≥ M: all saved); None: the fewest recomputed steps within the budget.
    """
    start = time.perf_counter()
    device = _resolve_device(model, device)
    weights = check_inputs(model, examples, recipe, weights)
    check_hvp_microbatch_size(hvp_microbatch_size)
    store = StepStore(offload, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict[str, float] = {}
    with prepared(model, dtype, device) as target, explain_not_finite(model, examples):
        opt = recipe.optimizer_record()
        sched = _schedule(target, opt, recipe, offload, device, group, checkpoint_k)
        plan = _global_sizes(plan_steps(examples, weights, recipe, device, dtype), group, device)
        hvp_plan = _hvp_plan(plan, examples, weights, recipe, hvp_microbatch_size, device, dtype, group)
        total = sum(len(plan[a[1] - 1].microbatches) for a in sched.actions if a[0] == "run")
        total += len(plan[0].microbatches) + sum(len(s.microbatches) for s in hvp_plan[1:])
        with tqdm(total=total, disable=not progress, desc="metagradient", unit="mb") as bar:
            run = ScheduledRun(target, opt, plan, sched.actions, store, bar, timings, group=group)
            result = _metagrads(model, target, run, hvp_plan, metric, timings, len(weights), on_trained)
        check_scores(result.scores, dtype)
    timings["total"] = time.perf_counter() - start
    return _with_diagnostics(result, timings, device, sched, recipe.steps, store)


def _with_diagnostics(
    result: MetagradResult, timings: dict[str, float], device: torch.device, sched: schedule.Plan, steps: int,
    store: StepStore,
) -> MetagradResult:  # fmt: skip
    """The result with its timings, peak GPU memory and the schedule that ran (what it recomputed and held)."""
    result.timings = timings
    result.peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result.schedule = sched._asdict() | {"recomputed": sched.runs - steps, "held_items": store.peak_items,
                                        "held_bytes": store.peak_bytes}  # fmt: skip
    del result.schedule["actions"]
    return result


def _hvp_plan(
    plan: list[Step], examples: Examples, weights: Tensor, recipe: Recipe, size: int | None, device: torch.device,
    dtype: torch.dtype, group: dist.ProcessGroup | None,
) -> list[Step]:  # fmt: skip
    """The steps cut into microbatches of `size` for the Hessian-vector-product passes."""
    if size is None or recipe.steps == 1:
        return plan
    finer = replace(recipe, microbatch_size=size)
    return _global_sizes(plan_steps(examples, weights, finer, device, dtype), group, device)


def _schedule(
    target: Target, opt: optim.Optimizer, recipe: Recipe, offload: str, device: torch.device,
    group: dist.ProcessGroup | None, k: int | None,
) -> schedule.Plan:  # fmt: skip
    """The checkpoint schedule that fits the budget (the same on every rank), logged."""
    if k is not None and k < 2:
        raise DpgError(f"checkpoint_k must be at least 2, got {k}")
    unit = sum(p.numel() * p.element_size() for p in target.params.values())
    if recipe.state_budget_gb is not None:
        budget = int(recipe.state_budget_gb * 2**30)
    else:
        room = free_bytes(offload, device)
        # Half the free memory (saved states are page-locked on a GPU machine: leave the rest to
        # everything else), 80 % of the free disk; rounded down to 1 MiB so that repeated calls
        # find their plan in choose's cache (to 1 GiB, a small machine would get a budget of 0).
        share = 0.5 if offload == "cpu" else 0.8
        budget = None if room is None else int(share * room) // 2**20 * 2**20
    if group is not None:
        budget = None if budget is None else int(smallest(budget, group, device))
    sched = schedule.choose(recipe.steps, isinstance(opt, optim.AdamW), unit, budget, k)
    log.info("metagradient over M = %d steps: %s", recipe.steps, schedule.describe(sched, recipe.steps))
    return sched


def _metagrads(
    model: nn.Module, target: Target, run: ScheduledRun, hvp_plan: list[Step], metric: Metric,
    timings: dict[str, float], n: int, on_trained: Callable[[Params], None] | None,
) -> MetagradResult:  # fmt: skip
    device = target.params[next(iter(target.params))].device
    try:
        # Φ is measured in full fp32 even inside `tf32_matmuls()` (reward.tf32): an inner step
        # moves weights far below TF32's input resolution, and de-quantized weights (GGUF) sit on
        # or halfway between TF32 values, so TF32's rounding turns the step into a ~1e-3 relative
        # one in its own direction. On one H200 that made Φ(θ_1) − Φ(θ_0) of a SmolLM2 step 9×
        # what fp32 measures (0.0204 against 0.0023), while the TF32-trained θ_1 measured in
        # fp32 gained what the fp32 step does (README, German run).
        with _phase(timings, "metric", device), tf32_matmuls(False):
            # Φ(θ_0) (kept from the last call while metric and θ_0 are unchanged: phi.py), and
            # where it can matter, which parameters Φ reads: a metric on the (untied) LM head
            # alone, with M = 1, is scored from the training pass's own hidden states.
            splittable = len(run.plan) == 1 and head_only(target, ())  # could any support be the head alone?
            phi0, support = metric_before(metric, model, target, want_support=splittable)
        run.stash_hidden = splittable and head_only(target, support)
        with _phase(timings, "train", device):
            params, losses = run.forward()
        with _phase(timings, "metric", device), tf32_matmuls(False):
            phi, adj, proxy = value_and_grad(metric, target, params)
        if on_trained is not None:
            on_trained({**target.frozen, **params})
        del params
        with _phase(timings, "reverse", device):
            scores = reverse_sweep(target, run, adj, n, hvp_plan)
    finally:
        run.store.close()
    return MetagradResult(scores.cpu(), phi, phi0, proxy, losses)


def fine_tune(
    model: nn.Module,
    examples: Examples,
    recipe: Recipe,
    weights: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
    group: dist.ProcessGroup | None = None,
) -> TrainResult:
    """The inner run alone (plain fine-tuning, no metagradient): the same steps, same math,
    data-parallel over `group` as in `example_metagrads`."""
    device = _resolve_device(model, device)
    weights = check_inputs(model, examples, recipe, weights)
    with prepared(model, dtype, device) as target:
        plan = _global_sizes(plan_steps(examples, weights, recipe, device, dtype), group, device)
        total = sum(len(s.microbatches) for s in plan)
        with tqdm(total=total, disable=not progress, desc="train", unit="mb") as bar:
            opt = recipe.optimizer_record()
            params, state, losses = target.params, optim.init(opt, target.params), []
            for t, step in enumerate(plan, 1):  # the last step's optimizer state is never read
                out = train_step(target, opt, step, params, state, bar, group=group, keep_state=t < len(plan))
                params, state = out.params, out.state
                losses.append(out.loss)
    return TrainResult(params, losses)


def plan_steps(
    examples: Examples, weights: Tensor, recipe: Recipe, device: torch.device, dtype: torch.dtype
) -> list[Step]:
    """Which examples each inner step trains on, cut into microbatches.

    Without `batch_size` the N examples are split in order into M contiguous batches (sizes
    differ by at most one). With it, step t takes the next `batch_size` examples of the
    sequence x_1..x_N, x_1.. (wrapping around: several epochs). Inside a step, examples are
    grouped by length before microbatching to cut padding; the batch mean is unchanged.
    """
    n = examples.input_ids.shape[0]
    if recipe.batch_size is None:
        batches = list(torch.arange(n).tensor_split(recipe.steps))
    else:
        batches = [torch.arange(t * recipe.batch_size, (t + 1) * recipe.batch_size) % n for t in range(recipe.steps)]
    lengths = examples.attention_mask.sum(1)
    plan = []
    for idx in batches:
        idx = idx[torch.argsort(lengths[idx], stable=True)]
        size = recipe.microbatch_size or len(idx)
        mbs = []
        for part in idx.split(size):
            width = int(lengths[part].max())
            mbs.append(
                make_microbatch(
                    part.to(device),
                    examples.input_ids[part, :width].to(device),
                    examples.attention_mask[part, :width].to(device),
                    examples.loss_mask[part, :width].to(device),
                    weights[part].to(device, dtype),
                    dtype,
                )
            )
        plan.append(Step(len(idx), mbs))
    return plan


def _global_sizes(plan: list[Step], group: dist.ProcessGroup | None, device: torch.device) -> list[Step]:
    """Data-parallel: |B_t| is the size of the union of the ranks' batch t."""
    if group is None:
        return plan
    sizes = summed(torch.tensor([s.size for s in plan], dtype=torch.long), group, device)
    return [Step(int(size), s.microbatches) for size, s in zip(sizes.tolist(), plan)]


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


class _phase:
    """Time a phase, synchronising the GPU so the figure is the phase's own."""

    def __init__(self, timings: dict[str, float], name: str, device: torch.device):
        self.timings, self.name, self.device = timings, name, device

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start
