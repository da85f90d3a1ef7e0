"""dpg.rollout against HF: per-token log-probabilities from a plain full forward pass, the
processed distribution against HF's own logits warpers, sample frequencies against
`generate`, eos and padding as TRL cuts `generate`'s output. CPU, eager decode step (the
CUDA-graph replay runs the same step; tests/test_gpu.py compares the two on a GPU)."""

import copy
import math

import pytest
import torch
from transformers import (
    GenerationConfig,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dpg.errors import DpgError
from dpg.models import load_model
from dpg.rollout import Sampler, SamplingSettings, process_logits


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request):
    m, _ = load_model(request.param, seed=3)
    return m


def _prompts():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]  # different lengths: left padding, and a one-token prompt
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _reference_logprobs(model, prompt, completion, s: SamplingSettings):
    """Each completion token's log-prob from one full forward pass over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return process_logits(logits, s, None).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_match_a_full_forward_pass(model, temperature, top_k, top_p):
    s = SamplingSettings(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=0)
    rollout = Sampler(model, s).sample(_prompts())
    assert [len(c) for c in rollout.completion_ids] == [12] * 4  # no eos set: full length
    for prompt, completion, lps in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, strict=True):
        ref = _reference_logprobs(model, prompt, completion, s)
        assert torch.allclose(torch.tensor(lps), ref, atol=2e-5, rtol=0), (lps, ref)
        assert all(math.isfinite(x) for x in lps)  # every drawn token is inside the kept set


def test_sampler_leaves_the_model_as_it_was(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    Sampler(model, SamplingSettings(max_new_tokens=3)).sample(_prompts())
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.3, 0, 1.0), (0.8, 7, 1.0), (1.0, 0, 0.6),
                                                     (0.5, 30, 0.8)])  # fmt: skip
def test_processed_distribution_is_hfs(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g) * 3
    logits[0, :5] = 9.0  # ties at the top-k boundary
    suppress = [3, 17, 250]
    s = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, suppress_tokens=tuple(suppress))
    ours = process_logits(logits, s, torch.tensor(suppress))
    ids = torch.zeros(6, 1, dtype=torch.long)
    hf = SuppressTokensLogitsProcessor(suppress, device="cpu")(ids, logits.clone())
    hf = TemperatureLogitsWarper(temperature)(ids, hf)
    if top_k:
        hf = TopKLogitsWarper(top_k)(ids, hf)
    if top_p < 1:
        hf = TopPLogitsWarper(top_p)(ids, hf)
    hf = torch.log_softmax(hf, dim=-1)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    kept = torch.isfinite(hf)
    assert torch.allclose(ours[kept], hf[kept], atol=1e-6, rtol=0)


def test_sample_frequencies_match_generate():
    """First and second tokens from one prompt, 4,000 draws each way: both empirical
    distributions within sampling error of the exact one (and so of each other)."""
    model, _ = load_model("tiny-llama", seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked logits: a wrong temperature (2.0) would be off by TV ≈ 0.17
    prompt = [72, 101, 108]
    n, s = 4000, SamplingSettings(max_new_tokens=2, temperature=2.5, top_k=40, pad_token_id=0)
    torch.manual_seed(11)
    ours = torch.tensor(Sampler(model, s).sample([prompt] * n).completion_ids)  # (n, 2)
    cfg = GenerationConfig(do_sample=True, max_new_tokens=2, temperature=2.5, top_k=40, top_p=1.0, pad_token_id=0,
                           eos_token_id=None)  # fmt: skip
    torch.manual_seed(12)
    theirs = model.generate(torch.tensor([prompt] * n), generation_config=cfg)[:, len(prompt) :]
    with torch.no_grad():
        exact = process_logits(model(torch.tensor([prompt])).logits[0, -1:], s, None).exp()[0]
    for draws in (ours[:, 0], theirs[:, 0]):
        freq = torch.bincount(draws, minlength=exact.numel()).double() / n
        tv = 0.5 * (freq - exact.double()).abs().sum().item()
        assert tv < 0.06, tv  # TV of 4,000 draws over ≤ 40 outcomes: ≈ 0.025 here
        assert set(draws.tolist()) <= set(torch.nonzero(exact > 0).flatten().tolist())
    # second token: its exact marginal sums p(first) p(second | first) over the kept first tokens
    firsts = torch.nonzero(exact > 0).flatten()
    with torch.no_grad():
        ids = torch.cat([torch.tensor([prompt]).expand(len(firsts), -1), firsts[:, None]], dim=1)
        cond = process_logits(model(ids).logits[:, -1], s, None).exp()  # (kept firsts, V)
    marginal = (exact[firsts, None] * cond).sum(0).double()
    for pair in (ours, theirs):
        freq = torch.bincount(pair[:, 1], minlength=marginal.numel()).double() / n
        assert 0.5 * (freq - marginal).abs().sum().item() < 0.12  # ≤ 256 outcomes: expected ≈ 0.07


def test_eos_ends_a_completion_and_pads_after_it():
    model, _ = load_model("tiny-llama", seed=2)
    with torch.no_grad():
        probs = model(torch.tensor([[65, 66]])).logits[0, -1].softmax(-1)
    eos = int(torch.argsort(probs, descending=True)[0])  # the most likely next token: some rows stop at once
    s = SamplingSettings(max_new_tokens=40, temperature=1.0, eos_token_ids=(eos,), pad_token_id=255)
    torch.manual_seed(0)
    sampler = Sampler(model, s)
    rollout = sampler.sample([[65, 66]] * 64)
    ended = [c for c in rollout.completion_ids if c and c[-1] == eos]
    assert ended and len(ended) < 64  # some ended early, some ran to the limit
    for c, lps in zip(rollout.completion_ids, rollout.logprobs, strict=True):
        assert eos not in c[:-1]  # cut right after the first eos
        assert len(c) == len(lps) and (c[-1] == eos or len(c) == 40)
        ref = _reference_logprobs(model, [65, 66], c, s)
        assert torch.allclose(torch.tensor(lps), ref, atol=2e-5, rtol=0)
    buf = sampler._buffers  # after eos the history holds padding with log-prob 0
    for row, lp_row, c in zip(buf.tokens.tolist(), buf.logprobs.tolist(), rollout.completion_ids, strict=True):
        assert row[len(c) :] == [255] * (40 - len(c)) and all(x == 0 for x in lp_row[len(c) :])
    assert rollout.new_tokens == sum(len(c) for c in rollout.completion_ids)


def test_a_second_batch_reuses_the_buffers_and_sees_new_weights():
    model, _ = load_model("tiny-llama", seed=4)
    s = SamplingSettings(max_new_tokens=6)
    sampler = Sampler(model, s)
    sampler.sample(_prompts())
    buffers = sampler._buffers
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an in-place update, as an optimizer step makes
    rollout = sampler.sample(_prompts())
    assert sampler._buffers is buffers
    for prompt, completion, lps in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, strict=True):
        assert torch.allclose(torch.tensor(lps), _reference_logprobs(model, prompt, completion, s), atol=2e-5, rtol=0)


def test_bad_settings_are_clear_errors():
    with pytest.raises(DpgError, match="temperature"):
        SamplingSettings(temperature=0.0)
    with pytest.raises(DpgError, match="top_p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(DpgError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)
    model, _ = load_model("tiny-llama", seed=1)
    with pytest.raises(DpgError, match="at least one token"):
        Sampler(model, SamplingSettings()).sample([[1, 2], []])


def test_a_decode_dtype_other_than_the_policys_samples_from_a_refreshed_copy():
    """dtype=float64 on an fp32 policy: log-probs are those of the policy in fp64, also after
    the policy's weights change (the copy is refreshed before every batch)."""
    model, _ = load_model("tiny-llama", seed=6)
    s = SamplingSettings(max_new_tokens=5, dtype=torch.float64)
    sampler = Sampler(model, s)
    for _ in range(2):
        r = sampler.sample(_prompts())
        ref_model = copy.deepcopy(model).double()
        for prompt, completion, lps in zip(r.prompt_ids, r.completion_ids, r.logprobs, strict=True):
            ref = _reference_logprobs(ref_model, prompt, completion, s)
            assert torch.allclose(torch.tensor(lps), ref, atol=1e-6, rtol=0)
        with torch.no_grad():
            model.lm_head.weight.mul_(2.0)
    assert next(model.parameters()).dtype == torch.float32  # the policy itself stays as it was


def test_grouped_decode_attention_is_hfs_sdpa():
    """The folded grouped-query decode step equals HF's SDPA path (repeat_kv), masks included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dpg.rollout import grouped_decode_attention

    module = type("Attn", (torch.nn.Module,), {"num_key_value_groups": 3, "is_causal": True})()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, h, n, 16, generator=g) for h, n in ((9, 1), (3, 10), (3, 10)))
    mask = torch.rand(4, 1, 1, 10, generator=g) > 0.3
    mask[..., 0] = True
    ours, _ = grouped_decode_attention(module, q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_a_grouped_query_model_samples_the_right_distribution():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    s = SamplingSettings(max_new_tokens=10)
    r = Sampler(model, s).sample(_prompts())
    assert model.config._attn_implementation == "sdpa"  # switched back after sampling
    for prompt, completion, lps in zip(r.prompt_ids, r.completion_ids, r.logprobs, strict=True):
        assert torch.allclose(torch.tensor(lps), _reference_logprobs(model, prompt, completion, s), atol=2e-5, rtol=0)
