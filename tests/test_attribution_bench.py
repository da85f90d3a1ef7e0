"""benchmarks/attribution.py's logic: ranks, Spearman, subsets, LDS, top-k, the retraining loop.

Hand-worked numbers, and for the retraining loop an independent one-step SGD formula. The
bench-only libraries (kronfluence, traker, dattri) are not needed here.
"""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attribution as bench  # noqa: E402

from dpg.metagrad.engine import Recipe, make_examples  # noqa: E402
from dpg.models import load_model  # noqa: E402


def test_ranks_average_ties():
    assert bench.ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_by_hand():
    # one swapped pair of four: 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/60
    assert bench.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert bench.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / √(4.5·5) = 3/√10
    assert bench.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(bench.spearman([1, 1, 1], [1, 2, 3]))  # no spread, no correlation


def test_random_subsets():
    subsets = bench.random_subsets(10, 0.5, 4, seed=3)
    assert len(subsets) == 4
    for s in subsets:
        assert len(s) == 5 and s.tolist() == sorted(set(s.tolist())) and 0 <= s.min() and s.max() < 10
    assert len({tuple(s.tolist()) for s in subsets}) > 1  # not four copies of one subset
    again = bench.random_subsets(10, 0.5, 4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(subsets, again))
    assert [len(s) for s in bench.random_subsets(10, 0.9, 2, seed=0)] == [9, 9]


def test_lds_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    subsets = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 3])]  # sums 3, 7, 5
    assert bench.lds(scores, subsets, [0.1, 0.3, 0.2]) == pytest.approx(1.0)
    assert bench.lds(scores, subsets, [0.3, 0.1, 0.2]) == pytest.approx(-1.0)
    # predicted ranks (1, 3, 2) against actual (1, 2, 3): 1 − 6·2/(3·8)
    assert bench.lds(scores, subsets, [0.1, 0.2, 0.3]) == pytest.approx(0.5)


def test_top_k_by_hand():
    sets = bench.top_k(torch.tensor([0.3, -0.2, 0.1, -0.5, 0.4]), 2)
    assert sets["drop_harmful_2"].tolist() == [0, 2, 4]  # -0.5 (#3) and -0.2 (#1) dropped
    assert sets["keep_helpful_2"].tolist() == [0, 4]  # 0.4 and 0.3


def test_evaluate_and_random_baseline_on_an_additive_truth():
    # Φ(S) = Σ_{i∈S} v_i exactly: the true values are a perfect ranking (LDS 1), and every
    # ΔΦ can be worked out by hand.
    v = torch.tensor([0.5, -1.0, 2.0, 0.0, -3.0, 1.0, 0.25, -0.5])
    calls = []

    def retrain(keep):
        calls.append(keep.tolist())
        return {"t": float(v[keep].sum())}

    cfg = bench.BenchConfig(subsets=6, fractions=[0.5, 0.75], ks=[2], random_seeds=3)
    truth = bench.ground_truth(retrain, len(v), cfg)
    full = float(v.sum())  # −0.75
    row = bench.evaluate_scores(v, "t", truth, retrain, full, cfg.ks)
    assert row["lds_50"] == pytest.approx(1.0) and row["lds_75"] == pytest.approx(1.0)
    assert row["topk_gain"]["drop_harmful_2"] == pytest.approx(4.0)  # drop −3 and −1
    assert row["topk_gain"]["keep_helpful_2"] == pytest.approx(3.0 - full)  # 2 + 1 alone
    assert len(calls) == 2 * 6 + 2


def test_mean_std_by_hand():
    rows = [
        {"lds_50": 0.1, "topk_gain": {"a": 1.0}},
        {"lds_50": 0.3, "topk_gain": {"a": 3.0}},
        {"lds_50": 0.2, "topk_gain": {"a": 5.0}},
    ]
    out = bench.mean_std(rows)
    assert out["lds_50"] == pytest.approx(0.2) and out["lds_50_std"] == pytest.approx(0.1)  # √(0.02/2)
    assert out["topk_gain"]["a"] == pytest.approx(3.0) and out["topk_gain_std"]["a"] == pytest.approx(2.0)
    one = bench.mean_std(rows[:1])
    assert one["lds_50"] == pytest.approx(0.1) and one["lds_50_std"] == 0.0


