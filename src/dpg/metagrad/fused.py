"""Layers the engine runs as one fused torch op while it holds a model (target.prepared):
the same function to rounding, with far fewer ops to carry a tangent through.

- GPT-2's NewGELUActivation (the tanh formula in seven elementwise ops, each carried as a
  tangent and differentiated again in the HVP pass) as F.gelu(approximate="tanh").
- An RMSNorm written out in HF's way, x·rsqrt(mean(x²) + eps)·w (Llama, SmolLM2, Mistral,
  Qwen2, ...), as torch's rms_norm. In a forward-mode pass the written-out form adds a Python
  float to a tensor that carries a tangent: torch then forms a zero tangent for the float and
  works out its shape through Python reference kernels, ~0.3 ms of host time each, twice per
  layer (benchmarks/metagrad_ratio.py --shape deep-overhead; README, "The GRPO step").
  A norm class is swapped only after it computed torch's rms_norm to the dtype's rounding on
  a probe input with a random weight (so Gemma's x·(1 + w), say, stays as it is), and only
  in fp32 or fp64 (where HF's norm, which computes in fp32, passes only under float64_everywhere).

`swap(module, dtype)` makes the swaps and returns what `restore` puts back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import _get_current_function_mode_stack  # metrics.py reads it too
from transformers.activations import NewGELUActivation

Swapped = list[tuple[nn.Module, str, nn.Module]]


class _TanhGelu(nn.Module):
    """GPT-2's activation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) as torch's one fused op."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


class _RMSNorm(nn.Module):
    """torch's rms_norm with the replaced norm's own weight (the same Parameter, the same name)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (self.weight.shape[0],), self.weight, self.eps)


# (norm class, dtype, function modes) -> whether it computes torch's rms_norm: probed once per process
_IS_RMS_NORM: dict[tuple, bool] = {}


def swap(module: nn.Module, dtype: torch.dtype) -> Swapped:
    """Replace the layers above inside `module`; returns (parent, name, original) for each."""
    found = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                found.append((parent, name, child, _TanhGelu()))
            elif dtype in (torch.float32, torch.float64) and _eps(child) is not None and _is_rms_norm(child, dtype):
                found.append((parent, name, child, _RMSNorm(child.weight, _eps(child))))
    for parent, name, _, new in found:
        setattr(parent, name, new)
    return [(parent, name, old) for parent, name, old, _ in found]


def restore(swapped: Swapped) -> None:
    for parent, name, old in swapped:
        setattr(parent, name, old)


def _eps(m: nn.Module) -> float | None:
    """The epsilon of a module that looks like an RMSNorm (a 1-D weight, a float epsilon), else None."""
    if not type(m).__name__.endswith("RMSNorm") or len(list(m.children())) or len(list(m.buffers())):
        return None
    weight = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    if {n for n, _ in m.named_parameters()} != {"weight"}:
        return None
    return eps


def _is_rms_norm(m: nn.Module, dtype: torch.dtype) -> bool:
    # HF's norm computes in fp32 whatever the dtype: in fp64 it is another function, unless a mode
    # such as float64_everywhere (precision.py) promotes its casts; the verdict depends on the modes.
    key = (type(m), dtype, tuple(type(mode) for mode in _get_current_function_mode_stack()))
    if key not in _IS_RMS_NORM:
        g = torch.Generator().manual_seed(0)
        d = m.weight.shape[0]
        x = (torch.randn(2, 3, d, generator=g, dtype=torch.float64) * 3).to(m.weight.device, dtype)
        w = (torch.randn(d, generator=g, dtype=torch.float64) + 1).to(m.weight.device, dtype)
        with torch.no_grad():
            theirs = functional_call(m, {"weight": w}, (x,))
            ours = F.rms_norm(x, (d,), w, _eps(m))
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        _IS_RMS_NORM[key] = theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=tol, atol=tol)
    return _IS_RMS_NORM[key]
