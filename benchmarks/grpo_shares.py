"""Where a GRPO step's time goes, from a run's metrics.jsonl: rollout generation throughput
and the share of each step spent in generation, reward (metagradient) and policy update.

    python benchmarks/grpo_shares.py runs/paper/67/metrics.jsonl [--skip 2]

Generated tokens per step = mean completion length × completions per step (TRL's
completions/mean_length, which counts tokens up to and including EOS). Medians over the
steps after the first `--skip` (warm-up: CUDA kernels, allocator).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("metrics", type=Path)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    ap.add_argument("--completions", type=int, default=None, help="completions per step (default: from config.yaml)")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()][args.skip :]
    if not rows:
        raise SystemExit(f"{args.metrics}: no steps after the first {args.skip}")
    per_step = args.completions or _completions(args.metrics.parent)
    med = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in ("step", "generation", "reward", "update")}
    tokens = statistics.median(r["trl/completions/mean_length"] * per_step for r in rows)
    out = {
        "steps": len(rows),
        "completions_per_step": per_step,
        "generated_tokens_per_step": tokens,
        "generation_tokens_per_s": tokens / med["generation"],
        "step_seconds": med["step"],
        **{f"share_{k}": med[k] / med["step"] for k in ("generation", "reward", "update")},
    }
    print(json.dumps(out, indent=2))


def _completions(run_dir: Path) -> int:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return cfg["grpo"]["prompts_per_step"] * cfg["grpo"]["num_generations"]


if __name__ == "__main__":
    main()