def test_random_method_against_a_plain_python_reference():
    # Φ(S) = Σ_{i∈S} v_i with v = ±2^i: distinct subsets never tie, nor do normal scores, so
    # Spearman is 1 − 6·Σd²/(n(n²−1)) with ranks from sorted(); top-k from sorted() too.
    v = [1.0, -2.0, 4.0, -8.0, 16.0, -32.0, 64.0, -128.0]
    vt = torch.tensor(v, dtype=torch.float64)

    def retrain(keep):
        return {"t": float(vt[keep].sum())}

    cfg = bench.BenchConfig(subsets=6, fractions=[0.5], ks=[2], random_seeds=3, seed=1)
    truth = bench.ground_truth(retrain, len(v), cfg)
    assert len({tuple(x.tolist()) for x in truth[0.5][0]}) == 6  # no repeated subset (it would tie)
    full = sum(v)
    out = bench.random_baseline(retrain, "t", truth, full, len(v), cfg)

    def rank(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        return {i: r for r, i in enumerate(order)}

    lds, drop, keep = [], [], []
    for s in range(3):
        r = bench.random_scores(len(v), 1500 + s).tolist()  # seed·1000 + 500 + s
        subsets = [x.tolist() for x in truth[0.5][0]]
        pred = rank([sum(r[i] for i in sub) for sub in subsets])
        act = rank([sum(v[i] for i in sub) for sub in subsets])
        n = len(subsets)
        lds.append(1 - 6 * sum((pred[j] - act[j]) ** 2 for j in range(n)) / (n * (n * n - 1)))
        order = sorted(range(len(v)), key=lambda i: r[i])
        drop.append(-(v[order[0]] + v[order[1]]))
        keep.append(v[order[-1]] + v[order[-2]] - full)
    assert out["lds_50"] == pytest.approx(statistics.mean(lds))
    assert out["lds_50_std"] == pytest.approx(statistics.stdev(lds))
    assert out["topk_gain"]["drop_harmful_2"] == pytest.approx(statistics.mean(drop))
    assert out["topk_gain_std"]["drop_harmful_2"] == pytest.approx(statistics.stdev(drop))
    assert out["topk_gain"]["keep_helpful_2"] == pytest.approx(statistics.mean(keep))
    assert out["topk_gain_std"]["keep_helpful_2"] == pytest.approx(statistics.stdev(keep))
    assert torch.equal(bench.random_scores(8, 3), bench.random_scores(8, 3))
    assert not torch.equal(bench.random_scores(8, 3), bench.random_scores(8, 4))


def test_retrain_is_one_sgd_step_on_the_kept_examples():
    # SGD, one step, no weight decay, Φ = c·θ (linear): Φ(S) = c·θ_0 − lr·mean_{i∈S} c·∇l_i(θ_0),
    # with each ∇l_i from plain autograd on the model, example by example.
    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    model.double()
    ids = [torch.randint(0, 256, (6,)).tolist() for _ in range(5)]
    examples = make_examples(ids)
    head = "lm_head.weight"
    c = torch.randn_like(dict(model.named_parameters())[head])
    recipe = Recipe(optimizer="sgd", lr=0.1, weight_decay=0.0, steps=1)
    retrain = bench.make_retrain(model, examples, recipe, {"lin": lambda p: (c * p[head]).sum()}, torch.float64)

    def grad_dot(i):
        logits = model(torch.tensor([ids[i]])).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[i][1:]))
        return float((c * torch.autograd.grad(loss, model.lm_head.weight)[0]).sum())

    dots = [grad_dot(i) for i in range(5)]
    phi0 = float((c * model.lm_head.weight.detach()).sum())
    zero = bench.make_retrain(model, examples, recipe, {"lin": lambda p: (c * p[head]).sum()}, torch.float64,
                              mode="zero_weight")  # fmt: skip
    for keep in ([0, 1, 2, 3, 4], [1, 3], [2]):
        expected = phi0 - 0.1 * sum(dots[i] for i in keep) / len(keep)
        assert retrain(torch.tensor(keep))["lin"] == pytest.approx(expected, rel=1e-10, abs=1e-12)
        # the removed examples weighted 0 in the whole batch: the divisor stays 5
        expected = phi0 - 0.1 * sum(dots[i] for i in keep) / 5
        assert zero(torch.tensor(keep))["lin"] == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_pool_is_mixed_and_disjoint():
    cfg = bench.BenchConfig(pool=16, heldout=4, pretrain_steps=2, pretrain_batch=4)
    texts, kinds, heldout, pretrain = bench.build_pool(cfg)
    assert len(texts) == 16 and len(heldout) == 4 and len(pretrain) == 8
    assert {k: kinds.count(k) for k in set(kinds)} == {"en": 6, "de": 4, "es": 2, "shuffled-en": 2, "shuffled-de": 2}
    assert not set(heldout) & set(texts) and not set(pretrain) & set(texts)
    assert all(len(t.encode()) >= cfg.seq_len for t in texts + heldout + pretrain)


def test_inner_sgd_sets_the_recipe():
    small = dict(pool=16, heldout=4, pretrain_steps=1, pretrain_batch=4, tasks=["german"])
    (task,) = bench.build_tasks(bench.BenchConfig(**small, inner="sgd", sgd_lr=0.05))
    assert (task.recipe.optimizer, task.recipe.lr, task.recipe.steps) == ("sgd", 0.05, 4)
    with pytest.raises(SystemExit, match="inner must be adamw or sgd"):
        bench.build_tasks(bench.BenchConfig(**small, inner="adam"))


def test_lds_table_by_hand():
    def run(inner, seed, methods):
        rows = {m: {"lds_50": a, "lds_90": b} for m, (a, b) in methods.items()}
        config = {"inner": inner, "lr": 3e-3, "sgd_lr": 0.01, "seed": seed}
        return {"config": config, "tasks": {"german": {"methods": rows}}}

    text = bench.lds_table({
        "a": run("adamw", 0, {"random": (0.01, -0.02), "dpg": (0.413, 0.817)}),
        "b": run("sgd", 1, {"dpg": (0.992, 0.995), "trak": (0.2, 0.4)}),
    })  # fmt: skip
    assert text.splitlines()[0] == "| run | inner, lr | seed | task | dpg | trak | random |"
    assert text.splitlines()[2] == "| a | adamw 0.003 | 0 | german | 0.41 / 0.82 | — | 0.01 / -0.02 |"
    assert text.splitlines()[3] == "| b | sgd 0.01 | 1 | german | 0.99 / 0.99 | 0.20 / 0.40 | — |"
