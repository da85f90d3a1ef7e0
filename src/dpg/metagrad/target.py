"""The target model as the engine sees it: a private copy, a per-example loss, and the
three differentiation passes the engine needs (gradient, forward-mode scores, and
reverse-over-forward Hessian-vector products).

The copy keeps the caller's model untouched: it lives in the engine's dtype and device, in
eval mode (dropout off: a metagradient through a random dropout mask is not the derivative
anyone wants), with no parameter requiring grad. Parameters are supplied to every pass
explicitly through `torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpg.errors import DpgError
from dpg.metagrad import fused
from dpg.metagrad.head_ops import HeadObjective, LayerNormFromPrimitives, token_tangents

Params = dict[str, Tensor]


class Microbatch(NamedTuple):
    index: Tensor  # (B,) positions of these examples in the caller's example order
    input_ids: Tensor  # (B, T) long, right-padded, trimmed to the longest row
    attention_mask: Tensor  # (B, T)
    weights: Tensor  # (B,) data weights w_i
    label_pos: Tensor  # (n,) flat positions b·(T−1)+t of the n label tokens in the shifted grid
    label_row: Tensor  # (n,) which example each label token belongs to
    labels: Tensor  # (n,) the label token ids (position t predicts token t+1)
    label_count: Tensor  # (B,) label tokens per example, in the engine dtype


def make_microbatch(
    index: Tensor, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, weights: Tensor, dtype: torch.dtype
) -> Microbatch:
    """Precompute label positions once, so no pass has to synchronise on a boolean mask."""
    shifted = loss_mask[:, 1:].bool()  # (B, T−1): position t is trained to predict token t+1
    label_pos = shifted.flatten().nonzero().flatten()
    label_row = torch.div(label_pos, shifted.shape[1], rounding_mode="floor")
    labels = input_ids[:, 1:].flatten()[label_pos]
    return Microbatch(index, input_ids, attention_mask, weights, label_pos, label_row, labels, shifted.sum(1).to(dtype))


class Target(NamedTuple):
    module: nn.Module  # private copy: engine dtype/device, eval mode, requires_grad off
    params: Params  # θ_0 for the trainable parameters (the copy's own tensors)
    frozen: Params  # parameters the caller froze (requires_grad False): constants
    head: str | None  # name of the LM-head weight (the embedding's name when tied); None: not found
    head_bias: str | None  # name of the LM-head bias, if any
    head_tied: bool  # the head weight is also the input embedding
    trunk: nn.Module | None  # the body with logits = head(trunk(x)), or None: run the whole model
    prefix: str  # parameter-name prefix of the trunk ("transformer.", "model.")
    buffers: Params = {}  # floating-point buffers (rotary frequencies, ...): a zero tangent in forward mode
    embeds: nn.Module | None = None  # tied head on a split target: the input embedding, if trunk(inputs_embeds=
    # embed(x)) is trunk(input_ids=x) (M = 1 head metrics then read the embedding's output gradient)


@contextlib.contextmanager
def prepared(model: nn.Module, dtype: torch.dtype, device: torch.device) -> Iterator[Target]:
    """The target as the engine runs it, for the duration of one call.

    A model already in the engine's dtype and on its device is used in place: θ_0 is its own
    parameters (detached; every update makes new tensors, so they are never written) and
    only its eval mode and attention setting change, restored on exit. Otherwise a private
    copy is made in the engine's dtype and device. Either way the caller's model is left as
    it was found.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise DpgError("the target model has no trainable parameters (all have requires_grad=False)")
    in_place = all(
        t.device == device and (t.dtype == dtype or not t.is_floating_point())
        for t in (*model.parameters(), *model.buffers())
    )
    module = model if in_place else copy.deepcopy(model).to(device=device, dtype=dtype)
    was_training, attn = module.training, _attn_implementation(module)
    # nn.Embedding's padding_idx is a rule of reverse mode alone (the pad row gets no gradient
    # from its lookups); forward-mode AD does not follow it. With a tied head (SmolLM2, and any
    # model whose pad token is also bos) the pad row's tangent would then reach the loss
    # through the lookups that its gradient skips, and the scores were wrong by O(1). Inside
    # the engine the pad row is trained like every other row, in every pass.
    pads = [(m, m.padding_idx) for m in module.modules() if isinstance(m, nn.Embedding) and m.padding_idx is not None]
    swapped = fused.swap(module, dtype)  # GELU, RMSNorm: one fused op each (fused.py)
    try:
        module.eval()
        for m, _ in pads:
            m.padding_idx = None
        _use_differentiable_attention(module)
        yield _describe(model, module, trainable)
    finally:
        for m, idx in pads:
            m.padding_idx = idx
        fused.restore(swapped)
        module.train(was_training)
        if attn is not None and _attn_implementation(module) != attn:
            module.set_attn_implementation(attn)


