"""float64_everywhere: run a model truly in fp64 for exactness checks.

HF models cast to fp32 inside some layers even when their weights are fp64 (Llama's RMSNorm
and rotary tables, the eager attention softmax). That leaves ~1e-7 relative noise in a
"float64" forward, which is harmless for training but ruins finite differences: the noise
divided by the step h swamps the derivative. Inside this context every cast to a lower
float precision (`.to(float32)`, `.float()`, `dtype=torch.float32` arguments) is promoted to
fp64, so the whole computation is fp64 and finite differences reach 1e-8.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

_LOW = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)


class float64_everywhere(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _CASTS:
            return args[0].to(torch.float64)
        if func is torch.Tensor.to:
            args = tuple(torch.float64 if a in _LOW else a for a in args)
        if kwargs.get("dtype") in _LOW:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def matmul_precision() -> str:
    """CUDA's fp32 matmul precision as torch ≥ 2.9 names it: "ieee" (full fp32), "tf32", or
    "none" (inherits `torch.backends.fp32_precision`). Read through the new API only: torch's
    legacy getter (`torch.get_float32_matmul_precision`) raises once anything has set the new
    one, which transformers does under `torch_compile` (session 12 lost a run's rewards to it)."""
    return torch.backends.cuda.matmul.fp32_precision


def set_matmul_precision(value: str) -> None:
    """Put `value` back as `matmul_precision()` reads it: as inherited from the global setting
    ("none") where that gives it, else set on CUDA matmuls."""
    torch.backends.cuda.matmul.fp32_precision = "none"
    if matmul_precision() != value:
        torch.backends.cuda.matmul.fp32_precision = value


@contextmanager
def tf32_matmuls(enabled: bool = True):
    """fp32 matrix products in TF32 on CUDA (10-bit mantissa inputs, fp32 accumulation) inside
    the context, full fp32 ("ieee") otherwise, whatever the global setting (transformers turns
    TF32 on globally under `torch_compile`); then the previous setting back. No effect on CPU.
    The engine's default stays full fp32: `dpg check` on CUDA and benchmarks/grpo_step.py report
    the scores' TF32 error."""
    before = matmul_precision()
    torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        set_matmul_precision(before)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How well `other` scores stand in for `reference` ones: relative error ‖o − r‖/‖r‖, the
    Spearman correlation of their ranks (ties broken by position) and the share of signs
    they agree on."""
    rank = lambda x: torch.argsort(torch.argsort(x)).double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(reference), rank(other)]))[0, 1].item()
    return {
        "relative_error": ((other - reference).norm() / reference.norm()).item(),
        "spearman": spearman,
        "sign_agreement": (reference.sign() == other.sign()).double().mean().item(),
    }
