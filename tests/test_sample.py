"""dpg sample writes the dataset a transfer check samples, and dpg evaluate repeats the
transfer check from that file alone (evaluate.samples_file)."""

import json
from dataclasses import asdict

import pytest
import yaml

from dpg import DpgError
from dpg.cli import main
from dpg.config import TrainConfig, load_config
from dpg.data import load_prompts
from dpg.evaluate import transfer_check
from dpg.sample import run_sample
from dpg.sampling import cycle_prompts, read_samples

TINY = [
    "generator.model=tiny-gpt2", "generator.seed=1", "target.model=tiny-llama", "recipe.optimizer=sgd",
    "recipe.lr=1.0", "reward.max_length=16", "grpo.max_completion_length=8", "prompts.heldout=4",
    "evaluate.samples=8", "device=cpu",
]  # fmt: skip


def test_sample_then_evaluate_from_the_file_repeats_the_transfer_check(tmp_path, capsys):
    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path / 'run'}", *TINY])
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    direct = transfer_check(cfg, "base", cfg.generator, seed=3)  # samples 8 completions with seed 3

    out = tmp_path / "base.parquet"
    settings = ["sample.generator=base", "sample.n=8", "sample.seed=3", f"sample.output={out}"]
    assert main(["sample", str(config), *settings]) == 0
    rows = read_samples(out)
    assert [r["completion"] for r in rows] == direct.samples  # the same sampler, the same seed
    assert [r["prompt"] for r in rows] == cycle_prompts(load_prompts(cfg.prompts)[1], 8)
    assert {(r["generator"], r["seed"]) for r in rows} == {("tiny-gpt2", 3)}

    assert main(["evaluate", str(config), f"evaluate.samples_file={out}"]) == 0
    [row] = json.loads((tmp_path / "base.evaluate.json").read_text())
    assert (row["generator"], row["seed"], row["samples"]) == ("tiny-gpt2", 3, direct.samples)
    assert row["metric"] == direct.metric and row["proxy"] == direct.proxy  # the same inner run, bit for bit
    assert "| tiny-gpt2 | 1 |" in capsys.readouterr().out


def test_sample_settings_are_checked(tmp_path):
    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path}", *TINY, "sample.n=3", "sample.split=train"])
    with pytest.raises(DpgError, match=r"no trained generator at .*generator: run dpg train first, or set sample.gen"):
        run_sample(cfg)
    cfg.sample.generator = "tiny-gpt2"
    path = run_sample(cfg)
    assert path == tmp_path / "samples" / "tiny-gpt2_seed0.jsonl"
    assert [r["prompt"] for r in read_samples(path)] == load_prompts(cfg.prompts)[0][:3]  # the training prompts
    for key, value, message in [
        ("split", "test", "sample.split must be heldout, train or all"), ("n", 0, "sample.n must be at least 1"),
        ("output", "x.csv", "sample.output x.csv must end in .jsonl or .parquet"),
    ]:  # fmt: skip
        bad = load_config(TrainConfig, None, [f"output_dir={tmp_path}", *TINY, f"sample.{key}={value}"])
        with pytest.raises(DpgError, match=message):
            run_sample(bad)
