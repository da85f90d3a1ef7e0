"""Text in, target token batches out.

Every text the target trains or is measured on goes through `encode_texts`: it cannot fail
on odd generated text (empty, whitespace, invalid UTF-8 decoded with replacement characters,
lone surrogates, only special-token strings, longer than the limit); it truncates and always
leaves at least one label token, so the engine's loss is defined for every example.

Layout of one example:  [bos] prompt... text... [eos]   labels on text and eos.
`bos` is the tokenizer's BOS token, else its EOS token (GPT-2 style separator), else none.

Prompts in, generator inputs out: `load_prompts` (file or built-in, template, held-out
split), `as_chat` (messages for a chat template) and `ascii_only` (tokens a byte-level
generator must not sample), shared by dpg train and dpg evaluate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpg.errors import DpgError
from dpg.metagrad.engine import Examples, make_examples


def encode_texts(
    tokenizer, texts: Sequence[str], max_length: int, prompts: Sequence[str] | None = None
) -> Examples:
    """Tokenize `texts` (and optional `prompts` before them, not trained on) for the target."""
    if max_length < 2:
        raise DpgError(f"max_length must be at least 2 (a start token and one label), got {max_length}")
    if prompts is not None and len(prompts) != len(texts):
        raise DpgError(f"{len(prompts)} prompts for {len(texts)} texts")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    end = tokenizer.eos_token_id
    head = [start] if start is not None else []
    tail = [end] if end is not None else []
    ids, masks = [], []
    for i, text in enumerate(texts):
        # split_special_tokens: text that spells "<|endoftext|>" is trained on as text, so
        # generated strings can never inject control tokens into the target's data.
        body = _tokens(tokenizer, text) + tail
        if not body:
            raise DpgError(f"text {i} is empty and the tokenizer has no EOS token to train on")
        room = max_length - len(head)
        body = body[:room]  # over-long text is cut at the end...
        prompt = _tokens(tokenizer, prompts[i]) if prompts is not None else []
        # ...a prompt at its start
        prompt = prompt[max(0, len(prompt) - (room - len(body))) :] if room > len(body) else []
        seq = head + prompt + body
        label = [False] * (len(head) + len(prompt)) + [True] * len(body)
        label[0] = False  # nothing precedes the first token to predict it
        if not any(label):
            raise DpgError(f"text {i} leaves no token to train on within max_length = {max_length}")
        ids.append(seq)
        masks.append(label)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (end or 0)
    return make_examples(ids, masks, pad_id=pad)


def _tokens(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return tokenizer(valid_unicode(text), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def valid_unicode(text: str) -> str:
    """`text` as UTF-8 can hold it: surrogate code points, which Rust tokenizers refuse,
    are paired into the character they spell or, alone, become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def decode_bytes(data: bytes) -> str:
    """Bytes to text, never failing: invalid UTF-8 becomes U+FFFD."""
    return data.decode("utf-8", errors="replace")


