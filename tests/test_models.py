"""Model and tokenizer loading against independent references: GPT-2's real BPE files for the
byte tokenizer, Python's UTF-8 codec for decoding, hand-counted parameters for the presets,
and the source model's logits for a GGUF file written here with the gguf package."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpg import DpgError
from dpg.models import PRESETS, byte_tokenizer, bytes_to_unicode, load_model

GPT2_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers" / "gpt2"  # beside every checkout
STRINGS = [
    "Hello, world!",
    "Grüße aus Köln: Äpfel, Öl, Übermaß.",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文，日本語のテキスト，한국어",
    " \t\n  \r\n",
    "",
    "  leading and trailing spaces  ",
    "\x00\x07 control bytes \x7f",
]


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2's real tokenizer (vocab, merges, Rust byte-level pre-tokenizer) and its vocab dict."""
    if not (GPT2_DIR / "vocab.json").exists():
        pytest.skip(f"GPT-2's BPE files are not at {GPT2_DIR} (shared files, never copied into the repo)")
    from transformers import GPT2TokenizerFast

    # transformers 5 takes vocab=/merges= paths; vocab_file= would silently build an empty tokenizer.
    tok = GPT2TokenizerFast(vocab=str(GPT2_DIR / "vocab.json"), merges=str(GPT2_DIR / "merges.txt"))
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's documented ids: the reference is real
    return tok, json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))


def no_grad_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- byte tokenizer


def test_byte_vocabulary_is_gpt2_first_256_ids(gpt2):
    _, vocab = gpt2
    tok = byte_tokenizer()
    gpt2_first = sorted(vocab, key=vocab.get)[:256]
    assert tok.convert_ids_to_tokens(list(range(257))) == gpt2_first + ["<|endoftext|>"]
    assert tok.convert_tokens_to_ids(["!", '"', "Ġ", "Ċ"]) == [0, 1, 220, 198]  # GPT-2: "!", '"', space, newline
    assert len(tok) == 257 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 256, 256)


def test_every_utf8_byte_gets_gpt2_id(gpt2):
    # One character for every byte that can occur in UTF-8: ASCII, 2-byte leads C2..DF and all
    # continuations 80..BF, 3-byte leads E0..EF, 4-byte leads F0..F4.
    chars = [chr(c) for c in range(0x800)]
    chars += [chr((lead - 0xE0) << 12 | (0x800 if lead == 0xE0 else 0)) for lead in range(0xE0, 0xF0)]
    chars += [chr(c) for c in (0x10000, 0x40000, 0x80000, 0xC0000, 0x100000)]
    text = "".join(chars)
    data = text.encode("utf-8")
    assert set(data) == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}  # the rest never occur
    gpt2_tok, vocab = gpt2
    # GPT-2's own byte-level pre-tokenizer maps bytes to characters; its vocab gives the ids.
    pieces = gpt2_tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    expected = [vocab[ch] for piece, _ in pieces for ch in piece]
    assert len(expected) == len(data)
    assert byte_tokenizer().encode(text) == expected


