"""Hand-written pieces of the reverse-over-forward pass (target.hvp_and_tangent_scores).

`token_tangents`: the LM head's per-token loss tangent, written out and chunked over label
tokens; `HeadObjective`: the HVP pass's weighted sum of those tangents as an autograd
function with its gradient written out, so no (tokens × vocabulary) tensor outlives one chunk.
`LayerNormFromPrimitives`: layer_norm in primitive ops, because torch.func differentiates
layer_norm's tangent wrongly (tests/test_engine.py pins both against references).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LayerNormFromPrimitives(torch.overrides.TorchFunctionMode):
    """layer_norm written in primitive ops, for reverse-over-forward passes.

    torch.func's gradient of layer_norm's forward-mode tangent is wrong with respect to the
    input (torch 2.13: grad(jvp(F.layer_norm)) disagrees with finite differences by O(1),
    while every other op GPT-2 and Llama use agrees to 1e-9); the same function written as
    mean, variance and rsqrt differentiates correctly. tests/test_engine.py pins this.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *_):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    out = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def token_tangents(h, h_dot, weight, bias, t_weight, t_bias, labels, chunk: int = 4096) -> Tensor:
    """Per label token, the tangent of −log softmax(z)_y, z = W·h + b, along (ḣ, Ẇ, ḃ). (n,)

    Σ_v p_v ż_v − ż_y = h·(Ẇᵀp) + ḣ·(Wᵀp) + ḃ·p − (Ẇ_y·h + W_y·ḣ + ḃ_y): products with p,
    so no (chunk, V) tangent of the logits is formed. Any of ḣ, Ẇ, ḃ may be None (zero).
    """
    out = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    for s in range(0, h.shape[0], chunk):
        hc, y, d = h[s : s + chunk], labels[s : s + chunk], out[s : s + chunk]
        p = torch.softmax(F.linear(hc, weight, bias), dim=-1)  # (c, V)
        if t_weight is not None:
            d += ((p @ t_weight) * hc).sum(-1) - (t_weight[y] * hc).sum(-1)
        if h_dot is not None:
            hd = h_dot[s : s + chunk]
            d += ((p @ weight) * hd).sum(-1) - (weight[y] * hd).sum(-1)
        if t_bias is not None:
            d += p @ t_bias - t_bias[y]
    return out


class HeadObjective(torch.autograd.Function):
    """The head's share of the reverse-over-forward pass: Σ_tok c_tok·d_tok and every token's
    d_tok, the tangent of −log softmax(z)_y with z = W·h + b along (ḣ, Ẇ, ḃ), with the
    objective's gradient with respect to (h, ḣ, W, b) written out and chunked.

    With p = softmax(z), ż = Ẇ·h + W·ḣ + ḃ and s = p·ż, a token's value is d = s − ż_y, and
        ∂d/∂z = p ⊙ (ż − s)        ∂d/∂ż = p − e_y.
    So with A = c·p⊙(ż − s) and B = c·(p − e_y) for the token weights c:
        h̄ = A·W + B·Ẇ    ḣ̄ = B·W    W̄ = Aᵀ·h + Bᵀ·ḣ    b̄ = Σ A.
    The token weights are constants known before the pass (w_i / (|B_t|·labels of x_i)), so
    the forward computes the gradient as well, from one (p, ż) per chunk, and the backward
    only scales it by the scalar upstream gradient: 8 head-sized matrix products and one
    softmax a chunk, where a backward of d alone (given per-token upstream gradients) must
    form p and ż a second time (11 products, two softmaxes). Ẇ, ḃ are constants; memory is
    the gradient and one (chunk, V) block at a time. `needs` = (h̄, ḣ̄, W̄, b̄) wanted.
    Outputs: the objective (scalar) and d (n,), not differentiable.
    """

    @staticmethod
    def forward(h, h_dot, weight, bias, t_weight, t_bias, labels, c, needs, chunk):
        grads = head_objective_grads(h, h_dot, weight, bias, t_weight, t_bias, labels, c, needs, chunk)
        d = grads[0]
        return (c * d).sum(), d, *grads[1:]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, d, *grads = output
        ctx.mark_non_differentiable(d, *grads)
        ctx.save_for_backward(*grads)

    @staticmethod
    def backward(ctx, g, *_):
        grads = [None if x.numel() == 0 else g * x for x in ctx.saved_tensors]
        return *grads, None, None, None, None, None, None


def head_objective_grads(h, h_dot, weight, bias, t_weight, t_bias, labels, c, needs, chunk):
    """HeadObjective's work: (d, h̄, ḣ̄, W̄, b̄); an unwanted gradient is an empty tensor."""
    def want(flag, like):
        return torch.zeros_like(like) if flag else like.new_empty(0)

    d = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
    gh, ghd, gw = want(needs[0], h), want(needs[1] and h_dot is not None, h), want(needs[2], weight)
    gb = want(needs[3] and bias is not None, weight if bias is None else bias)
    for s in range(0, h.shape[0], chunk):
        sl = slice(s, s + chunk)
        hc, hdc, cc, y = h[sl], None if h_dot is None else h_dot[sl], c[sl, None], labels[sl]
        p, a = head_chunk(hc, hdc, weight, bias, t_weight, t_bias)  # a holds ż until made A below
        dot = (p * a).sum(-1, keepdim=True)
        d[sl] = dot.squeeze(1) - a.gather(1, y[:, None]).squeeze(1)
        a.sub_(dot).mul_(p).mul_(cc)  # A = c·p⊙(ż − s)
        b = p.mul_(cc)  # B = c·(p − e_y), in p's memory
        b[torch.arange(len(y), device=y.device), y] -= cc.squeeze(1)
        if gh.numel():
            gh[sl] = a @ weight + (b @ t_weight if t_weight is not None else 0)
        if ghd.numel():
            ghd[sl] = b @ weight
        if gw.numel():
            gw.addmm_(a.T, hc)
            if hdc is not None:
                gw.addmm_(b.T, hdc)
        if gb.numel():
            gb += a.sum(0)
    return d, gh, ghd, gw, gb


def head_chunk(h, h_dot, weight, bias, t_weight, t_bias) -> tuple[Tensor, Tensor]:
    """(p, ż) for a chunk of label tokens: the softmax and the logits' tangent (backward)."""
    p = torch.softmax(F.linear(h, weight, bias), dim=-1)
    z_dot = torch.zeros_like(p)
    if t_weight is not None:
        z_dot += h @ t_weight.T
    if h_dot is not None:
        z_dot += h_dot @ weight.T
    if t_bias is not None:
        z_dot += t_bias
    return p, z_dot
