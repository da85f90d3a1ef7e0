"""Data-parallel metagradients: scores on several GPUs against one GPU, and the speed-up.

    python benchmarks/dp_scaling.py --out one.json                       # one process, all examples
    torchrun --nproc_per_node 2 benchmarks/dp_scaling.py --compare one.json --out two.json

GPT-2-small shape (124M, untied head), 1,024 sequences × 128 tokens in all, fp32, M = 1,
microbatches of 128, for an LM-head metric ("67") and an lm_loss metric. With N processes
each holds 1/N of the sequences (rank r: rows r, r + N, ...), the inner step trains on their
union (gradients all-reduced), and each rank scores its own rows. Prints, per metric, the
median time of one metagradient and, with --compare, the relative error of the gathered
scores against the one-process scores and the speed-up (one-process time / this time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from metagrad_ratio import SHAPES, build
from dpg import Recipe, example_metagrads, make_examples
from dpg.metrics import LMLossMetric, pattern_metric


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare", default=None, help="JSON written by a one-process run")
    ap.add_argument("--out", default="dp_scaling.json")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    group = None
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
        group = dist.group.WORLD
    shape = SHAPES["gpt2-small"]
    model = build(shape, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (shape["seqs"], shape["seq_len"]), generator=gen)
    held_out = torch.randint(0, shape["vocab_size"], (32, shape["seq_len"]), generator=gen)
    rows = list(range(rank, shape["seqs"], world))
    examples = make_examples(ids[rows].tolist())
    metrics = {"head": pattern_metric(model, "67"), "lm_loss": LMLossMetric(model, make_examples(held_out.tolist()))}
    recipe = Recipe(steps=1, microbatch_size=shape["micro"])
    one = json.load(open(args.compare)) if args.compare else None
    results = {"world": world, "device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    for name, metric in metrics.items():
        times, scores = [], None
        for _ in range(args.reps + 1):  # the first is a warm-up
            torch.cuda.synchronize(device)
            if group is not None:
                dist.barrier()
            start = time.perf_counter()
            res = example_metagrads(model, examples, recipe, metric, group=group)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            scores = res.scores
        secs = statistics.median(times[1:])
        full = torch.zeros(shape["seqs"], dtype=torch.float64)
        if group is not None:
            parts = [torch.empty_like(scores, device=device) for _ in range(world)]
            dist.all_gather(parts, scores.to(device))
            for r, part in enumerate(parts):
                full[r::world] = part.cpu()
        else:
            full = scores
        row = {"seconds": secs, "phi": res.metric, "scores": full.tolist()}
        if one is not None:
            ref = torch.tensor(one[name]["scores"], dtype=torch.float64)
            row["rel_err_vs_one"] = ((full - ref).norm() / ref.norm()).item()
            row["speedup_vs_one"] = one[name]["seconds"] / secs
        results[name] = row
        if rank == 0:
            extra = (
                f"  rel. error vs 1 GPU {row['rel_err_vs_one']:.2e}  speed-up {row['speedup_vs_one']:.2f}×"
                if one
                else ""
            )
            print(f"{world} GPU(s) {name:8s} {secs:7.3f} s  Φ {res.metric:.6g}{extra}", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
