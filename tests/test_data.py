"""Text -> target tokens: layout, labels, truncation, and text of every odd kind."""

import json

import pytest

from dpg import DpgError
from dpg.data import builtin_texts, decode_bytes, encode_texts, read_texts
from dpg.models import byte_tokenizer

EOT = 256


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def row(ex, i):
    n = int(ex.attention_mask[i].sum())
    return ex.input_ids[i, :n].tolist(), ex.loss_mask[i, :n].tolist()


def test_layout_bos_text_eos_with_labels_on_text(tok):
    ex = encode_texts(tok, ["ab"], max_length=16)
    ids, labels = row(ex, 0)
    # GPT-2 byte ids: "a" = 64, "b" = 65; <|endoftext|> is both start and end.
    assert ids == [EOT, 64, 65, EOT]
    assert labels == [False, True, True, True]


def test_prompt_is_context_not_label(tok):
    ex = encode_texts(tok, ["b"], max_length=16, prompts=["a"])
    assert row(ex, 0) == ([EOT, 64, 65, EOT], [False, False, True, True])


def test_overlong_text_is_cut_and_overlong_prompt_cut_from_its_start(tok):
    ex = encode_texts(tok, ["abcdefgh"], max_length=5)
    assert row(ex, 0) == ([EOT, 64, 65, 66, 67], [False, True, True, True, True])
    ex = encode_texts(tok, ["g"], max_length=5, prompts=["abcdef"])
    # room for 4 after the start token: the text "g" + eos, then the last 2 prompt tokens.
    assert row(ex, 0) == ([EOT, 68, 69, 70, EOT], [False, False, False, True, True])


@pytest.mark.parametrize(
    "text",
    ["", "   ", "\n\t", "<|endoftext|>", "<|endoftext|><|endoftext|>", decode_bytes(b"\xff\xfe\x80ok"), "é" * 500],
)
def test_odd_text_always_gives_a_trainable_example(tok, text):
    ex = encode_texts(tok, [text, "fine"], max_length=32)
    ids, labels = row(ex, 0)
    assert 2 <= len(ids) <= 32 and any(labels) and not labels[0]
    # Text that spells the special token is trained on as characters, never as the token.
    assert EOT not in ids[1:-1]


def test_invalid_utf8_decodes_with_replacement():
    assert decode_bytes(b"a\xffb") == "a\ufffdb"


def test_padding_is_right_and_ragged(tok):
    ex = encode_texts(tok, ["a", "abcd"], max_length=16)
    assert ex.input_ids.shape == (2, 6)
    assert ex.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert not ex.loss_mask[0, 3:].any()


def test_bad_arguments(tok):
    with pytest.raises(DpgError, match="max_length"):
        encode_texts(tok, ["a"], max_length=1)
    with pytest.raises(DpgError, match="2 prompts for 1 texts"):
        encode_texts(tok, ["a"], max_length=8, prompts=["x", "y"])


def test_read_texts(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "one", "prompt": "p"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_texts(jl) == (["one", "two"], ["p", ""])
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"first\n\n  \nsecond \xff\n")
    assert read_texts(txt) == (["first", "second \ufffd"], None)
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(DpgError, match="holds no examples"):
        read_texts(tmp_path / "e.txt")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DpgError, match=r"b.jsonl:2: not valid JSON"):
        read_texts(tmp_path / "b.jsonl")
    (tmp_path / "f.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DpgError, match="'text' field"):
        read_texts(tmp_path / "f.jsonl")
    with pytest.raises(DpgError, match="data file not found"):
        read_texts(tmp_path / "none.jsonl")


def test_builtin_texts_are_deterministic_and_varied():
    a, b = builtin_texts(), builtin_texts()
    assert a == b and len(a) == 48 and len(set(a)) == 48
    assert any("!" in t for t in a) and any(not set(t) & set("!\"#$%&'") for t in a)
