"""Peak memory of `dpg check`, `attribute` and `train`, estimated before any compute.

A command that needs more memory than the machine has is killed by the kernel with no
message, often minutes in. Each command therefore estimates its peak from the model's
shape (parameters, vocabulary, width, depth), the sequence lengths, the microbatch, the
number of inner steps M and the dtype, and refuses to start when the estimate exceeds the
memory available, naming the figure and the keys that lower it.

The estimate counts what the engine holds at its peak (metagrad/engine.py):
  - the model as loaded, and a private copy when the engine runs another dtype or device;
  - parameter copies: M = 1 AdamW holds g, θ_1 and then λ = ∇Φ and γ (3 copies at most;
    the first step's moments are recomputed from g); M > 1 keeps θ_{t−1}, g_t, m_t, v_t of
    every step for the reverse sweep (4M − 3) plus about 6 working copies;
  - the optimizer's elementwise temporaries: it works in flat groups of parameters, or chunks
    of one, of at most 2M elements (optim.CHUNK), and its adjoint holds up to ~16 chunk-sized
    temporaries at once (its inputs' flat copies among them) — 256 MB in fp64, whatever the
    model's size, which on a small model is more than its copies;
  - activations of one microbatch: the trunk's saved activations and the (tokens ×
    vocabulary) logits, the softmax and their gradient — with a 262k-token vocabulary
    these dominate as soon as a microbatch holds a few thousand tokens;
  - the Python / torch runtime itself.
`dpg train` adds the GRPO side: the generator with AdamW's moments, dpg's sampler's static KV
cache (kept from step to step, for its CUDA graph), and one policy update's activations. A
step runs the reward's inner run and then the policy updates, so the two sets of activations
are never held at once: the estimate takes the larger (`Estimate.apart`).
It is checked against measured peaks in tests/test_new_user.py (within 0.5×–2×) and the
README's "Memory" table.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from dpg.errors import DpgError
from dpg.metagrad.optim import CHUNK

GB = 2**30
RUNTIME = int(0.6 * GB)  # Python, torch, transformers and tokenizers once imported (measured ~0.5 GB)


class ModelShape(NamedTuple):
    params: int  # parameters, tied weights counted once
    trainable: int  # of which trainable (the ones the inner run updates)
    vocab: int  # rows of the LM head
    hidden: int  # width of the residual stream
    layers: int  # transformer blocks
    intermediate: int  # width of the MLP
    heads: int  # attention heads
    scores: bool = True  # attention keeps its (heads × length²) scores for backward (eager); SDPA and flash do not
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as `heads`
    head_dim: int = 0  # width of one head; 0: hidden // heads


class Estimate(NamedTuple):
    parts: dict[str, int]  # bytes, by what holds them
    device: str  # "cpu" or "cuda:N": where they are held
    apart: tuple[tuple[str, ...], ...] = ()  # groups of parts held at different times: only the largest counts

    @property
    def total(self) -> int:
        grouped = {name for group in self.apart for name in group}
        held = sum(v for k, v in self.parts.items() if k not in grouped)
        return held + max((sum(self.parts.get(k, 0) for k in group) for group in self.apart), default=0)

    def describe(self) -> str:
        text = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in self.parts.items() if v >= 0.05 * GB)
        return text + ("; of the parts held at different times, only the largest group counted" if self.apart else "")


def model_shape(model) -> ModelShape:
    """The shape of a loaded causal LM (HF config names, with GPT-2's as fallbacks)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config

    def get(*names, default=0):
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return default

    unique = {id(p): p for p in model.parameters()}.values()
    hidden = get("hidden_size", "n_embd", "d_model")
    return ModelShape(
        params=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        vocab=model.get_input_embeddings().weight.shape[0],
        hidden=hidden,
        layers=get("num_hidden_layers", "n_layer", "num_layers"),
        intermediate=get("intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        heads=get("num_attention_heads", "n_head", default=1),
        scores=getattr(config, "_attn_implementation", None) in (None, "eager"),
        kv_heads=get("num_key_value_heads"),  # 0 where the config has none: as many as the heads
        head_dim=get("head_dim"),  # 0 where the config has none: hidden // heads
    )


def engine_copies(steps: int, optimizer: str) -> int:
    """Parameter copies the engine holds at its peak, beyond θ_0 (see the module docstring)."""
    if optimizer == "sgd":
        return 2 if steps == 1 else steps + 4
    return 3 if steps == 1 else 4 * steps + 3


def chunk_temporaries(steps: int, optimizer: str) -> int:
    """Chunk-sized temporaries of the optimizer's elementwise work at its peak, beyond its
    outputs (measured on one 2M-element parameter: AdamW's adjoint holds 8 with the first
    step's recomputed moments, 10 when it also returns the older state's adjoints; SGD's
    update 3), plus the flat copies of its inputs that optim.map_params packs small parameters
    into (2 for SGD's and the M = 1 adjoint's g and adjoint, 6 for the M > 1 adjoint's)."""
    if optimizer == "sgd":
        return 3 + 2
    return 8 + 2 if steps == 1 else 10 + 6


def activation_bytes(
    shape: ModelShape, sequences: int, length: int, nbytes: int, second_order: bool,
    head_length: int | None = None, head_nbytes: int | None = None,
) -> int:  # fmt: skip
    """One microbatch's activations: the trunk's saved tensors and the head's (tokens × V)
    logits, softmax and gradients (over the last `head_length` positions of each sequence
    when only those are scored, as in TRL's policy update; in `head_nbytes` when they differ
    from the trunk's, as under autocast); second-order passes (M > 1) keep primal and tangent."""
    tokens = sequences * length
    per_layer = tokens * (12 * shape.hidden + 4 * shape.intermediate)
    if shape.scores:  # eager attention materialises softmax(QKᵀ) per head; SDPA / flash kernels never do
        per_layer += 2 * sequences * shape.heads * length * length
    trunk = shape.layers * per_layer * nbytes
    head = 4 * sequences * (head_length or length) * shape.vocab * (head_nbytes or nbytes)
    if second_order:
        trunk *= 3
        head = max(head, 4 * min(tokens, 4096) * shape.vocab * nbytes)  # HeadObjective: chunks of 4096 tokens, ≤ 3 live
    return trunk + head


def engine_parts(
    shape: ModelShape, *, examples: int, length: int, steps: int, optimizer: str, microbatch: int | None,
    nbytes: int, copied: bool, host_store: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Bytes of one metagradient run, beyond the model as loaded. `copied`: the engine runs
    in another dtype or device than the model's, so it makes a private copy. `host_store`:
    the saved steps wait off the device (a GPU run with offload cpu or disk), which then
    holds only the working copies."""
    per_step = -(-examples // steps)  # the largest batch
    sequences = min(microbatch or per_step, per_step)
    copies = engine_copies(steps, optimizer)
    if host_store and steps > 1:
        copies = min(copies, 7)
    parts = {"parameter copies": copies * shape.trainable * nbytes}
    chunk = min(shape.trainable, CHUNK)  # map_params packs parameters into groups of up to CHUNK elements
    parts["optimizer's working chunks"] = chunk_temporaries(steps, optimizer) * chunk * nbytes
    if copied:
        parts["engine's model copy"] = shape.params * nbytes
    parts["activations"] = activation_bytes(shape, sequences, length, nbytes, second_order=steps > 1)
    return parts


def estimate_check(shape: ModelShape, *, examples: int, length: int, steps: int, optimizer: str,
                   microbatch: int | None, device: torch.device) -> Estimate:  # fmt: skip
    """dpg check: the model in fp64, the fp64 engine (its finite differences hold less)."""
    parts = {"runtime": RUNTIME if device.type == "cpu" else 0, "model (fp64)": shape.params * 8}
    parts |= engine_parts(shape, examples=examples, length=length, steps=steps, optimizer=optimizer,
                          microbatch=microbatch, nbytes=8, copied=False)  # fmt: skip
    return Estimate(parts, str(device))


def estimate_attribute(shape: ModelShape, *, examples: int, length: int, steps: int, optimizer: str,
                       microbatch: int | None, dtype: torch.dtype, device: torch.device,
                       offload: str = "cpu") -> Estimate:  # fmt: skip
    """dpg attribute: the model in fp32 and one engine run in `dtype`."""
    nbytes = torch.finfo(dtype).bits // 8
    parts = {"runtime": RUNTIME if device.type == "cpu" else 0, "model (fp32)": shape.params * 4}
    parts |= engine_parts(shape, examples=examples, length=length, steps=steps, optimizer=optimizer,
                          microbatch=microbatch, nbytes=nbytes, copied=nbytes != 4,
                          host_store=device.type == "cuda" and offload != "device")  # fmt: skip
    return Estimate(parts, str(device))


def kv_cache_bytes(model: ModelShape, sequences: int, length: int, nbytes: int) -> int:
    """A static KV cache: keys and values of every layer, `sequences` × `length` slots."""
    heads = model.kv_heads or model.heads
    width = model.head_dim or model.hidden // max(model.heads, 1)
    return 2 * model.layers * sequences * heads * width * length * nbytes


def estimate_train(target: ModelShape, generator: ModelShape, *, examples: int, length: int, steps: int,
                   optimizer: str, microbatch: int | None, nbytes: int, sequences: int, sequence_length: int,
                   reference: bool, device: torch.device, offload: str = "cpu", completion_length: int | None = None,
                   update_bytes: int = 4, sampler_cache: int = 0) -> Estimate:  # fmt: skip
    """dpg train: the target and one inner run of `examples` completions (metagrad reward),
    and the GRPO side — generator weights, gradient and AdamW's two moments in fp32, a KL
    reference model, the sampler's KV cache (`sampler_cache` bytes), and one update's
    activations (`sequences` of `sequence_length`, the trunk's in `update_bytes` — 2 under bf16
    autocast — and the head's logits over the `completion_length` positions TRL scores, in
    fp32). The inner run and the update come one after the other: only the larger counts."""
    parts = {"runtime": RUNTIME if device.type == "cpu" else 0, "target (fp32)": target.params * 4}
    engine = {}
    if examples:  # metagrad / naive rewards: one inner run at a time
        engine = engine_parts(target, examples=examples, length=length, steps=steps, optimizer=optimizer,
                              microbatch=microbatch, nbytes=nbytes, copied=nbytes != 4,
                              host_store=device.type == "cuda" and offload != "device")  # fmt: skip
    parts |= {f"inner run: {k}": v for k, v in engine.items()}
    parts["generator + AdamW"] = generator.params * 4 * (4 + int(reference))
    if sampler_cache:
        parts["sampler KV cache"] = sampler_cache
    parts["generator activations"] = activation_bytes(
        generator, sequences, sequence_length, update_bytes, False, head_length=completion_length, head_nbytes=4
    )
    apart = (tuple(f"inner run: {k}" for k in engine), ("generator activations",))
    return Estimate(parts, str(device), apart)


TRAIN_FIXES = (
    "cut the inner run into microbatches (recipe.microbatch_size), shorten completions (reward.max_length, "
    "grpo.max_completion_length), generate fewer per step (grpo.prompts_per_step, grpo.num_generations) or "
    "update in more mini-batches (grpo.updates_per_step), or run on a device with more memory (device)"
)


def train_estimate(cfg, target, generator, device: torch.device, prompt_tokens: int) -> Estimate:
    """estimate_train for a dpg train config (a TrainConfig) and the loaded models;
    `prompt_tokens`: the longest prompt, in generator tokens."""
    g, r = cfg.grpo, cfg.reward
    shape = model_shape(generator)
    inner = r.name in ("metagrad", "naive")
    per_run = g.prompts_per_step * (g.num_generations if r.name == "metagrad" and r.cross_group_batching else 1)
    return estimate_train(
        model_shape(target), shape, examples=per_run if inner else 0, length=r.max_length,
        steps=cfg.recipe.steps, optimizer=cfg.recipe.optimizer, microbatch=cfg.recipe.microbatch_size,
        nbytes=8 if cfg.dtype == "float64" else 4,
        sequences=g.update_microbatch or g.prompts_per_step * g.num_generations // g.updates_per_step,
        sequence_length=prompt_tokens + g.max_completion_length, reference=g.beta > 0, device=device,
        completion_length=g.max_completion_length,
        update_bytes=2 if g.bf16_update(device.type) else 4,
        sampler_cache=sampler_cache_bytes(g, shape, device, prompt_tokens),
    )  # fmt: skip


def sampler_cache_bytes(g, generator: ModelShape, device: torch.device, prompt_tokens: int) -> int:
    """dpg's sampler's static KV cache for a generated batch, under GRPO settings `g` (0 with
    TRL's own sampler)."""
    if g.sampler != "dpg":
        return 0
    bf16 = g.sampler_dtype == "bfloat16" or (g.sampler_dtype == "auto" and device.type == "cuda")
    batch = g.prompts_per_step * g.num_generations
    return kv_cache_bytes(generator, batch, prompt_tokens + g.max_completion_length, 2 if bf16 else 4)


def available_bytes(device: torch.device) -> int:
    """What this process could hold in all on `device`: free memory plus what it holds now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    import psutil

    return psutil.virtual_memory().available + psutil.Process(os.getpid()).memory_info().rss


def ensure_fits(estimate: Estimate, command: str, fixes: str) -> None:
    """Refuse, before any compute, a run whose estimated peak exceeds the memory available.

    `fixes` names the config keys that lower the estimate. DPG_MEMORY_CHECK=0 skips this."""
    if os.environ.get("DPG_MEMORY_CHECK", "1") == "0":
        return
    device = torch.device(estimate.device)
    have = available_bytes(device)
    if estimate.total > have:
        raise DpgError(
            f"{command} needs about {estimate.total / GB:.1f} GB at its peak ({estimate.describe()}), "
            f"but {have / GB:.1f} GB is available on {device}. To fit, {fixes}. "
            "(The estimate is within about 2x; set DPG_MEMORY_CHECK=0 to start anyway.)"
        )
