"""Load a generator or target model and its tokenizer from one string.

    spec = "tiny-gpt2" | "tiny-llama"          offline presets: random weights from a fixed seed
         | "./dir" | "/abs/dir"                 a local Hugging Face checkpoint
         | "path/model.gguf"                    a GGUF file (transformers de-quantizes it)
         | "org/name"                           a Hugging Face hub id (online, or in the cache)

The presets need no downloaded file: they share a byte-level tokenizer whose 256 byte tokens
carry GPT-2's ids, so token ids mean the same thing as in GPT-2's vocabulary.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dpg.errors import DpgError

EOT = "<|endoftext|>"  # GPT-2's only special token; bos, eos and pad of the presets


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in GPT-2's order.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map
    to chr(256 + n) in byte order. Dict order is GPT-2's vocabulary order for ids 0..255.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 257-token byte-level tokenizer: one token per byte (GPT-2 ids 0..255) + <|endoftext|>.

    BPE with no merges is exactly "one token per byte", and reusing GPT-2's byte alphabet and
    pre-tokenizer means every string round-trips, and any id sequence decodes (bytes that
    are not valid UTF-8 become U+FFFD rather than raising).
    """
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab[EOT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT)


# Presets: name -> () -> (config, tokenizer). Untied LM heads by default, like the paper's
# target (GPT-2 with a separately trained head). Small enough for CPU tests in seconds.
_SPECIAL = dict(bos_token_id=256, eos_token_id=256, pad_token_id=256)


def _tiny_gpt2() -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    config = GPT2Config(vocab_size=257, n_positions=256, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False, **_SPECIAL)
    return config, byte_tokenizer()


def _tiny_llama() -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    config = LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in current Llama-family models
        max_position_embeddings=256, tie_word_embeddings=False, **_SPECIAL,
    )  # fmt: skip
    return config, byte_tokenizer()


_PRESETS: dict[str, Callable[[], tuple[PretrainedConfig, PreTrainedTokenizerBase]]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


@dataclass
class ModelConfig:
    """Which model to load (a generator or a target)."""

    model: str = "tiny-gpt2"  # preset (tiny-gpt2, tiny-llama), local directory, .gguf file or HF hub id
    seed: int = 0  # presets: seed of the random initialisation
    tie_word_embeddings: bool | None = None  # presets: tie the LM head to the input embeddings


def load(config: ModelConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """load_model for a ModelConfig."""
    return load_model(
        config.model, dtype=dtype, device=device, seed=config.seed, tie_word_embeddings=config.tie_word_embeddings
    )


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `spec`: model in eval mode, on `device` in `dtype`, with SDPA
    attention where supported; the tokenizer has a pad token and fits the model's vocabulary.

    `seed` fixes a preset's random weights; `tie_word_embeddings` overrides a preset's tying
    (for a loaded model it may only restate what the checkpoint has). The caller's CPU RNG
    state is left as it was.
    """
    # Only the CPU generator is forked and seeded: every model is built or loaded on the CPU,
    # and torch.manual_seed would also reseed every CUDA device, which fork_rng(devices=[])
    # would not restore (forking all devices instead would open a context on each GPU).
    with torch.random.fork_rng(devices=[]):
        if spec in _PRESETS:
            config, tokenizer = _PRESETS[spec]()
            if tie_word_embeddings is not None:
                config.tie_word_embeddings = tie_word_embeddings
            torch.default_generator.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        else:
            model, tokenizer = _load_pretrained(spec, dtype)
            if tie_word_embeddings is not None and tie_word_embeddings != _is_tied(model):
                raise DpgError(
                    f"tie_word_embeddings={tie_word_embeddings} was given for {spec!r}, whose LM head is "
                    f"{'tied' if _is_tied(model) else 'untied'}; tying can only be chosen for presets {PRESETS}"
                )
    model = model.to(device=device, dtype=dtype).eval()
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError, NotImplementedError):
        pass  # architectures without an SDPA path keep their default attention

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DpgError(f"tokenizer of {spec!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise DpgError(
            f"tokenizer and model vocabularies do not match for {spec!r}: "
            f"the tokenizer has {len(tokenizer)} tokens, the model embeds {rows}"
        )
    return model, tokenizer


def _is_tied(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name", so one "/" alone does not make a path.
    seps = {os.sep, os.altsep} - {None, "/"}
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(".gguf")
        or spec.count("/") > 1
        or any(s in spec for s in seps)
    )


def _load_pretrained(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.exists():
        raise DpgError(f"model not found: {spec} (no such file or directory)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise DpgError(f"model file {spec} is not a .gguf file; give a .gguf file or a checkpoint directory")
        if importlib.util.find_spec("gguf") is None:
            raise DpgError(f"loading {spec} needs the gguf package: pip install 'dpg[gguf]'")
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        where, kwargs = str(path) if path.exists() else spec, {}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if path.exists():
            raise DpgError(f"could not load model from {spec}: {first}") from e
        raise DpgError(f"model {spec!r} could not be found locally or on the Hugging Face hub: {first}") from e
    return model, tokenizer
