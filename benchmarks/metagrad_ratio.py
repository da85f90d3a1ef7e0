"""Time of one exact metagradient / time of plain SFT, measured in the same process.

    python benchmarks/metagrad_ratio.py                      # GPT-2-small shape on CUDA
    python benchmarks/metagrad_ratio.py --shape tiny --device cpu   # smoke run

GPT-2-small shape: 124M parameters (untied head), 1,024 sequences × 128 tokens per step in
microbatches of 128, fp32 weights. The baseline is the plain SFT step everyone writes: HF
forward with labels, backward, torch's fused AdamW, SDPA attention. Ratios:

    head       M = 1 metagradient, metric on the LM head (the "67" pattern)  / 1 SFT step
    lm_loss    M = 1 metagradient, metric = held-out LM loss (tangent everywhere) / 1 SFT step
    m4_head    M = 4 metagradient (4,096 sequences), LM-head metric / 4 SFT steps

Prints a table and writes JSON (--out). Each figure is the median of --reps timed runs after
one warm-up. --tf32 sets TF32 matmuls for the baseline and the engine alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

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
}


def build(shape: dict, device: torch.device) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=shape["vocab_size"], n_positions=max(1024, shape["seq_len"]), n_embd=shape["n_embd"],
        n_layer=shape["n_layer"], n_head=shape["n_head"], tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="gpt2-small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated cases to skip: head,lm_loss,m4_head")
    ap.add_argument("--m4-micro", type=int, default=128, help="microbatch of M = 4's training passes")
    ap.add_argument("--m4-hvp-micro", type=int, default=64, help="microbatch of M = 4's Hessian-vector products")
    ap.add_argument("--out", default="metagrad_ratio.json")
    args = ap.parse_args()
    shape, device = SHAPES[args.shape], torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    skip = set(filter(None, args.skip.split(",")))

    model = build(shape, device)
    for p in model.parameters():
        p.requires_grad_(True)
    n, t, micro = shape["seqs"], shape["seq_len"], shape["micro"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (4 * n, t), generator=gen)
    held_out = torch.randint(0, shape["vocab_size"], (32, t), generator=gen)
    # every token but the first is a label, as in the baseline's HF loss
    examples = make_examples(ids.tolist())
    first = make_examples(ids[:n].tolist())


    head_metric = pattern_metric(model, "67")
    lm_metric = LMLossMetric(model, make_examples(held_out.tolist()))  # −loss on held-out sequences

    results = {"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tf32": args.tf32, "reps": args.reps}  # fmt: skip
    print(f"\n{results['device']}, torch {torch.__version__}, shape {args.shape}, tf32={args.tf32}")
    print(f"{'what':34s} {'seconds':>9s} {'ratio':>7s} {'peak GB':>8s}", flush=True)

    def report(what, secs, ratio, mem=None):
        print(f"{what:34s} {secs:9.3f} {ratio:7.2f} {'' if mem is None else f'{mem:8.1f}'}", flush=True)
        with open(args.out, "w") as f:  # rewritten after every row: a crash keeps what was measured
            json.dump(results, f, indent=2)

    base1, _ = timed(sft_steps(model, ids[:n].to(device), micro, 1, device), device, args.reps)
    results["sft_step_s"] = base1
    report("plain SFT step", base1, 1.0)
    cases = [("head", first, 1, head_metric, micro), ("lm_loss", first, 1, lm_metric, micro)]
    if "m4_head" not in skip:
        cases.append(("m4_head", examples, 4, head_metric, args.m4_micro))
    for name, ex, steps, metric, mb_size in cases:
        if name in skip:
            continue
        base = base1
        if steps == 4:
            base, _ = timed(sft_steps(model, ids.to(device), micro, 4, device), device, args.reps)
            results["sft_4_steps_s"] = base
            report("4 plain SFT steps", base, 1.0)
        recipe = Recipe(steps=steps, microbatch_size=mb_size)
        holder = {}

        def run():
            hvp = args.m4_hvp_micro if steps > 1 else None
            holder["res"] = example_metagrads(model, ex, recipe, metric, device=device, hvp_microbatch_size=hvp)

        try:
            secs, _ = timed(run, device, args.reps)
        except torch.OutOfMemoryError as err:
            results[name] = {"error": str(err).splitlines()[0]}
            print(f"{name}: out of memory ({results[name]['error']})", flush=True)
            holder.clear()
            torch.cuda.empty_cache()
            continue
        res = holder["res"]
        results[name] = {
            "seconds": secs, "ratio": secs / base, "timings": res.timings, "microbatch": mb_size,
            "hvp_microbatch": args.m4_hvp_micro if steps > 1 else None,
            "peak_memory_gb": None if res.peak_memory is None else res.peak_memory / 2**30,
        }  # fmt: skip
        report(f"metagradient {name} (M={steps})", secs, secs / base, results[name]["peak_memory_gb"])
        print("   phases: " + ", ".join(f"{k} {v:.3f}s" for k, v in res.timings.items()), flush=True)


if __name__ == "__main__":
    main()
