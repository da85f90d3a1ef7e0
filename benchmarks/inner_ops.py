"""What an inner fine-tune costs in dispatched ops and time, per microbatch size: dpg's
`fine_tune` (the naive reward's inner run, and the metagrad engine's training pass) against the
plain SFT loop everyone writes, in the same process.

    python benchmarks/inner_ops.py --shape smollm2-135m --device cuda --tf32 --examples 256 --seq-len 32 \\
        --micro 32 64 128 [--out inner_ops.json]
    python benchmarks/inner_ops.py --shape deep-overhead --device cpu --examples 256 --seq-len 24   # smoke

Why: the naive reward of a paper run (4 inner fine-tunes of 256 completions of ~20-50 tokens
a step, SmolLM2 target) took ~4 s a step on the H200 whatever the completions' length (session 14),
which points at the host's cost per op rather than at arithmetic. Each row counts the aten op
calls of one fine-tune under torch.profiler (views, reshapes and other metadata ops among them,
which launch no kernel on CUDA: the count bounds the kernels launched from above and grows
with the passes as they do) and times it
(median of --reps after a warm-up), for dpg and for the plain loop (HF forward with labels,
backward, torch's AdamW), at each --micro; ratios are dpg / plain at the same microbatch.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from metagrad_ratio import SHAPES, build, sft_steps, timed  # benchmarks/, the script's own folder
from torch.profiler import ProfilerActivity, profile

from dpg import Recipe, make_examples
from dpg.metagrad.engine import fine_tune
from dpg.metagrad.precision import tf32_matmuls


def dpg_loop(model: torch.nn.Module, ids: torch.Tensor, micro: int, device: torch.device):
    examples = make_examples(ids.cpu().tolist())
    recipe = Recipe(optimizer="adamw", lr=5e-6, b2=0.95, eps_root=1e-9, weight_decay=1e-4, steps=1,
                    microbatch_size=micro)  # fmt: skip
    return lambda: fine_tune(model, examples, recipe, device=device)


def op_calls(fn) -> int:
    """aten op calls of one call of `fn` (views included, as the dispatcher sees them)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def measure(model, ids, micro, device, reps, count_ops=True) -> dict:
    row = {"micro": micro}
    for name, fn in (("plain", sft_steps(model, ids, micro, 1, device)), ("dpg", dpg_loop(model, ids, micro, device))):
        row[f"{name}_seconds"] = timed(fn, device, reps)[0]
        row[f"{name}_ops"] = op_calls(fn) if count_ops else None  # None (JSON null): not counted (--no-ops)
    row["ops_ratio"] = row["dpg_ops"] / row["plain_ops"] if count_ops else None
    row["time_ratio"] = row["dpg_seconds"] / row["plain_seconds"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls for both loops (reward.tf32)")
    ap.add_argument("--examples", type=int, default=256, help="examples of the fine-tune (a naive inner run: 256)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--micro", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-ops", action="store_true", help="time only (counting: ~30 s a 150k-op run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    model = build(shape, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (args.examples, args.seq_len), generator=gen).to(device)
    result = {"command": " ".join(["python", *sys.argv]), "shape": args.shape,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tf32": args.tf32, "examples": args.examples, "seq_len": args.seq_len,
              "reps": args.reps, "rows": []}  # fmt: skip
    print(f"{result['device']}, shape {args.shape}, {args.examples} examples × {args.seq_len} tokens, tf32={args.tf32}")
    heads = ("micro", 5), ("plain s", 8), ("dpg s", 8), ("time ×", 7), ("plain ops", 10), ("dpg ops", 10), ("ops ×", 6)
    print(" ".join(f"{h:>{w}s}" for h, w in heads))
    with tf32_matmuls(args.tf32):
        for micro in args.micro:
            row = measure(model, ids, micro, device, args.reps, count_ops=not args.no_ops)
            result["rows"].append(row)
            counted = row["ops_ratio"] is not None
            ops = (f"{row['plain_ops']:10d} {row['dpg_ops']:10d} {row['ops_ratio']:6.2f}" if counted
                   else f"{'-':>10s} {'-':>10s} {'-':>6s}")  # fmt: skip
            print(f"{micro:5d} {row['plain_seconds']:8.3f} {row['dpg_seconds']:8.3f} {row['time_ratio']:7.2f} {ops}",
                  flush=True)  # fmt: skip
            if args.out:  # after every row: a call cut short keeps the rows it measured
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
