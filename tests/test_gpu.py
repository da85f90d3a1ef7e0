"""The engine on CUDA against the CPU fp64 reference (pytest -m gpu on a GPU machine)."""

import copy

import pytest
import torch

from dpg import Recipe, example_metagrads
from dpg.metagrad.precision import float64_everywhere
from reference import tiny_model, unrolled_scores
from test_engine import check_inner_step_equals_fine_tune, head_metric, lm_metric, ragged_examples, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("metric_kind,steps", [("head", 1), ("lm", 1), ("head", 3), ("lm", 3)])
def test_cuda_fp64_matches_cpu_reference(family, metric_kind, steps):
    model = tiny_model(family, False)
    examples = ragged_examples()
    recipe = Recipe(lr=1e-2, steps=steps, microbatch_size=4)
    make = head_metric if metric_kind == "head" else lm_metric
    # Llama's fp32 RMSNorm rounds differently on CPU and GPU: compare in true fp64.
    with float64_everywhere():
        ref, _ = unrolled_scores(model, examples, recipe, make(model))
        model = model.cuda()  # the metric closes over the model: build it on the device's copy
        res = example_metagrads(model, examples, recipe, make(model), dtype=torch.float64, device="cuda")
    assert rel_err(res.scores, ref) < 1e-8
    assert res.peak_memory > 0


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_cuda_offload_and_fp32(offload):
    model = tiny_model("gpt2", False)
    examples = ragged_examples()
    recipe = Recipe(lr=1e-2, steps=3, microbatch_size=2, eps=1e-4)
    ref, _ = unrolled_scores(model, examples, recipe, lm_metric(model))
    model = model.cuda()
    metric = lm_metric(model)
    s64 = example_metagrads(model, examples, recipe, metric, dtype=torch.float64, device="cuda", offload=offload).scores
    assert rel_err(s64, ref) < 1e-8
    s32 = example_metagrads(model, examples, recipe, metric, dtype=torch.float32, device="cuda", offload=offload).scores
    assert rel_err(s32, s64) < 1e-3


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_graph_sampler_matches_a_full_forward_pass(family, dtype):
    """The replayed graph draws tokens whose log-probs a plain forward pass reproduces, for two
    batches in a row (the second reuses the graph) with an in-place weight update between."""
    from dpg.models import load_model
    from dpg.rollout import Sampler, SamplingSettings, process_logits

    model, _ = load_model(family, seed=3, device="cuda")
    s = SamplingSettings(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, eos_token_ids=(10,), dtype=dtype)
    sampler = Sampler(model, s)
    prompts = [[65, 66, 67], [70], [71, 72, 73, 74, 75, 76], [80, 81]]
    for round_ in range(2):
        r = sampler.sample(prompts)
        assert sampler._buffers.graph is not None
        for p, c, lps in zip(r.prompt_ids, r.completion_ids, r.logprobs, strict=True):
            ref_model = copy.deepcopy(model).to(dtype or torch.float32)  # the sampler decodes a copy in `dtype`
            with torch.no_grad():
                logits = ref_model(input_ids=torch.tensor([p + c], device="cuda")).logits[0, len(p) - 1 : -1]
            ref = process_logits(logits, s, None).gather(-1, torch.tensor(c, device="cuda")[:, None])[:, 0].cpu()
            diff = (ref - torch.tensor(lps)).abs()
            if dtype is None:
                assert diff.max().item() < 1e-4, (round_, len(p), diff.tolist())
            else:  # bf16: prefill and cached decode round differently from one full pass
                assert diff.mean().item() < 2e-2 and diff.max().item() < 0.2, (round_, len(p), diff.tolist())
        with torch.no_grad():
            model.lm_head.weight.mul_(3.0)  # a stale bf16 copy would now be far off


