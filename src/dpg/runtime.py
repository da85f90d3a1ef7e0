"""Where and in what precision dpg computes: the `device` and `dtype` keys of every command,
and the device of each process of a multi-GPU run."""

from __future__ import annotations

import os

import torch

from dpg.errors import DpgError


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DpgError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpgError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """The metagradient precision: bf16 / fp16 are refused (their metagradients are wrong)."""
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise DpgError(f"dtype must be float32 or float64 (metagradients in bf16 are wrong), got {name!r}")
    return dtypes[name]


def process_device(name: str) -> tuple[torch.device, bool]:
    """(this process's device, whether it is the main process). Under `accelerate launch` or
    torchrun each process takes the GPU of its LOCAL_RANK; only rank 0 writes files and prints."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device, int(os.environ.get("RANK", "0")) == 0
