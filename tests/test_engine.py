"""The engine against an independent fully-unrolled autograd reference (fp64 tiny models)."""

import pytest
import torch

from dpg import DpgError, Recipe, example_metagrads, make_examples, fine_tune
from reference import VOCAB, example_losses_ref, tiny_model, unrolled_scores


def ragged_examples(n=6, seed=0, prompt=2):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 5, 9, 4, 8, 6, 9, 3][:n]
    ids = [torch.randint(1, VOCAB, (L,), generator=g).tolist() for L in lengths]
    # The first `prompt` tokens of every other example are prompt, not labels.
    masks = [[False] + [not (i % 2 and j < prompt) for j in range(1, L)] for i, L in enumerate(lengths)]
    return make_examples(ids, masks, pad_id=0)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def head_name(model):
    head = model.get_output_embeddings().weight
    return next(n for n, p in model.named_parameters() if p is head)


def head_metric(model):
    """A pattern-like metric on a block of the LM head (changes from the initial weights)."""
    name = head_name(model)
    w0 = model.get_output_embeddings().weight.detach()[:5, :4].clone()
    sign = torch.tensor(
        [[1, -1, 1, -1], [-1, 1, 1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [1, -1, -1, 1]],
        dtype=w0.dtype,
        device=w0.device,
    )

    def metric(params):
        delta = params[name][:5, :4] - w0.to(params[name])
        return -torch.nn.functional.softplus(-20 * sign * delta).mean()

    return metric


def lm_metric(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(1, VOCAB, (2, 6), generator=g).to(device)
    attn = torch.ones_like(ids)

    def metric(params):
        return -example_losses_ref(model, params, ids, attn, attn.bool() & (torch.arange(6, device=device) > 0)).mean()

    return metric


CASES = [
    # family, tied, optimizer, steps, microbatch, metric
    ("gpt2", False, "adamw", 1, None, "head"),
    ("gpt2", False, "adamw", 3, 1, "head"),
    ("gpt2", True, "adamw", 3, 2, "lm"),
    ("gpt2", False, "sgd", 3, 1, "lm"),
    ("gpt2", True, "sgd", 1, 2, "head"),
    ("llama", False, "adamw", 3, 2, "head"),
    ("llama", True, "adamw", 1, None, "lm"),
    ("llama", False, "sgd", 3, 1, "lm"),
]


@pytest.mark.parametrize("family,tied,opt,steps,mb,metric_kind", CASES)
def test_scores_match_unrolled_autograd(family, tied, opt, steps, mb, metric_kind):
    model = tiny_model(family, tied)
    examples = ragged_examples()
    lr = 1e-2 if opt == "adamw" else 0.5
    recipe = Recipe(optimizer=opt, lr=lr, steps=steps, microbatch_size=mb, weight_decay=0.1)
    metric = head_metric(model) if metric_kind == "head" else lm_metric(model)
    ref, phi_ref = unrolled_scores(model, examples, recipe, metric)
    before = {k: p.clone() for k, p in model.state_dict().items()}
    res = example_metagrads(model, examples, recipe, metric, dtype=torch.float64)
    rel = (res.scores - ref).norm() / ref.norm()
    # GPT-2 is fp64 throughout. HF's Llama computes RMSNorm (and RoPE tables) in fp32 even in
    # an fp64 model, so its derivatives carry fp32 rounding (issue bound: 1e-5).
    tol = 1e-8 if family == "gpt2" else 1e-6
    assert rel < tol, f"relative error {rel:.2e}"
    assert res.metric == pytest.approx(phi_ref, rel=1e-10)
    assert ref.abs().min() > 0  # a real signal on every example, not zeros
    assert len(res.losses) == steps
    # The caller's model is untouched.
    for k, p in model.state_dict().items():
        assert torch.equal(p, before[k]), k


def test_weights_and_epoch_wraparound_match_reference():
    """Non-unit data weights and batch_size with M·B > N (examples revisited across steps)."""
    model = tiny_model("gpt2", False)
    examples = ragged_examples()
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.5, 1.0], dtype=torch.float64)
    recipe = Recipe(lr=1e-2, steps=3, batch_size=4, microbatch_size=3)
    metric = lm_metric(model)
    ref, _ = unrolled_scores(model, examples, recipe, metric, weights)
    res = example_metagrads(model, examples, recipe, metric, weights, dtype=torch.float64)
    assert (res.scores - ref).norm() / ref.norm() < 1e-8


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_scores_match_central_finite_differences(opt):
    """Central differences on w. AdamW's update g/(|g|+eps) bends on the scale of eps, so
    the difference step h must be small against eps for O(h²) accuracy: eps = 1e-3 here.
    (With eps = 1e-8 the differences still converge to the engine's value as h → 0.)"""
    model = tiny_model("gpt2", True)
    examples = ragged_examples()
    recipe = Recipe(optimizer=opt, lr=1e-2 if opt == "adamw" else 0.5, steps=2, eps=1e-3)
    metric = lm_metric(model)
    res = example_metagrads(model, examples, recipe, metric, dtype=torch.float64)
    h = 1e-5
    full = {k: p.detach() for k, p in model.named_parameters()}
    for i in (0, 3, 5):
        phis = []
        for sign in (1, -1):
            w = torch.ones(6, dtype=torch.float64)
            w[i] += sign * h
            trained = fine_tune(model, examples, recipe, w, dtype=torch.float64).params
            phis.append(metric(full | trained).item())
        fd = (phis[0] - phis[1]) / (2 * h)
        assert res.scores[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("metric_kind", ["head", "lm"])
@pytest.mark.parametrize("opt,steps", [("sgd", 1), ("sgd", 3), ("adamw", 1), ("adamw", 3)])
def test_fp32_scores_agree_with_fp64(family, metric_kind, opt, steps):
    """fp32 engine vs fp64 engine. AdamW's metagradient through a fresh-state step weights
    coordinate j by eps/(|g_j|+eps)², so coordinates whose gradient is of order eps
    dominate it, and fp32 rounding of those small gradients shows: on these tiny models the
    fp32 error is ~1e-4 at eps = 1e-4 but ~1e-2 at eps = 1e-6 and O(1) at eps = 1e-8 for
    an M = 1 head metric (README, "Precision"). SGD has no such amplification."""
    model = tiny_model(family, False)
    examples = ragged_examples()
    recipe = Recipe(optimizer=opt, lr=1e-2 if opt == "adamw" else 0.5, steps=steps, microbatch_size=2, eps=1e-4)
    metric = lm_metric(model) if metric_kind == "lm" else head_metric(model)
    s64 = example_metagrads(model, examples, recipe, metric, dtype=torch.float64).scores
    s32 = example_metagrads(model, examples, recipe, metric, dtype=torch.float32).scores
    tol = 1e-5 if opt == "sgd" else 1e-3
    assert (s32 - s64).norm() / s64.norm() < tol


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("eps,eps_root", [(1e-8, 0.0), (1e-8, 1e-9), (1e-6, 0.0)])
def test_fp32_m1_head_scores_agree_with_fp64_where_adam_saturates(family, eps, eps_root):
    """An M = 1 head metric goes through AdamW's first update alone, whose derivative is small
    where |g| ≫ √eps_root + eps. The engine takes it in closed form (optim._first_update_vjp),
    so fp32 keeps its rounding there: ~1e-6 here, where the routes through m and v, which
    cancel, gave 4e-3 to 8.5e-3 at eps_root = 0, eps = 1e-8 and 2.6e-5 to 5.5e-5 at the paper's."""
    model = tiny_model(family, False)
    examples = ragged_examples()
    recipe = Recipe(optimizer="adamw", lr=1e-2, steps=1, microbatch_size=2, eps=eps, eps_root=eps_root)
    metric = head_metric(model)
    s64 = example_metagrads(model, examples, recipe, metric, dtype=torch.float64).scores
    s32 = example_metagrads(model, examples, recipe, metric, dtype=torch.float32).scores
    assert (s32 - s64).norm() / s64.norm() < 1e-5


def test_offload_modes_agree():
    model = tiny_model("gpt2", False)
    examples = ragged_examples()
    recipe = Recipe(lr=1e-2, steps=3, microbatch_size=4)
    metric = head_metric(model)
    runs = [
        example_metagrads(model, examples, recipe, metric, dtype=torch.float64, offload=o).scores
        for o in ("cpu", "disk", "device")
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_finer_hvp_microbatches_change_nothing(family):
    """hvp_microbatch_size cuts only the Hessian-vector-product passes; same scores as the
    unrolled reference."""
    model = tiny_model(family, False)
    examples = ragged_examples()
    recipe = Recipe(lr=1e-2, steps=2, batch_size=4, microbatch_size=4)
    metric = lm_metric(model)
    res = example_metagrads(model, examples, recipe, metric, dtype=torch.float64, hvp_microbatch_size=1)
    ref, _ = unrolled_scores(model, examples, recipe, metric)
    assert rel_err(res.scores, ref) < (1e-9 if family == "gpt2" else 1e-6)
    with pytest.raises(DpgError, match="hvp_microbatch_size"):
        example_metagrads(model, examples, recipe, metric, hvp_microbatch_size=0)


@pytest.mark.parametrize("on", ["all", "head"])  # a tangent on every parameter, or on the head alone
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family,tol", [("gpt2", 1e-9), ("llama", 1e-5)])  # Llama: fp32 RMSNorm
def test_forward_mode_scores_equal_brute_force_per_example_gradients(family, tol, tied, on):
    """tangent_scores and the HVP pass against per-example autograd gradients."""
    from dpg.metagrad.engine import plan_steps
    from dpg.metagrad.target import batch_loss_grad, hvp_and_tangent_scores, prepared, tangent_scores

    model = tiny_model(family, tied)
    examples = ragged_examples()
    target = prepared(model, torch.float64, torch.device("cpu")).__enter__()
    (step,) = plan_steps(examples, torch.ones(6, dtype=torch.float64), Recipe(), torch.device("cpu"), torch.float64)
    (mb,) = step.microbatches
    g = torch.Generator().manual_seed(5)
    tangent = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in target.params.items()}
    if on == "head":
        tangent = {target.head: tangent[target.head]}
    dl = tangent_scores(target, target.params, tangent, mb)
    hv, dl2 = hvp_and_tangent_scores(target, target.params, tangent, mb, step.size)
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in target.params.items()}

    def math():
        return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)

    with math():  # CPU flash attention has no double backward
        width = mb.input_ids.shape[1]
        losses = example_losses_ref(
            target.module, leaves, mb.input_ids, mb.attention_mask, examples.loss_mask[mb.index, :width]
        )
    brute = []
    for i in range(len(losses)):
        gi = torch.autograd.grad(losses[i], list(leaves.values()), retain_graph=True)
        brute.append(sum((a * tangent[k]).sum() for a, k in zip(gi, leaves) if k in tangent))
    brute = torch.stack(brute)
    assert rel_err(dl, brute) < tol and rel_err(dl2, brute) < tol
    # HVP against double backward of the batch loss.
    loss = losses.sum() / step.size
    with math():
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, retain_graph=True)
        dot = sum((a * tangent[k]).sum() for a, k in zip(grads, leaves) if k in tangent)
        ref = dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values()), retain_graph=True)))
    for k in ref:
        assert rel_err(hv[k], ref[k]) < tol, k
    # And the plain gradient pass.
    g_mb, _, _, _ = batch_loss_grad(target, target.params, mb, step.size)
    for k, a in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
        assert rel_err(g_mb[k], a) < tol, k


