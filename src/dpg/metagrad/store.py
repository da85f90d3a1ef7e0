"""Where the saved step states wait for the reverse sweep.

The forward run (and any recomputation, see schedule.py) produces records (θ_{t−1}, and
for AdamW g_t, m_t, v_t: what step t's adjoint needs) and checkpoint states (θ_t, m_t, v_t).
Keeping them on the GPU would make memory grow with M, so by default they go to CPU memory
(pooled pinned chunks, copied on a side stream: pinned.py) or, for long runs on big models,
to disk. The store counts what it holds, so the schedule's bound can be checked.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from dpg.errors import DpgError
from dpg.metagrad import pinned

Record = dict[str, dict[str, torch.Tensor]]  # group ("theta", "g", "m", "v") -> name -> tensor
Key = tuple[str, int]  # ("record", t) or ("state", t)

OFFLOAD_CHOICES = ("cpu", "disk", "device")


class StepStore:
    def __init__(self, where: str, device: torch.device):
        if where not in OFFLOAD_CHOICES:
            raise DpgError(f"offload must be one of {OFFLOAD_CHOICES}, got {where!r}")
        self.where, self.device = where, device
        # On a CUDA device with offload "cpu", copies go through pooled pinned memory.
        self._pinned = where == "cpu" and device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._pinned else None
        self._held: dict[Key, Record | pinned.HostCopy] = {}
        self._bytes: dict[Key, int] = {}
        self._dir: tempfile.TemporaryDirectory | None = None
        self.peak_items = 0  # most items held at once
        self.peak_bytes = 0  # most bytes held at once (tensor bytes, wherever they are)

    def put(self, key: Key, record: Record) -> None:
        if self._pinned:
            self._held[key] = pinned.to_host(record, self._stream)
        elif self.where == "disk":
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="dpg-metagrad-")
            flat = {f"{group}/{k}": x.contiguous() for group, tensors in record.items() for k, x in tensors.items()}
            save_file(flat, self._path(key))
            self._held[key] = {}
        else:  # "device", or "cpu" with the device being the CPU: the engine never writes into these
            self._held[key] = record
        self._bytes[key] = sum(x.nbytes for tensors in record.values() for x in tensors.values())
        self.peak_items = max(self.peak_items, len(self._held))
        self.peak_bytes = max(self.peak_bytes, sum(self._bytes.values()))

    def get(self, key: Key) -> Record:
        """The saved tensors on the device; the store keeps them."""
        item = self._held[key]
        if self._pinned:
            return pinned.to_device(item, self.device)
        if self.where == "disk":
            record: Record = {}
            for name, x in load_file(self._path(key), device=str(self.device)).items():
                group, k = name.split("/", 1)
                # On the CPU, a fresh (aligned) copy: vectorised kernels may round differently on
                # the loaded buffer's odd alignment, and a recomputed step must match bit for bit.
                record.setdefault(group, {})[k] = x.clone() if self.device.type == "cpu" else x
            return record
        return {group: {k: x.to(self.device) for k, x in tensors.items()} for group, tensors in item.items()}

    def pop(self, key: Key) -> Record:
        record = self.get(key)
        self.drop(key)
        return record

    def drop(self, key: Key) -> None:
        item = self._held.pop(key)
        del self._bytes[key]
        if self._pinned:
            pinned.release(item, self.device)
        elif self.where == "disk":
            os.remove(self._path(key))

    def close(self) -> None:
        for key in list(self._held):
            self.drop(key)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _path(self, key: Key) -> str:
        return os.path.join(self._dir.name, f"{key[0]}{key[1]}.safetensors")


def free_bytes(where: str, device: torch.device) -> int | None:
    """Room for saved states where `where` puts them: available host memory ("cpu"), free space
    in the temporary directory ("disk"); None where unknown or unbounded by design ("device")."""
    if where == "disk":
        return shutil.disk_usage(tempfile.gettempdir()).free
    if where == "device":
        return None
    try:  # Linux: MemAvailable counts the page cache that can be dropped
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
