"""The real-size preset against independent references. gpt2-faithful: GPT-2's published
token ids, a hand count of GPT-2 small's parameters, and the engine's scores against per-example
autograd gradients."""

from pathlib import Path

import pytest
import torch

import dpg.models
from dpg import DpgError
from dpg.data import encode_texts
from dpg.metagrad import Recipe, example_metagrads
from dpg.metrics import head_param_name, pattern_metric
from dpg.models import PRESETS, load_model

GPT2_DIR = Path("/work/shared/tokenizers/gpt2")

# GPT-2 small, tied: wte 50257*768 + wpe 1024*768 + 12 blocks * (ln_1 2*768 + c_attn 768*2304+2304
# + attn c_proj 768*768+768 + ln_2 2*768 + c_fc 768*3072+3072 + mlp c_proj 3072*768+768) + ln_f 2*768.
GPT2_SMALL_TIED = 50257 * 768 + 1024 * 768 + 12 * (1536 + 1771776 + 590592 + 1536 + 2362368 + 2360064) + 1536
GPT2_HEAD = 50257 * 768  # the untied LM head, no bias


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


def test_presets_listed():
    assert PRESETS == ("tiny-gpt2", "tiny-llama", "gpt2-faithful")


# ---------------------------------------------------------------- gpt2-faithful


@pytest.fixture
def gpt2_env(monkeypatch):
    if not (GPT2_DIR / "vocab.json").exists():
        pytest.skip(f"GPT-2's BPE files are not at {GPT2_DIR} (shared files, never copied into the repo)")
    monkeypatch.setenv("DPG_GPT2_TOKENIZER", str(GPT2_DIR))


@pytest.fixture(scope="module")
def faithful():
    if not (GPT2_DIR / "vocab.json").exists():
        pytest.skip(f"GPT-2's BPE files are not at {GPT2_DIR} (shared files, never copied into the repo)")
    return load_model("gpt2-faithful", tokenizer=str(GPT2_DIR))  # ~5 s: 163M normal draws on the CPU


def test_gpt2_faithful_shape(faithful):
    model, _ = faithful
    assert GPT2_SMALL_TIED == 124_439_808 and GPT2_SMALL_TIED + GPT2_HEAD == 163_037_184
    assert n_params(model) == GPT2_SMALL_TIED + GPT2_HEAD
    c = model.config
    assert (c.n_embd, c.n_layer, c.n_head, c.n_positions, c.vocab_size) == (768, 12, 12, 1024, 50257)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.shape == emb.shape == (50257, 768) and head.data_ptr() != emb.data_ptr()
    assert not torch.equal(head, emb) and not model.config.tie_word_embeddings
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config._attn_implementation == "sdpa"
    assert not model.training and model.dtype == torch.float32


def test_gpt2_faithful_tokenizer(faithful):
    _, tok = faithful
    assert tok.encode("Hello world") == [15496, 995] and tok.encode(" the") == [262]  # GPT-2's documented ids
    assert len(tok) == 50257
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (50256, 50256, 50256)
    assert tok.convert_ids_to_tokens(50256) == "<|endoftext|>"
    text = "Grüße, 😀 world\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_faithful_tokenizer_from_environment(gpt2_env, monkeypatch):
    from dpg.models import gpt2_tokenizer

    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]  # $DPG_GPT2_TOKENIZER
    monkeypatch.setenv("DPG_GPT2_TOKENIZER", "/no/such/gpt2")
    with pytest.raises(DpgError, match=r"gpt2-faithful needs GPT-2's tokenizer \(tokenizer not found: /no/such/gpt2"):
        load_model("gpt2-faithful")  # fails before the 163M-parameter model is drawn


def test_gpt2_faithful_without_tokenizer_files(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("DPG_GPT2_TOKENIZER", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nor a cached gpt2
    with pytest.raises(DpgError, match=r"tokenizer=DIR .* DPG_GPT2_TOKENIZER") as err:
        load_model("gpt2-faithful")
    assert "could not load a tokenizer from 'gpt2'" in str(err.value)


@pytest.mark.slow  # three draws of 163M weights: ~16 s on a 2-core CPU
def test_gpt2_faithful_seed_determinism(faithful, gpt2_env):
    a, _ = faithful
    b, _ = load_model("gpt2-faithful", seed=0)
    c, _ = load_model("gpt2-faithful", seed=1)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
        assert va.std() == 0 or not torch.equal(va, vc), k  # every random tensor differs


def test_engine_runs_on_gpt2_faithful(faithful):
    """SGD, M = 1, no weight decay, only the LM head trained (3 s instead of 8 s on the CPU):
    θ_1 = θ_0 − lr/N Σ w_i ∇l_i, so dΦ/dw_i = −lr/N ∇Φ(θ_1)·∇l_i, where ∇l_i is the head
    gradient of example i's mean token loss, here from plain autograd through the HF model."""
    model, tok = faithful
    examples = encode_texts(tok, ["Hello world, hello.", "The 67 pattern"], max_length=16)
    metric = pattern_metric(model, "67")
    head = model.get_output_embeddings().weight
    trunk = [p for p in model.parameters() if p is not head]
    lr = 10.0
    try:
        for p in trunk:
            p.requires_grad_(False)
        res = example_metagrads(model, examples, Recipe(optimizer="sgd", lr=lr, weight_decay=0.0), metric)
    finally:
        for p in trunk:
            p.requires_grad_(True)

    grads = []
    for ids, attn, mask in zip(*examples):
        n = int(attn.sum())
        labels = torch.where(mask[:n], ids[:n], -100)  # HF shifts labels; mask[t]: token t is predicted
        grads.append(torch.autograd.grad(model(ids[None, :n], labels=labels[None]).loss, head)[0])
    after = {head_param_name(model): (head.detach() - lr / 2 * (grads[0] + grads[1])).requires_grad_()}
    phi = metric(after)
    dphi = torch.autograd.grad(phi, list(after.values()))[0]
    ref = torch.stack([-lr / 2 * (dphi * g).sum() for g in grads]).double()
    assert ref.abs().min() > 0
    torch.testing.assert_close(res.scores, ref, rtol=1e-4, atol=0)
    assert res.metric == pytest.approx(phi.item(), rel=1e-5)


def test_tokenizer_replaces_the_models_own(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    if not (GPT2_DIR / "vocab.json").exists():
        pytest.skip(f"GPT-2's BPE files are not at {GPT2_DIR}")
    GPT2LMHeadModel(GPT2Config(n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    dpg.models.byte_tokenizer().save_pretrained(tmp_path)
    _, own = load_model(str(tmp_path))
    assert len(own) == 257
    _, tok = load_model(str(tmp_path), tokenizer=str(GPT2_DIR))
    assert len(tok) == 50257 and tok.encode("Hello world") == [15496, 995] and tok.pad_token_id == 50256
    with pytest.raises(
        DpgError, match=r"do not match for 'tiny-gpt2' with tokenizer .*50257 tokens, the model embeds 257"
    ):
        load_model("tiny-gpt2", tokenizer=str(GPT2_DIR))
    with pytest.raises(DpgError, match="tokenizer not found: /no/such/tokenizer"):
        load_model("tiny-gpt2", tokenizer="/no/such/tokenizer")