def _attn_implementation(module: nn.Module) -> str | None:
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


# Whether a model's logits are head(trunk(x)), by the caller's model: probed once per model.
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _describe(model: nn.Module, module: nn.Module, trainable: list[str]) -> Target:
    named = {n: p.detach() for n, p in module.named_parameters()}
    params = {n: named[n] for n in trainable}
    frozen = {n: p for n, p in named.items() if n not in params}
    out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    names = {id(p): n for n, p in module.named_parameters()}
    head = names.get(id(getattr(out, "weight", None)))
    if head is None:  # no identifiable LM head: the whole model runs in every pass
        return Target(module, params, frozen, None, None, False, None, "", _float_buffers(module))
    bias = names.get(id(getattr(out, "bias", None)))
    embed = module.get_input_embeddings()
    tied = out.weight is embed.weight
    if model not in _SPLITS:
        trunk = _split(module, out)[0]
        _SPLITS[model] = (trunk is not None, trunk is not None and tied and _embeds_path(trunk, embed))
    split, by_embeds = _SPLITS[model]
    trunk, prefix = (module.base_model, module.base_model_prefix + ".") if split else (None, "")
    return Target(module, params, frozen, head, bias, tied, trunk, prefix, _float_buffers(module),
                  embed if by_embeds else None)  # fmt: skip


def _float_buffers(module: nn.Module) -> Params:
    """The buffers a forward-mode pass gives a zero tangent (`with_zero_tangents`)."""
    return {n: b for n, b in module.named_buffers() if b.is_floating_point()}


def with_zero_tangents(target: Target, primals: Params, tangents: Params) -> tuple[Params, Params]:
    """A forward-mode pass's primals and tangents, plus the floating-point buffers with an exact
    zero tangent. A constant's missing tangent is no cost to autograd's formulas, but each op
    between it and a tangent-carrying tensor (Llama's q·cos, k·sin: four a layer) builds a
    zero tangent whose shape torch works out through Python reference kernels, ~0.3 ms of host
    time an op; a zero tangent on the rotary frequencies makes cos and sin carry one from the
    start, once a pass. Adding the exact zeros it contributes changes no value."""
    zeros = {k: torch.zeros_like(b) for k, b in target.buffers.items()}
    return primals | target.buffers, tangents | zeros


def _split(module: nn.Module, head: nn.Module) -> tuple[nn.Module | None, str]:
    """The trunk, if the model's logits are exactly head(trunk(x).last_hidden_state).

    Running trunk and head separately lets every pass compute logits at label positions
    only, and lets a head-only metric be scored from saved hidden states. Models whose
    logits are post-processed (soft-capping, scaling) fail the probe and run whole.
    """
    trunk = getattr(module, "base_model", None)
    prefix = getattr(module, "base_model_prefix", "") + "."
    if trunk is None or trunk is module or not isinstance(head, nn.Linear):
        return None, ""
    if not all(n.startswith(prefix) or p is head.weight or p is head.bias for n, p in module.named_parameters()):
        return None, ""
    probe = torch.arange(8, device=head.weight.device).view(1, 8) % head.weight.shape[0]
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            whole = module(input_ids=probe, use_cache=False).logits
            split = F.linear(trunk(input_ids=probe, use_cache=False).last_hidden_state, head.weight, head.bias)
    except torch.OutOfMemoryError:
        raise  # a model too big for its device must say so, not take the slow path
    except (TypeError, AttributeError, RuntimeError):
        # The trunk takes other arguments, returns no last_hidden_state, or its width is
        # not the head's: not a plain trunk + head model, so it runs whole.
        return None, ""
    if whole.shape != split.shape or not torch.allclose(whole, split, rtol=1e-5, atol=1e-6 * whole.abs().max().item()):
        return None, ""
    return trunk, prefix


