"""dpg attribute: score each example of a file by its exact effect on the target metric.

Reads examples, fine-tunes the target on them (the inner run), and writes dΦ/dw_i per
example: positive helps Φ, negative hurts it. Useful on its own for data selection and
mixture weighting; inside DPG the same scores are the generator's rewards.

Real datasets: JSONL or Parquet rows (`text_field`, optional `prompt_field`); the scores join
back to the rows by row index (and `id_field` where the rows have one), and `select.keep_top`
or `select.drop_bottom` writes the chosen rows as a file of the data's own format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpg import memory
from dpg.data import builtin_texts, encode_texts, read_texts
from dpg.errors import DpgError
from dpg.metagrad.engine import MetagradResult, Recipe, example_metagrads
from dpg.metrics import MetricConfig, build_metric
from dpg.models import ModelConfig, load
from dpg.rows import Rows, is_row_file, read_rows, write_rows
from dpg.runtime import resolve_device, resolve_dtype
from dpg.report import phi_report
from dpg.safety import check_at_least

_FIXES = (
    "cut the inner batch into microbatches (recipe.microbatch_size), shorten the examples (max_length), "
    "use fewer inner steps (recipe.steps) or offload=disk, or run on a device with more memory (device)"
)


@dataclass
class SelectConfig:
    """Data selection by score: the chosen rows, written in the data's own format."""

    keep_top: float | None = None  # keep the rows with the highest scores: a count, or a share of the rows if < 1
    drop_bottom: float | None = None  # drop the rows with the lowest scores: a count, or a share if < 1
    output: str | None = None  # the subset's file; none: selected.jsonl / selected.parquet beside `output`


@dataclass
class AttributeConfig:
    """dpg attribute: per-example metagradient scores of a data file."""

    target: ModelConfig = field(default_factory=ModelConfig)  # the model the inner run fine-tunes
    recipe: Recipe = field(default_factory=Recipe)  # the inner run (the paper's AdamW, lr 5e-6)
    metric: MetricConfig = field(default_factory=MetricConfig)  # Φ, the target metric
    data: str | None = None  # JSONL / Parquet rows, or a text file (an example a line or block); none: built-in texts
    text_field: str = "text"  # the JSONL key / Parquet column (or TSV column) holding each example's text
    prompt_field: str = "prompt"  # key / column of a prompt before the text (not trained on); used where present
    id_field: str = "id"  # key / column copied into the scores to join them back; used where present
    max_length: int = 128  # tokens per example (prompt included), longer text is cut
    output: str = "scores.jsonl"  # where the per-example scores go (JSONL, input order)
    top: int = 5  # how many most helpful and most harmful examples to print
    dtype: str = "float32"  # engine precision: float32 | float64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    offload: str = "cpu"  # where each step's saved state waits for the reverse sweep: cpu | disk | device
    select: SelectConfig = field(default_factory=SelectConfig)  # write a subset of the rows chosen by score


def run_attribute(cfg: AttributeConfig) -> MetagradResult:
    check_at_least({"max_length": (cfg.max_length, 2), "top": (cfg.top, 0)})
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    rows = _read(cfg)
    _select_count(cfg.select, len(rows.texts))  # a bad selection fails before any compute
    model, tokenizer = load(cfg.target, device=device)
    examples = encode_texts(tokenizer, rows.texts, cfg.max_length, rows.prompts)
    metric = build_metric(cfg.metric, model, tokenizer)
    r = cfg.recipe
    estimate = memory.estimate_attribute(
        memory.model_shape(model), examples=len(rows.texts), length=examples.input_ids.shape[1], steps=r.steps,
        optimizer=r.optimizer, microbatch=r.microbatch_size, dtype=dtype, device=device, offload=cfg.offload,
    )  # fmt: skip
    memory.ensure_fits(estimate, "dpg attribute", _FIXES)
    print(
        f"target {cfg.target.model} on {device}: {len(rows.texts)} examples, {r.steps} inner step(s), lr {r.lr:g}, "
        f"metric {cfg.metric.name} (estimated peak memory {estimate.total / memory.GB:.1f} GB)"
    )
    print(_memory_note(model, cfg, dtype))
    result = example_metagrads(
        model, examples, cfg.recipe, metric, dtype=dtype, device=device, offload=cfg.offload, progress=True
    )
    out = _write_scores(cfg.output, rows, result.scores.tolist())
    proxy = "".join(f", {k} {v:.4g}" for k, v in result.proxy.items())
    print(phi_report(result.metric_before, result.metric, r.lr, suffix=proxy))
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    _print_extremes(rows.texts, result.scores, cfg.top)
    print(f"\nscores for all {len(rows.texts)} examples: {out}")
    if cfg.select.keep_top is not None or cfg.select.drop_bottom is not None:
        keep = select_rows(result.scores, cfg.select)
        path = write_rows(rows, keep, _select_path(cfg, rows))
        print(f"selected {len(keep)} of {len(rows.texts)} rows: {path}")
    return result