def test_cuda_recomputation_through_pooled_pinned_memory():
    """Checkpoint trees on CUDA (states through pinned.py's pooled chunks and side stream, and
    through disk) give the all-saved scores; a second call reuses the pool and agrees."""
    model = tiny_model("gpt2", False).cuda()
    recipe = Recipe(lr=1e-2, steps=7, batch_size=2)
    metric = head_metric(model)

    def run(k, offload="cpu"):
        return example_metagrads(
            model, ragged_examples(), recipe, metric, dtype=torch.float64, device="cuda", offload=offload,
            checkpoint_k=k,
        )  # fmt: skip

    saved = run(7, "device").scores
    for k, offload in [(2, "cpu"), (3, "cpu"), (2, "disk"), (2, "cpu")]:
        res = run(k, offload)
        assert rel_err(res.scores, saved) < 1e-10, (k, offload)  # CUDA atomics may reorder sums
        assert res.schedule["recomputed"] > 0 and res.schedule["held_bytes"] == res.schedule["peak_bytes"]


@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_engine_inner_step_equals_plain_fine_tuning(tf32):
    """As test_engine's CPU test, on CUDA, with TF32 off and on: a German run on one H200 (TF32,
    AdamW with eps_root 1e-9, lm_loss Φ in chunks) logged an engine gain of 0.0224 at step 1
    where plain fine-tuning of that kind of data gained 0.0026 (README, German run)."""
    check_inner_step_equals_fine_tune("cuda", tf32)


def test_cuda_tf32_engine_reports_the_fp32_gain():
    """Inside tf32_matmuls() the engine's Φ(θ_1) − Φ(θ_0) is the gain fp32 measures, on weights
    that sit exactly halfway between TF32 values (as 15 % of SmolLM2's de-quantized ones do,
    benchmarks/tf32_grid.py), where a step of 1e-6 decides their rounding and Φ measured with
    TF32 matmuls moves by far more than the step does (README, German run)."""
    from dpg import fine_tune
    from dpg.metagrad.precision import tf32_matmuls
    from dpg.metrics import LMLossMetric

    model = tiny_model("llama", True, dtype=torch.float32).cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # low 13 bits = 0x1000: halfway between two TF32 values
                p.copy_(((p.view(torch.int32) & ~0x1FFF) | 0x1000).view(torch.float32))
    examples = ragged_examples(n=64)
    metric = LMLossMetric(model, examples, chunk=8)  # Φ = −loss on the training data: a gain well above rounding
    recipe = Recipe(optimizer="adamw", lr=1e-6, b2=0.95, eps_root=1e-9, weight_decay=1e-4, microbatch_size=16)
    with tf32_matmuls(True):
        res = example_metagrads(model, examples, recipe, metric, device="cuda")
        trained = {k: p.detach() for k, p in model.named_parameters()} | fine_tune(model, examples, recipe).params
    gains = {}
    for tf32 in (False, True):
        with torch.no_grad(), tf32_matmuls(tf32):
            gains[tf32] = (metric(trained) - metric(dict(model.named_parameters()))).item()
    assert res.metric - res.metric_before == pytest.approx(gains[False], rel=0.05, abs=2e-6)
    assert abs(gains[True] - gains[False]) > 0.5 * abs(gains[False])  # the rounding the engine steps around


def test_cuda_nan_policy_update_is_skipped_bitwise(tmp_path, monkeypatch):
    """On CUDA (bf16 autocast, torch's fused AdamW kernel) a skipped update moves no weight
    and no optimizer state, as on the CPU (tests/test_safety.py), and leaves its inputs for the post-mortem."""
    from test_safety import checkpoint_state, nan_loss_in
    from test_train import tiny

    from dpg.report import read_rows
    from dpg.train import run_train

    seen = nan_loss_in(range(1, 2), monkeypatch)  # step 2's update
    run_train(tiny(tmp_path, "grpo.steps=3", "grpo.save_every=1", "device=cuda"))
    saved = torch.load(tmp_path / "nonfinite" / "step_2_update_1.pt", map_location="cpu", weights_only=True)
    assert len(saved) == len(seen) == 1 and saved[0].keys() == seen[0].keys() >= {"completion_ids", "advantages"}
    assert all(torch.equal(saved[0][k], seen[0][k]) for k in seen[0])  # the post-mortem holds the update's inputs
    (w1, opt1), (w2, opt2), (w3, _) = (checkpoint_state(tmp_path / f"checkpoint-{s}") for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.equal(opt1[i][n], opt2[i][n]) for i in opt1 for n in opt1[i])
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    assert [r["skipped_updates"] for r in read_rows(tmp_path / "metrics.jsonl")] == [0, 1, 0]
