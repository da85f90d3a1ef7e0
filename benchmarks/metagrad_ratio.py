"""Time of one exact metagradient / time of plain SFT, measured in the same process.

    python benchmarks/metagrad_ratio.py                      # GPT-2-small shape on CUDA
    python benchmarks/metagrad_ratio.py --shape tiny --device cpu   # smoke run
    python benchmarks/metagrad_ratio.py --shape smollm2-135m --tf32 --reps 2   # the paper's language/UUID reward
    python benchmarks/metagrad_ratio.py --shape deep-overhead --device cpu --threads 1   # its host cost, on a CPU
    python benchmarks/metagrad_ratio.py --shape smollm2-135m --device cpu --examples 16 --seq-len 16 --held 8  # smoke

GPT-2-small shape: 124M parameters (untied head), 1,024 sequences × 128 tokens per step in
microbatches of 128, fp32 weights. The baseline is the plain SFT step everyone writes: HF
forward with labels, backward, torch's fused AdamW, SDPA attention. Ratios:

    head       M = 1 metagradient, metric on the LM head (the "67" pattern)  / 1 SFT step
    head_fwd   the same with every score by a forward-mode pass, as before the training pass gave
               them (a tied head's scores did so until the embedding's output gradient was kept)
    lm_loss    M = 1 metagradient, metric = held-out LM loss (tangent everywhere) / 1 SFT step
    m4_head    M = 4 metagradient (4,096 sequences), LM-head metric / 4 SFT steps

smollm2-135m: the German/Spanish/UUID demonstrations' reward (configs/paper/german.yaml): a
SmolLM2-135M-Instruct-shaped Llama (30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary
49,152, tied head; random weights, no download), 1,024 examples × 128 tokens, one AdamW step in
microbatches of 128, Φ = −LM loss on 256 held-out texts, 64 a pass (--micro, --chunk).
deep-overhead: the same 30-layer Llama layout with every tensor tiny (hidden 64, vocabulary
257, 8 tokens): what is left is the host's cost per op, pass and microbatch. These two shapes
run the lm_loss case alone by default (--cases).

Each metagradient row also prints its phases (metric: Φ(θ_0), ∇Φ(θ_1) and the proxy; train:
the inner step; reverse: the scores). Prints a table and writes JSON (--out). Each figure is
the median of --reps timed runs after one warm-up (which, as in a GRPO run's later steps, leaves
the engine's kept Φ(θ_0) in place). --tf32 sets TF32 matmuls for the baseline and the engine alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from rollout_speed import smollm2_shape  # benchmarks/, the script's own folder
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dpg import Recipe, example_metagrads, make_examples
from dpg.metrics import LMLossMetric, pattern_metric

SHAPES = {
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, seqs=1024, seq_len=128, micro=128),
    # CPU profiling (reverse_profile.py): GPT-2's layout shrunk, the head about half the trunk as in gpt2-small
    "small": dict(n_embd=128, n_layer=4, n_head=4, vocab_size=4096, seqs=64, seq_len=64, micro=32),
    # GPT-2-small's 12 layers with every tensor tiny: the host's per-op cost alone (reverse_profile.py, --hvp-micro 4
    # gives gpt2-small's 16 HVP passes a step)
    "overhead": dict(n_embd=64, n_layer=12, n_head=4, vocab_size=257, seqs=64, seq_len=8, micro=8),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=257, seqs=32, seq_len=32, micro=8),
    # the paper's language and UUID target (llama: a LlamaConfig; held: held-out texts of the lm_loss metric)
    "smollm2-135m": dict(llama="smollm2", vocab_size=49152, seqs=1024, seq_len=128, micro=128, held=256, chunk=64),
    # its 30 layers with every tensor tiny (the lead's CPU probe of the reward's host cost)
    "deep-overhead": dict(llama="tiny30", vocab_size=257, seqs=1024, seq_len=8, micro=128, held=256, chunk=64),
}


def build(shape: dict, device: torch.device) -> GPT2LMHeadModel | LlamaForCausalLM:
    torch.manual_seed(0)
    if shape.get("llama") == "smollm2":
        return LlamaForCausalLM(smollm2_shape()).to(device).eval()
    if shape.get("llama") == "tiny30":
        config = LlamaConfig(
            vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa",
        )  # fmt: skip
        return LlamaForCausalLM(config).to(device).eval()
    config = GPT2Config(
        vocab_size=shape["vocab_size"], n_positions=max(1024, shape["seq_len"]), n_embd=shape["n_embd"],
        n_layer=shape["n_layer"], n_head=shape["n_head"], tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    return GPT2LMHeadModel(config).to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def sft_steps(model, ids, micro, steps, device):
    """Plain SFT: `steps` optimizer steps over `ids` split into equal batches."""

    def run():
        params = [p for p in model.parameters()]
        saved = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(
            params, lr=5e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4, fused=device.type == "cuda"
        )
        model.train()  # dropout is zero in this config: same math as eval
        for batch in ids.chunk(steps):
            chunks = batch.split(micro)
            for mb in chunks:
                loss = model(input_ids=mb, labels=mb).loss / len(chunks)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # put the weights back for the next repetition
            for p, s in zip(params, saved):
                p.copy_(s)
        model.eval()

    return run


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="gpt2-small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: torch's")
    ap.add_argument("--cases", default=None, help="comma-separated: head,head_fwd,lm_loss,m4_head (default: "
                    "head,lm_loss,m4_head; lm_loss alone for the llama shapes)")  # fmt: skip
    ap.add_argument("--skip", default="", help="comma-separated cases to skip: head,lm_loss,m4_head")
    ap.add_argument("--micro", type=int, default=None, help="microbatch of SFT and M = 1 (default: the shape's)")
    ap.add_argument("--chunk", type=int, default=None, help="lm_loss: held-out texts per pass (default: the shape's)")
    ap.add_argument("--examples", type=int, default=None, help="examples of the inner step (default: the shape's)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per example and text (default: the shape's)")
    ap.add_argument("--held", type=int, default=None, help="lm_loss: held-out texts (default: the shape's)")
    ap.add_argument("--m4-micro", type=int, default=128, help="microbatch of M = 4's training passes")
    ap.add_argument("--m4-hvp-micro", type=int, default=64, help="microbatch of M = 4's Hessian-vector products")
    ap.add_argument("--out", default="metagrad_ratio.json")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    shape, device = SHAPES[args.shape], torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    default_cases = "lm_loss" if "llama" in shape else "head,lm_loss,m4_head"
    cases = set((args.cases or default_cases).split(",")) - set(args.skip.split(","))
    micro, chunk = args.micro or shape["micro"], args.chunk or shape.get("chunk", 16)

    model = build(shape, device)
    for p in model.parameters():
        p.requires_grad_(True)
    n, t = args.examples or shape["seqs"], args.seq_len or shape["seq_len"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (4 * n if "m4_head" in cases else n, t), generator=gen)
    held_out = torch.randint(0, shape["vocab_size"], (args.held or shape.get("held", 32), t), generator=gen)
    # every token but the first is a label, as in the baseline's HF loss
    first = make_examples(ids[:n].tolist())
    metrics = {"head": lambda: pattern_metric(model, "67"),  # −loss on held-out sequences:
               "lm_loss": lambda: LMLossMetric(model, make_examples(held_out.tolist()), chunk=chunk)}  # fmt: skip

    results = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tf32": args.tf32, "reps": args.reps, "threads": torch.get_num_threads(),
               "examples": n, "seq_len": t, "held_out": len(held_out), "micro": micro, "chunk": chunk}  # fmt: skip
    print(f"\n{results['device']}, torch {torch.__version__}, shape {args.shape}, tf32={args.tf32}, "
          f"{n} examples × {t} tokens, microbatch {micro}, lm_loss: {len(held_out)} texts, {chunk} a pass")  # fmt: skip
    print(f"{'what':34s} {'seconds':>9s} {'ratio':>7s} {'peak GB':>8s}", flush=True)

    def report(what, secs, ratio, mem=None):
        print(f"{what:34s} {secs:9.3f} {ratio:7.2f} {'' if mem is None else f'{mem:8.1f}'}", flush=True)
        with open(args.out, "w") as f:  # rewritten after every row: a crash keeps what was measured
            json.dump(results, f, indent=2)

    base1, _ = timed(sft_steps(model, ids[:n].to(device), micro, 1, device), device, args.reps)
    results["sft_step_s"] = base1
    report("plain SFT step", base1, 1.0)
    for name in ("head", "head_fwd", "lm_loss", "m4_head"):
        if name not in cases:
            continue
        steps, base = (4, None) if name == "m4_head" else (1, base1)
        if steps == 4:
            base, _ = timed(sft_steps(model, ids.to(device), micro, 4, device), device, args.reps)
            results["sft_4_steps_s"] = base
            report("4 plain SFT steps", base, 1.0)
        ex = make_examples(ids.tolist()) if steps == 4 else first
        mb_size = args.m4_micro if steps == 4 else micro
        hvp = args.m4_hvp_micro if steps > 1 else None
        metric = metrics[name.removeprefix("m4_").removesuffix("_fwd")]()
        with forward_mode_only(name.endswith("_fwd")):
            res = measure(model, ex, Recipe(steps=steps, microbatch_size=mb_size), metric, hvp, device, args.reps)
        if res is None:
            results[name] = {"error": "out of memory"}
            print(f"{name}: out of memory", flush=True)
            continue
        secs, times, res, phases = res
        results[name] = {
            "seconds": secs, "ratio": secs / base, "times": times, "timings": res.timings, "phases": phases,
            "microbatch": mb_size, "hvp_microbatch": hvp,
            "peak_memory_gb": None if res.peak_memory is None else res.peak_memory / 2**30,
        }  # fmt: skip
        report(f"metagradient {name} (M={steps})", secs, secs / base, results[name]["peak_memory_gb"])
        print("   phases (medians): " + ", ".join(f"{k} {v:.3f}s" for k, v in phases.items() if k != "first_call"))
        warm_up = phases["first_call"]
        print("   first call (warm-up): " + ", ".join(f"{k} {v:.3f}s" for k, v in warm_up.items()), flush=True)


@contextlib.contextmanager
def forward_mode_only(on: bool):
    """With `on`, no score comes from the training pass: every one takes a forward-mode pass."""
    import dpg.metagrad.engine as engine
    import dpg.metagrad.reverse as reverse

    real = reverse.head_only
    if on:
        engine.head_only = reverse.head_only = lambda target, support: False
    try:
        yield
    finally:
        engine.head_only = reverse.head_only = real


def measure(model, examples, recipe, metric, hvp, device, reps):
    """(median seconds, every rep's seconds, the last result, the median of each phase over the
    reps, and the warm-up's as "first_call") of `reps` metagradients after a warm-up, or None when out of memory."""
    holder, timings = {}, []

    def run():
        holder["res"] = example_metagrads(model, examples, recipe, metric, device=device, hvp_microbatch_size=hvp)
        timings.append(holder["res"].timings)

    try:
        secs, times = timed(run, device, reps)
    except torch.OutOfMemoryError:
        holder.clear()
        torch.cuda.empty_cache()
        return None
    phases = {k: statistics.median(t.get(k, 0.0) for t in timings[1:]) for k in timings[-1]}  # [0]: the warm-up
    return secs, times, holder["res"], phases | {"first_call": timings[0]}


if __name__ == "__main__":
    main()
