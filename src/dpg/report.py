"""What a run shows a person: the per-step console line, metrics.jsonl, pattern PNGs, the
metric curve and the summary of the transfer check.

RunLog is a TrainerCallback (TRL's public extension point). Once per generated batch it
merges the reward's figures (Φ, proxy, raw reward spread, inner-run time) with TRL's logs
(reward, loss, entropy, completion lengths) into one row of metrics.jsonl and one console
line, writes the batch's texts (the most common, the best and the worst by reward) to
samples.jsonl, and every `png_every` steps draws the pattern the target holds after the inner run.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TrainerCallback


class GenerationTimer:
    """Seconds spent in the generator's `generate`, since the last `take()`.

    TRL times generation itself but reports it only to W&B / MLflow, so the generator's
    own method is wrapped (an instance attribute; the class is untouched).
    """

    def __init__(self, model):
        self.seconds = 0.0
        inner = model.generate

        def generate(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        model.generate = generate

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class RunLog(TrainerCallback):
    def __init__(
        self, out_dir: Path, reward, timer: GenerationTimer, *, total_steps: int, per_step: int, png_every: int,
        enabled: bool = True, batch: int = 0, skips=None,
    ):  # fmt: skip
        self.out, self.reward, self.timer, self.enabled = Path(out_dir), reward, timer, enabled  # enabled: rank 0
        self.total_steps, self.per_step, self.png_every = total_steps, per_step, png_every
        self.batch = batch  # completions per generated batch: x axis of the curves (generated examples)
        self.skips = skips  # safety.FiniteGuard: policy updates skipped for a non-finite gradient
        self.path = self.out / "metrics.jsonl"
        self.samples_path = self.out / "samples.jsonl"  # each step's texts (DistinctShare.samples)
        self.last_row: dict[str, Any] = {}
        self._phi_shown = False
        self._clock = time.perf_counter()

    def resume(self, global_step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (0: a fresh start): they will
        be redone. A last line cut short by a killed run is dropped too."""
        for path in (self.path, self.samples_path):
            if self.enabled and path.exists():
                rows = [r for r in read_rows(path, partial_ok=True) if r["global_step"] <= global_step]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                os.replace(tmp, path)  # a kill now leaves the old file or the new one, never half of it

    def on_train_begin(self, args, state, control, **kwargs):
        self._clock = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs or "loss" not in logs:  # the end-of-training summary has no loss
            return
        now = time.perf_counter()
        wall, self._clock = now - self._clock, now
        history = getattr(self.reward, "history", None)
        figures = dict(history[-1]) if history else {}
        figures.pop("step", None)
        called = self.reward.take_seconds() if hasattr(self.reward, "take_seconds") else 0.0
        generation, reward_s = self.timer.take(), figures.get("seconds", called)  # a baseline: the wrapper's clock
        step = state.global_step // self.per_step
        row = {"step": step, "global_step": state.global_step, "examples": step * self.batch}
        row |= figures
        if getattr(self.reward, "share", None) is not None:
            row["distinct_share"] = self.reward.share
        if getattr(self.reward, "samples", None) is not None:  # DistinctShare's batch: its distinct_2 too
            row["distinct_2"] = self.reward.samples["distinct_2"]
        # a skipped update's NaN grad_norm as null: metrics.jsonl stays strict JSON
        row |= {f"trl/{k}": v if math.isfinite(v) else None for k, v in logs.items() if isinstance(v, (int, float))}
        if self.skips is not None:
            row["skipped_updates"] = self.skips.take()
        row |= {"time/step": wall, "time/generation": generation, "time/reward": reward_s}
        row["time/update"] = max(wall - generation - reward_s, 0.0)
        row |= gpu_memory()
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        samples = getattr(self.reward, "samples", None)
        if samples is not None:
            with self.samples_path.open("a") as f:
                f.write(json.dumps({"step": step, "global_step": state.global_step, **samples}, default=float) + "\n")
        self.last_row = row
        if not self._phi_shown and "phi_before" in row:  # once: Φ before and after the first inner run
            self._phi_shown = True
            print(phi_report(row["phi_before"], row["phi"]), flush=True)
        print(console_line(row, self.total_steps), flush=True)
        decoded = getattr(self.reward, "decoded", None)
        if self.png_every and decoded is not None and (step % self.png_every == 0 or step == self.total_steps):
            save_pattern(decoded, self.out / "patterns" / f"step_{step:05d}.png")


