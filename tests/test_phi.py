"""The engine's metric passes (metagrad/phi.py): Φ(θ_0) kept between calls only while nothing
it depends on changed, and a proxy that is a function of Φ read from Φ."""

import math

import pytest
import torch

from dpg import Recipe, example_metagrads, make_examples
from dpg.metrics import LMLossMetric
from reference import VOCAB, tiny_model, unrolled_scores


class NormMetric:
    """Φ = −‖W_head‖, counting its calls; `proxy` counts too (it has no proxy_from_phi)."""

    def __init__(self, model):
        head = model.get_output_embeddings().weight
        self.name = next(n for n, p in model.named_parameters() if p is head)
        self.calls, self.proxies = 0, 0

    def __call__(self, params):
        self.calls += 1
        return -torch.linalg.vector_norm(params[self.name])

    def proxy(self, params):
        self.proxies += 1
        return {"norm": float(torch.linalg.vector_norm(params[self.name]))}


def examples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_examples([torch.randint(1, VOCAB, (6,), generator=g).tolist() for _ in range(n)])


def head_norm(model):
    return torch.linalg.vector_norm(model.get_output_embeddings().weight.detach()).item()


@pytest.mark.parametrize("tied", [False, True])  # untied: Φ's support is probed; tied: the value alone
def test_phi_before_is_kept_while_nothing_changed_and_measured_afresh_after(tied):
    model, recipe = tiny_model("gpt2", tied), Recipe(lr=1e-2)
    metric = NormMetric(model)
    first = example_metagrads(model, examples(), recipe, metric, dtype=torch.float64)
    assert first.metric_before == pytest.approx(-head_norm(model), rel=1e-14)
    assert metric.calls == 2  # Φ(θ_0) and Φ(θ_1)
    again = example_metagrads(model, examples(), recipe, metric, dtype=torch.float64)
    assert metric.calls == 3  # Φ(θ_1) alone: Φ(θ_0) was kept
    assert again.metric_before == first.metric_before and torch.equal(again.scores, first.scores)

    with torch.no_grad():  # an in-place edit of a weight Φ reads
        model.get_output_embeddings().weight.mul_(1.5)
    edited = example_metagrads(model, examples(), recipe, metric, dtype=torch.float64)
    assert metric.calls == 5
    assert edited.metric_before == pytest.approx(-head_norm(model), rel=1e-14)
    assert edited.metric_before == pytest.approx(1.5 * first.metric_before, rel=1e-14)

    other = NormMetric(model)  # another metric object: measured, though it computes the same
    example_metagrads(model, examples(), recipe, other, dtype=torch.float64)
    assert other.calls == 2
    with torch.no_grad():  # any weight of the target (untied: one Φ does not read; the scores change)
        model.get_input_embeddings().weight[1] += 0.25
    res = example_metagrads(model, examples(), recipe, other, dtype=torch.float64)
    assert other.calls == 4 and res.metric_before == pytest.approx(-head_norm(model), rel=1e-14)
    example_metagrads(model, examples(), recipe, other, dtype=torch.float32)  # another dtype
    assert other.calls == 6


def test_a_kept_phi_before_still_gives_exact_scores_after_an_edit():
    model, recipe = tiny_model("gpt2", False), Recipe(lr=1e-2)
    metric = NormMetric(model)
    example_metagrads(model, examples(), recipe, metric, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    res = example_metagrads(model, examples(), recipe, metric, dtype=torch.float64)
    ref, phi = unrolled_scores(model, examples(), recipe, metric)
    assert float((res.scores - ref).norm() / ref.norm()) < 1e-8
    assert res.metric == pytest.approx(phi, rel=1e-12)
    assert res.metric_before == pytest.approx(-head_norm(model), rel=1e-14)


def test_proxy_from_phi_spares_a_pass_and_a_custom_proxy_still_runs():
    model = tiny_model("gpt2", False)
    g = torch.Generator().manual_seed(5)
    texts = make_examples([torch.randint(1, VOCAB, (5,), generator=g).tolist() for _ in range(3)])
    lm = LMLossMetric(model, texts, chunk=2)
    passes = []
    real = LMLossMetric._ce_sum
    LMLossMetric._ce_sum = lambda self, *a: passes.append(1) or real(self, *a)
    try:
        res = example_metagrads(model, examples(), Recipe(lr=1e-2), lm, dtype=torch.float64)
        # two chunks a pass: Φ(θ_0) (no graph) and Φ(θ_1) with its gradient, chunk by chunk:
        # no recomputed forward, no third pass for the proxy
        assert len(passes) == 4
        assert res.proxy["loss"] == -res.metric
        assert res.proxy["perplexity"] == pytest.approx(math.exp(-res.metric), rel=1e-15)
    finally:
        LMLossMetric._ce_sum = real
    custom = NormMetric(model)
    res = example_metagrads(model, examples(), Recipe(lr=1e-2), custom, dtype=torch.float64)
    assert custom.proxies == 1 and res.proxy["norm"] == pytest.approx(-res.metric, rel=1e-14)


def test_lm_loss_value_and_grad_equals_autograd_through_the_checkpointed_loss():
    model = tiny_model("llama", True)
    model.train()  # the caller's mode: the metric runs without dropout whatever it is, and leaves it
    g = torch.Generator().manual_seed(2)
    texts = make_examples([torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 3, 6, 4, 6)])
    metric = LMLossMetric(model, texts, chunk=2)  # three chunks, the last one short
    params = {k: p.detach() + 0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype)
              for k, p in model.named_parameters()}  # fmt: skip
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    phi = metric(leaves)
    ref = dict(zip(leaves, torch.autograd.grad(phi, list(leaves.values()))))
    wrt = [k for k in params if "layers.1" in k or "embed" in k]
    value, grads = metric.value_and_grad(params, wrt)
    assert value.item() == pytest.approx(phi.item(), rel=1e-14) and not value.requires_grad
    assert set(grads) == set(wrt)
    for k in wrt:
        assert float((grads[k] - ref[k]).norm() / ref[k].norm()) < 1e-13
    assert model.training and all(m.training for m in model.modules())


def test_a_gradient_not_finite_is_named():
    from dpg import DpgError

    model = tiny_model("gpt2", False)
    # Φ = √(0·w): finite (0) at every θ, its gradient 0·∞ = NaN in the head weight alone
    with pytest.raises(DpgError, match=r"the metric's gradient is not finite in \['lm_head.weight'\]"):
        example_metagrads(model, examples(), Recipe(lr=1e-2), lambda p: (p["lm_head.weight"][0, 0] * 0.0).sqrt())


def test_a_grpo_reward_measures_phi_before_once_over_its_steps():
    """The reward hands the engine the same target and metric every step: Φ(θ_0) is measured at
    the first step alone, and every step reports it."""
    from dpg.models import load_model
    from dpg.rewards import InnerRunReward

    model, tok = load_model("tiny-gpt2", dtype=torch.float64)
    metric = NormMetric(model)
    reward = InnerRunReward("metagrad", model, tok, metric, Recipe(lr=1e-3), max_length=16, dtype=torch.float64)
    for step in range(3):
        reward(prompts=["p"] * 4, completions=["a b", "cd", f"step {step}", "e f g"])
    assert metric.calls == 4  # Φ(θ_0) once, Φ(θ_1) each step
    assert [row["phi_before"] for row in reward.history] == [pytest.approx(-head_norm(model), rel=1e-14)] * 3
