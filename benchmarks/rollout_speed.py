"""New tokens per second of dpg's sampler (dpg.rollout) against HF `generate`, same process.

    python benchmarks/rollout_speed.py [--batches 128 1024] [--new 128] [--prompt 64] [--out rollout.json]

A SmolLM2-135M-shaped Llama with random weights (no download), prompts of `--prompt` random
tokens, `--new` new tokens forced (no eos). dpg's sampler runs as `dpg train` runs it: fp32
policy weights copied to bf16 before each batch (the copy is timed), decode step in a CUDA
graph. HF `generate` (dynamic cache, sampling) runs on a bf16 copy, its fastest
eager setting here. Also checks, on the first batch, that the graph replay's per-token
log-probs match a full forward pass of the bf16 model to bf16 rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from dpg.rollout import Sampler, SamplingSettings, process_logits


def smollm2_shape() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def agreement(model, sampler: Sampler, prompts: list[list[int]], rows: int = 8) -> float:
    """Largest |log-prob difference| between the replayed graph and one full forward pass of
`model` (the bf16 model, which holds the weights the sampler copies)."""
    r = sampler.sample(prompts)  # the batch the graph was captured for
    worst = 0.0
    for p, c, lps in list(zip(r.prompt_ids, r.completion_ids, r.logprobs, strict=True))[:rows]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c], device="cuda")).logits[0, len(p) - 1 : -1]
        ref = process_logits(logits, sampler.s, None).gather(-1, torch.tensor(c, device="cuda")[:, None])[:, 0]
        worst = max(worst, (ref.cpu() - torch.tensor(lps)).abs().max().item())
    return worst


def profile(sampler: Sampler, prompts: list[list[int]]) -> None:
    """The CUDA kernels of 16 decode steps, run eagerly (what the graph replays)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    buf = sampler._buffers
    with torch.no_grad():
        sampler._prefill(buf, prompts, buf.allowed.shape[-1] - sampler.s.max_new_tokens, torch.device("cuda"))
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(16):
            sampler._decode_step(buf)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of eager decode steps")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_shape()).cuda().eval()
    model.set_attn_implementation("sdpa")
    bf16 = LlamaForCausalLM(smollm2_shape()).to("cuda", torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.set_attn_implementation("sdpa")
    s = SamplingSettings(max_new_tokens=args.new, eos_token_ids=(), pad_token_id=2, dtype=torch.bfloat16)
    hf_cfg = GenerationConfig(do_sample=True, max_new_tokens=args.new, min_new_tokens=args.new, temperature=1.0,
                              top_p=1.0, top_k=0, pad_token_id=2, eos_token_id=None)  # fmt: skip
    results = {"gpu": torch.cuda.get_device_name(), "new_tokens": args.new, "prompt_tokens": args.prompt, "rows": []}
    for batch in args.batches:
        prompts = torch.randint(3, 49152, (batch, args.prompt)).tolist()
        sampler = Sampler(model, s)
        start = time.perf_counter()
        sampler.sample(prompts)  # allocates the cache and captures the graph
        first = time.perf_counter() - start
        ours = timed(partial(sampler.sample, prompts), args.repeats)
        ids = torch.tensor(prompts, device="cuda")
        with torch.no_grad():
            bf16.generate(ids[:8], generation_config=hf_cfg)  # warm-up
            hf = timed(partial(bf16.generate, ids, generation_config=hf_cfg), max(1, args.repeats - 1))
        row = {
            "batch": batch, "dpg_tokens_per_s": batch * args.new / ours,
            "hf_generate_tokens_per_s": batch * args.new / hf,
            "dpg_seconds": ours, "hf_seconds": hf, "dpg_first_call_seconds": first,
            "speedup": hf / ours, "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "graph": sampler._buffers.graph is not None,
        }  # fmt: skip
        if batch == args.batches[0]:
            row["max_logprob_diff_vs_forward"] = agreement(bf16, sampler, prompts)
        if args.profile:
            profile(sampler, prompts)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        sampler = None  # the next batch size gets a cache of its own
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
