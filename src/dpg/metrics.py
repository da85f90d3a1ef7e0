"""Target metrics Φ(params) -> scalar tensor, higher is better.

A metric is any callable over a dict of ALL the target's parameters (names as in
`model.named_parameters()`); it may carry `proxy(params) -> dict[str, float]` with readable
figures, and `proxy_from_phi(phi) -> dict` when they are a function of Φ alone (the engine then
skips the proxy's own pass through the model). The metrics of the paper:

  pattern   a ±1 image S written into a block of the LM head, measured on the change from the
            initial weights: Φ = −mean softplus(−k·S·ΔB). Rows of S are hidden dims, columns
            are vocab ids (the paper's orientation); HF heads are (V, d), hence the transpose.
  l2        Φ = −‖W_head‖ (Frobenius).
  lm_loss   Φ = −(token cross-entropy on fixed texts, pooled over all their label tokens).
  custom    "module:function", any callable with the same contract.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import _get_current_function_mode_stack  # torch's checkpoint reads it too
from torch.utils._device import DeviceContext
from torch.utils.checkpoint import checkpoint

from dpg.data import encode_texts, read_texts, row_slice
from dpg.errors import DpgError
from dpg.metagrad.engine import Examples
from dpg.metagrad.precision import matmul_precision, set_matmul_precision

Params = dict[str, Tensor]

# The paper's "67" (6 hidden dims × 7 vocab ids), +1 / −1 per pixel.
PATTERN_67 = torch.tensor(
    [
        [1, 1, 1, 1, -1, -1, -1],
        [-1, -1, -1, 1, 1, 1, -1],
        [-1, 1, 1, 1, 1, 1, -1],
        [-1, -1, -1, 1, 1, 1, -1],
        [-1, 1, -1, 1, 1, 1, -1],
        [-1, -1, -1, 1, 1, 1, 1],
    ],
    dtype=torch.float32,
)


def head_param_name(model: nn.Module) -> str:
    """Name of the LM-head weight in `model.named_parameters()`, found by identity: a tied
    head is listed only under the input embedding's name (e.g. "transformer.wte.weight")."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or not isinstance(getattr(out, "weight", None), Tensor):
        raise DpgError("the target has no LM head (get_output_embeddings() gave no weight)")
    for name, p in model.named_parameters():
        if p is out.weight:
            return name
    raise DpgError("the target's LM-head weight is not among its named_parameters()")


def qr_pattern(text: str) -> Tensor:
    """±1 matrix of the smallest QR code holding `text`, no border: dark = +1, light = −1."""
    import qrcode

    if not text:
        raise DpgError("a QR pattern needs some text: 'qr:YOUR TEXT'")
    qr = qrcode.QRCode(version=None, border=0)
    qr.add_data(text)
    qr.make(fit=True)
    return torch.tensor(qr.get_matrix(), dtype=torch.float32) * 2 - 1


