"""Samples files (dpg.sampling): written and read back in both formats, loaded by 🤗 datasets,
checked on the way in; sampling seeded."""

import json

import pytest
import torch

from dpg import DpgError
from dpg.models import load_model
from dpg.sampling import FIELDS, cycle_prompts, read_samples, sample_completions, write_samples

PROMPTS = ["Rephrase: a", "Rephrase: b 😀", "Rephrase: c"]
COMPLETIONS = ["one", "zwei\nzeilen", "", "tab\there", 'quote "x"']


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_samples_file_round_trip_and_datasets_loads_it(tmp_path, suffix, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    prompts = cycle_prompts(PROMPTS, len(COMPLETIONS))
    assert prompts == [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    path = write_samples(tmp_path / f"s{suffix}", prompts, COMPLETIONS, "runs/x/generator", 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"s{suffix}"]  # no temporary file left
    expected = [
        {"prompt": p, "completion": c, "generator": "runs/x/generator", "seed": 7} for p, c in zip(prompts, COMPLETIONS)
    ]
    assert read_samples(path) == expected
    kind = "json" if suffix == ".jsonl" else "parquet"
    ds = load_dataset(kind, data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == list(FIELDS) and ds.to_list() == expected
    if suffix == ".jsonl":  # one JSON object a line, UTF-8 as is
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 5 and json.loads(lines[1])["prompt"] == "Rephrase: b 😀" and "😀" in lines[1]


def test_samples_file_errors(tmp_path):
    with pytest.raises(DpgError, match=r"must end in .jsonl or .parquet"):
        write_samples(tmp_path / "s.csv", ["p"], ["c"], "g", 0)
    with pytest.raises(DpgError, match="1 prompts for 2 completions"):
        write_samples(tmp_path / "s.jsonl", ["p"], ["c", "d"], "g", 0)
    with pytest.raises(DpgError, match=r"samples file not found: .*none.jsonl \(evaluate.samples_file\)"):
        read_samples(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "completion": "c", "generator": "g"}\n')
    with pytest.raises(DpgError, match=r"row 1 has no seed \(a samples file has prompt, completion, generator, seed\)"):
        read_samples(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DpgError, match=r"broken.jsonl:1: not valid JSON"):
        read_samples(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DpgError, match="holds no rows"):
        read_samples(tmp_path / "empty.jsonl")
    with pytest.raises(DpgError, match="no prompts to sample on"):
        cycle_prompts([], 3)


def test_sampling_is_seeded_and_cycles_the_prompts():
    model, tok = load_model("tiny-gpt2", seed=1)
    kw = dict(chat=False, temperature=1.0, max_new_tokens=6, suppress=None, device=torch.device("cpu"), batch_size=2)
    a = sample_completions(model, tok, ["hi", "yo"], 5, seed=3, **kw)
    assert a == sample_completions(model, tok, ["hi", "yo"], 5, seed=3, **kw)
    assert a != sample_completions(model, tok, ["hi", "yo"], 5, seed=4, **kw) and len(a) == 5
    # Greedy decoding of one prompt alone gives the same text as in a padded batch: left padding
    # and the attention mask keep the prompts apart, and the i-th completion answers prompt i % 2.
    greedy = dict(kw, temperature=1e-4)
    both = sample_completions(model, tok, ["hi", "a longer prompt"], 2, seed=0, **greedy)
    assert both == [
        sample_completions(model, tok, ["hi"], 1, seed=0, **greedy)[0],
        sample_completions(model, tok, ["a longer prompt"], 1, seed=0, **greedy)[0],
    ]
