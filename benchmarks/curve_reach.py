"""When would a run's curve reach a level? Judging from the curve, as issue 11 asks of a target
not reached in the GPU time at hand.

    python benchmarks/curve_reach.py RUN [RUN ...] --level 0.00826 [--key delta_phi] [--window 40]
                                     [--batch 1024] [--out FILE.json]

RUN is a run's metrics.jsonl or its console log (NAME.log, read back by dpg.report). The series
is a per-step quantity of the run: `delta_phi` (the default: Φ after the inner step on the step's
batch minus Φ before it, the gain the rewards share out) or any key of its rows (say
`proxy/pixel_accuracy`, the batch's own check). Over the last --window steps, a line and an
exponential (a line through log y) are fitted by least squares. For each, the step at which the
fitted curve reaches --level, and the generated examples (× --batch) by then. A line that
does not rise, or a level below the fit's, says `never` or `already`. These are
extrapolations of a noisy curve, not predictions: the two fits bracket what the curve, as it
goes, would need.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpg.report import read_rows, rows_from_console  # noqa: E402


def series(path: Path, key: str, batch: int) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` in the run at `path` (metrics.jsonl, or a console log)."""
    rows = read_rows(path, partial_ok=True) if path.suffix == ".jsonl" else rows_from_console(path.read_text(), batch)
    steps, values = [], []
    for row in rows:
        value = row["phi"] - row["phi_before"] if key == "delta_phi" and "phi_before" in row else row.get(key)
        if value is not None:
            steps.append(float(row["step"]))
            values.append(float(value))
    if len(steps) < 2:
        raise SystemExit(f"{path}: fewer than two steps hold {key}")
    return steps, values


def fit_line(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y ≈ a + b·x: (a, b, the standard error of b; 0 for two points)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx
    a = my - b * mx
    residual = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y))
    se = math.sqrt(residual / (len(x) - 2) / sxx) if len(x) > 2 else 0.0
    return a, b, se


def reach(a: float, b: float, level: float, last: float) -> float | str:
    """The x at which a + b·x reaches level, going on from x = last."""
    if a + b * last >= level:
        return "already"
    if b <= 0:
        return "never"
    return (level - a) / b


def fitted(x: list[float], y: list[float], level: float, log: bool) -> dict:
    """One fit (a line through y, or through log y) and where it reaches level; with the slope
    one standard error lower and higher, through the same mean point, as the fit's range."""
    if log:
        y, level = [math.log(v) for v in y], math.log(level)
    a, b, se = fit_line(x, y)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    ends = [reach(my - s * mx, s, level, x[-1]) for s in (b + se, b - se)]
    value = a + b * x[-1]
    return {"value_at_last": math.exp(value) if log else value, "per_step": b, "per_step_se": se,
            "reaches_at_step": reach(a, b, level, x[-1]), "range_slope_pm_se": ends}  # fmt: skip


def judge(x: list[float], y: list[float], level: float, window: int, batch: int) -> dict:
    """Both fits over the last `window` points (the exponential where every value is > 0), and
    where each reaches `level`."""
    x, y = x[-window:], y[-window:]
    out = {"steps_fitted": [x[0], x[-1]], "mean_fitted": sum(y) / len(y), "line": fitted(x, y, level, False)}
    if min(y) > 0 and level > 0:
        out["exponential"] = fitted(x, y, level, True)
    for fit in ("line", "exponential"):
        step = out.get(fit, {}).get("reaches_at_step")
        if isinstance(step, float):
            out[fit]["examples_by_then"] = round(step * batch)
    return out


def said(step: float | str) -> str:
    return step if isinstance(step, str) else f"{step:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--level", type=float, required=True)
    ap.add_argument("--key", default="delta_phi")
    ap.add_argument("--window", type=int, default=40, help="the last steps the fits see")
    ap.add_argument("--batch", type=int, default=1024, help="generated examples a step")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    result = {"key": a.key, "level": a.level, "window": a.window, "runs": {}}
    for path in a.runs:
        x, y = series(path, a.key, a.batch)
        result["runs"][str(path)] = r = {"steps": len(x)} | judge(x, y, a.level, a.window, a.batch)
        fits = "; ".join(f"{f} {said(r[f]['reaches_at_step'])} (slope ± SE: "
                         f"{said(r[f]['range_slope_pm_se'][0])}–{said(r[f]['range_slope_pm_se'][1])})"
                         for f in ("line", "exponential") if f in r)  # fmt: skip
        first, last = r["steps_fitted"]
        print(f"{path}: {a.key} over steps {first:.0f}–{last:.0f}, mean {r['mean_fitted']:.4g}; reaches {a.level:g}"
              f" at step: {fits}")  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
        print(f"→ {a.out}")


if __name__ == "__main__":
    main()