@pytest.mark.parametrize("text", STRINGS)
def test_round_trip_one_token_per_byte(gpt2, text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert gpt2[0].decode(ids) == text  # GPT-2's decoder reads the same ids as the same bytes


def test_invalid_utf8_decodes_like_python_replace():
    tok = byte_tokenizer()
    byte_id = {b: tok.convert_tokens_to_ids(ch) for b, ch in bytes_to_unicode().items()}
    cases = [
        bytes([0x41, 0xC3, 0x28, 0xFF, 0x42]),  # 'A', broken 2-byte lead, '(', never-valid 0xFF, 'B'
        "😀".encode()[:3],  # truncated 4-byte emoji
        bytes([0x80, 0xBF, 0xC0, 0xAF]),  # lone continuations, overlong lead
    ]
    rng = np.random.default_rng(0)
    cases += [bytes(rng.integers(0, 256, size=40).tolist()) for _ in range(20)]
    for data in cases:
        assert tok.decode([byte_id[b] for b in data]) == data.decode("utf-8", errors="replace")
    assert tok.decode([byte_id[0x41], byte_id[0xC3], byte_id[0x28]]) == "A\ufffd("
    tok.decode(rng.integers(0, 257, size=200).tolist())  # with <|endoftext|> mixed in: no raise


def test_byte_tokenizer_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert len(back) == 257 and (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (256, 256, 256)
    for text in STRINGS + ["<|endoftext|>x"]:
        assert back.encode(text) == tok.encode(text)
        assert back.decode(back.encode(text)) == text
    assert back.encode("<|endoftext|>x") == [256, 87]  # "x" is GPT-2 id 87


# ---------------------------------------------------------------- presets


# Hand-counted parameters. tiny-gpt2: wte 257*64 + wpe 256*64 + 2 blocks * (ln 2*64 + c_attn 64*192+192
# + c_proj 64*64+64 + ln 2*64 + fc 64*256+256 + proj 256*64+64) + ln_f 2*64 + head 257*64.
GPT2_PARAMS = 257 * 64 + 256 * 64 + 2 * (128 + 12480 + 4160 + 128 + 16640 + 16448) + 128 + 257 * 64
# tiny-llama: embed 257*64 + 2 * (q 64*64 + k 32*64 + v 32*64 + o 64*64 + 3 mlp 128*64 + 2 norms 64)
# + norm 64 + head 257*64.
LLAMA_PARAMS = 257 * 64 + 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128) + 64 + 257 * 64


TINY = ("tiny-gpt2", "tiny-llama")  # the presets of these tests; the real-size ones are in test_presets.py


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


def test_preset_shapes():
    assert PRESETS[:2] == TINY
    gpt, tok = load_model("tiny-gpt2")
    assert n_params(gpt) == GPT2_PARAMS == 149376
    assert gpt.transformer.wte.weight.shape == (257, 64) and gpt.transformer.wpe.weight.shape == (256, 64)
    assert len(gpt.transformer.h) == 2 and gpt.config.n_head == 4
    llama, _ = load_model("tiny-llama")
    assert n_params(llama) == LLAMA_PARAMS == 106944
    attn = llama.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 16, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 16, 64)  # GQA: 2 kv heads x head_dim 16
    assert llama.model.layers[0].mlp.gate_proj.weight.shape == (128, 64) and len(llama.model.layers) == 2
    for model in (gpt, llama):
        assert not model.training and model.config._attn_implementation == "sdpa"
        assert model.dtype == torch.float32 and model.device.type == "cpu"
        assert model.get_output_embeddings().weight.shape == (257, 64)
        assert model.config.eos_token_id == model.config.pad_token_id == tok.pad_token_id == 256


@pytest.mark.parametrize("name", TINY)
def test_preset_seed_determinism(name):
    a, _ = load_model(name, seed=0)
    b, _ = load_model(name, seed=0)
    c, _ = load_model(name, seed=1)
    d, _ = load_model(name, seed=0, dtype=torch.float64)
    for (k, va), vb, vd in zip(a.state_dict().items(), b.state_dict().values(), d.state_dict().values()):
        assert torch.equal(va, vb), k
        assert vd.dtype == torch.float64 and torch.equal(vd, va.double()), k  # fp64 = the fp32 draw, upcast
    differ = [k for k, va in a.state_dict().items() if va.std() > 0 and not torch.equal(va, c.state_dict()[k])]
    assert len(differ) == sum(1 for v in a.state_dict().values() if v.std() > 0) > 0  # every random tensor


