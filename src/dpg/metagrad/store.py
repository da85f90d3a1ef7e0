"""Where each inner step's saved tensors wait for the reverse sweep.

The forward run produces, per step t, what step t's adjoint needs (θ_{t−1}, and for AdamW
g_t, m_t, v_t). Keeping them on the GPU would make memory grow with M, so by default they
go to CPU memory (pinned, copied asynchronously) or, for long runs on big models, to disk.
The last step's tensors are used first by the reverse sweep and stay where they are.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dpg.errors import DpgError

Record = dict[str, dict[str, Tensor]]  # group ("theta", "g", "m", "v") -> name -> tensor

OFFLOAD_CHOICES = ("cpu", "disk", "device")


class StepStore:
    def __init__(self, where: str, device: torch.device):
        if where not in OFFLOAD_CHOICES:
            raise DpgError(f"offload must be one of {OFFLOAD_CHOICES}, got {where!r}")
        self.where, self.device = where, device
        self._held: dict[int, Record] = {}
        self._on_disk: set[int] = set()
        self._dir: tempfile.TemporaryDirectory | None = None

    def put(self, t: int, record: Record, *, keep_on_device: bool = False) -> None:
        if keep_on_device or self.where == "device" or (self.where == "cpu" and self.device.type == "cpu"):
            # The engine never writes into these tensors, so holding references is safe.
            self._held[t] = record
        elif self.where == "cpu":
            pinned = self.device.type == "cuda"
            self._held[t] = {
                group: {k: _to_host(x, pinned) for k, x in tensors.items()} for group, tensors in record.items()
            }
        else:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="dpg-metagrad-")
            flat = {f"{group}/{k}": x.contiguous() for group, tensors in record.items() for k, x in tensors.items()}
            save_file(flat, os.path.join(self._dir.name, f"step{t}.safetensors"))
            self._on_disk.add(t)

    def pop(self, t: int) -> Record:
        if t in self._on_disk:
            self._on_disk.remove(t)
            path = os.path.join(self._dir.name, f"step{t}.safetensors")
            record: Record = {}
            for key, x in load_file(path, device=str(self.device)).items():
                group, name = key.split("/", 1)
                record.setdefault(group, {})[name] = x
            os.remove(path)
            return record
        record = self._held.pop(t)
        return {
            group: {k: x.to(self.device, non_blocking=True) for k, x in tensors.items()}
            for group, tensors in record.items()
        }

    def close(self) -> None:
        self._held.clear()
        self._on_disk.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _to_host(x: Tensor, pinned: bool) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=pinned)
    out.copy_(x, non_blocking=pinned)
    return out