def gpu_memory() -> dict[str, float]:
    """This process's peak CUDA memory so far, in GiB (dpg's "GB", as its estimates): what
    torch allocated, and what its caching allocator reserved, the card's share the process
    holds. Nothing off CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"memory/peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "memory/peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}  # fmt: skip


def phi_report(before: float, after: float, lr: float | None = None, suffix: str = "") -> str:
    """Φ before and after an inner run, with a warning when the run made it much worse:
    usually a learning rate far too high for a pretrained model (the paper's is 5e-6), and
    then every score describes the broken model."""
    digits = telling_digits([before, after], least=6)  # an L2 norm of 721 moves in its 8th digit
    line = f"Φ before the inner run {before:.{digits}g}, after {after:.{digits}g}{suffix}"
    if after < before - 0.5 * max(abs(before), 1e-12):
        rate = "recipe.lr" if lr is None else f"recipe.lr = {lr:g}"
        line += (
            f"\nwarning: the inner run made Φ much worse ({before:.4g} -> {after:.4g}); {rate} "
            "is probably too high for this model (the paper's is 5e-6)"
        )
    return line


def console_line(row: dict[str, Any], total: int) -> str:
    row = {k: v for k, v in row.items() if v is not None}  # a figure a skipped update left null is not shown
    parts = [f"step {row['step']:>4}/{total}"]
    if "phi" in row:
        parts.append(f"Φ {row['phi']:.5g}")
        if "phi_before" in row:  # the inner run's gain: where Φ's own digits hide it (an L2 norm of 721)
            parts.append(f"ΔΦ {row['phi'] - row['phi_before']:+.3g}")
    parts += [f"{k.split('/', 1)[1]} {v:.4g}" for k, v in row.items() if k.startswith("proxy/")]
    if "raw_std" in row:
        parts.append(f"raw reward σ {row['raw_std']:.2e}")
    elif "trl/reward" in row:
        parts.append(f"reward {row['trl/reward']:.4g}")
    if "trl/entropy" in row:  # TRL: mean per-token entropy (nats) of the policy over the step's updates
        parts.append(f"entropy {row['trl/entropy']:.3g}")
    if "distinct_share" in row:
        parts.append(f"distinct {row['distinct_share']:.2f}")
    if "distinct_2" in row:
        parts.append(f"bigrams {row['distinct_2']:.2f}")
    if "trl/completions/mean_length" in row:
        parts.append(f"len {row['trl/completions/mean_length']:.3g}")
    parts.append(
        f"| gen {row['time/generation']:.2f}s  reward {row['time/reward']:.2f}s  update {row['time/update']:.2f}s"
    )
    return "  ".join(parts)


CONSOLE_KEYS = {"Φ": "phi", "raw reward σ": "raw_std", "reward": "trl/reward", "entropy": "trl/entropy",
                "distinct": "distinct_share", "bigrams": "distinct_2",
                "len": "trl/completions/mean_length"}  # fmt: skip


def rows_from_console(text: str, batch: int) -> list[dict[str, Any]]:
    """The rows a run's console lines show (console_line, read back: its digits only), for a
    run whose metrics.jsonl was lost but whose log was kept; `batch`: completions a step. A
    step logged twice (a resumed run redoing it) keeps its last line."""
    rows: dict[int, dict[str, Any]] = {}
    for line in text.replace("\r", "\n").splitlines():
        head = re.match(r"step\s+(\d+)/\d+\s+(.*?)\s+\| gen ([\d.]+)s\s+reward ([\d.]+)s\s+update ([\d.]+)s$", line)
        if not head:
            continue
        step = int(head.group(1))
        row: dict[str, Any] = {"step": step, "examples": step * batch}
        for part in head.group(2).split("  "):
            key, _, value = part.strip().rpartition(" ")
            if key == "ΔΦ":
                row["phi_before"] = row["phi"] - float(value)
            else:
                row[CONSOLE_KEYS.get(key, f"proxy/{key}")] = float(value)
        times = (float(head.group(k)) for k in (3, 4, 5))
        rows[step] = row | dict(zip(("time/generation", "time/reward", "time/update"), times))
    return [rows[k] for k in sorted(rows)]


def read_rows(path: Path, partial_ok: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; `partial_ok`: skip a last line cut short (a killed run)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not (partial_ok and i == len(lines) - 1):
                raise
    return rows


def save_pattern(matrix: torch.Tensor, path: Path, scale: int = 24) -> None:
    """A ±1 matrix as an image: +1 black, −1 white, 0 (unmoved) mid-grey; nearest upscaling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = matrix.detach().float().cpu()
    pixels = (127.5 - 127.5 * m).clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels, mode="L").resize((m.shape[1] * scale, m.shape[0] * scale), Image.NEAREST)
    img.save(path)


CURVE_TITLES = {
    "phi": "Φ (inner run on the batch)",
    "trl/reward": "reward",
    "trl/entropy": "policy entropy (nats a token)",
    "distinct_share": "distinct completions (share)",
    "distinct_2": "distinct word bigrams (share)",
}