def _embeds_path(trunk: nn.Module, embed: nn.Module) -> bool:
    """Whether trunk(inputs_embeds=embed(x)) is exactly trunk(input_ids=x), so the loss's
    gradient at the embedding's output is the one the lookups receive (`embedding_scores`)."""
    if not isinstance(embed, nn.Embedding):  # a lookup (times any scale) is linear in its weight
        return False
    probe = torch.arange(8, device=embed.weight.device).view(1, 8) % embed.weight.shape[0]
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            by_ids = trunk(input_ids=probe, use_cache=False).last_hidden_state
            by_embeds = trunk(inputs_embeds=embed(probe), use_cache=False).last_hidden_state
    except torch.OutOfMemoryError:
        raise
    except (TypeError, AttributeError, RuntimeError, ValueError):
        return False
    return by_ids.shape == by_embeds.shape and torch.equal(by_ids, by_embeds)


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


_OLD_STYLE_FUNCTION = (
    " (an autograd.Function without setup_context cannot go through torch.func; liger-kernel's "
    "patches, grpo.extra.use_liger_kernel, are such functions, and replace a model family's RoPE "
    "process-wide, the target's too when it is of the generator's family: leave them off there)"
)


@contextlib.contextmanager
def higher_order():
    """Context for forward-mode and second-order passes: math attention, clear errors."""
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except (RuntimeError, NotImplementedError) as err:
        text = str(err)
        if any(
            s in text
            for s in ("not implemented", "forward AD", "forward-mode", "jvp", "double backward", "once_differentiable")
        ):
            hint = _OLD_STYLE_FUNCTION if "setup_context" in text else ""
            raise DpgError(
                "the target model uses an operation with no forward-mode or second-order "
                f"derivative, so its exact metagradient cannot be computed: {text.splitlines()[0]}{hint}"
            ) from err
        raise


def _head(target: Target, params: Params) -> tuple[Tensor, Tensor | None]:
    def get(name):
        return None if name is None else params.get(name, target.frozen.get(name))

    return get(target.head), get(target.head_bias)


def label_hidden(target: Target, params: Params, mb: Microbatch, embeds: Tensor | None = None) -> Tensor:
    """Last hidden states at the label positions (needs a split target), from the input ids
    or from their `embeds` (B, T, d), the input embedding's output. (n, d)"""
    trunk_params = {k[len(target.prefix) :]: v for k, v in params.items() if k.startswith(target.prefix)}
    inputs = {"input_ids": mb.input_ids} if embeds is None else {"inputs_embeds": embeds}
    out = functional_call(
        target.trunk, trunk_params, (), {**inputs, "attention_mask": mb.attention_mask, "use_cache": False}
    )
    hidden = out.last_hidden_state[:, :-1]  # (B, T−1, d)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.label_pos)


