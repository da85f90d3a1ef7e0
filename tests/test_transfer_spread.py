"""benchmarks/transfer_spread.py: a transfer check on resampled samples, from one block gradient
per sample, equals the check itself run on those samples."""

import json
import sys
from pathlib import Path

import pytest
import torch

from reference import example_losses_ref

from dpg.config import TrainConfig, load_config
from dpg.data import encode_texts
from dpg.metagrad.engine import fine_tune
from dpg.metrics import build_metric
from dpg.models import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import transfer_spread as ts  # noqa: E402

# The first holds tokens of the block's vocab rows ($ % & ' ( ) *): on a tied head their lookups
# add the input side's share to the block's gradient.
TEXTS = ["numbers (a) & 5%, $3*2", "the cat sat", "a dog ran far away", "six seven", "sixty-seven and more",
         "hello there friend", "numbers: 6 7 67", "one", "two words", "the pattern is in the head", "x y z",
         "again and again", "67"]  # fmt: skip


def config(model: str, optimizer: str, tied: bool = False) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"target.model={model}", f"target.tie_word_embeddings={tied}", "dtype=float64",
        f"recipe.optimizer={optimizer}", "recipe.lr=0.01",
        "recipe.b2=0.95", "recipe.eps_root=1e-9", "recipe.weight_decay=1e-4", "recipe.microbatch_size=5",
        "metric.pattern=67", "metric.vocab_offset=3", "metric.hidden_offset=2",
    ])  # fmt: skip


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("tied", [False, True])  # a tied head (SmolLM2's) is also the input embedding
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_resample_checks_as_fine_tune_on_it_with_those_multiplicities(model, tied, optimizer):
    cfg = config(model, optimizer, tied)
    target, tok = load(cfg.target)
    assert target.config.tie_word_embeddings == tied
    metric = build_metric(cfg.metric, target, tok)
    grads = ts.block_grads(cfg, target, tok, metric, TEXTS)
    counts = ts.resample(torch.arange(len(TEXTS)) % 4, torch.Generator().manual_seed(5))
    assert counts.sum() == len(TEXTS) and (counts == 0).any() and (counts > 1).any()
    got = ts.checked(cfg, metric, grads, counts)
    # The reference: the engine's whole inner step, on every parameter, with loss weights c_i
    # (the batch loss is (1/N)·Σ c_i·l_i, and Σ c_i = N), read by the metric on the full head.
    examples = encode_texts(tok, TEXTS, cfg.reward.max_length)
    trained = fine_tune(target, examples, cfg.recipe, weights=counts.double(), dtype=torch.float64).params
    full = {k: p.detach().double() for k, p in target.named_parameters()} | trained
    assert got["phi"] == pytest.approx(metric(full).item(), rel=1e-12, abs=1e-15)
    assert got["pixel_accuracy"] == metric.proxy(full)["pixel_accuracy"]
    assert got["phi"] != pytest.approx(ts.checked(cfg, metric, grads, torch.ones(len(TEXTS)))["phi"], rel=1e-9)


def test_the_block_gradients_are_each_samples_own_loss_gradient():
    """Against tests/reference.py's loss (no engine code), on the tied head of tiny-gpt2."""
    cfg = config("tiny-gpt2", "sgd", tied=True)
    target, tok = load(cfg.target, dtype=torch.float64)
    assert target.get_output_embeddings().weight is target.get_input_embeddings().weight
    metric = build_metric(cfg.metric, target, tok)
    grads = ts.block_grads(cfg, target, tok, metric, TEXTS[:3])
    ids, attn, labels = encode_texts(tok, TEXTS[:3], cfg.reward.max_length)
    params = dict(target.named_parameters())
    h, w = metric.pattern.shape
    for i in range(3):
        loss = example_losses_ref(target, params, ids[i : i + 1], attn[i : i + 1], labels[i : i + 1])[0]
        g = torch.autograd.grad(loss, params[metric.head])[0][3 : 3 + w, 2 : 2 + h]
        torch.testing.assert_close(grads[i], g, rtol=1e-10, atol=1e-14)


def test_resample_draws_within_each_prompt():
    strata = torch.arange(64) % 8
    counts = ts.resample(strata, torch.Generator().manual_seed(0))
    for s in range(8):
        assert counts[strata == s].sum() == 8


def test_sets_are_read_once_and_a_pair_is_signed(tmp_path):
    base = {"generator": "base", "seed": 0, "metric": -1.0, "proxy": {"pixel_accuracy": 0.5}, "samples": ["a", "b"]}
    other = base | {"generator": "trained", "metric": -0.5, "samples": ["c", "d"]}
    (tmp_path / "x.evaluate.json").write_text(json.dumps([base, other]))
    (tmp_path / "x-naive.evaluate.json").write_text(json.dumps([base, other | {"samples": ["e", "f"]}]))
    sets = ts.read_sets(ts.read_rows([str(tmp_path / "x.evaluate.json"), str(tmp_path / "x-naive.evaluate.json")]))
    assert list(sets) == ["x:base@0", "x:trained@0", "x-naive:trained@0"]
    spread = ts.spread(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert spread["mean"] == 2.5 and spread["ci95"][0] == pytest.approx(1.075)


def test_subsample_takes_as_many_of_each_prompt_once():
    strata = torch.arange(64) % 8
    counts = ts.subsample(strata, 3, torch.Generator().manual_seed(0))
    assert set(counts.tolist()) == {0.0, 1.0}
    for s in range(8):
        assert counts[strata == s].sum() == 3


def test_the_size_curve_draws_checks_of_that_many_samples():
    """At the full size a smaller check is the check itself, with no spread; at one sample a
    prompt, every draw is one of the checks enumerated on such subsets by hand."""
    import itertools

    cfg = config("tiny-gpt2", "adamw")
    target, tok = load(cfg.target)
    metric = build_metric(cfg.metric, target, tok)
    grads = ts.block_grads(cfg, target, tok, metric, TEXTS[:8])  # 4 prompts, 2 samples each (i mod 4)
    curve = ts.size_curve(cfg, metric, {"g": grads}, 4, [4, 8], replicates=40, seed=0)["g"]
    whole = ts.checked(cfg, metric, grads, torch.ones(8))
    assert curve[8]["phi"]["mean"] == pytest.approx(whole["phi"], rel=1e-12) and curve[8]["phi"]["std"] == 0
    by_hand = []
    for picks in itertools.product(*[(i, i + 4) for i in range(4)]):
        counts = torch.zeros(8)
        counts[list(picks)] = 1
        by_hand.append(ts.checked(cfg, metric, grads, counts)["phi"])
    lo, hi = curve[4]["phi"]["ci95"]
    assert min(by_hand) - 1e-12 <= lo < hi <= max(by_hand) + 1e-12 and curve[4]["phi"]["std"] > 0
    with pytest.raises(SystemExit, match="multiples of the 4 held-out prompts"):
        ts.size_curve(cfg, metric, {"g": grads}, 4, [6], replicates=1, seed=0)