def utf8_text(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 (Latin-1, UTF-16, ...) is an error that
    names the file and the first bad byte, rather than text silently full of U+FFFD."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is not text
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DpgError(
            f"{path} is not UTF-8: byte {err.start} (line {line}) is {data[err.start : err.start + 1]!r}. "
            f"Convert it, e.g. iconv -f latin1 -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)}"
        ) from None


def row_slice(spec: str, key: str) -> slice:
    """Rows of a text source as a Python slice "start:stop" (e.g. "-256:"); `key` names the
    setting in the error."""
    try:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(parts) != 2:
            raise ValueError
    except ValueError:
        raise DpgError(f"{key} must be a slice 'start:stop' of integers, got {spec!r}") from None
    return slice(*parts)


def read_texts(path: str | Path, field: str = "text") -> tuple[list[str], list[str] | None]:
    """Texts from a file. Returns (texts, prompts or None).

    .jsonl/.json  one object per line with `field` (and an optional "prompt")
    .parquet      column `field`
    .tsv          column `field`, by name (first row is a header) or by number ("0", "1")
    other         plain text: blocks separated by blank lines (fortune files), or one per
                  line if the file has no blank line
    """
    path = Path(path)
    if not path.is_file():
        raise DpgError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        texts, prompts = _parquet_column(path, field), None
    else:
        raw = utf8_text(path)
        if path.suffix in (".jsonl", ".json"):
            texts, prompts = _jsonl(path, raw, field)
        elif path.suffix == ".tsv":
            texts, prompts = _tsv_column(path, raw, field), None
        else:
            blocks = [b.strip() for b in re.split(r"\n\s*\n", raw) if b.strip()]
            texts = blocks if len(blocks) > 1 else [line for line in raw.splitlines() if line.strip()]
            prompts = None
    if not texts:
        raise DpgError(f"{path} holds no examples")
    return texts, prompts


def _jsonl(path: Path, raw: str, field: str) -> tuple[list[str], list[str] | None]:
    texts, prompts = [], []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DpgError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or field not in row:
            raise DpgError(f"{path}:{n}: expected an object with a {field!r} field")
        texts.append(str(row[field]))
        prompts.append(str(row.get("prompt", "")))
    return texts, (prompts if any(prompts) else None)


def _tsv_column(path: Path, raw: str, field: str) -> list[str]:
    rows = [line.split("\t") for line in raw.splitlines() if line.strip()]
    if field.isdigit():
        col = int(field)
    elif rows and field in rows[0]:
        col, rows = rows[0].index(field), rows[1:]
    else:
        raise DpgError(f"{path}: no column {field!r} (give a header name or a column number)")
    if any(len(r) <= col for r in rows):
        raise DpgError(f"{path}: some rows have no column {col}")
    return [r[col] for r in rows if r[col].strip()]


def _parquet_column(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise DpgError(f"{path}: no column {field!r} (has {table.column_names})")
    return [str(x) for x in table.column(field).to_pylist() if x is not None and str(x).strip()]


_WORDS = (
    "the data model learns from every example it sees and each one moves its weights a little "
    "some push toward the goal while others pull away small changes add up over many steps"
).split()
_MARKS = "!\"#$%&'"  # GPT-2 (and the presets') token ids 0..6: the "67" pattern's vocab columns


def builtin_texts(n: int = 48, seed: int = 0) -> list[str]:
    """Deterministic short texts for runs without a data file: words mixed with the marks
    whose token ids the default pattern block covers, in varying amounts."""
    import random

    rng = random.Random(seed)
    texts = []
    for i in range(n):
        marks = i % 4  # a quarter without marks, the rest with one to three kinds
        words = []
        for _ in range(rng.randint(4, 12)):
            word = rng.choice(_WORDS)
            if marks and rng.random() < 0.4:
                word += "".join(rng.choice(_MARKS[: marks * 2 + 1]) for _ in range(rng.randint(1, 3)))
            words.append(word)
        texts.append(" ".join(words))
    return texts


def distinct_share(texts: list[str]) -> float:
    """Distinct texts / texts: near 1 for a diverse generator, near 0 for a collapsed one."""
    return len(set(texts)) / max(len(texts), 1)


def distinct_ngrams(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams / word n-grams over all texts ("distinct-n", Li et al. 2016; words
    split at whitespace); 1.0 where no text has n words. Near 1 for varied texts; it falls when
    a policy writes one template with small changes, which distinct_share (whole texts) misses."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def completion_text(completion) -> str:
    """TRL hands reward functions plain strings, or for chat models a list of messages
    [{"role": "assistant", "content": ...}]: the text either way."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(_content(m) if isinstance(m, dict) else str(m) for m in completion)
    if isinstance(completion, dict):
        return _content(completion)
    raise DpgError(f"cannot read a completion of type {type(completion).__name__}")


def _content(message: dict) -> str:
    content = message.get("content")
    return "" if content is None else str(content)  # a message without text (e.g. a tool call) has None


def builtin_prompts(n: int = 64, seed: int = 7) -> list[str]:
    """Short prompts for runs without a prompt file: the first words of built-in texts."""
    return [" ".join(t.split()[:3]) for t in builtin_texts(n, seed)]


@dataclass
class PromptConfig:
    """What the generator is asked."""

    file: str | None = None  # JSONL / Parquet / TSV / text file of prompts; none: built-in short prompts
    field: str = "prompt"  # JSONL or Parquet field, TSV column name or number
    template: str = "{prompt}"  # the prompt the generator sees; {prompt} is the file's text
    chat: bool = False  # send it as a user message through the generator's chat template (instruct models)
    limit: int | None = None  # use only the first this many prompts
    heldout: int = 16  # the last prompts, kept out of training for `dpg evaluate`
    max_tokens: int | None = None  # cut each prompt (before the template) to its first this many generator tokens


def load_prompts(cfg: PromptConfig, tokenizer=None) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), each already through the template; with
    `prompts.max_tokens` and the generator's `tokenizer`, each cut to its first tokens."""
    texts = read_texts(cfg.file, cfg.field)[0] if cfg.file else builtin_prompts()
    texts = texts[: cfg.limit] if cfg.limit else texts
    if cfg.max_tokens is not None and tokenizer is not None:
        texts, cut = truncate_prompts(texts, tokenizer, cfg.max_tokens)
        if cut:
            print(f"prompts.max_tokens = {cfg.max_tokens}: cut {cut} of {len(texts)} prompts to their first tokens")
    if len(texts) <= cfg.heldout:
        raise DpgError(f"{len(texts)} prompts leave none for training after prompts.heldout = {cfg.heldout}")
    try:
        prompts = [cfg.template.format(prompt=t) for t in texts]
    except (KeyError, IndexError, ValueError) as err:
        raise DpgError(f"prompts.template {cfg.template!r} is not a valid template with {{prompt}}: {err}") from None
    return prompts[: len(prompts) - cfg.heldout], prompts[len(prompts) - cfg.heldout :]


def truncate_prompts(texts: list[str], tokenizer, max_tokens: int) -> tuple[list[str], int]:
    """Each text cut to its first `max_tokens` tokens (its start kept: the question comes
    first), decoded back to text; and how many were cut."""
    if max_tokens < 1:
        raise DpgError(f"prompts.max_tokens must be at least 1, got {max_tokens}")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = [tokenizer.decode(x[:max_tokens]) if len(x) > max_tokens else t for t, x in zip(texts, ids)]
    return out, sum(len(x) > max_tokens for x in ids)


def as_chat(prompts: list[str], chat: bool) -> list:
    """TRL treats a list of messages as a conversation and applies the chat template."""
    return [[{"role": "user", "content": p}] for p in prompts] if chat else prompts


def ascii_only(tokenizer) -> list[int]:
    """Token ids a byte-level tokenizer should never sample for printable-ASCII text."""
    keep = set(range(0x20, 0x7F)) | {ord("\n")}
    suppress = []
    for token_id in range(len(tokenizer)):
        if token_id in tokenizer.all_special_ids:
            continue
        raw = tokenizer.decode([token_id]).encode("utf-8", errors="replace")
        if not raw or any(b not in keep for b in raw):
            suppress.append(token_id)
    return suppress
