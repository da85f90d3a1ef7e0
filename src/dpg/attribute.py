"""dpg attribute: score each example of a file by its exact effect on the target metric.

Reads examples, fine-tunes the target on them (the inner run), and writes dΦ/dw_i per
example: positive helps Φ, negative hurts it. Useful on its own for data selection and
mixture weighting; inside DPG the same scores are the generator's rewards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpg import memory
from dpg.data import builtin_texts, encode_texts, read_texts
from dpg.metagrad.engine import MetagradResult, Recipe, example_metagrads
from dpg.metrics import MetricConfig, build_metric
from dpg.models import ModelConfig, load
from dpg.runtime import resolve_device, resolve_dtype
from dpg.report import phi_report
from dpg.safety import check_at_least

_FIXES = (
    "cut the inner batch into microbatches (recipe.microbatch_size), shorten the examples (max_length), "
    "use fewer inner steps (recipe.steps) or offload=disk, or run on a device with more memory (device)"
)


@dataclass
class AttributeConfig:
    """dpg attribute: per-example metagradient scores of a data file."""

    target: ModelConfig = field(default_factory=ModelConfig)  # the model the inner run fine-tunes
    recipe: Recipe = field(default_factory=Recipe)  # the inner run (the paper's AdamW, lr 5e-6)
    metric: MetricConfig = field(default_factory=MetricConfig)  # Φ, the target metric
    data: str | None = None  # JSONL ("text", optional "prompt") or text file, an example a line; none: built-in texts
    max_length: int = 128  # tokens per example (prompt included), longer text is cut
    output: str = "scores.jsonl"  # where the per-example scores go (JSONL, input order)
    top: int = 5  # how many most helpful and most harmful examples to print
    dtype: str = "float32"  # engine precision: float32 | float64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    offload: str = "cpu"  # where each step's saved state waits for the reverse sweep: cpu | disk | device


def run_attribute(cfg: AttributeConfig) -> MetagradResult:
    check_at_least({"max_length": (cfg.max_length, 2), "top": (cfg.top, 0)})
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    texts, prompts = read_texts(cfg.data) if cfg.data else (builtin_texts(), None)
    model, tokenizer = load(cfg.target, device=device)
    examples = encode_texts(tokenizer, texts, cfg.max_length, prompts)
    metric = build_metric(cfg.metric, model, tokenizer)
    r = cfg.recipe
    estimate = memory.estimate_attribute(
        memory.model_shape(model), examples=len(texts), length=examples.input_ids.shape[1], steps=r.steps,
        optimizer=r.optimizer, microbatch=r.microbatch_size, dtype=dtype, device=device, offload=cfg.offload,
    )  # fmt: skip
    memory.ensure_fits(estimate, "dpg attribute", _FIXES)
    print(
        f"target {cfg.target.model} on {device}: {len(texts)} examples, {r.steps} inner step(s), lr {r.lr:g}, "
        f"metric {cfg.metric.name} (estimated peak memory {estimate.total / memory.GB:.1f} GB)"
    )
    result = example_metagrads(
        model, examples, cfg.recipe, metric, dtype=dtype, device=device, offload=cfg.offload, progress=True
    )

    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, (text, score) in enumerate(zip(texts, result.scores.tolist())):
            row = {"index": i, "score": score, "text": text}
            if prompts:
                row["prompt"] = prompts[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    proxy = "".join(f", {k} {v:.4g}" for k, v in result.proxy.items())
    print(phi_report(result.metric_before, result.metric, r.lr, suffix=proxy))
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    order = torch.argsort(result.scores, descending=True).tolist()
    k = min(cfg.top, len(order))
    print("\nmost helpful (largest dΦ/dw):")
    for i in order[:k]:
        print(f"  {result.scores[i]:+.4e}  #{i}  {_clip(texts[i])}")
    print("most harmful (smallest dΦ/dw):")
    for i in reversed(order[-k:]):
        print(f"  {result.scores[i]:+.4e}  #{i}  {_clip(texts[i])}")
    print(f"\nscores for all {len(texts)} examples: {out}")
    return result


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
