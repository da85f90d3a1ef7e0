"""Exact metagradient through M inner steps: time, ratio to M plain SFT steps, peak memory.

    python benchmarks/metagrad_steps.py --steps 1 4 8 32 96 --budget-gb 44 \\
        --out benchmarks/results/h200_steps.json                       # GPT-2-small shape on CUDA
    python benchmarks/metagrad_steps.py --shape tiny --device cpu --steps 1 4 8 --budget-gb 0.01   # smoke run

Each inner step trains on `seqs` sequences (GPT-2-small shape: 1,024 × 128 tokens, training
passes in microbatches of 128, Hessian-vector products in microbatches of 64, fp32, untied
head, metric on the LM head: the "67" pattern), so M steps see M × 1,024 sequences. The
saved step states are bounded by --budget-gb (recipe.state_budget_gb): the engine keeps
what fits and recomputes the rest from checkpoints (the schedule is printed and saved).

Baseline: plain SFT (HF forward with labels, backward, fused AdamW), timed over --sft-steps
steps after a warm-up and scaled to M steps (plain SFT is linear in M). Per M: seconds,
the ratio, the engine's phases (train = the forward run; replay = recomputed steps, part of
reverse), forward seconds per step, peak GPU memory, peak resident host memory (sampled)
and the bytes of saved states the engine held. JSON is rewritten after every M.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch
from metagrad_ratio import SHAPES, build, sft_steps, timed

from dpg import Examples, Recipe, example_metagrads
from dpg.metagrad import schedule
from dpg.metrics import pattern_metric


class PeakRSS:
    """Peak resident memory of this process (pinned host memory included), sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def examples_for(ids: torch.Tensor) -> Examples:
    """Every token but the first is a label, as in the baseline's HF loss."""
    labels = torch.ones_like(ids, dtype=torch.bool)
    labels[:, 0] = False
    return Examples(ids, torch.ones_like(ids), labels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="gpt2-small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4, 8, 32, 96], help="the M values, run in this order")
    ap.add_argument("--budget-gb", type=float, default=None, help="recipe.state_budget_gb (none: half the free memory)")
    ap.add_argument("--offload", default="cpu", choices=["cpu", "disk", "device"])
    ap.add_argument("--hvp-micro", type=int, default=None, help="HVP microbatch (default: half the training one)")
    ap.add_argument("--seqs", type=int, default=None, help="sequences per inner step (default: the shape's)")
    ap.add_argument("--sft-steps", type=int, default=4, help="plain SFT steps timed for the baseline")
    ap.add_argument("--reps", type=int, default=1, help="timed metagradients per M (median), after --warmup")
    ap.add_argument("--warmup", action="store_true", help="an untimed metagradient at each M first")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--plan-only", action="store_true", help="print the schedule chosen for each M, run nothing")
    ap.add_argument("--out", default="metagrad_steps.json")
    args = ap.parse_args()
    shape, device = SHAPES[args.shape], torch.device(args.device)
    if args.plan_only:
        return print_plans(build(shape, torch.device("cpu")), args.steps, args.budget_gb)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    n, t, micro = args.seqs or shape["seqs"], shape["seq_len"], shape["micro"]
    hvp_micro = args.hvp_micro or max(1, micro // 2)
    model = build(shape, device)
    metric = pattern_metric(model, "67")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (max(args.steps) * n, t), generator=gen)

    base, _ = timed(sft_steps(model, ids[: args.sft_steps * n].to(device), micro, args.sft_steps, device), device, 3)
    sft_step = base / args.sft_steps
    results = {
        "shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tf32": args.tf32, "seqs_per_step": n, "seq_len": t, "microbatch": micro,
        "hvp_microbatch": hvp_micro, "budget_gb": args.budget_gb, "offload": args.offload, "sft_step_s": sft_step,
        "runs": {},
    }  # fmt: skip
    print(f"\n{results['device']}, torch {torch.__version__}, shape {args.shape}: plain SFT step {sft_step:.3f} s")
    print(
        f"{'M':>4s} {'seconds':>9s} {'ratio':>6s} {'fwd/step':>9s} {'replay':>8s} {'GPU GB':>7s} {'host GB':>8s}  "
        "schedule"
    )
    for m in args.steps:
        row = measure(model, metric, ids[: m * n], m, micro, hvp_micro, args, device)
        row["sft_equivalent_s"], row["ratio"] = m * sft_step, row["seconds"] / (m * sft_step)
        results["runs"][str(m)] = row
        with open(args.out, "w") as f:  # rewritten after every M: a crash keeps what was measured
            json.dump(results, f, indent=2)
        s = row["schedule"]
        tree = f"k={s['k']}, {s['levels']} levels, {s['recomputed']} recomputed"
        plan = "all saved" if s["recomputed"] == 0 else tree
        gpu = "" if row["peak_gpu_gb"] is None else f"{row['peak_gpu_gb']:7.1f}"
        print(
            f"{m:4d} {row['seconds']:9.2f} {row['ratio']:6.2f} {row['forward_s_per_step']:9.3f} "
            f"{row['timings'].get('replay', 0):8.2f} {gpu:>7s} {row['peak_host_rss_gb']:8.1f}  {plan}, "
            f"{row['saved_states_gb']:.2f} GB held",
            flush=True,
        )


def measure(model, metric, ids, m, micro, hvp_micro, args, device) -> dict:
    """One metagradient through M steps on `ids` (M × seqs sequences): time and memory."""
    recipe = Recipe(steps=m, microbatch_size=micro, state_budget_gb=args.budget_gb)
    examples = examples_for(ids)
    holder = {}

    def run():
        with PeakRSS() as rss:
            holder["res"] = example_metagrads(
                model, examples, recipe, metric, device=device, offload=args.offload, hvp_microbatch_size=hvp_micro
            )  # fmt: skip
        holder["rss"] = rss.peak

    if args.warmup:
        run()
    secs, times = timed_once(run, device, args.reps)
    res = holder["res"]
    return {
        "seconds": secs, "all_seconds": times, "forward_s_per_step": res.timings["train"] / m,
        "timings": res.timings, "peak_gpu_gb": None if res.peak_memory is None else res.peak_memory / 2**30,
        "peak_host_rss_gb": holder["rss"] / 2**30, "saved_states_gb": res.schedule["held_bytes"] / 2**30,
        "schedule": res.schedule, "warmup": args.warmup,
    }  # fmt: skip


def print_plans(model, steps: list[int], budget_gb: float | None) -> None:
    """What the engine would keep and recompute (AdamW, fp32), without running anything."""
    unit = sum(p.numel() for p in model.parameters()) * 4
    budget = None if budget_gb is None else int(budget_gb * 2**30)
    print(
        f"θ: {unit / 2**30:.3f} GB fp32; a record (θ, g, m, v) {4 * unit / 2**30:.2f} GB, "
        f"a state {3 * unit / 2**30:.2f} GB"
    )
    print(f"{'M':>4s} {'k':>4s} {'levels':>6s} {'held':>5s} {'GB':>6s} {'steps run':>9s} {'recomputed':>10s}")
    for m in steps:
        p = schedule.choose(m, True, unit, budget)
        gb = p.peak_bytes / 2**30
        print(f"{m:4d} {p.k:4d} {p.levels:6d} {p.peak_items:5d} {gb:6.1f} {p.runs:9d} {p.runs - m:10d}")


def timed_once(fn, device, reps):
    """Median of `reps` timed calls, no warm-up of its own (see --warmup)."""
    import statistics

    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


if __name__ == "__main__":
    main()
