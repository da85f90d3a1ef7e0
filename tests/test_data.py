"""Text -> target tokens: layout, labels, truncation, and text of every odd kind."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpg import DpgError
from dpg.data import (
    builtin_texts, completion_text, decode_bytes, distinct_ngrams, distinct_share, encode_texts, read_texts,
    valid_unicode,
)  # fmt: skip
from dpg.models import byte_tokenizer, bytes_to_unicode

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
    ["", "   ", "\n\t", "<|endoftext|>", "<|endoftext|><|endoftext|>", decode_bytes(b"\xff\xfe\x80ok"), "é" * 500,
     "a\ud800b", "\udfff", "\x00", "<|endoftext|>" * 40],
)  # fmt: skip
def test_odd_text_always_gives_a_trainable_example(tok, text):
    ex = encode_texts(tok, [text, "fine"], max_length=32)
    ids, labels = row(ex, 0)
    assert 2 <= len(ids) <= 32 and any(labels) and not labels[0]
    # Text that spells the special token is trained on as characters, never as the token.
    assert EOT not in ids[1:-1]


def test_invalid_utf8_decodes_with_replacement():
    assert decode_bytes(b"a\xffb") == "a\ufffdb"


def test_surrogates_pair_into_their_character_or_become_replacement(tok):
    assert valid_unicode("a\ud800b") == "a\ufffdb" and valid_unicode("\udfff\ud800") == "\ufffd\ufffd"
    assert valid_unicode("\ud83d\ude00") == "\U0001f600"  # a UTF-16 pair spells one character
    # U+FFFD is UTF-8 EF BF BD: GPT-2 byte ids 171, 123, 121.
    assert row(encode_texts(tok, ["a\ud800"], 16), 0)[0] == [EOT, 64, 171, 123, 121, EOT]


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
    txt.write_bytes(b"first\n\n  \nsecond\n")
    assert read_texts(txt) == (["first", "second"], None)
    txt.write_bytes(b"first\n\n  \nsecond \xff\n")  # not UTF-8: an error naming the byte, not silent U+FFFD
    with pytest.raises(DpgError, match=r"d.txt is not UTF-8: byte 17 \(line 4\) is b'\\xff'"):
        read_texts(txt)
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


def test_completion_text_of_every_shape():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": None}]) == "a"
    assert completion_text({"role": "assistant", "content": None}) == ""
    with pytest.raises(DpgError, match="cannot read a completion of type int"):
        completion_text(3)


# ---- fuzz: any text, with any prompt, at any limit, gives the layout worked out by hand ----

BYTE_ID = {b: i for i, b in enumerate(bytes_to_unicode())}  # GPT-2's id of each byte


def by_hand_unicode(text: str) -> str:
    """A UTF-16 surrogate pair becomes its character, a lone surrogate U+FFFD."""
    out, i = [], 0
    while i < len(text):
        c = ord(text[i])
        low = ord(text[i + 1]) if i + 1 < len(text) else 0
        if 0xD800 <= c < 0xDC00 and 0xDC00 <= low < 0xE000:
            out.append(chr(0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00)))
            i += 2
            continue
        out.append("\ufffd" if 0xD800 <= c < 0xE000 else text[i])
        i += 1
    return "".join(out)


def expected_row(text: str, prompt: str, max_length: int) -> tuple[list[int], list[bool]]:
    """[EOT] prompt text [EOT]: text and EOT cut at the end, the prompt cut at its start."""
    ids = lambda s: [BYTE_ID[b] for b in by_hand_unicode(s).encode("utf-8")]  # noqa: E731
    body = (ids(text) + [EOT])[: max_length - 1]
    room = max_length - 1 - len(body)
    context = ids(prompt)[-room:] if room else []
    return [EOT, *context, *body], [False] * (1 + len(context)) + [True] * len(body)


ODD = st.sampled_from(
    ["<|endoftext|>", "<|endoftext", " ", "\n", "\t", "é", "\x00", "\ufffd", "\U0001f600", "\ud83d", "\ude00"]
)
TEXT = (
    st.text(alphabet=st.characters(exclude_categories=()), max_size=40)  # surrogates included
    | st.lists(ODD, max_size=8).map("".join)
    | st.binary(max_size=40).map(decode_bytes)  # invalid UTF-8 from bytes
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4),
    max_length=st.integers(2, 40),
    with_prompts=st.booleans(),
)
def test_fuzz_any_text_gives_the_layout_by_hand(tok, rows, max_length, with_prompts):
    texts, prompts = [t for t, _ in rows], [p for _, p in rows]
    ex = encode_texts(tok, texts, max_length, prompts=prompts if with_prompts else None)
    assert ex.input_ids.shape[1] <= max_length
    assert int(ex.input_ids.min()) >= 0 and int(ex.input_ids.max()) < len(tok)
    for i, (text, prompt) in enumerate(rows):
        assert row(ex, i) == expected_row(text, prompt if with_prompts else "", max_length)


def test_distinct_ngrams_by_hand():
    texts = ["a b c", "a b d", "x"]  # bigrams (a b) (b c) (a b) (b d); words a b c a b d x
    assert distinct_ngrams(texts, 2) == 3 / 4
    assert distinct_ngrams(texts, 1) == 5 / 7
    assert distinct_ngrams(texts, 3) == 1.0  # (a b c), (a b d)
    assert distinct_ngrams(["one", ""], 2) == distinct_ngrams([], 2) == 1.0  # no bigram: nothing repeats
    assert distinct_ngrams(["a\tb\n c"], 2) == 1.0  # any whitespace splits words


def test_distinct_ngrams_sees_a_template_that_distinct_share_misses():
    """One template with one word changed: every text distinct, most bigrams repeated."""
    texts = [f"Lua Converter price {i} Mbps server" for i in range(10)]
    assert distinct_share(texts) == 1.0
    # 5 bigrams a text; "Lua Converter", "Converter price", "Mbps server" are shared by all ten
    assert distinct_ngrams(texts, 2) == (3 + 2 * 10) / 50