def curve_keys(rows: list[dict[str, Any]]) -> list[str]:
    """What a run's curves show: Φ (or the reward, for baselines), each proxy, the policy's
    entropy, the share of distinct completions and of distinct word bigrams, those the rows hold."""
    proxies = sorted({k for r in rows for k in r if k.startswith("proxy/")})
    first = "phi" if any("phi" in r for r in rows) else "trl/reward"
    keys = (first, *proxies, "trl/entropy", "distinct_share", "distinct_2")
    return [k for k in keys if any(k in r for r in rows)]


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """The curves of one run (curve_keys) against the number of generated examples."""
    plot_runs({"": rows}, path, title)


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Several runs' curves overlaid, one panel per figure (curve_keys of all the runs), against
    the number of generated examples (the GRPO step for rows that lack it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for rows in runs.values() for k in curve_keys(rows)))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in runs.items():
            pts = [(r.get("examples") or r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, label=name or None)
        examples = any(r.get("examples") for rows in runs.values() for r in rows)
        ax.set_xlabel("generated examples" if examples else "GRPO step")
        ax.set_title(CURVE_TITLES.get(key, key.replace("proxy/", "")))
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, results: list, target_pattern: torch.Tensor | None, seconds: dict[str, float]) -> Path:
    """The report folder of a run: metric curve, target/before/after patterns, summary."""
    report = Path(out_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    metrics = Path(out_dir) / "metrics.jsonl"
    if metrics.exists():
        plot_curves(
            read_rows(metrics), report / "curve.png", title="during training (inner run on each generated batch)"
        )
    if target_pattern is not None:
        save_pattern(target_pattern, report / "pattern_target.png")
    for name in ("base", "trained"):
        first = next((r for r in results if r.generator == name and r.decoded is not None), None)
        if first is not None:
            save_pattern(first.decoded, report / f"pattern_{name}.png")
    table = results_table(results)
    lines = [
        "# dpg run summary",
        "",
        "Transfer check: a fresh dataset sampled from each generator on held-out prompts, a fresh",
        "target fine-tuned on it with the inner recipe (plain training), then Φ and its proxy.",
        "",
        table,
        "",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
        "",
        "Files: curve.png (Φ and proxy during training), pattern_target.png, pattern_base.png,",
        "pattern_trained.png (black +1, white −1, grey unmoved).",
    ]
    (report / "summary.md").write_text("\n".join(lines) + "\n")
    summary = {
        "seconds": seconds,
        "results": [{k: v for k, v in r._asdict().items() if k not in ("decoded", "samples")} for r in results],
    }
    (report / "summary.json").write_text(json.dumps(summary, indent=2))
    return report


def results_table(results: list) -> str:
    """One row per generator of the transfer check (dpg.evaluate.TransferResult rows)."""
    names = dict.fromkeys(r.generator for r in results)
    return figures_table(
        "generator", [(n, [{"Φ": r.metric, **r.proxy, **r.text} for r in results if r.generator == n]) for n in names]
    )


def figures_table(corner: str, rows: list[tuple[str, list[dict[str, float]] | None]], phi_least: int = 4) -> str:
    """A markdown table, one row per (name, one figures dict per seed): the mean over seeds (and
    the range when there are several), each column printed with the digits that tell its values
    apart (an L2 norm of 124 moves in its 7th digit), Φ with at least `phi_least`. A row whose
    figures are None has no transfer check yet: "(training)"."""
    keys = list(dict.fromkeys(k for _, seeds in rows for f in seeds or [] for k in f if k != "Φ"))
    values = {(n, k): [f[k] for f in seeds if k in f] for n, seeds in rows if seeds for k in ["Φ", *keys]}
    digits = {
        k: telling_digits([v for (_, key), vs in values.items() if key == k for v in _summary(vs)],
                          least=phi_least if k == "Φ" else 4)
        for k in ["Φ", *keys]
    }  # fmt: skip
    lines = [f"| {corner} | seeds | Φ | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for name, seeds in rows:
        if seeds is None:
            lines.append(f"| {name} | (training) |" + " |" * (1 + len(keys)))
            continue
        cells = [name, str(len(seeds)), *(_mean_range(values[name, k], digits[k]) for k in ["Φ", *keys])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def telling_digits(values: list[float], least: int = 4, most: int = 12) -> int:
    """The fewest significant digits (at least `least`) at which values that differ by more
    than 1e-12 of their size print differently."""
    for d in range(least, most + 1):
        groups: dict[str, list[float]] = {}
        for v in values:
            groups.setdefault(f"{v:.{d}g}", []).append(v)
        if all(max(g) - min(g) <= 1e-12 * max(abs(x) for x in g) for g in groups.values()):
            return d
    return most


def _summary(values: list[float]) -> list[float]:
    """What a cell of a results table prints: the mean, and the range when there are several."""
    if not values:
        return []
    mean = sum(values) / len(values)
    return [mean] if len(values) == 1 else [mean, min(values), max(values)]


def _mean_range(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    mean, *spread = _summary(values)
    return f"{mean:.{digits}g}" + (f" [{spread[0]:.{digits}g}, {spread[1]:.{digits}g}]" if spread else "")