def test_diagnostics_are_reported():
    model = tiny_model("gpt2", False)
    res = example_metagrads(model, ragged_examples(), Recipe(steps=2), head_metric(model))
    assert set(res.timings) == {"train", "metric", "reverse", "total"}
    assert all(v >= 0 for v in res.timings.values())
    assert res.peak_memory is None  # CPU
    assert res.scores.dtype == torch.float64 and res.scores.shape == (6,)
    ref_loss = example_losses_ref(
        model, dict(model.named_parameters()), *ragged_examples()[:2], ragged_examples().loss_mask
    )[:3].mean()
    assert res.losses[0] == pytest.approx(ref_loss.item(), rel=1e-5)


# --- bad input: a clear error naming the problem, before any compute ---------------------


def test_empty_examples_rejected():
    with pytest.raises(DpgError, match="no examples"):
        make_examples([])
    model = tiny_model("gpt2", False)
    ex = make_examples([[1, 2, 3], []])
    with pytest.raises(DpgError, match="empty"):
        example_metagrads(model, ex, Recipe(), head_metric(model))


def test_all_masked_example_rejected():
    model = tiny_model("gpt2", False)
    ex = make_examples([[1, 2, 3], [4, 5, 6]], [[False, True, True], [False, False, False]])
    with pytest.raises(DpgError, match=r"examples 1 have no label tokens"):
        example_metagrads(model, ex, Recipe(), head_metric(model))