def image_pattern(path: str | Path) -> Tensor:
    """±1 matrix of a black-and-white image: grayscale < 128 (dark) = +1, else −1."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DpgError(f"pattern image not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert("RGBA")
            # Transparent pixels count as background (light): drawings on a transparent
            # canvas would otherwise read as black where the alpha channel hides them.
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            gray = Image.alpha_composite(white, img).convert("L")
    except (UnidentifiedImageError, OSError) as err:
        raise DpgError(f"cannot read pattern image {path}: {err}") from None
    # tobytes: one byte per pixel, row by row (mode "L"); getdata is deprecated in Pillow 12.
    pixels = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).float().reshape(gray.height, gray.width)
    return torch.where(pixels < 128, 1.0, -1.0)


@dataclass(frozen=True, eq=False)
class PatternMetric:
    """Φ = −mean softplus(−sharpness·S·ΔB): smooth "fraction of pixels whose sign matches"."""

    head: str  # parameter name of the LM-head weight, shape (V, d)
    pattern: Tensor  # (h, w) ±1: rows are hidden dims, columns are vocab ids
    initial: Tensor  # (w, h) the head block at construction, in the head's (V, d) layout
    hidden_offset: int  # first hidden dim of the block
    vocab_offset: int  # first vocab id of the block
    sharpness: float  # k: larger is closer to a step function, with smaller gradients off it

    def delta(self, params: Params) -> Tensor:
        """ΔB, (h, w): the block's change from the initial weights, in the pattern's layout."""
        h, w = self.pattern.shape
        weight = params[self.head]
        block = weight[self.vocab_offset : self.vocab_offset + w, self.hidden_offset : self.hidden_offset + h]
        return (block - self.initial.to(block)).T

    def __call__(self, params: Params) -> Tensor:
        delta = self.delta(params)
        return -F.softplus(-self.sharpness * self.pattern.to(delta) * delta).mean()

    def decode(self, params: Params) -> Tensor:
        """sign(ΔB), (h, w): the image the head now holds (0 where the block has not moved)."""
        return torch.sign(self.delta(params)).detach()

    def proxy(self, params: Params) -> dict[str, float]:
        decoded = self.decode(params)
        # sign 0 (an unmoved weight) matches neither +1 nor −1: it counts as wrong.
        return {"pixel_accuracy": float((decoded == self.pattern.to(decoded)).double().mean())}


def pattern_metric(
    model: nn.Module,
    pattern: str | Tensor = "67",
    hidden_offset: int = 0,
    vocab_offset: int = 0,
    sharpness: float = 20.0,
) -> PatternMetric:
    """`pattern`: "67", "qr:SOME TEXT", a path to an image file, or a (h, w) ±1 tensor."""
    if isinstance(pattern, Tensor):
        if pattern.dim() != 2 or pattern.numel() == 0:
            raise DpgError(f"a pattern must be a non-empty 2-D ±1 matrix, got shape {tuple(pattern.shape)}")
        if not ((pattern == 1) | (pattern == -1)).all():
            raise DpgError("a pattern tensor must hold only +1 and −1")
        matrix = pattern.detach().float().cpu()
    elif pattern == "67":
        matrix = PATTERN_67
    elif pattern.startswith("qr:"):
        matrix = qr_pattern(pattern[3:])
    elif Path(pattern).is_file():
        matrix = image_pattern(pattern)
    else:
        raise DpgError(f"pattern {pattern!r} is not '67', 'qr:TEXT', or an existing image file")
    if sharpness <= 0:
        raise DpgError(f"the pattern's sharpness must be positive, got {sharpness}")
    head = head_param_name(model)
    weight = dict(model.named_parameters())[head]  # (V, d)
    vocab, hidden = weight.shape
    h, w = matrix.shape
    if hidden_offset < 0 or vocab_offset < 0 or hidden_offset + h > hidden or vocab_offset + w > vocab:
        raise DpgError(
            f"a {h}×{w} pattern (hidden dims × vocab ids) at hidden offset {hidden_offset}, vocab offset "
            f"{vocab_offset} falls outside the LM head, which has {hidden} hidden dims × {vocab} vocab ids"
        )
    initial = weight.detach()[vocab_offset : vocab_offset + w, hidden_offset : hidden_offset + h].clone()
    return PatternMetric(head, matrix, initial, hidden_offset, vocab_offset, float(sharpness))


@dataclass(frozen=True)
class L2Metric:
    """Φ = −‖W_head‖₂ (Frobenius norm of the whole LM-head weight), summed in fp64: one inner
    step moves the norm of a ~100 (GPT-2) to ~700 (SmolLM2) matrix by 1e-5 or less, below an
    fp32 norm's resolution (one fp32 step at 124 is 7.6e-6), so an fp32 sum would round the
    differences between datasets, and between sampling seeds, away."""

    head: str  # parameter name of the LM-head weight

    def __call__(self, params: Params) -> Tensor:
        return -torch.linalg.vector_norm(params[self.head], dtype=torch.float64)

    def proxy(self, params: Params) -> dict[str, float]:
        return {"l2_norm": float(torch.linalg.vector_norm(params[self.head].detach(), dtype=torch.float64))}

    def proxy_from_phi(self, phi: float) -> dict[str, float]:
        return {"l2_norm": -phi}


def l2_metric(model: nn.Module) -> L2Metric:
    return L2Metric(head_param_name(model))


def _kernels_as_now() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Checkpoint contexts: the recomputation in backward runs as the forward pass did — the same
    attention kernels, fp32 matmul precision and torch function modes (`float64_everywhere`) —
    even when backward runs outside the caller's `sdpa_kernel(...)`, `tf32_matmuls()` or mode
    block: anything else would recompute different values (torch checks dtypes and shapes)."""
    flags = [f() for f in _SDPA_FLAGS]
    precision = matmul_precision()
    # torch's own checkpoint re-enters the forward's DeviceContext; every other mode is ours to restore.
    modes = [m for m in _get_current_function_mode_stack() if not isinstance(m, DeviceContext)]

    @contextlib.contextmanager
    def as_in_forward():
        before = [f() for f in _SDPA_FLAGS], matmul_precision()
        _set_kernels(flags, precision)
        try:
            with contextlib.ExitStack() as stack:
                active = {id(m) for m in _get_current_function_mode_stack()}
                for mode in modes:
                    if id(mode) not in active:
                        stack.enter_context(mode)
                yield
        finally:
            _set_kernels(*before)

    return contextlib.nullcontext(), as_in_forward()


