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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpg.errors import DpgError
from dpg.metagrad import optim
from dpg.metagrad.store import StepStore
from dpg.metagrad.target import (
    Microbatch,
    Target,
    batch_loss_grad,
    head_tangent_scores,
    hvp_and_tangent_scores,
    make_microbatch,
    prepared,
    tangent_scores,
)

Params = dict[str, Tensor]
Metric = Callable[[Params], Tensor]


@dataclass(frozen=True)
class Recipe:
    """How the target is fine-tuned inside each metagradient (the inner run).

    Defaults are the paper's AdamW for GPT-2 targets. eps_root matters: it makes the first
    update linear, not sign-like, for gradients below ~√eps_root, which keeps the
    metagradient well conditioned (see README, "Precision").
    """

    optimizer: str = "adamw"  # "adamw" (optax form, decoupled weight decay) or "sgd"
    lr: float = 5e-6  # learning rate
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW: added to √(v̂ + eps_root)
    eps_root: float = 1e-9  # AdamW: added to v̂ under the square root
    weight_decay: float = 1e-4  # decoupled (AdamW, scaled by lr) / L2-in-gradient (SGD) weight decay
    steps: int = 1  # M, inner optimizer steps
    batch_size: int | None = None  # examples per step; None splits the N examples into M batches
    microbatch_size: int | None = None  # examples per forward pass; None: the whole batch

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise DpgError(f"recipe.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.steps < 1:
            raise DpgError(f"recipe.steps must be at least 1, got {self.steps}")
        for name in ("batch_size", "microbatch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DpgError(f"recipe.{name} must be at least 1 or null, got {value}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise DpgError(f"recipe.b1 and recipe.b2 must lie in [0, 1), got {self.b1}, {self.b2}")
        if self.eps < 0 or self.eps_root < 0 or (self.eps == 0 and self.eps_root == 0 and self.optimizer == "adamw"):
            raise DpgError("recipe.eps and recipe.eps_root must be ≥ 0 and not both 0")

    def optimizer_record(self) -> optim.Optimizer:
        if self.optimizer == "sgd":
            return optim.SGD(self.lr, self.weight_decay)
        return optim.AdamW(self.lr, self.b1, self.b2, self.eps, self.eps_root, self.weight_decay)


class Examples(NamedTuple):
    input_ids: Tensor  # (N, T) long, right-padded
    attention_mask: Tensor  # (N, T) 1 on tokens, 0 on padding
    loss_mask: Tensor  # (N, T) bool: token t is a label (predicted from tokens < t)


def make_examples(
    token_ids: Sequence[Sequence[int]], label_masks: Sequence[Sequence[bool]] | None = None, pad_id: int = 0
) -> Examples:
    """Right-pad ragged token lists. Without label masks every token but the first is a label."""
    if len(token_ids) == 0:
        raise DpgError("no examples given")
    n, t = len(token_ids), max(len(x) for x in token_ids)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    attn = torch.zeros((n, t), dtype=torch.long)
    labels = torch.zeros((n, t), dtype=torch.bool)
    for i, x in enumerate(token_ids):
        ids[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        attn[i, : len(x)] = 1
        if label_masks is None:
            labels[i, 1 : len(x)] = True
        else:
            if len(label_masks[i]) != len(x):
                raise DpgError(f"example {i}: label mask has {len(label_masks[i])} entries for {len(x)} tokens")
            labels[i, : len(x)] = torch.as_tensor(list(label_masks[i]), dtype=torch.bool)
    return Examples(ids, attn, labels)


@dataclass
class MetagradResult:
    scores: Tensor  # (N,) float64 on CPU: dΦ/dw_i, in example order
    metric: float  # Φ(θ_M)
    metric_before: float  # Φ(θ_0), before the inner run
    proxy: dict[str, float] = field(default_factory=dict)  # readable companions of Φ (accuracy, norm, ...)
    losses: list[float] = field(default_factory=list)  # weighted batch loss L_t at each inner step
    timings: dict[str, float] = field(default_factory=dict)  # seconds: train, metric, reverse, total
    peak_memory: int | None = None  # bytes on the CUDA device; None on CPU


class TrainResult(NamedTuple):
    params: Params  # θ_M for the trainable parameters
    losses: list[float]  # weighted batch loss L_t at each inner step


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
) -> MetagradResult:
    """Exact dΦ/dw_i for every example after the inner run `recipe` on `examples`.

    `model` (an HF causal LM or any module with the same call signature) is left unmodified;
    its parameters with requires_grad are the ones trained. `metric` maps a dict of all
    parameters (names as in `model.named_parameters()`) to a scalar, higher is better; it
    may carry a `proxy(params) -> dict` for readable figures. `offload` says where each
    step's saved state waits for the reverse sweep: "cpu" (default), "disk" or "device".
    `on_trained`, if given, sees every parameter at θ_M (for logging, e.g. drawing the
    pattern the head now holds) before the reverse sweep.

    `group` (a torch.distributed process group, e.g. `dist.group.WORLD`): data-parallel.
    Every rank passes its own share of the examples (and weights); inner step t trains on
    the union of the ranks' batch t, with the batch gradient and the Hessian-vector
    products all-reduced, so θ_t, Φ and every score equal those of one process holding all
    the examples (up to the order of floating-point sums). Each rank gets its own
    examples' scores. Every rank must call with the same model, recipe and metric.

    `hvp_microbatch_size`: examples per Hessian-vector-product pass (M > 1 only), which holds
    about twice a training pass's activations; None: `recipe.microbatch_size`. Only memory
    and speed depend on it, never the result.
    """
    start = time.perf_counter()
    device = _resolve_device(model, device)
    weights = check_inputs(model, examples, recipe, weights)
    store = StepStore(offload, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict[str, float] = {}
    with prepared(model, dtype, device) as target:
        plan = _global_sizes(plan_steps(examples, weights, recipe, device, dtype), group, device)
        hvp_plan = plan
        if hvp_microbatch_size is not None and recipe.steps > 1:
            if hvp_microbatch_size < 1:
                raise DpgError(f"hvp_microbatch_size must be at least 1, got {hvp_microbatch_size}")
            finer = replace(recipe, microbatch_size=hvp_microbatch_size)
            hvp_plan = _global_sizes(plan_steps(examples, weights, finer, device, dtype), group, device)
        total = sum(len(s.microbatches) for s in plan) + len(plan[0].microbatches)
        total += sum(len(s.microbatches) for s in hvp_plan[1:])
        with tqdm(total=total, disable=not progress, desc="metagradient", unit="mb") as bar:
            result = _metagrads(
                target, plan, hvp_plan, recipe.optimizer_record(), metric, store, bar, timings, len(weights),
                on_trained, group,
            )  # fmt: skip
    timings["total"] = time.perf_counter() - start
    result.timings = timings
    result.peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return result


def _metagrads(
    target: Target, plan: list[Step], hvp_plan: list[Step], opt: optim.Optimizer, metric: Metric, store: StepStore, bar: tqdm,
    timings: dict[str, float], n: int, on_trained: Callable[[Params], None] | None, group: dist.ProcessGroup | None,
) -> MetagradResult:  # fmt: skip
    device = target.params[next(iter(target.params))].device
    try:
        with _phase(timings, "metric", device):
            # Φ(θ_0), and which parameters Φ reads: a metric on the (untied) LM head alone,
            # with M = 1, is scored from the training pass's own hidden states.
            phi0, support = _metric_probe(metric, target)
        head_only = len(plan) == 1 and _head_only(target, support)
        with _phase(timings, "train", device):
            params, losses = _inner_run(target, opt, plan, bar, store, stash_hidden=head_only, group=group)
        with _phase(timings, "metric", device):
            phi, adj, proxy = _metric_value_and_grad(metric, target, params)
        if on_trained is not None:
            on_trained({**target.frozen, **params})
        del params
        with _phase(timings, "reverse", device):
            scores = _reverse_sweep(target, opt, plan, store, adj, n, bar, group, hvp_plan)
    finally:
        store.close()
    return MetagradResult(scores.cpu(), phi, phi0, proxy, losses)


def _head_only(target: Target, support: Params) -> bool:
    head = {target.head, target.head_bias} - {None}
    return target.trunk is not None and not target.head_tied and bool(head) and set(support) <= head


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
            params, losses = _inner_run(target, recipe.optimizer_record(), plan, bar, None, group=group)
    return TrainResult(params, losses)


class Step(NamedTuple):
    size: int  # |B_t|, the divisor of the batch loss
    microbatches: list[Microbatch]


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


def _inner_run(
    target: Target,
    opt: optim.Optimizer,
    plan: list[Step],
    bar: tqdm,
    store: StepStore | None,
    stash_hidden: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[Params, list[float]]:
    """The M inner steps. With a store, save what each step's adjoint will need."""
    params, state = target.params, optim.init(opt, target.params)
    losses = []
    for t, step in enumerate(plan, 1):
        grads, loss, hidden = _batch_grad(target, params, step, bar, stash_hidden and t == 1, group)
        new_params, new_state = optim.step(opt, params, state, grads)
        if store is not None:
            record = {"theta": params} if t > 1 else {}  # θ_0 is target.params, always at hand
            if isinstance(opt, optim.AdamW):
                record |= {"g": grads, "m": new_state.m, "v": new_state.v}
            if hidden:
                record["hidden"] = hidden
            store.put(t, record, keep_on_device=(t == len(plan)))
        params, state = new_params, new_state
        losses.append(loss)
    return params, losses


def _batch_grad(
    target: Target, params: Params, step: Step, bar: tqdm, stash_hidden: bool, group: dist.ProcessGroup | None
) -> tuple[Params, float, dict[str, Tensor]]:
    total, loss, stash = None, torch.zeros((), dtype=torch.float64), {}
    for j, mb in enumerate(step.microbatches):
        grads, ex_losses, hidden = batch_loss_grad(target, params, mb, step.size)
        total = grads if total is None else {k: total[k].add_(grads[k]) for k in total}
        loss += (mb.weights * ex_losses).sum().double().cpu() / step.size
        if stash_hidden:
            stash[str(j)] = hidden
        bar.update(1)
    if total is None:  # this rank holds no example of this step
        total = {k: torch.zeros_like(p) for k, p in params.items()}
    if group is not None:
        total = _all_reduce(total | {"\0loss": loss.to(next(iter(total.values())))}, group)
        loss = total.pop("\0loss").double().cpu()
    return total, float(loss), stash


def _metric_probe(metric: Metric, target: Target) -> tuple[float, set[str]]:
    """Φ(θ_0) and the trainable parameters Φ depends on, from the forward graph alone."""
    phi, leaves = _metric_forward(metric, target, target.params, "before the inner run")
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


def _metric_forward(metric: Metric, target: Target, params: Params, when: str) -> tuple[Tensor, Params]:
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        phi = metric({**target.frozen, **leaves})
    if not isinstance(phi, Tensor) or phi.numel() != 1:
        raise DpgError(f"the metric must return a scalar tensor, got {type(phi).__name__} {getattr(phi, 'shape', '')}")
    if not torch.isfinite(phi):
        raise DpgError(f"the metric is not finite {when}: Φ = {phi.item()}")
    if not phi.requires_grad:
        raise DpgError("the metric does not depend on any trainable parameter of the target")
    return phi, leaves


def _metric_value_and_grad(metric: Metric, target: Target, params: Params) -> tuple[float, Params, dict]:
    phi, leaves = _metric_forward(metric, target, params, "after the inner run")
    grads = torch.autograd.grad(phi.reshape(()), list(leaves.values()), allow_unused=True)
    adj = {k: g for k, g in zip(leaves, grads) if g is not None}
    if not adj:
        raise DpgError("the metric does not depend on any trainable parameter of the target")
    bad = [k for k, g in adj.items() if not torch.isfinite(g).all()]
    if bad:
        raise DpgError(f"the metric's gradient is not finite in {bad[:3]}")
    proxy_fn = getattr(metric, "proxy", None)
    figures = proxy_fn({**target.frozen, **params}) if callable(proxy_fn) else {}
    return phi.item(), adj, figures


def _reverse_sweep(
    target: Target, opt: optim.Optimizer, plan: list[Step], store: StepStore, adj: Params, n: int, bar: tqdm,
    group: dist.ProcessGroup | None = None, hvp_plan: list[Step] | None = None,
) -> Tensor:  # fmt: skip
    scores = torch.zeros(n, dtype=torch.float64, device=next(iter(adj.values())).device)
    adj_state = None
    for t in range(len(plan), 0, -1):
        step, record = plan[t - 1], store.pop(t)
        theta = record.get("theta", target.params)
        state_after = optim.AdamState(t, record["m"], record["v"]) if "m" in record else None
        gamma, adj_direct, adj_state = optim.step_adjoint(opt, state_after, record.get("g", {}), adj, adj_state)
        del state_after
        if t == 1:  # nothing upstream of θ_0 is wanted: scores only, no Hessian term
            stash = record.get("hidden") if _head_only(target, gamma) else None
            for j, mb in enumerate(step.microbatches):
                if stash:  # the training pass's hidden states: no second trunk pass at all
                    dl = head_tangent_scores(target, theta, gamma, stash[str(j)], mb)
                else:
                    dl = tangent_scores(target, theta, gamma, mb)
                scores.index_add_(0, mb.index, dl.double() / step.size)
                bar.update(1)
            break
        hv_sum = None
        for mb in (hvp_plan or plan)[t - 1].microbatches:
            hv, dl = hvp_and_tangent_scores(target, theta, gamma, mb, step.size)
            hv_sum = hv if hv_sum is None else {k: hv_sum[k] + hv[k] for k in hv_sum}
            scores.index_add_(0, mb.index, dl.double() / step.size)
            bar.update(1)
        if hv_sum is None:  # this rank holds no example of this step
            hv_sum = {k: torch.zeros_like(p) for k, p in theta.items()}
        if group is not None:
            hv_sum = _all_reduce(hv_sum, group)
        adj = {k: (hv_sum[k] + adj_direct[k]) if k in adj_direct else hv_sum[k] for k in hv_sum}
        del hv_sum, adj_direct, gamma, theta, record
    return scores


def _global_sizes(plan: list[Step], group: dist.ProcessGroup | None, device: torch.device) -> list[Step]:
    """Data-parallel: |B_t| is the size of the union of the ranks' batch t."""
    if group is None:
        return plan
    sizes = torch.tensor([s.size for s in plan], dtype=torch.long, device=_comm_device(group, device))
    dist.all_reduce(sizes, group=group)
    return [Step(int(size), s.microbatches) for size, s in zip(sizes.tolist(), plan)]


def _comm_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _all_reduce(tensors: Params, group: dist.ProcessGroup) -> Params:
    """Sum a dict of tensors over the group, as one flat buffer (one collective)."""
    keys = list(tensors)
    first = tensors[keys[0]]
    flat = torch.cat([tensors[k].reshape(-1).to(first.dtype) for k in keys])
    where = _comm_device(group, first.device)
    moved = flat.to(where)
    dist.all_reduce(moved, group=group)
    flat = moved.to(first.device)
    out, offset = {}, 0
    for k in keys:
        size = tensors[k].numel()
        out[k] = flat[offset : offset + size].view_as(tensors[k]).to(tensors[k].dtype)
        offset += size
    return out


def check_inputs(model: nn.Module, examples: Examples, recipe: Recipe, weights: Tensor | None) -> Tensor:
    """Validate everything before any compute; return the data weights as a (N,) tensor."""
    if not isinstance(examples, Examples):
        raise DpgError(f"examples must be dpg.Examples, got {type(examples).__name__}")
    ids, attn, labels = examples
    if ids.dim() != 2 or ids.shape != attn.shape or ids.shape != labels.shape:
        raise DpgError(
            f"input_ids, attention_mask and loss_mask must share one (N, T) shape, got "
            f"{tuple(ids.shape)}, {tuple(attn.shape)}, {tuple(labels.shape)}"
        )
    n, width = ids.shape
    if n == 0 or width == 0:
        raise DpgError("no examples given (empty input_ids)")
    if ids.dtype not in (torch.int64, torch.int32):
        raise DpgError(f"input_ids must be integer token ids, got {ids.dtype}")
    attn, labels = attn.bool(), labels.bool()
    lengths = attn.sum(1)
    if (lengths == 0).any():
        raise DpgError(f"examples {_few(lengths == 0)} are empty (no tokens)")
    if (attn[:, 1:] & ~attn[:, :-1]).any():
        raise DpgError("attention_mask must be right-padded: tokens first, padding after")
    if (labels & ~attn).any():
        raise DpgError("loss_mask marks padding positions as labels")
    if labels[:, 0].any():
        raise DpgError("loss_mask[:, 0] must be False: the first token has nothing before it to predict it")
    no_label = labels.sum(1) == 0
    if no_label.any():
        raise DpgError(f"examples {_few(no_label)} have no label tokens (every token masked out of the loss)")
    vocab = _vocab_size(model)
    used = ids[attn]
    if used.min() < 0 or used.max() >= vocab:
        bad = int(used.max()) if used.max() >= vocab else int(used.min())
        raise DpgError(
            f"token id {bad} is outside the target's vocabulary of {vocab}: were the examples tokenized "
            "with another model's tokenizer?"
        )
    limit = _max_positions(model)
    if limit is not None and int(lengths.max()) > limit:
        raise DpgError(f"an example has {int(lengths.max())} tokens, more than the target's limit of {limit}")
    if recipe.batch_size is None and recipe.steps > n:
        raise DpgError(f"recipe.steps = {recipe.steps} inner steps need at least that many examples, got {n}")
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    weights = torch.as_tensor(weights).detach().cpu()
    if weights.shape != (n,):
        raise DpgError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise DpgError("weights must be finite")
    return weights


def _few(mask: Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:5])) + (f" (and {len(idx) - 5} more)" if len(idx) > 5 else "")


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not hasattr(emb, "num_embeddings"):
        raise DpgError("the target must be a causal LM with token embeddings (get_input_embeddings())")
    return emb.num_embeddings


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


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