def test_mismatched_vocabulary_rejected():
    model = tiny_model("gpt2", False)
    ex = make_examples([[1, 2, VOCAB + 3]])
    with pytest.raises(DpgError, match=f"token id {VOCAB + 3} is outside the target's vocabulary of {VOCAB}"):
        example_metagrads(model, ex, Recipe(), head_metric(model))


def test_too_long_rejected():
    model = tiny_model("gpt2", False)
    ex = make_examples([list(range(1, 36))])
    with pytest.raises(DpgError, match="35 tokens, more than the target's limit of 32"):
        example_metagrads(model, ex, Recipe(), head_metric(model))


def test_nan_metric_rejected():
    model = tiny_model("gpt2", False)
    name = next(iter(dict(model.named_parameters())))
    with pytest.raises(DpgError, match="not finite"):
        example_metagrads(model, ragged_examples(), Recipe(), lambda p: p[name].sum() * float("nan"))


def test_metric_independent_of_trained_params_rejected():
    model = tiny_model("gpt2", False)
    with pytest.raises(DpgError, match="does not depend"):
        example_metagrads(model, ragged_examples(), Recipe(), lambda p: torch.tensor(1.0, dtype=torch.float64))


def test_bad_recipe_and_weights_rejected():
    model = tiny_model("gpt2", False)
    with pytest.raises(DpgError, match="optimizer"):
        Recipe(optimizer="lion")
    with pytest.raises(DpgError, match="steps"):
        Recipe(steps=0)
    with pytest.raises(DpgError, match="at least that many examples"):
        example_metagrads(model, ragged_examples(3), Recipe(steps=4), head_metric(model))
    with pytest.raises(DpgError, match=r"weights must have shape \(6,\)"):
        example_metagrads(model, ragged_examples(), Recipe(), head_metric(model), torch.ones(5))