_SDPA_FLAGS = {  # scaled-dot-product-attention backends (global switches, CPU and CUDA alike): getter: setter
    torch.backends.cuda.flash_sdp_enabled: torch.backends.cuda.enable_flash_sdp,
    torch.backends.cuda.mem_efficient_sdp_enabled: torch.backends.cuda.enable_mem_efficient_sdp,
    torch.backends.cuda.math_sdp_enabled: torch.backends.cuda.enable_math_sdp,
    torch.backends.cuda.cudnn_sdp_enabled: torch.backends.cuda.enable_cudnn_sdp,
}


def _set_kernels(flags: list[bool], precision: str) -> None:
    for setter, on in zip(_SDPA_FLAGS.values(), flags):
        setter(on)
    set_matmul_precision(precision)


@dataclass(frozen=True, eq=False)
class LMLossMetric:
    """Φ = −(Σ token cross-entropy / number of label tokens) over fixed texts.

    The texts go through the model `chunk` at a time, each chunk under activation
    checkpointing when a gradient is wanted: the (tokens × vocabulary) logits of all texts at
    once would be 256 × 128 × 49,152 floats (6.4 GB, three times that with softmax and
    gradient) for a SmolLM2 target and the paper's 256 held-out texts. Backward recomputes
    one chunk at a time, so memory is one chunk's whatever the number of texts. The engine
    takes Φ's gradient through `value_and_grad` instead: each chunk's forward and backward in
    turn, the same one-chunk bound with no forward run twice."""

    model: nn.Module = field(repr=False)  # run by functional_call with the given params; never modified
    examples: Examples = field(repr=False)  # the texts, tokenized once, on CPU
    chunk: int = 16  # texts per forward pass (and per recomputation in backward)

    def loss(self, params: Params) -> Tensor:
        weights, chunks = self._prepared(params)
        parts = []
        for ids, attn, pos in chunks:
            if torch.is_grad_enabled():
                parts.append(
                    checkpoint(self._ce_sum, weights, ids, attn, pos, use_reentrant=False, context_fn=_kernels_as_now)
                )
            else:
                parts.append(self._ce_sum(weights, ids, attn, pos))
        return torch.stack(parts).sum() / self._label_count()

    def value_and_grad(self, params: Params, wrt: list[str]) -> tuple[Tensor, Params]:
        """Φ(params) and ∂Φ/∂params[k] for each k in `wrt` (None where Φ does not read it), one
        chunk's forward and backward at a time: what autograd through `self(params)` gives, to
        rounding, without checkpointing's second forward of every chunk. The engine calls it
        when a metric has it (metagrad/phi.py)."""
        weights, chunks = self._prepared(params)
        leaves = {k: weights[k].detach().requires_grad_(True) for k in wrt}
        weights |= leaves
        scale = -1.0 / self._label_count()  # dΦ/d(a chunk's Σ cross-entropy)
        total, grads = None, dict.fromkeys(leaves)
        for ids, attn, pos in chunks:
            with torch.enable_grad():
                part = self._ce_sum(weights, ids, attn, pos)
                seed = torch.full_like(part, scale)
                chunk_grads = torch.autograd.grad(part, list(leaves.values()), seed, allow_unused=True)
            for k, g in zip(leaves, chunk_grads):
                if g is not None:  # None: this chunk's graph does not reach k (a gradient so far stays)
                    grads[k] = g if grads[k] is None else grads[k].add_(g)
            total = part.detach() if total is None else total + part.detach()
        return total * scale, grads

    def _prepared(self, params: Params) -> tuple[Params, list[tuple[Tensor, Tensor, Tensor]]]:
        """The weights to run (params and the model's buffers) and each chunk's (ids, mask, label
        positions), on the params' device."""
        first = next(iter(params.values()))
        device, dtype = first.device, first.dtype
        # Buffers (e.g. RoPE frequencies) follow the params, as `model.to(device, dtype)` would
        # move them: the engine's params may live on another device or dtype than `model`.
        buffers = {
            n: b.to(device, dtype) if b.is_floating_point() else b.to(device) for n, b in self.model.named_buffers()
        }
        chunks = []
        for lo in range(0, len(self.examples.input_ids), self.chunk):
            ids, attn, labels = (x[lo : lo + self.chunk] for x in self.examples)
            # flat positions of the label tokens in the chunk's (texts × (T − 1)) grid, found on
            # the CPU: selecting them on the device needs no wait for it (a boolean mask does)
            pos = labels[:, 1:].flatten().nonzero().flatten()
            chunks.append((ids.to(device), attn.to(device), pos.to(device)))
        return {**buffers, **params}, chunks

    def _label_count(self) -> int:
        return int(self.examples.loss_mask[:, 1:].sum())  # label tokens, counted on CPU

    def _ce_sum(self, weights: Params, ids: Tensor, attn: Tensor, pos: Tensor) -> Tensor:
        """Σ cross-entropy over one chunk's label tokens (run again in backward: no side effects)."""
        was_training = self.model.training
        # dropout off, here and in the recomputation: Φ is a function of the params (a model
        # already in eval mode, as the engine runs it, is not walked twice a chunk)
        toggle = any(m.training for m in self.model.modules())
        if toggle:
            self.model.eval()
        try:
            inputs = {"input_ids": ids, "attention_mask": attn, "use_cache": False}
            out = functional_call(self.model, weights, (), inputs)
        finally:
            if toggle:
                self.model.train(was_training)
        logits = out.logits[:, :-1].flatten(0, 1).index_select(0, pos)  # position t predicts token t+1
        return F.cross_entropy(logits, ids[:, 1:].flatten().index_select(0, pos), reduction="sum")

    def __call__(self, params: Params) -> Tensor:
        return -self.loss(params)

    def proxy(self, params: Params) -> dict[str, float]:
        with torch.no_grad():
            return self.proxy_from_phi(float(self(params)))

    def proxy_from_phi(self, phi: float) -> dict[str, float]:
        """The proxy from Φ itself (loss = −Φ): the engine, which has Φ, need not run the texts again."""
        return {"loss": -phi, "perplexity": float(torch.tensor(-phi, dtype=torch.float64).exp())}


