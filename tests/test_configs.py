"""Every shipped config loads, names its command in its header, and the demo file is the
built-in default."""

import json
import math
from pathlib import Path

import pytest
import torch
from reference import unrolled_train

from dpg.config import TrainConfig, load_config
from dpg.data import builtin_texts, encode_texts
from dpg.demo import demo_config
from dpg.evaluate import transfer_check
from dpg.metrics import build_metric
from dpg.models import ModelConfig, load
from dpg.train import run_train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_header_names_the_command(path):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# dpg ") and path.name in header, header
    load_config(TrainConfig, path)


def test_demo_yaml_is_the_builtin_default():
    assert load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml") == demo_config()


TINY = [
    "generator.model=tiny-llama", "target.model=tiny-gpt2", "target.tokenizer=null", "prompts.chat=false",
    "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.max_completion_length=6",
    "grpo.save_every=0", "grpo.png_every=1", "reward.max_length=16", "metric.max_length=16",
    "evaluate.samples=4", "device=cpu", "dtype=float64",
]  # fmt: skip
PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
UUID = "3f2b8c1e-7d4a-4e9b-a6c5-0d1f2e3a4b5c"


def short_rows() -> list[list[str]]:
    """lohelp_en_de.tsv's short rows (English, German): tiny models see 256 bytes."""
    path = SHARED / "data" / "lohelp_en_de.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data beside the checkout)")
    return [r.split("\t") for r in path.read_text().splitlines() if len(r) < 200][:300]


def by_hand(cfg, samples: list[str]) -> tuple[float, dict[str, float]]:
    """Φ and its proxy after the config's inner run on `samples`, done by tests/reference.py
    (its own loss and optimizer arithmetic, no engine code)."""
    target, tok = load(cfg.target, dtype=torch.float64)
    examples = encode_texts(tok, samples, cfg.reward.max_length)
    trained = unrolled_train(target, examples, cfg.recipe, torch.ones(len(samples), dtype=torch.float64))
    params = {k: p.detach() for k, p in target.named_parameters()} | {k: p.detach() for k, p in trained.items()}
    metric = build_metric(cfg.metric, target, tok)
    with torch.no_grad():
        return metric(params).item(), metric.proxy(params)


def transfer_of(cfg, texts: list[str], monkeypatch):
    """The transfer check with a generator that writes exactly `texts`."""
    import dpg.evaluate

    monkeypatch.setattr(dpg.evaluate, "sample_completions", lambda *a, **k: list(texts))
    return dpg.evaluate.transfer_check(cfg, "fixed", ModelConfig(model="tiny-llama"), seed=0)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_runs_end_to_end_and_measures_what_it_is_for(path, tmp_path, monkeypatch):
    """Each paper config on tiny models for one step (its prompts, metric, reward), then its
    transfer check: the figures equal a hand-made inner run on the sampled texts, and the
    figure the config is for moves when the generator writes the target text."""
    extra = []
    if path.stem == "german":
        (tmp_path / "short.tsv").write_text("".join("\t".join(r) + "\n" for r in short_rows()))
        extra = [f"prompts.file={tmp_path / 'short.tsv'}", f"metric.texts_file={tmp_path / 'short.tsv'}"]
    cfg = load_config(TrainConfig, path, [*TINY, *extra, f"output_dir={tmp_path}"])
    run_train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["phi"])
    res = transfer_check(cfg, "trained", ModelConfig(model=str(tmp_path / "generator")), seed=0)
    phi, proxy = by_hand(cfg, res.samples)
    assert res.metric == pytest.approx(phi, rel=1e-9) and res.proxy == pytest.approx(proxy, rel=1e-9)
    if path.stem == "german":  # Φ = −loss on held-out German: German data lowers it, and is seen as German
        english, german = [r[0] for r in short_rows()[:8]], [r[1] for r in short_rows()[:8]]
        en, de = transfer_of(cfg, english, monkeypatch), transfer_of(cfg, german, monkeypatch)
        assert de.text["share_de"] >= 0.75 and en.text["share_de"] <= 0.25
        assert de.metric > en.metric
    if path.stem == "uuid":  # Φ = −loss on the UUID: writing it lowers the loss and is counted
        uuid, other = transfer_of(cfg, [UUID] * 4, monkeypatch), transfer_of(cfg, builtin_texts()[:4], monkeypatch)
        assert (uuid.text["exact_rate"], uuid.text["within_5_rate"]) == (1.0, 1.0)
        assert other.text["exact_rate"] == 0.0 and uuid.metric > other.metric