def test_model_without_higher_order_derivatives_is_refused():
    """An op with no forward-mode derivative gives a clear error, never a wrong number."""

    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.tanh()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - x.tanh() ** 2)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            out.logits = NoJvp.apply(out.logits)
            return out

    inner = tiny_model("gpt2", False)
    model = Wrapped(inner)
    name = "inner.lm_head.weight"
    with pytest.raises(DpgError, match="no forward-mode or second-order derivative") as refused:
        example_metagrads(model, ragged_examples(), Recipe(), lambda p: -p[name].square().sum())
    # an old-style Function (no setup_context), as liger-kernel's patched RoPE is: the error says so
    assert "liger-kernel's patches, grpo.extra.use_liger_kernel" in str(refused.value)


@pytest.mark.parametrize("opt,tied", [("adamw", False), ("sgd", True)])
def test_llama_in_strict_fp64_matches_reference_to_1e8(opt, tied):
    """With HF's internal fp32 casts promoted (float64_everywhere), Llama is exact to fp64."""
    from dpg.metagrad.precision import float64_everywhere

    model = tiny_model("llama", tied)
    examples = ragged_examples()
    recipe = Recipe(optimizer=opt, lr=1e-2 if opt == "adamw" else 0.5, steps=3, microbatch_size=2)
    metric = lm_metric(model)
    with float64_everywhere():
        ref, _ = unrolled_scores(model, examples, recipe, metric)
        res = example_metagrads(model, examples, recipe, metric, dtype=torch.float64)
    assert rel_err(res.scores, ref) < 1e-8


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_only_scores_from_saved_hidden_states_equal_forward_mode(family):
    """The written-out head tangent (used for M = 1 head metrics) against torch.func.jvp."""
    from dpg.metagrad.engine import plan_steps
    from dpg.metagrad.target import batch_loss_grad, example_losses, head_tangent_scores, prepared

    model = tiny_model(family, False)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB, dtype=torch.float64))  # exercise the bias term
    examples = ragged_examples()
    target = prepared(model, torch.float64, torch.device("cpu")).__enter__()
    assert target.trunk is not None and target.head_bias == "lm_head.bias"
    (step,) = plan_steps(
        examples, torch.ones(6, dtype=torch.float64), Recipe(microbatch_size=4), torch.device("cpu"), torch.float64
    )
    g = torch.Generator().manual_seed(3)
    tangent = {
        k: torch.randn(target.params[k].shape, generator=g, dtype=torch.float64)
        for k in ("lm_head.weight", "lm_head.bias")
    }
    for mb in step.microbatches:
        _, _, hidden, _ = batch_loss_grad(target, target.params, mb, step.size)
        fast = head_tangent_scores(target, target.params, tangent, hidden, mb, chunk=5)
        active = {k: target.params[k] for k in tangent}
        rest = {k: p for k, p in target.params.items() if k not in tangent}
        _, reference = torch.func.jvp(lambda a: example_losses(target, {**rest, **a}, mb), (active,), (tangent,))
        assert rel_err(fast, reference) < 1e-12


