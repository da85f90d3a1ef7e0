"""metagrad and naive rewards: shapes, hand-checked values, inverse groups, odd text, errors."""

import math

import pytest
import torch

from dpg import DpgError, Recipe, example_metagrads, fine_tune
from dpg.data import decode_bytes, encode_texts
from dpg.metrics import pattern_metric
from dpg.models import load_model
from dpg.rewards import InnerRunReward, inverse_groups, length_correlation, select, standardize


@pytest.fixture(scope="module")
def target():
    model, tok = load_model("tiny-gpt2", dtype=torch.float64)
    return model, tok, pattern_metric(model, "67")


COMPLETIONS = ["hello!", "a#b", "", "x$y%z", "   ", decode_bytes(b"\xff\xfeok"), "tail'" * 60, "<|endoftext|>"]


def test_inverse_groups_by_hand():
    groups = [g.tolist() for g in inverse_groups(8, 4)]
    assert groups == [[0, 4], [1, 5], [2, 6], [3, 7]]  # one completion of each prompt per group
    assert [g.tolist() for g in inverse_groups(3, 1)] == [[0, 1, 2]]
    with pytest.raises(DpgError, match="not whole groups"):
        inverse_groups(7, 4)


def test_standardize_by_hand():
    out = standardize(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert out.tolist() == [-1.0, 1.0]  # mean 2, population std 1
    assert standardize(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]
    # A positive affine map: group-normalised advantages are unchanged.
    raw = torch.tensor([1e-9, 3e-9, -2e-9, 7e-9], dtype=torch.float64)
    adv = lambda r: (r - r.mean()) / r.std()  # noqa: E731
    assert torch.allclose(adv(standardize(raw)), adv(raw))


def test_length_correlation_is_pearsons_within_groups():
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(20, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 128, (20,), generator=gen)
    centred = [x.reshape(5, 4) - x.reshape(5, 4).mean(1, keepdims=True) for x in (raw.numpy(), lengths.numpy() * 1.0)]
    expected = np.corrcoef(centred[0].ravel(), centred[1].ravel())[0, 1]
    assert length_correlation(raw, lengths, 4) == pytest.approx(expected, abs=1e-12)
    offsets = torch.arange(5.0, dtype=torch.float64).repeat_interleave(4) * 100  # prompts differ; groups do not
    assert length_correlation(2 * lengths + offsets, lengths, 4) == pytest.approx(1.0)
    assert length_correlation(offsets - lengths, lengths, 4) == pytest.approx(-1.0)
    assert length_correlation(raw, torch.full((20,), 7), 4) == 0.0  # no length differs within a group
    assert length_correlation(raw[:18], lengths[:18], 4) is None and length_correlation(raw, lengths, 1) is None


def test_metagrad_reward_is_the_standardised_engine_scores(target):
    model, tok, metric = target
    recipe = Recipe(lr=1e-3)
    reward = InnerRunReward("metagrad", model, tok, metric, recipe, max_length=32, dtype=torch.float64)
    out = reward(prompts=["p"] * 8, completions=COMPLETIONS)
    assert len(out) == 8 and all(math.isfinite(r) for r in out)
    direct = example_metagrads(model, encode_texts(tok, COMPLETIONS, 32), recipe, metric, dtype=torch.float64)
    assert torch.allclose(torch.tensor(out, dtype=torch.float64), standardize(direct.scores), rtol=1e-9, atol=1e-12)
    row = reward.history[-1]
    assert row["phi"] == pytest.approx(direct.metric) and row["inner_runs"] == 1
    assert row["raw_max"] == pytest.approx(direct.scores.max().item())
    assert "proxy/pixel_accuracy" in row and reward.decoded.shape == (6, 7)
    lengths = encode_texts(tok, COMPLETIONS, 32).attention_mask.sum(1)
    assert row["length_corr"] == pytest.approx(length_correlation(direct.scores, lengths, 4))  # TRL's default G
    assert reward.__name__ == "metagrad"


def test_inverse_group_batching_runs_one_inner_run_per_group(target, monkeypatch):
    import dpg.rewards as rewards

    model, tok, metric = target
    seen = []
    real = rewards.example_metagrads
    monkeypatch.setattr(
        rewards, "example_metagrads", lambda m, ex, *a, **k: seen.append(ex.input_ids.shape[0]) or real(m, ex, *a, **k)
    )
    reward = InnerRunReward("metagrad", model, tok, metric, Recipe(lr=1e-3), max_length=32, cross_group_batching=False,
                            num_generations=4, dtype=torch.float64)  # fmt: skip
    out = reward(prompts=["p"] * 8, completions=COMPLETIONS)
    assert seen == [2, 2, 2, 2]  # 2 prompts × 4 completions: 4 runs of one completion per prompt
    examples = encode_texts(tok, COMPLETIONS, 32)
    raw = torch.empty(8, dtype=torch.float64)
    for idx in inverse_groups(8, 4):
        raw[idx] = real(model, select(examples, idx), Recipe(lr=1e-3), metric, dtype=torch.float64).scores
    assert torch.allclose(torch.tensor(out, dtype=torch.float64), standardize(raw), rtol=1e-9, atol=1e-12)


def test_naive_reward_gives_each_inner_run_its_phi(target):
    model, tok, metric = target
    recipe = Recipe(lr=1e-3)
    reward = InnerRunReward("naive", model, tok, metric, recipe, max_length=32, cross_group_batching=False,
                            num_generations=4, dtype=torch.float64)  # fmt: skip
    out = torch.tensor(reward(prompts=["p"] * 8, completions=COMPLETIONS), dtype=torch.float64)
    examples = encode_texts(tok, COMPLETIONS, 32)
    phis = torch.empty(8, dtype=torch.float64)
    everything = {k: p.detach() for k, p in model.named_parameters()}
    for idx in inverse_groups(8, 4):
        params = fine_tune(model, select(examples, idx), recipe, dtype=torch.float64).params
        phis[idx] = metric(everything | params).item()
    assert torch.allclose(out, standardize(phis), rtol=1e-9, atol=1e-12)
    assert out[0] == out[4] and out[1] == out[5]  # completions of one inner run share its reward
    with pytest.raises(DpgError, match="cross_group_batching: false"):
        InnerRunReward("naive", model, tok, metric, recipe)


def test_failures_raise_naming_the_step(target):
    model, tok, _ = target

    class State:
        global_step = 7

    def nan_metric(params):
        return params["lm_head.weight"].sum() * float("nan")

    reward = InnerRunReward("metagrad", model, tok, nan_metric, Recipe(), max_length=32, dtype=torch.float64)
    with pytest.raises(DpgError, match=r"step 8: the metagrad reward failed: .*not finite"):  # 7 done, 8 under way
        reward(prompts=["p"], completions=["text"], trainer_state=State())
    State.global_step = 6  # with 3 optimizer steps per generated batch, step 3 (of dpg's log) is under way
    reward = InnerRunReward("metagrad", model, tok, nan_metric, Recipe(), max_length=32, steps_per_batch=3)
    with pytest.raises(DpgError, match=r"step 3: the metagrad reward failed"):
        reward(prompts=["p"], completions=["text"], trainer_state=State())
    with pytest.raises(DpgError, match="'metagrad' or 'naive'"):
        InnerRunReward("magic", model, tok, nan_metric, Recipe())


def test_chat_completions_and_log_metric(target):
    model, tok, metric = target
    logged = {}
    reward = InnerRunReward("metagrad", model, tok, metric, Recipe(lr=1e-3), max_length=32, dtype=torch.float64)
    chat = [[{"role": "assistant", "content": t}] for t in ["ab!", "cd#"]]
    out = reward(prompts=["p", "p"], completions=chat, log_metric=lambda k, v: logged.__setitem__(k, v))
    plain = InnerRunReward("metagrad", model, tok, metric, Recipe(lr=1e-3), max_length=32, dtype=torch.float64)
    assert out == plain(prompts=["p", "p"], completions=["ab!", "cd#"])
    assert {"dpg/phi", "dpg/proxy/pixel_accuracy", "dpg/raw_std", "dpg/seconds"} <= set(logged)


def test_non_finite_metagradients_and_inner_losses_stop_the_step(target, monkeypatch):
    import dpg.rewards as rewards

    model, tok, metric = target
    real = rewards.example_metagrads

    def one_nan_score(*a, **k):
        res = real(*a, **k)
        res.scores[1] = float("nan")
        return res

    monkeypatch.setattr(rewards, "example_metagrads", one_nan_score)
    reward = InnerRunReward("metagrad", model, tok, metric, Recipe(lr=1e-3), max_length=32, dtype=torch.float64)
    with pytest.raises(DpgError, match=r"step 1: the metagrad reward is not finite for completions \[1\]"):
        reward(prompts=["p"] * 3, completions=["a", "b", "c"])
    assert reward.history == []  # nothing logged as if the step had a reward

    # The inner run diverges: in fp32, SGD at lr 1e10 makes the second inner step's loss NaN.
    naive = InnerRunReward("naive", model, tok, metric, Recipe(optimizer="sgd", lr=1e10, steps=2), max_length=32,
                           cross_group_batching=False, num_generations=1, dtype=torch.float32)  # fmt: skip
    message = r"step 1: the naive reward failed: the inner training loss is not finite at inner step 2"
    with pytest.raises(DpgError, match=message):
        naive(prompts=["p"] * 2, completions=["ab", "cd"])


def test_hvp_microbatch_size_reaches_the_engine(target, monkeypatch):
    import dpg.rewards

    model, tok, metric = target
    seen = {}
    real = dpg.rewards.example_metagrads

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(dpg.rewards, "example_metagrads", spy)
    recipe = Recipe(lr=1e-3, steps=2, microbatch_size=4)
    finer = InnerRunReward("metagrad", model, tok, metric, recipe, max_length=32, dtype=torch.float64,
                           hvp_microbatch_size=1)(prompts=["p"] * 8, completions=COMPLETIONS)  # fmt: skip
    assert seen["hvp_microbatch_size"] == 1
    plain = InnerRunReward("metagrad", model, tok, metric, recipe, max_length=32, dtype=torch.float64)(
        prompts=["p"] * 8, completions=COMPLETIONS
    )
    assert torch.allclose(torch.tensor(finer), torch.tensor(plain), rtol=1e-9, atol=1e-12)
