"""dpg.memory's activation count for the attention kernel in use and for a policy update
that scores only the completion's positions (hand-worked numbers)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpg import memory

SHAPE = dict(params=1000, trainable=1000, vocab=50, hidden=8, layers=1, intermediate=16, heads=2)


def test_activation_bytes_by_hand():
    # 2 sequences × 10 tokens, 1 layer: trunk 20 tokens × (12·8 + 4·16 = 160) floats × 4 bytes = 12,800;
    # eager scores 2 sequences × 2 heads × 10² × 2 (scores and softmax) × 4 bytes = 3,200;
    # head 4 × tokens × 50 × 4 bytes: 16,000 over all 20 tokens, 4,800 over the last 3 of each sequence.
    eager, sdpa = memory.ModelShape(**SHAPE, scores=True), memory.ModelShape(**SHAPE, scores=False)
    assert memory.activation_bytes(eager, 2, 10, 4, second_order=False) == 12_800 + 3_200 + 16_000
    assert memory.activation_bytes(sdpa, 2, 10, 4, second_order=False) == 12_800 + 16_000
    assert memory.activation_bytes(sdpa, 2, 10, 4, False, head_length=3) == 12_800 + 4_800


def test_model_shape_reads_the_attention_kernel():
    config = dict(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    for kernel, scores in (("eager", True), ("sdpa", False)):
        model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation=kernel))
        assert memory.model_shape(model).scores is scores


def test_train_estimate_update_in_bf16_and_completion_logits():
    """The policy update's trunk in 2 bytes under bf16 autocast, its logits over the completion only."""
    g = memory.ModelShape(**SHAPE, scores=False)
    kw = dict(examples=0, length=8, steps=1, optimizer="adamw", microbatch=None, nbytes=4, sequences=2,
              sequence_length=10, reference=False, device=torch.device("cpu"))  # fmt: skip
    full = memory.estimate_train(g, g, **kw).parts["generator activations"]
    lean = memory.estimate_train(g, g, **kw, completion_length=3, update_bytes=2).parts["generator activations"]
    assert full == 12_800 + 16_000
    assert lean == 6_400 + 4_800


def test_train_estimate_counts_one_pass_of_an_update_in_passes():
    """grpo.update_microbatch: the policy update holds one pass's activations, not the mini-batch's."""
    from dpg.config import TrainConfig, load_config
    from dpg.models import load_model

    g = load_model("tiny-llama")[0]
    parts = {}
    for micro in (0, 4):
        cfg = load_config(TrainConfig, None, ["reward.name=levenshtein", "grpo.prompts_per_step=4",
                                              "grpo.num_generations=4", f"grpo.update_microbatch={micro}"])  # fmt: skip
        parts[micro] = memory.train_estimate(cfg, g, g, torch.device("cpu"), prompt_tokens=2).parts
    assert parts[0]["generator activations"] == 4 * parts[4]["generator activations"]  # 16 sequences, then 4


def test_parts_held_apart_count_only_the_larger_group():
    e = memory.Estimate({"model": 5, "a1": 3, "a2": 4, "b": 6, "cache": 1}, "cpu", apart=(("a1", "a2"), ("b",)))
    assert e.total == 5 + 1 + max(3 + 4, 6)
    assert memory.Estimate({"model": 5, "b": 6}, "cpu").total == 11  # no groups: everything at once


def test_sampler_kv_cache_by_hand():
    """tiny-llama: 2 layers, 2 key/value heads (of 4) of width 64 / 4 = 16."""
    from dpg.config import TrainConfig, load_config
    from dpg.models import load_model

    shape = memory.model_shape(load_model("tiny-llama")[0])
    assert (shape.kv_heads, shape.head_dim) == (2, 16)
    assert memory.kv_cache_bytes(shape, sequences=8, length=10, nbytes=2) == 2 * 2 * 8 * 2 * 16 * 10 * 2
    g = load_model("tiny-llama")[0]
    over = ["grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.max_completion_length=6"]
    cfg = load_config(TrainConfig, None, over)
    e = memory.train_estimate(cfg, g, g, torch.device("cpu"), prompt_tokens=4)
    assert e.parts["sampler KV cache"] == 2 * 2 * 8 * 2 * 16 * 10 * 4  # fp32 on the CPU: the policy's dtype
    cuda = memory.train_estimate(cfg, g, g, torch.device("cuda"), prompt_tokens=4)
    assert cuda.parts["sampler KV cache"] == e.parts["sampler KV cache"] // 2  # bf16 there (sampler_dtype auto)
    trl = memory.train_estimate(load_config(TrainConfig, None, [*over, "grpo.sampler=trl"]), g, g,
                                torch.device("cpu"), prompt_tokens=4)  # fmt: skip
    assert "sampler KV cache" not in trl.parts
    inner = sum(v for k, v in e.parts.items() if k.startswith("inner run: "))
    update = e.parts["generator activations"]
    assert e.total == sum(e.parts.values()) - min(inner, update)  # the inner run and the update never overlap
