"""Independent references for the engine's tests.

`unrolled_scores` differentiates through the fully unrolled inner run with plain autograd
(create_graph=True): it shares no code with the engine (its own loss, its own batching,
its own optimizer arithmetic), so agreement is evidence, not tautology.
"""

from __future__ import annotations

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 37


def tiny_model(family: str, tied: bool, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).eval()


def example_losses_ref(model, params, ids, attn, labels):
    logits = functional_call(model, params, (ids,), {"attention_mask": attn}).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = labels[:, 1:].to(logp.dtype)
    return -(logp * mask).sum(1) / mask.sum(1)


def _safe_sqrt(x):
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def batches(n, steps, batch_size):
    if batch_size is None:
        return list(torch.arange(n).tensor_split(steps))
    return [torch.arange(t * batch_size, (t + 1) * batch_size) % n for t in range(steps)]


def unrolled_train(model, examples, recipe, w, create_graph=False):
    """θ_M after the inner run with example weights `w`, step by step with plain autograd."""
    ids, attn, labels = examples
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters() if p.requires_grad}
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    names = list(params)
    with sdpa_kernel(SDPBackend.MATH):
        for t, idx in enumerate(batches(ids.shape[0], recipe.steps, recipe.batch_size), 1):
            losses = example_losses_ref(model, params, ids[idx], attn[idx], labels[idx])
            loss = (w[idx] * losses).sum() / len(idx)
            grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)))
            new = {}
            for k in names:
                p, g = params[k], grads[k]
                if recipe.optimizer == "sgd":
                    new[k] = p - recipe.lr * (g + recipe.weight_decay * p)
                else:
                    m[k] = recipe.b1 * m[k] + (1 - recipe.b1) * g
                    v[k] = recipe.b2 * v[k] + (1 - recipe.b2) * g * g
                    mhat = m[k] / (1 - recipe.b1**t)
                    vhat = v[k] / (1 - recipe.b2**t)
                    u = mhat / (_safe_sqrt(vhat + recipe.eps_root) + recipe.eps) + recipe.weight_decay * p
                    new[k] = p - recipe.lr * u
            params = new if create_graph else {k: p.detach().requires_grad_(True) for k, p in new.items()}
    return params


def unrolled_scores(model, examples, recipe, metric, weights=None):
    """(scores, Φ): autograd of Φ(θ_M) w.r.t. w through the whole unrolled inner run."""
    n = examples[0].shape[0]
    dtype = next(model.parameters()).dtype
    w = (torch.ones(n, dtype=dtype) if weights is None else weights.clone().to(dtype)).requires_grad_(True)
    params = unrolled_train(model, examples, recipe, w, create_graph=True)
    with sdpa_kernel(SDPBackend.MATH):
        everything = {k: p.detach() for k, p in model.named_parameters()} | params
        phi = metric(everything)
    (scores,) = torch.autograd.grad(phi, w)
    return scores.detach(), phi.item()