def _read(cfg: AttributeConfig) -> Rows:
    if cfg.data is None:
        if cfg.select.keep_top is not None or cfg.select.drop_bottom is not None:
            raise DpgError("select needs a data file: set data to a .jsonl or .parquet file")
        return Rows("builtin", builtin_texts(), None, None, None)
    if is_row_file(cfg.data):
        return read_rows(cfg.data, cfg.text_field, cfg.prompt_field, cfg.id_field)
    if cfg.select.keep_top is not None or cfg.select.drop_bottom is not None:
        raise DpgError(f"select writes rows in the data's own format: data must be .jsonl or .parquet, got {cfg.data}")
    texts, _ = read_texts(cfg.data, cfg.text_field)
    return Rows("text", texts, None, None, None)


def _write_scores(output: str, rows: Rows, scores: list[float]) -> Path:
    """One JSON line per row, in row order: index (the row's position in the data), the id
    field where the rows have one, the score, the text and prompt."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, (text, score) in enumerate(zip(rows.texts, scores)):
            row = {"index": i}
            if rows.ids is not None:
                row["id"] = rows.ids[i]
            row |= {"score": score, "text": text}
            if rows.prompts:
                row["prompt"] = rows.prompts[i]
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return out


def _select_count(select: SelectConfig, n: int) -> int | None:
    """How many rows select.keep_top keeps or select.drop_bottom drops (None: no selection)."""
    chosen = [(k, v) for k, v in (("keep_top", select.keep_top), ("drop_bottom", select.drop_bottom)) if v is not None]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise DpgError("set one of select.keep_top and select.drop_bottom, not both")
    key, value = chosen[0]
    count = round(value * n) if 0 < value < 1 else int(value)
    if value < 0 or (value >= 1 and value != int(value)) or count > n:
        raise DpgError(f"select.{key} must be a count of rows (at most {n}) or a share in (0, 1), got {value}")
    return count


def select_rows(scores: torch.Tensor, select: SelectConfig) -> list[int]:
    """Row indices, in file order, that select.keep_top / select.drop_bottom chooses. Ties
    are broken by row order (the earlier row ranks higher)."""
    n = len(scores)
    count = _select_count(select, n)
    if count is None:
        return list(range(n))
    # stable sorts: for equal scores the earlier row comes first in both directions
    if select.keep_top is not None:
        chosen = torch.argsort(-scores, stable=True)[:count]
    else:
        chosen = torch.argsort(scores, stable=True)[count:]
    return sorted(chosen.tolist())


def _select_path(cfg: AttributeConfig, rows: Rows) -> Path:
    if cfg.select.output is not None:
        return Path(cfg.select.output)
    return Path(cfg.output).parent / ("selected.parquet" if rows.format == "parquet" else "selected.jsonl")


def _memory_note(model, cfg: AttributeConfig, dtype: torch.dtype) -> str:
    """What the state saved for the reverse sweep costs per inner step, and what bounds it."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    copies = 4 if cfg.recipe.optimizer == "adamw" else 1  # θ_{t−1}, g_t, m_t, v_t (SGD: θ_{t−1})
    per_step = params * copies * torch.finfo(dtype).bits / 8 / 2**30
    budget = cfg.recipe.state_budget_gb
    default = {"cpu": "half the free memory", "disk": "80 % of the free disk"}.get(cfg.offload, "device memory")
    bound = f"{budget} GiB (recipe.state_budget_gb)" if budget is not None else default  # as engine._schedule
    return (
        f"saved state for the reverse sweep: {per_step:.3g} GiB per inner step ({cfg.offload}); "
        f"held within {bound}, steps that do not fit are recomputed"
    )


def _print_extremes(texts: list[str], scores: torch.Tensor, top: int) -> None:
    order = torch.argsort(scores, descending=True).tolist()
    k = min(top, len(order))
    print("\nmost helpful (largest dΦ/dw):")
    for i in order[:k]:
        print(f"  {scores[i]:+.4e}  #{i}  {_clip(texts[i])}")
    print("most harmful (smallest dΦ/dw):")
    for i in reversed(order[-k:]):
        print(f"  {scores[i]:+.4e}  #{i}  {_clip(texts[i])}")


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
