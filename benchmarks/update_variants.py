"""A GRPO step's time under variants of one config, against the config as it is.

    python benchmarks/update_variants.py CONFIG [KEY=VALUE ...] --variant "grpo.extra.torch_compile=true"
        [--variant "grpo.update_microbatch=128" ...] [--steps 5] [--warmup 2] [--out FILE.json]

Trains CONFIG with the common overrides for --steps GRPO steps, once as it is (the baseline)
and once per --variant (more overrides, space-separated), one after another in this invocation,
each in its own `dpg train` process and output_dir (no checkpoints), so each variant's baseline
runs on the same machine in the same call. Prints for each run the medians over the steps after
--warmup of dpg's split of a step (time/generation, time/reward, time/update, time/step), each
variant's ratio to the baseline, and the peak device memory its metrics record. As the check that a
variant trains the same policy: step 1's loss and gradient norm (trl/loss, trl/grad_norm)
relative to the baseline's, where step 1's batch is the baseline's (the same seed and weights
draw the same completions, unless the variant changes generation); a variant that changes the
update shows there. A variant that changes step 1's batch (its completions' mean length or its
rewards' mean differ: liger-kernel's patches, say, reach dpg's sampler, whose bf16 logits then
round differently and sample other tokens) is reported as not comparable, as its loss and
gradient then differ by sampling alone (session 12's liger run: loss 38 % apart).
A variant that fails (say, fused kernels the device's stack lacks) is recorded with its error,
and the others still run.

Example (the device machine, after benchmarks/gpu_setup.sh; ~2 minutes a run):
    python benchmarks/update_variants.py configs/paper/67.yaml device=cuda grpo.update_microbatch=64 \\
        recipe.microbatch_size=32 --variant grpo.extra.torch_compile=true --variant grpo.update_microbatch=128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ("generation", "reward", "update", "step")
BATCH = ("trl/completions/mean_length", "target_tokens", "raw_mean", "raw_std")  # step 1's batch, in brief


def same_lengths(base: dict, run: dict) -> bool:
    """Whether step 1's completions had the baseline's mean length and target tokens."""
    b, r = base["step1_batch"], run["step1_batch"]
    return all(b[k] == r[k] for k in ("trl/completions/mean_length", "target_tokens"))


def reward_shift(base: dict, run: dict) -> float | None:
    """How far step 1's rewards' mean moved from the baseline's, in units of their spread
    (None: a reward that records no mean, the baselines': levenshtein, ...)."""
    b, r = base["step1_batch"], run["step1_batch"]
    if b["raw_mean"] is None or r["raw_mean"] is None:
        return None
    return abs(b["raw_mean"] - r["raw_mean"]) / max(b["raw_std"], 1e-30)


def same_batch(base: dict, run: dict) -> bool:
    """Whether step 1 trained on the baseline's batch: the same mean lengths, and rewards whose
    mean agrees to 1e-4 of their spread (rounding, not another draw: a new batch of n moves the
    mean by ~spread/√n). Rewards that record no mean leave the lengths alone to tell."""
    shift = reward_shift(base, run)
    return same_lengths(base, run) and (shift is None or shift <= 1e-4)


def train(config: str, overrides: list[str], steps: int, out_dir: Path) -> list[dict]:
    """One `dpg train` run of `steps` steps: its metrics rows; a run that fails raises
    RuntimeError with its output's tail."""
    over = [*overrides, f"output_dir={out_dir}", f"grpo.steps={steps}", "grpo.save_every=0", "grpo.png_every=0",
            "resume=false", "time_limit=0"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "dpg.cli", "train", config, *over], cwd=ROOT, text=True,
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{done.stdout[-1500:]}{done.stderr[-1500:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows


def summary(rows: list[dict], warmup: int) -> dict:
    """Medians of the split over the steps after warmup; step 1's loss and gradient norm; peak
    memory (the last row's, as `dpg train` records it on a GPU)."""
    timed = [r for r in rows if r["step"] > warmup] or rows
    first = rows[0]
    return {
        "steps_timed": len(timed),
        "median_s": {k: statistics.median(r[f"time/{k}"] for r in timed) for k in SPLIT},
        "step1": {"loss": first.get("trl/loss"), "grad_norm": first.get("trl/grad_norm")},
        "step1_batch": {k: first.get(k) for k in BATCH},
        "peak_reserved_gb": rows[-1].get("memory/peak_reserved_gb"),
    }


def compare(base: dict, run: dict) -> dict:
    """A variant against the baseline: time ratios, and step 1's relative differences (None
    where step 1's batch was not the baseline's)."""
    ratio = {k: run["median_s"][k] / base["median_s"][k] for k in SPLIT}
    same = same_batch(base, run)
    rel = None
    if same:
        rel = {k: None if b is None or run["step1"][k] is None else abs(run["step1"][k] - b) / max(abs(b), 1e-30)
               for k, b in base["step1"].items()}  # fmt: skip
    return {"ratio_to_baseline": ratio, "step1_relative_difference": rel, "same_step1_batch": same,
            "step1_reward_shift": reward_shift(base, run)}  # fmt: skip


def not_comparable(base: dict, run: dict) -> str:
    """Why step 1 is not compared: other lengths (another draw), or the same lengths with rewards
    moved past rounding's 1e-4 of their spread, which is either another draw of equal lengths or a
    variant that changes the reward's own arithmetic (session 15: recipe.microbatch_size 32 -> 128
    moved the naive L2 rewards' mean by 4.9e-4 of their spread on the same completions)."""
    if not same_lengths(base, run):
        return "step 1 not comparable: another batch (other completion lengths: the variant changed generation)"
    return (f"step 1 not comparable: the baseline's lengths, rewards' mean moved {reward_shift(base, run):.1e} "
            "of their spread (another draw, or a variant that changes the reward's rounding)")  # fmt: skip


def measure(a: argparse.Namespace) -> dict:
    """Each run's summary, the baseline first; a variant that fails is recorded with its error
    and the others go on (a device call's minutes are dear)."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, variant in enumerate(["", *a.variant]):
            name = variant or "baseline"
            try:
                rows = train(a.config, [*a.overrides, *variant.split()], a.steps, Path(tmp) / f"run{n}")
            except RuntimeError as err:
                runs[name] = {"error": str(err)}
                print(f"{name:>40}: failed\n{err}", flush=True)
                continue
            runs[name] = r = summary(rows, a.warmup)
            print(f"{name:>40}: " + "  ".join(f"{k} {v:.3f}s" for k, v in r["median_s"].items())
                  + f"  peak {r['peak_reserved_gb']} GB", flush=True)  # fmt: skip
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE for every run")
    ap.add_argument("--variant", action="append", default=[], help="more overrides, space-separated (repeatable)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians (compilation, caches)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not a.variant:
        ap.error("name at least one --variant")
    runs = measure(a)
    base = runs["baseline"]
    if "error" in base:
        raise SystemExit(f"the baseline failed:\n{base['error']}")
    for variant in (v for v in a.variant if "error" not in runs[v]):
        runs[variant] |= compare(base, runs[variant])
        ratio, diff = runs[variant]["ratio_to_baseline"], runs[variant]["step1_relative_difference"]
        check = f"step 1 relative difference {diff}" if diff is not None else not_comparable(base, runs[variant])
        print(f"{variant:>40}: update ×{ratio['update']:.3f}, step ×{ratio['step']:.3f} of the baseline's; {check}")
    result = {"config": a.config, "overrides": a.overrides, "steps": a.steps, "warmup": a.warmup, "runs": runs}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
        print(f"→ {a.out}")


if __name__ == "__main__":
    main()