@pytest.mark.parametrize("family,tied", [("gpt2", False), ("gpt2", True), ("llama", True)])
def test_m1_head_metric_takes_the_training_pass_path(monkeypatch, family, tied):
    """M = 1 and a metric on the LM head alone: the scores come from the training pass (its
    hidden states; on a tied head also the gradient at the embedding's output, the block's
    rows being input tokens here), no second trunk pass, and equal the unrolled reference."""
    import dpg.metagrad.reverse as reverse  # the reverse sweep's home

    calls, passes = [], []
    real, jvp_pass = reverse.head_tangent_scores, reverse.tangent_scores
    monkeypatch.setattr(reverse, "head_tangent_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(reverse, "tangent_scores", lambda *a, **k: passes.append(1) or jvp_pass(*a, **k))
    from dpg.metagrad.precision import float64_everywhere

    model = tiny_model(family, tied)
    recipe = Recipe(lr=1e-2, microbatch_size=4)
    with float64_everywhere():  # Llama's fp32 casts promoted: the reference is exact to fp64
        res = example_metagrads(model, ragged_examples(), recipe, head_metric(model), dtype=torch.float64)
        assert len(calls) == 2 and not passes  # both microbatches, no forward-mode pass
        ref, _ = unrolled_scores(model, ragged_examples(), recipe, head_metric(model))
    assert rel_err(res.scores, ref) < 1e-10
    assert res.metric_before == pytest.approx(-torch.nn.functional.softplus(torch.tensor(0.0)).item())
    calls.clear()  # an lm_loss metric reads the whole model: the general forward-mode path
    example_metagrads(model, ragged_examples(), Recipe(), lm_metric(model), dtype=torch.float64)
    assert not calls


def test_tied_head_scores_from_the_training_pass_with_pad_as_bos():
    """Llama tied, pad = bos = id 0 (a row of Φ's block) opening every example as an input: the
    pad row's lookups count in the embedding's share, as the engine trains that row (the
    reference's padding_idx removed to match, as tests/test_configs.py does)."""
    from dpg.metagrad.precision import float64_everywhere

    model = tiny_model("llama", True)
    assert model.get_input_embeddings().padding_idx == 0
    g = torch.Generator().manual_seed(5)
    ids = [[0, *torch.randint(1, VOCAB, (n,), generator=g).tolist()] for n in (6, 4, 8, 5)]
    examples = make_examples(ids, [[False] + [True] * (len(x) - 1) for x in ids], pad_id=0)
    recipe = Recipe(lr=1e-2, microbatch_size=2)
    with float64_everywhere():
        res = example_metagrads(model, examples, recipe, head_metric(model), dtype=torch.float64)
        model.get_input_embeddings().padding_idx = None
        ref, _ = unrolled_scores(model, examples, recipe, head_metric(model))
    assert rel_err(res.scores, ref) < 1e-10


def test_tied_head_with_a_zero_weight_takes_forward_mode_for_its_microbatch(monkeypatch):
    """The embedding's share divides by w_i: a microbatch holding a w_i = 0 example takes the
    forward-mode pass instead, and every score, that example's too, matches the reference."""
    import dpg.metagrad.reverse as reverse

    passes = []
    jvp_pass = reverse.tangent_scores
    monkeypatch.setattr(reverse, "tangent_scores", lambda *a, **k: passes.append(1) or jvp_pass(*a, **k))
    model = tiny_model("gpt2", True)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.5], dtype=torch.float64)  # example 4: second microbatch
    recipe = Recipe(lr=1e-2, microbatch_size=4)
    res = example_metagrads(model, ragged_examples(), recipe, head_metric(model), weights, dtype=torch.float64)
    assert len(passes) == 1
    ref, _ = unrolled_scores(model, ragged_examples(), recipe, head_metric(model), weights)
    assert rel_err(res.scores, ref) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_caller_model_is_left_as_found(dtype):
    """In place (same dtype/device) or copied, the caller's mode and attention come back."""
    model = tiny_model("llama", False)
    model.set_attn_implementation("eager")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = example_metagrads(model, ragged_examples(), Recipe(lr=1e-2, steps=2), lm_metric(model), dtype=dtype)
    assert model.training and model.config._attn_implementation == "eager"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(res.scores).all()


