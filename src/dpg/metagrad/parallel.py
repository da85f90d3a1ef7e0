"""The few collectives of the data-parallel engine and reward (torch.distributed).

Every rank holds its share of the examples; these sum what the ranks computed. NCCL needs
the tensors on this process's GPU, gloo on the CPU: `summed` moves them and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

Params = dict[str, Tensor]


def data_parallel_group() -> dist.ProcessGroup | None:
    """The default process group when this process is one of several (accelerate launch,
    torchrun), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def comm_device(group: dist.ProcessGroup, device: torch.device | None = None) -> torch.device:
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def summed(t: Tensor, group: dist.ProcessGroup | None, device: torch.device | None = None) -> Tensor:
    """t summed over the group, returned where t was."""
    if group is None:
        return t
    moved = t.to(comm_device(group, device), copy=True)
    dist.all_reduce(moved, group=group)
    return moved.to(t.device)


def all_reduce_sum(tensors: Params, group: dist.ProcessGroup) -> Params:
    """Sum a dict of tensors over the group, as one flat buffer (one collective)."""
    keys = list(tensors)
    first = tensors[keys[0]]
    flat = summed(torch.cat([tensors[k].reshape(-1).to(first.dtype) for k in keys]), group, first.device)
    out, offset = {}, 0
    for k in keys:
        size = tensors[k].numel()
        out[k] = flat[offset : offset + size].view_as(tensors[k]).to(tensors[k].dtype)
        offset += size
    return out


def smallest(x: float, group: dist.ProcessGroup | None, device: torch.device | None = None) -> float:
    """The least of x over the group (every rank must plan the same schedule)."""
    if group is None:
        return x
    moved = torch.tensor([x], dtype=torch.float64, device=comm_device(group, device))
    dist.all_reduce(moved, op=dist.ReduceOp.MIN, group=group)
    return moved.item()
