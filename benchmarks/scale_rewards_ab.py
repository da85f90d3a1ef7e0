"""Does normalising advantages over the batch instead of each group keep the policy from
collapsing? An A/B of `grpo.scale_rewards` (`group`, the paper's, against `batch`) on the tiny
demo, same seeds and budget, read from each run's own files.

    python benchmarks/scale_rewards_ab.py [--seeds 0 1 2 3 4 5] [--out runs/scale_rewards_ab] [key=value ...]

For each value and seed it runs `dpg train configs/demo.yaml` (skipped where OUT/V_sS already
holds a finished generator) and `dpg evaluate` (skipped where its evaluate.json exists), then
prints one row a run: the policy's entropy and the share of distinct completions at the last
step, the least share over the run and the first step it fell below 0.9, and the transfer
check's pixel accuracy (mean over the config's sampling seeds). Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIG = "configs/demo.yaml"
VALUES = ("group", "batch")


def run(out: Path, value: str, seed: int, overrides: list[str]) -> None:
    """Train and check one run through the CLI, as a user would, unless its files exist."""
    keys = [f"output_dir={out}", f"seed={seed}", f"grpo.scale_rewards={value}", *overrides]
    dpg = [sys.executable, "-m", "dpg.cli"]
    if not (out / "generator").is_dir():
        subprocess.run([*dpg, "train", CONFIG, *keys], check=True)
    if not (out / "evaluate.json").is_file():
        subprocess.run([*dpg, "evaluate", CONFIG, *keys], check=True)


def summary(out: Path, value: str, seed: int) -> dict:
    """The run's figures from its metrics.jsonl and evaluate.json."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = [r["distinct_share"] for r in rows]
    checks = [r for r in json.loads((out / "evaluate.json").read_text()) if r["generator"] == "trained"]
    return {
        "scale_rewards": value, "seed": seed, "steps": rows[-1]["step"],
        "entropy_last": rows[-1]["trl/entropy"], "distinct_last": shares[-1], "distinct_least": min(shares),
        "below_0.9_from": next((r["step"] for r in rows if r["distinct_share"] < 0.9), None),
        "pixel_accuracy": sum(c["proxy"]["pixel_accuracy"] for c in checks) / len(checks),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--out", default="runs/scale_rewards_ab")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results = []
    for value in VALUES:
        for seed in args.seeds:
            out = Path(args.out) / f"{value}_s{seed}"
            run(out, value, seed, args.overrides)
            results.append(summary(out, value, seed))
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print("| scale_rewards | seed | entropy, last step | distinct share, last | least | below 0.9 from step "
          "| pixel accuracy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        below = r["below_0.9_from"] or "never"
        print(f"| {r['scale_rewards']} | {r['seed']} | {r['entropy_last']:.2f} | {r['distinct_last']:.3f} | "
              f"{r['distinct_least']:.3f} | {below} | {r['pixel_accuracy']:.3f} |")  # fmt: skip
    for value in VALUES:
        rs = [r for r in results if r["scale_rewards"] == value]
        collapsed = sum(r["below_0.9_from"] is not None for r in rs)
        mean = sum(r["pixel_accuracy"] for r in rs) / len(rs)
        print(f"{value}: {collapsed} of {len(rs)} runs fell below a 0.9 distinct share; mean pixel accuracy {mean:.3f}")


if __name__ == "__main__":
    main()
