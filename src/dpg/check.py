"""dpg check: the engine against central finite differences, on the user's model and recipe.

Everything runs in true fp64 (`float64_everywhere` promotes the fp32 casts inside HF
layers). For a few examples i, Φ is re-trained at w_i = 1 ± h for a ladder of steps h;
central differences are accurate to O(h²) for large h and to rounding/h for small h, so the
best rung is the finite-difference estimate. AdamW's update bends on the scale of
√eps_root + eps, which is why a ladder is needed rather than one h.

The report also gives the fp32 engine's error against fp64 over all examples: it shows how
well the production precision resolves this recipe (README, "Precision").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from dpg import memory
from dpg.metagrad.engine import Examples, Metric, Recipe, example_metagrads, fine_tune
from dpg.metagrad.precision import agreement, float64_everywhere, tf32_matmuls
from dpg.metrics import MetricConfig
from dpg.models import ModelConfig


class CheckRow(NamedTuple):
    index: int  # example position in the input
    engine: float  # dΦ/dw_i from the engine, fp64
    finite_difference: float  # the best central difference
    step: float  # the h that gave it
    error: float  # |fd − engine| / scale (see check_metagrads)
    resolution: float  # that difference's own fp64 rounding, eps·(|Φ₊| + |Φ₋|)/(2h), on the same scale


class CheckReport(NamedTuple):
    rows: list[CheckRow]
    phi_before: float  # Φ(θ_0), fp64
    phi_after: float  # Φ(θ_M) after the inner run at w = 1, fp64
    max_error: float  # over the checked examples
    fp32_error: float | None  # ‖s32 − s64‖ / ‖s64‖ over all examples
    tf32: dict[str, float] | None  # on CUDA: TF32 vs fp32 scores (precision.agreement), what reward.tf32 costs
    tolerance: float
    passed: bool

    @property
    def unresolved(self) -> list[int]:
        """Examples off by more than the tolerance but by no more than their finite difference's
        own rounding: scores too small against Φ for differences to check (README, "Precision")."""
        return [r.index for r in self.rows if self.tolerance < r.error <= r.resolution]


def check_metagrads(
    model: nn.Module,
    examples: Examples,
    recipe: Recipe,
    metric: Metric,
    *,
    count: int = 3,
    steps: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7),
    tolerance: float = 1e-4,
    device: torch.device | str = "cpu",
    fp32: bool = True,
) -> CheckReport:
    """`model` and `metric` must be fp64 (the metric built on the fp64 model).

    Checked examples: the largest score, the smallest, and then evenly spaced ranks. Error
    is relative to max(|score_i|, 1e-3·max_j |score_j|), so a near-zero score is judged
    on the scale of the others rather than on its own. Each difference's rounding bound,
    eps·(|Φ₊| + |Φ₋|)/(2h) on the same scale, says whether it could resolve the tolerance.
    """
    with float64_everywhere():
        result = example_metagrads(model, examples, recipe, metric, dtype=torch.float64, device=device)
    exact = result.scores
    order = torch.argsort(exact, descending=True).tolist()
    picks = [order[round(k * (len(order) - 1) / max(count - 1, 1))] for k in range(min(count, len(order)))]
    picks = list(dict.fromkeys(picks))  # distinct, ranks kept
    scale_floor = 1e-3 * exact.abs().max().item()
    everything = {k: p.detach().to(device) for k, p in model.named_parameters()}
    rows = []
    for i in picks:
        e = exact[i].item()
        best = None
        for h in steps:
            phis = []
            for sign in (1.0, -1.0):
                w = torch.ones(len(exact), dtype=torch.float64)
                w[i] += sign * h
                with float64_everywhere():
                    trained = fine_tune(model, examples, recipe, w, dtype=torch.float64, device=device).params
                    phis.append(metric(everything | trained).item())
                del trained  # one θ_M at a time: a parameter copy is GBs in fp64 on a real model
            fd = (phis[0] - phis[1]) / (2 * h)
            err = abs(fd - e) / max(abs(e), scale_floor)
            if best is None or err < best.error:
                rounding = torch.finfo(torch.float64).eps * (abs(phis[0]) + abs(phis[1])) / (2 * h)
                best = CheckRow(i, e, fd, h, err, rounding / max(abs(e), scale_floor))
        rows.append(best)
    fp32_error, tf32 = None, None
    if fp32:
        s32 = example_metagrads(model, examples, recipe, metric, dtype=torch.float32, device=device).scores
        fp32_error = ((s32 - exact).norm() / exact.norm()).item()
        if torch.device(device).type == "cuda":
            with tf32_matmuls(True):
                s_tf32 = example_metagrads(model, examples, recipe, metric, dtype=torch.float32, device=device).scores
            tf32 = agreement(s32, s_tf32)
    worst = max(r.error for r in rows)
    return CheckReport(
        rows, result.metric_before, result.metric, worst, fp32_error, tf32, tolerance, worst <= tolerance
    )


def verdict(report: CheckReport) -> str:
    """PASS; UNRESOLVED where every example off by more than the tolerance is off by no more
    than its difference's rounding (the differences cannot judge it); else FAIL."""
    head = f"largest relative error {report.max_error:.2e} (tolerance {report.tolerance:g})"
    if report.passed:
        return f"PASS: {head}"
    unresolved = report.unresolved
    if len(unresolved) < sum(r.error > report.tolerance for r in report.rows):
        return f"FAIL: {head}"
    return (
        f"UNRESOLVED: {head}, within the finite differences' own fp64 rounding for examples {unresolved} "
        "(their scores are too small against Φ to check this way, as where AdamW's first update is "
        "saturated: |g| ≫ √eps_root). Not verified: check examples with larger scores (count, data), or "
        "a recipe whose update is off its sign (a larger recipe.eps_root)"
    )


