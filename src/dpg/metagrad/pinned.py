"""Page-locked host memory for saved step states on a CUDA device.

Why not `torch.empty(..., pin_memory=True)` per tensor and per step: every new pinned block
is a cudaHostAlloc that page-locks (and first touches) fresh memory, PyTorch's host
allocator rounds each block up to a power of two (a 9.4 MB matrix takes 16 MB), and a
plain non_blocking copy runs on the compute stream, so the next step waits for it. Here
the memory comes in fixed power-of-two chunks (no rounding waste), tensors are packed into
them, chunks are reused by later steps and later calls in this process, and the copy to the
host runs on a side stream, overlapping the next step's compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

Record = dict[str, dict[str, Tensor]]

_ALIGN = 64  # bytes: every packed tensor starts on a 64-byte boundary
_MIN_CHUNK = 64 * 2**20
# chunk bytes -> chunks free for reuse, each with the event after which it may be overwritten
_FREE: dict[int, list[tuple[Tensor, torch.cuda.Event | None]]] = {}


class HostCopy(NamedTuple):
    chunks: list[Tensor]  # the pinned uint8 chunks holding the tensors
    views: Record  # the tensors, as views into the chunks
    copied: torch.cuda.Event  # recorded on the side stream once the copy to the host is done


def chunk_bytes(record: Record) -> int:
    """Smallest power of two ≥ 64 MiB that holds the record's largest tensor."""
    largest = max((_padded(x) for tensors in record.values() for x in tensors.values()), default=1)
    return max(_MIN_CHUNK, 1 << (largest - 1).bit_length())


def pack(record: Record, size: int) -> list[list[tuple[str, str, int]]]:
    """First-fit decreasing: for each chunk, the (group, name, offset) of the tensors it holds."""
    items = sorted(((_padded(x), g, k) for g, ts in record.items() for k, x in ts.items()), reverse=True)
    chunks: list[list[tuple[str, str, int]]] = []
    used: list[int] = []
    for nbytes, group, name in items:
        j = next((j for j, u in enumerate(used) if u + nbytes <= size), None)
        if j is None:
            chunks.append([])
            used.append(0)
            j = len(used) - 1
        chunks[j].append((group, name, used[j]))
        used[j] += nbytes
    return chunks


def to_host(record: Record, stream: torch.cuda.Stream) -> HostCopy:
    """Queue the copy of `record` (device tensors) into pooled pinned chunks on `stream`."""
    size = chunk_bytes(record)
    layout = pack(record, size)
    stream.wait_stream(torch.cuda.current_stream(stream.device))  # the tensors are computed
    chunks, views = [], {g: {} for g in record}
    for placed in layout:
        chunk, released = _take(size)
        if released is not None:
            stream.wait_event(released)  # its last reader (a copy to the device) is done
        chunks.append(chunk)
        with torch.cuda.stream(stream):
            for group, name, offset in placed:
                x = record[group][name]
                view = chunk[offset : offset + x.nbytes].view(x.dtype).view(x.shape)
                view.copy_(x, non_blocking=True)
                x.record_stream(stream)  # its memory is not reused before the copy is done
                views[group][name] = view
    copied = torch.cuda.Event()
    copied.record(stream)
    return HostCopy(chunks, views, copied)


def to_device(copy: HostCopy, device: torch.device) -> Record:
    """Device tensors with the saved values (queued on the current stream)."""
    torch.cuda.current_stream(device).wait_event(copy.copied)
    return {g: {k: v.to(device, non_blocking=True) for k, v in ts.items()} for g, ts in copy.views.items()}


def release(copy: HostCopy, device: torch.device) -> None:
    """Give the chunks back to the pool once the copies queued so far have read them."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    for chunk in copy.chunks:
        _FREE.setdefault(chunk.numel(), []).append((chunk, done))


def _take(size: int) -> tuple[Tensor, torch.cuda.Event | None]:
    free = _FREE.get(size)
    if free:
        return free.pop()
    return torch.empty(size, dtype=torch.uint8, pin_memory=True), None


def _padded(x: Tensor) -> int:
    return -(-x.nbytes // _ALIGN) * _ALIGN