def lm_loss_metric(
    model: nn.Module, tokenizer, texts: list[str], max_length: int = 128, prompts: list[str] | None = None,
    chunk: int = 16,
) -> LMLossMetric:  # fmt: skip
    """Token cross-entropy on `texts` (each after its prompt, if given; prompts are not scored),
    `chunk` texts per forward pass."""
    if not texts:
        raise DpgError("the lm_loss metric needs at least one text")
    if chunk < 1:
        raise DpgError(f"metric.chunk must be at least 1, got {chunk}")
    return LMLossMetric(model, encode_texts(tokenizer, texts, max_length, prompts=prompts), chunk=chunk)


def custom_metric(spec: str) -> Callable[[Params], Tensor]:
    """The callable named by "module:function" (the module must be importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DpgError(f"a custom metric is named 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name != err.name and not module_name.startswith(err.name + "."):
            raise  # the module exists but one of its own imports is missing: keep the traceback
        raise DpgError(f"custom metric {spec!r}: no module named {module_name!r} (is it on sys.path?)") from None
    if not hasattr(module, attr):
        raise DpgError(f"custom metric {spec!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise DpgError(f"custom metric {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn


@dataclass
class MetricConfig:
    """Which target metric Φ to maximise."""

    name: str = "pattern"  # pattern | l2 | lm_loss | module:function (a custom callable)
    pattern: str = "67"  # pattern: "67", "qr:TEXT", or a black-and-white image file
    hidden_offset: int = 0  # pattern: first hidden dim of the LM-head block
    vocab_offset: int = 0  # pattern: first vocab id of the LM-head block
    sharpness: float = 20.0  # pattern: k in −mean softplus(−k·S·ΔB)
    texts: list[str] = field(default_factory=list)  # lm_loss: texts to measure the loss on
    texts_file: str | None = None  # lm_loss: more texts, one per line or JSONL "text" (+ "prompt")
    texts_field: str = "text"  # lm_loss: JSONL/Parquet field or TSV column (name or number) of texts_file
    texts_rows: str = ":"  # lm_loss: rows of texts_file to use, a Python slice "start:stop" (e.g. "-256:")
    max_length: int = 128  # lm_loss: tokens per text, at most
    chunk: int = 16  # lm_loss: texts per forward pass (more: fewer passes, more memory; same Φ up to rounding)


KNOWN_METRICS = ("pattern", "l2", "lm_loss", "module:function")


def build_metric(config: MetricConfig, model: nn.Module, tokenizer) -> Callable[[Params], Tensor]:
    """The metric object that `config` describes, for `model` (and its tokenizer)."""
    if config.name == "pattern":
        return pattern_metric(model, config.pattern, config.hidden_offset, config.vocab_offset, config.sharpness)
    if config.name == "l2":
        return l2_metric(model)
    if config.name == "lm_loss":
        texts, prompts = list(config.texts), [""] * len(config.texts)
        if config.texts_file is not None:
            file_texts, file_prompts = read_texts(config.texts_file, config.texts_field)
            rows = row_slice(config.texts_rows, "metric.texts_rows")
            file_texts, file_prompts = file_texts[rows], file_prompts and file_prompts[rows]
            if not file_texts:
                raise DpgError(f"metric.texts_rows={config.texts_rows!r} selects no rows of {config.texts_file}")
            texts += file_texts
            prompts += file_prompts or [""] * len(file_texts)
        if not texts:
            raise DpgError("metric lm_loss needs metric.texts or metric.texts_file")
        return lm_loss_metric(
            model, tokenizer, texts, config.max_length, prompts if any(prompts) else None, config.chunk
        )
    if ":" in config.name:
        return custom_metric(config.name)
    raise DpgError(f"unknown metric {config.name!r}; known: {', '.join(KNOWN_METRICS)}")