@dataclass
class CheckConfig:
    """dpg check: the engine against finite differences on your model and recipe."""

    target: ModelConfig = field(default_factory=ModelConfig)  # the model the inner run fine-tunes
    recipe: Recipe = field(default_factory=lambda: Recipe(steps=3))  # the inner run (the paper's AdamW, lr 5e-6)
    metric: MetricConfig = field(default_factory=MetricConfig)  # Φ, the target metric
    data: str | None = None  # JSONL ("text", optional "prompt") or text file, an example a line; none: built-in texts
    num_examples: int = 12  # examples in the inner run (the first ones of the data)
    max_length: int = 64  # tokens per example, at most
    count: int = 3  # examples checked by finite differences
    tolerance: float = 1e-4  # largest accepted relative error
    device: str = "auto"  # auto | cpu | cuda | cuda:N


_FIXES = (
    "check fewer or shorter examples (num_examples, max_length), cut the inner batch into microbatches "
    "(recipe.microbatch_size), or run on a device with more memory (device)"
)


def run_check(cfg: CheckConfig) -> bool:
    """Print the check's table; True when every checked example is within tolerance."""
    from dpg.data import builtin_texts, encode_texts, read_texts
    from dpg.metrics import build_metric
    from dpg.models import load
    from dpg.runtime import resolve_device
    from dpg.report import phi_report
    from dpg.safety import check_at_least, check_positive

    check_at_least({"num_examples": (cfg.num_examples, 1), "max_length": (cfg.max_length, 2), "count": (cfg.count, 1)})
    check_positive({"tolerance": cfg.tolerance})
    device = resolve_device(cfg.device)
    texts, prompts = read_texts(cfg.data) if cfg.data else (builtin_texts(), None)
    texts, prompts = texts[: cfg.num_examples], (prompts[: cfg.num_examples] if prompts else None)
    model, tokenizer = load(cfg.target, dtype=torch.float64, device=device)
    examples = encode_texts(tokenizer, texts, cfg.max_length, prompts)
    metric = build_metric(cfg.metric, model, tokenizer)
    r = cfg.recipe
    estimate = memory.estimate_check(
        memory.model_shape(model), examples=len(texts), length=examples.input_ids.shape[1], steps=r.steps,
        optimizer=r.optimizer, microbatch=r.microbatch_size, device=device,
    )  # fmt: skip
    memory.ensure_fits(estimate, "dpg check", _FIXES)
    print(
        f"checking {cfg.target.model}, {r.optimizer} lr={r.lr:g} M={r.steps}, metric {cfg.metric.name}, "
        f"{len(texts)} examples, in fp64 on {device} (estimated peak memory {estimate.total / memory.GB:.1f} GB)"
    )
    report = check_metagrads(model, examples, r, metric, count=cfg.count, tolerance=cfg.tolerance, device=device)
    print(phi_report(report.phi_before, report.phi_after, r.lr))
    print(f"{'example':>8} {'engine dΦ/dw':>16} {'finite diff.':>16} {'h':>7} {'rel. error':>11} {'resolution':>11}")
    for r in report.rows:
        print(f"{r.index:>8} {r.engine:>16.9e} {r.finite_difference:>16.9e} {r.step:>7.0e} {r.error:>11.2e} "
              f"{r.resolution:>11.2e}")  # fmt: skip
    print(verdict(report))
    if report.fp32_error is not None:
        poor = "  (poorly resolved in fp32: use dtype=float64 or a larger eps/eps_root)"
        note = "" if report.fp32_error < 1e-2 else poor
        error = f"relative error {report.fp32_error:.2e}"
        print(f"fp32 engine vs fp64 engine over all {len(texts)} examples: {error}{note}")
    if report.tf32 is not None:
        t = report.tf32
        print(f"TF32 engine (reward.tf32) vs fp32 engine: relative error {t['relative_error']:.2e}, "
              f"Spearman {t['spearman']:.5f}, signs agree {100 * t['sign_agreement']:.1f} %")  # fmt: skip
    elif device.type != "cuda":
        print("TF32 (reward.tf32): CUDA only; on this device the engine runs full fp32")
    return report.passed
