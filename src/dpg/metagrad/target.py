"""The target model as the engine sees it: a private copy, a per-example loss, and the
three differentiation passes the engine needs (gradient, forward-mode scores, and
forward-over-reverse Hessian-vector products).

The copy keeps the caller's model untouched: it lives in the engine's dtype and device, in
eval mode (dropout off: a metagradient through a random dropout mask is not the derivative
anyone wants), with no parameter requiring grad. Parameters are supplied to every pass
explicitly through `torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpg.errors import DpgError

Params = dict[str, Tensor]


class Microbatch(NamedTuple):
    index: Tensor  # (B,) positions of these examples in the caller's example order
    input_ids: Tensor  # (B, T) long, right-padded, trimmed to the longest row
    attention_mask: Tensor  # (B, T)
    loss_mask: Tensor  # (B, T) bool: token t is a label, predicted from tokens < t
    weights: Tensor  # (B,) data weights w_i


class Target(NamedTuple):
    module: nn.Module  # private copy: engine dtype/device, eval mode, requires_grad off
    params: Params  # θ_0 for the trainable parameters (the copy's own tensors)
    frozen: Params  # parameters the caller froze (requires_grad False): constants


def prepare_target(model: nn.Module, dtype: torch.dtype, device: torch.device) -> Target:
    """Copy `model` for the engine; `model` itself is never modified."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise DpgError("the target model has no trainable parameters (all have requires_grad=False)")
    module = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
    _use_differentiable_attention(module)
    named = dict(module.named_parameters())
    params = {n: named[n] for n in trainable}
    frozen = {n: p for n, p in named.items() if n not in params}
    return Target(module, params, frozen)


def _use_differentiable_attention(module: nn.Module) -> None:
    """Pick an attention implementation whose higher-order derivatives exist.

    HF models on "sdpa" run every pass through torch's scaled_dot_product_attention; the
    engine's higher-order passes pin it to the math backend (see `higher_order`). Fused
    kernels (flash, memory-efficient, cuDNN, flash-attention-2, flex) support neither
    forward-mode AD nor double backward.
    """
    config = getattr(module, "config", None)
    if config is None or not hasattr(module, "set_attn_implementation"):
        return  # not an HF model: unsupported operations raise at run time (see higher_order)
    for impl in ("sdpa", "eager"):
        try:
            module.set_attn_implementation(impl)
        except (ValueError, ImportError):
            continue
        if config._attn_implementation == impl:
            return
    raise DpgError(
        f"the target's attention implementation {config._attn_implementation!r} cannot be "
        "switched to 'sdpa' or 'eager'; exact metagradients need attention with forward-mode "
        "and second-order derivatives"
    )


@contextlib.contextmanager
def higher_order():
    """Context for forward-mode and second-order passes: math attention, clear errors."""
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except (RuntimeError, NotImplementedError) as err:
        text = str(err)
        if any(s in text for s in ("not implemented", "forward AD", "forward-mode", "jvp", "double backward", "once_differentiable")):
            raise DpgError(
                "the target model uses an operation with no forward-mode or second-order "
                f"derivative, so its exact metagradient cannot be computed: {text.splitlines()[0]}"
            ) from err
        raise


def example_losses(target: Target, params: Params, mb: Microbatch) -> Tensor:
    """Per-example loss l_i: mean token cross-entropy over x_i's label tokens. (B,)"""
    out = functional_call(
        target.module,
        params,
        (),
        {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask, "use_cache": False},
    )
    logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    labels = mb.input_ids[:, 1:]
    mask = mb.loss_mask[:, 1:]
    tok = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    tok = torch.where(mask, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))
    return tok.sum(1) / mask.sum(1)


def batch_loss_grad(target: Target, params: Params, mb: Microbatch, batch_size: int) -> tuple[Params, Tensor]:
    """Gradient of this microbatch's share of the batch loss Σ w_i·l_i / batch_size.

    Returns (grads, per-example losses). First-order only: any attention kernel is fine.
    """
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        losses = example_losses(target, leaves, mb)
        loss = (mb.weights * losses).sum() / batch_size
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), losses.detach()


def tangent_scores(target: Target, params: Params, tangent: Params, mb: Microbatch) -> Tensor:
    """γ·∇l_i for each example of the microbatch, by one forward-mode pass. (B,)

    Only parameters named in `tangent` carry a tangent; the rest are constants.
    """
    active = {k: params[k] for k in tangent}
    rest = {k: p for k, p in params.items() if k not in tangent}

    def losses(a: Params) -> Tensor:
        return example_losses(target, {**rest, **a}, mb)

    with higher_order():
        _, dl = jvp(losses, (active,), (tangent,))
    return dl


def hvp_and_tangent_scores(
    target: Target, params: Params, tangent: Params, mb: Microbatch, batch_size: int
) -> tuple[Params, Tensor]:
    """Forward-over-reverse on this microbatch's share of the batch loss.

    Returns (H·γ for every trainable parameter, γ·∇l_i for each example): one pass gives
    both, since the per-example losses ride along as the gradient's auxiliary output.
    """
    active = {k: params[k] for k in tangent}
    rest = {k: p for k, p in params.items() if k not in tangent}

    def loss(a: Params, r: Params) -> tuple[Tensor, Tensor]:
        losses = example_losses(target, {**r, **a}, mb)
        return (mb.weights * losses).sum() / batch_size, losses

    def grads(a: Params) -> tuple[Params, Tensor]:
        (ga, gr), losses = grad(loss, argnums=(0, 1), has_aux=True)(a, rest)
        return {**ga, **gr}, losses

    with higher_order():
        _, (hv, dl) = jvp(grads, (active,), (tangent,))
    return hv, dl