@pytest.mark.parametrize("name", TINY)
def test_untied_by_default_tied_on_request(name):
    untied, _ = load_model(name)
    head, emb = untied.get_output_embeddings().weight, untied.get_input_embeddings().weight
    assert head is not emb and head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)
    tied, _ = load_model(name, tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert n_params(tied) == n_params(untied) - 257 * 64
    with torch.no_grad():  # the tie is live: a change to the embedding is a change to the head
        tied.get_input_embeddings().weight[3, 5] += 1.0
    assert tied.get_output_embeddings().weight[3, 5] == tied.get_input_embeddings().weight[3, 5]


def test_caller_rng_untouched():
    torch.manual_seed(99)
    state = torch.get_rng_state()
    expected = torch.rand(5)
    torch.set_rng_state(state)
    load_model("tiny-llama", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


# ---------------------------------------------------------------- local, hub, errors


@pytest.mark.parametrize("spec", ["./no-such-dir", "/no/such/dir", "~/no-such-dpg-model", "a/b/c", "missing.gguf"])
def test_missing_path_is_dpg_error(spec):
    with pytest.raises(DpgError, match="model not found"):
        load_model(spec)


def test_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    with pytest.raises(DpgError, match="could not be found locally or on the Hugging Face hub"):
        load_model("dpg-test/no-such-model")


def test_local_directory_round_trip(tmp_path):
    model, tok = load_model("tiny-gpt2", seed=2)
    model.save_pretrained(tmp_path)
    tok.pad_token = None  # loading falls back to eos
    tok.save_pretrained(tmp_path)
    back, back_tok = load_model(str(tmp_path), dtype=torch.float64)
    ids = tok.encode("Grüße 😀")
    torch.testing.assert_close(no_grad_logits(back, ids), no_grad_logits(model, ids).double(), rtol=1e-6, atol=1e-6)
    assert back_tok.pad_token_id == 256 and back.dtype == torch.float64 and not back.training
    restated, _ = load_model(str(tmp_path), tie_word_embeddings=False)  # restating the checkpoint's tying is fine
    assert restated.get_output_embeddings().weight is not restated.get_input_embeddings().weight
    with pytest.raises(DpgError, match="tie_word_embeddings"):
        load_model(str(tmp_path), tie_word_embeddings=True)


def test_vocabulary_mismatch(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=200, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)  # 257 tokens > 200 embedding rows
    with pytest.raises(DpgError, match="tokenizer and model vocabularies do not match"):
        load_model(str(tmp_path))


def test_other_files_are_dpg_errors(tmp_path, monkeypatch):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(DpgError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "m.gguf").write_bytes(b"")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(DpgError, match=r"pip install 'dpg\[gguf\]'"):
        load_model(str(tmp_path / "m.gguf"))


# ---------------------------------------------------------------- GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders Q/K rows from HF's rotate-half RoPE layout to
    interleaved pairs; transformers undoes it on load, so a faithful file must apply it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tok, path):
    gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'dpg[gguf]') writes the test file")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # A "gpt2" (byte-level BPE) tokenizer section. The gguf writer drops an empty merges array,
    # so we give scores instead; transformers then derives the (empty) merges from the tokens.
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    w.add_pad_token_id(256)
    w.add_add_space_prefix(False)  # else the decoder strips one leading space

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])  # present -> loaded untied
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = llama_cpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_matches_source_model(tmp_path):
    model, tok = load_model("tiny-llama", seed=3)
    path = tmp_path / "tiny-llama-f32.gguf"
    write_llama_gguf(model, tok, path)
    back, back_tok = load_model(str(path))
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.num_key_value_heads == 2
    assert back.get_output_embeddings().weight is not back.get_input_embeddings().weight
    texts = ["Grüße, 😀 world", " hi  there\n", "<|endoftext|>x"]
    for text in texts:
        assert back_tok.encode(text) == tok.encode(text)
        assert back_tok.decode(back_tok.encode(text)) == text
    assert back_tok.pad_token_id == 256
    ids = tok.encode(texts[0])
    ref = no_grad_logits(model, ids)
    assert ref.std() > 0.05  # random logits, not a degenerate constant
    torch.testing.assert_close(no_grad_logits(back, ids), ref, rtol=1e-5, atol=1e-5)
