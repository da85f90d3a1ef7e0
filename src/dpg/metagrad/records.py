"""What the engine takes and gives: the inner-training recipe, the examples, the results,
and the checks every input passes before any compute."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dpg.errors import DpgError
from dpg.metagrad import optim

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Recipe:
    """How the target is fine-tuned inside each metagradient (the inner run).

    Defaults are the paper's AdamW for GPT-2 targets. eps_root matters: it makes the first
    update linear, not sign-like, for gradients below ~√eps_root, which keeps the
    metagradient well conditioned (see README, "Precision"). state_budget_gb bounds the saved
    step states where the engine's `offload` puts them (host memory, or disk); the steps that
    do not fit are recomputed from checkpoints, with the same result (README, "Long inner runs").
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
    state_budget_gb: float | None = None  # saved step states held at once, GB (more: recomputed); none: ½ free memory

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise DpgError(f"recipe.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.steps < 1:
            raise DpgError(f"recipe.steps must be at least 1, got {self.steps}")
        # A negative lr trains toward a worse loss and a zero one trains nothing: both ran silently.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DpgError(f"recipe.lr must be positive and finite, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise DpgError(f"recipe.weight_decay must be ≥ 0 and finite, got {self.weight_decay}")
        for name in ("batch_size", "microbatch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DpgError(f"recipe.{name} must be at least 1 or null, got {value}")
        if self.state_budget_gb is not None and not self.state_budget_gb > 0:
            raise DpgError(f"recipe.state_budget_gb must be positive or null, got {self.state_budget_gb}")
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
    timings: dict[str, float] = field(default_factory=dict)  # seconds: train, metric, reverse (replay: in it), total
    peak_memory: int | None = None  # bytes on the CUDA device; None on CPU
    schedule: dict = field(default_factory=dict)  # k, levels, runs, recomputed, peak_* (bound), held_* (seen)


class TrainResult(NamedTuple):
    params: Params  # θ_M for the trainable parameters
    losses: list[float]  # weighted batch loss L_t at each inner step


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
    limit = position_limit(model)
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


class NotFinite(DpgError):
    """Φ or a score that is not finite: an error, never a result."""


def check_scores(scores: Tensor, dtype: torch.dtype) -> None:
    bad = ~torch.isfinite(scores)
    if bad.any():
        raise NotFinite(
            f"the metagradient is not finite for {int(bad.sum())} of {len(scores)} examples ({_few(bad)}; the "
            f"engine ran in {str(dtype).removeprefix('torch.')}): an overflow in the inner run or its reverse "
            "sweep; try dtype float64, a smaller recipe.lr, or fewer inner steps (recipe.steps)"
        )


@contextlib.contextmanager
def explain_not_finite(model: nn.Module, examples: Examples) -> Iterator[None]:
    """A NotFinite error gains its likeliest cause on a real model: an all-zero embedding row
    among the examples' tokens. The engine trains the pad row through its lookups too
    (metagrad/target.py), and a zero row passes on a hidden state of exactly zero through a
    bias-free pre-norm stack, where each RMSNorm's backward scales by 1/sqrt(eps): the
    gradient overflows (a random SmolLM2 shape, 30 layers at eps 1e-5, reaches NaN in fp32)."""
    try:
        yield
    except NotFinite as err:
        weight = model.get_input_embeddings().weight.detach()
        used = examples.input_ids[examples.attention_mask.bool()].unique().to(weight.device)
        zero = used[(weight[used] == 0).all(dim=1)].tolist()
        if not zero:
            raise
        raise NotFinite(
            f"{err}. Likely cause: token(s) {zero[:5]} of the examples have an all-zero input embedding row. "
            "transformers zeroes the pad token's row in a model built from a config with pad_token_id, and here "
            "that token is an input (pad = bos starts every example): the gradient at such a row overflows. Use "
            "weights in which that row is trained, build the model with no pad_token_id (or one that is not an "
            "input), or give the row random values"
        ) from None


def _few(mask: Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:5])) + (f" (and {len(idx) - 5} more)" if len(idx) > 5 else "")


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not hasattr(emb, "num_embeddings"):
        raise DpgError("the target must be a causal LM with token embeddings (get_input_embeddings())")
    return emb.num_embeddings


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no declared limit)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_hvp_microbatch_size(size: int | None, key: str = "hvp_microbatch_size") -> None:
    """Examples per Hessian-vector-product pass: none (the recipe's microbatches) or at least 1."""
    if size is not None and size < 1:
        raise DpgError(f"{key} must be at least 1, got {size}")


def check_metric_value(phi: Any, name: str = "the metric", when: str = "", needs_grad: bool = True) -> None:
    """Φ as the engine needs it: a finite scalar tensor that (when `needs_grad`) depends on
    the weights it was given. `name` and `when` go into the error ("metric 'l2'", "after the inner run")."""
    if not isinstance(phi, Tensor) or phi.numel() != 1:
        raise DpgError(f"{name} must return a scalar tensor, got {type(phi).__name__} {getattr(phi, 'shape', '')}")
    if not torch.isfinite(phi):
        raise NotFinite(f"{name} is not finite{' ' + when if when else ''}: Φ = {phi.item()}")
    if needs_grad and not phi.requires_grad:
        raise DpgError(f"{name} does not depend on any trainable weight of the target")


def proxy_figures(metric: Any, params: Params, phi: float) -> dict[str, float]:
    """A metric's readable figures at `params`, where Φ(params) = `phi` is known: from Φ alone
    when the metric says how (`proxy_from_phi`: no pass through the model again), else its
    `proxy(params)`; none if it has neither."""
    from_phi = getattr(metric, "proxy_from_phi", None)
    if callable(from_phi):
        return from_phi(phi)
    proxy = getattr(metric, "proxy", None)
    return proxy(params) if callable(proxy) else {}
