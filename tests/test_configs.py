"""Every shipped config loads, names its command in its header, and the demo file is the
built-in default."""

import json
import math
from pathlib import Path

import pytest

from dpg.config import TrainConfig, load_config
from dpg.demo import demo_config

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
    "evaluate.samples=4", "device=cpu",
]  # fmt: skip
PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_runs_end_to_end_on_tiny_models(path, tmp_path):
    """Every code path a paper config takes on the GPU (its prompts, metric, reward and
    transfer-check figures), on tiny models for one step."""
    from dpg.evaluate import transfer_check
    from dpg.models import ModelConfig
    from dpg.train import run_train

    extra = []
    if path.stem == "german":  # tiny models see 256 bytes: the same TSV's short rows
        rows = [
            r
            for r in (Path(__file__).resolve().parents[2] / "shared" / "data" / "lohelp_en_de.tsv")
            .read_text()
            .splitlines()
            if len(r) < 200
        ][:300]
        (tmp_path / "short.tsv").write_text("\n".join(rows) + "\n")
        extra = [f"prompts.file={tmp_path / 'short.tsv'}", f"metric.texts_file={tmp_path / 'short.tsv'}"]
    cfg = load_config(TrainConfig, path, [*TINY, *extra, f"output_dir={tmp_path}"])
    run_train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["phi"])
    res = transfer_check(cfg, "trained", ModelConfig(model=str(tmp_path / "generator")), seed=0)
    assert math.isfinite(res.metric)
    if cfg.evaluate.language:
        assert 0.0 <= res.text[f"share_{cfg.evaluate.language}"] <= 1.0
    if cfg.evaluate.target_string:
        assert 0.0 <= res.text["exact_rate"] <= res.text["within_5_rate"] <= 1.0