def test_layer_norm_from_primitives_differentiates_its_tangent_correctly():
    """The reverse-over-forward pass replaces layer_norm (torch.func's gradient of its tangent
    is wrong); the replacement equals F.layer_norm and matches finite differences."""
    import torch.nn.functional as F
    from torch.func import grad, jvp

    from dpg.metagrad.head_ops import LayerNormFromPrimitives, layer_norm

    g = torch.Generator().manual_seed(0)
    x, tx = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    w, b, tw = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    assert rel_err(layer_norm(x, (6,), w, b), F.layer_norm(x, (6,), w, b)) < 1e-14

    def objective(x):
        with LayerNormFromPrimitives():
            t = jvp(lambda x, w: F.layer_norm(x, (6,), w, b), (x, w), (tx, tw))[1]
        return (t**2).sum()

    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    fd = (objective(x + 1e-6 * v) - objective(x - 1e-6 * v)) / 2e-6
    assert abs((grad(objective)(x) * v).sum() - fd) < 1e-7 * abs(fd)


def check_inner_step_equals_fine_tune(device: str, tf32: bool) -> None:
    """The engine's θ_1 (handed to on_trained) and its reported Φ(θ_1) equal plain fine-tuning's
    on the same data — what the naive reward and dpg evaluate run — with AdamW's eps_root (which
    makes the first step proportional to g for small g) and an lm_loss Φ in chunks."""
    from dpg.metagrad.precision import tf32_matmuls
    from dpg.metrics import LMLossMetric

    model = tiny_model("llama", True, dtype=torch.float32).to(device)
    examples = ragged_examples(n=64)
    held = make_examples(torch.randint(1, VOCAB, (24, 12), generator=torch.Generator().manual_seed(3)).tolist())
    metric = LMLossMetric(model, held, chunk=8)
    recipe = Recipe(optimizer="adamw", lr=1e-3, b2=0.95, eps_root=1e-9, weight_decay=1e-4, microbatch_size=16)
    seen = {}
    with tf32_matmuls(tf32):
        res = example_metagrads(
            model,
            examples,
            recipe,
            metric,
            device=device,
            on_trained=lambda p: seen.update({k: v.detach().clone() for k, v in p.items()}),
        )
        plain = fine_tune(model, examples, recipe, device=device).params
    with torch.no_grad(), tf32_matmuls(False):  # the engine measures Φ in full fp32 (engine._metagrads)
        phi_plain = metric({**dict(model.named_parameters()), **plain}).item()
    for k, p in plain.items():
        step = p.double() - model.get_parameter(k).double()
        assert (seen[k].double() - p.double()).abs().max() <= 1e-3 * step.abs().max() + 1e-12, k
    assert res.metric == pytest.approx(phi_plain, rel=1e-5)


def test_engine_inner_step_equals_plain_fine_tuning():
    check_inner_step_equals_fine_tune("cpu", False)


@pytest.mark.parametrize("metric_kind", ["lm", "head"])
def test_metric_is_measured_in_full_fp32_inside_tf32(metric_kind):
    """Inside tf32_matmuls() (reward.tf32) the engine trains and sweeps back in TF32 but runs
    every Φ pass, Φ(θ_0) and Φ(θ_M) with its gradient, at full fp32 matmul precision: an inner
    step is far below TF32's resolution (engine._metagrads). On CPU the setting is only a flag,
    which the metric reads at each call; the caller's setting is restored afterwards."""
    from dpg.metagrad.precision import matmul_precision, tf32_matmuls
    from dpg.metrics import LMLossMetric

    model = tiny_model("llama", False, dtype=torch.float32)
    seen_by_metric = []
    if metric_kind == "lm":
        held = make_examples(torch.randint(1, VOCAB, (8, 10), generator=torch.Generator().manual_seed(3)).tolist())

        class Recording(LMLossMetric):
            def value_and_grad(self, params, names):
                seen_by_metric.append(matmul_precision())
                return super().value_and_grad(params, names)

            def __call__(self, params):
                seen_by_metric.append(matmul_precision())
                return super().__call__(params)

        metric = Recording(model, held, chunk=4)
    else:
        inner = head_metric(model)

        def metric(params):
            seen_by_metric.append(matmul_precision())
            return inner(params)

    def record_training(params):  # on_trained runs after the Φ(θ_M) pass, back in the caller's setting
        seen_by_metric.append(("after", matmul_precision()))

    with tf32_matmuls(True):
        example_metagrads(model, ragged_examples(n=8), Recipe(lr=1e-2, steps=1), metric, on_trained=record_training)
    assert seen_by_metric and seen_by_metric[-1] == ("after", "tf32")
    assert set(seen_by_metric[:-1]) == {"ieee"}