def losses_and_hidden(
    target: Target, params: Params, mb: Microbatch, embeds: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Per-example loss l_i (mean token cross-entropy over x_i's labels), (B,), and the last
    hidden states at the label positions, (n, d), when the target is split (`label_hidden`)."""
    if target.trunk is not None:
        hidden = label_hidden(target, params, mb, embeds)
        weight, bias = _head(target, params)
        logits = F.linear(hidden, weight, bias)  # (n, V): only where a label is predicted
    else:
        hidden = None
        out = functional_call(
            target.module,
            params,
            (),
            {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask, "use_cache": False},
        )
        logits = out.logits[:, :-1].flatten(0, 1).index_select(0, mb.label_pos)
    return _per_example(F.cross_entropy(logits, mb.labels, reduction="none"), mb), hidden


def _per_example(tok: Tensor, mb: Microbatch) -> Tensor:
    """Per-token values (n,) -> their mean over each example's label tokens. (B,)"""
    sums = torch.zeros(mb.input_ids.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, mb.label_row, tok)
    return sums / mb.label_count


def example_losses(target: Target, params: Params, mb: Microbatch) -> Tensor:
    """Per-example loss l_i: mean token cross-entropy over x_i's label tokens. (B,)"""
    return losses_and_hidden(target, params, mb)[0]


def batch_loss_grad(
    target: Target, params: Params, mb: Microbatch, batch_size: int, embed_grad: bool = False
) -> tuple[Params, Tensor, Tensor | None, Tensor | None]:
    """Gradient of this microbatch's share of the batch loss Σ w_i·l_i / batch_size.

    Returns (grads, per-example losses, label hidden states or None, and with `embed_grad`
    on a target with `embeds` the gradient at the input embedding's output, (B, T, d), else
    None). The lookups are then made outside the trunk, the same operations. First-order
    only: any attention kernel is fine.
    """
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    by_embeds = embed_grad and target.embeds is not None
    with torch.enable_grad():
        embeds = functional_call(target.embeds, {"weight": leaves[target.head]}, (mb.input_ids,)) if by_embeds else None
        losses, hidden = losses_and_hidden(target, leaves, mb, embeds)
        loss = (mb.weights * losses).sum() / batch_size
        grads = torch.autograd.grad(loss, [*leaves.values(), *([embeds] if by_embeds else [])])
    at_embeds = grads[-1] if by_embeds else None
    return dict(zip(leaves, grads)), losses.detach(), None if hidden is None else hidden.detach(), at_embeds


def head_tangent_scores(
    target: Target,
    params: Params,
    tangent: Params,
    hidden: Tensor,
    mb: Microbatch,
    hidden_tangent: Tensor | None = None,
    chunk: int = 4096,
) -> Tensor:
    """γ·∇l_i from the last hidden states h at the label positions (and their tangent ḣ). (B,)

    The head's forward-mode pass written out (head_ops.token_tangents). With ḣ = None this is
    the whole pass for a tangent on an untied head alone (M = 1 head metrics, from the
    training pass's saved h). Chunks bound the (chunk, V) softmax.
    """
    weight, bias = _head(target, params)
    t_weight = tangent.get(target.head)
    t_bias = tangent.get(target.head_bias) if target.head_bias else None
    return _per_example(token_tangents(hidden, hidden_tangent, weight, bias, t_weight, t_bias, mb.labels, chunk), mb)


def embedding_scores(target: Target, tangent: Params, at_embeds: Tensor, mb: Microbatch, batch_size: int) -> Tensor:
    """The input embedding's share of γ·∇l_i on a tied head, from the training pass's gradient
    at the embedding's output, G = ∂(Σ w_j·l_j / batch_size)/∂e (B, T, d). (B,)

    Each position's embedding feeds one example only, so row i of G is (w_i / batch_size)·∂l_i/∂e,
    and the embedding is linear in its weight, so its tangent along γ is embed(x) with weight γ:
    Σ_p ė_p·∂l_i/∂e_p = (batch_size / w_i)·Σ_p ė_p·G_p. Needs every w_i ≠ 0 (`reverse.py` checks).
    """
    e_dot = functional_call(target.embeds, {"weight": tangent[target.head]}, (mb.input_ids,))
    return (e_dot * at_embeds).sum((1, 2)) * batch_size / mb.weights


def tangent_scores(target: Target, params: Params, tangent: Params, mb: Microbatch) -> Tensor:
    """γ·∇l_i for each example of the microbatch, by one forward-mode pass. (B,)

    Only parameters named in `tangent` carry a tangent; the rest are constants. On a split
    target the forward-mode pass runs through the trunk only, giving (h, ḣ) at the label
    positions, and the head's share is written out (head_tangent_scores): no (n, V) tangent
    logits and no log-softmax tangent are ever formed.
    """
    active = {k: params[k] for k in tangent}
    rest = {k: p for k, p in params.items() if k not in tangent}
    if target.trunk is None:

        def losses(a: Params) -> Tensor:
            return example_losses(target, {**rest, **a}, mb)

        primals, tangents = with_zero_tangents(target, active, tangent)
        with higher_order():
            return jvp(losses, (primals,), (tangents,))[1]
    into_trunk = {k: t for k, t in tangent.items() if k.startswith(target.prefix)}
    if not into_trunk:
        with torch.no_grad():
            return head_tangent_scores(target, params, tangent, label_hidden(target, params, mb), mb)
    trunk_active = {k: params[k] for k in into_trunk}
    others = {k: p for k, p in params.items() if k not in into_trunk}

    def hidden(a: Params) -> Tensor:
        return label_hidden(target, {**others, **a}, mb)

    primals, tangents = with_zero_tangents(target, trunk_active, into_trunk)
    with higher_order():
        h, h_dot = jvp(hidden, (primals,), (tangents,))
    return head_tangent_scores(target, params, tangent, h, mb, hidden_tangent=h_dot)


def hvp_and_tangent_scores(
    target: Target, params: Params, tangent: Params, mb: Microbatch, batch_size: int, chunk: int = 4096
) -> tuple[Params, Tensor]:
    """H·γ of this microbatch's share of the batch loss, and γ·∇l_i for each example.

    Reverse-over-forward: d_i(θ) = γ·∇l_i(θ) is the forward-mode tangent of l_i along γ, so
    the per-example scores are d_i and the Hessian-vector product is the gradient of
    Σ w_i·d_i / batch_size. On a split target the forward-mode pass runs through the trunk
    only and the head's share and its gradient are written out (`HeadObjective`), chunked
    over label tokens: no (n, V) tensor is kept between the passes.
    """
    if target.trunk is None:
        return _hvp_whole_model(target, params, tangent, mb, batch_size)
    into_trunk = {k: t for k, t in tangent.items() if k.startswith(target.prefix)}
    t_weight = tangent.get(target.head)
    t_bias = tangent.get(target.head_bias) if target.head_bias else None
    # Σ w_i·d_i / batch_size = Σ_tok c_tok·d_tok: each label token weighs w_i / (batch_size·labels of x_i)
    c = (mb.weights / mb.label_count).index_select(0, mb.label_row) / batch_size
    needs = (any(k.startswith(target.prefix) for k in params), bool(into_trunk), target.head in params,
             target.head_bias in params)  # fmt: skip

    def objective(p: Params) -> tuple[Tensor, Tensor]:
        if into_trunk:
            rest = {k: v for k, v in p.items() if k not in into_trunk}
            primals, tangents = with_zero_tangents(target, {k: p[k] for k in into_trunk}, into_trunk)
            h, h_dot = jvp(lambda a: label_hidden(target, {**rest, **a}, mb), (primals,), (tangents,))
        else:
            h, h_dot = label_hidden(target, p, mb), None
        weight, bias = _head(target, p)
        obj, d, *_ = HeadObjective.apply(h, h_dot, weight, bias, t_weight, t_bias, mb.labels, c, needs, chunk)
        return obj, _per_example(d, mb)

    with higher_order(), LayerNormFromPrimitives():
        return grad(objective, has_aux=True)(params)


def _hvp_whole_model(
    target: Target, params: Params, tangent: Params, mb: Microbatch, batch_size: int
) -> tuple[Params, Tensor]:
    """Forward-over-reverse for models not split into trunk and head; the per-example
    losses ride along as the gradient's auxiliary output."""
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
