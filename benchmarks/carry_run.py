"""Carry an unfinished training run from one device-machine session to the next.

The device machine's disk does not outlive a session (30 minutes), and what moves between it and
this machine goes in calls of at most 64 MiB (files back: 8 a call, 16 MiB each). A full
checkpoint of SmolLM2-135M as the generator is 1.6 GB (fp32 weights 0.54 GB, AdamW moments
1.08 GB); this packs the part that matters into ~9 parts of 14 MiB, so a run that needs more
steps than one session gives (the paper's UUID: 360) goes on in a later session, wherever those
parts can be kept in between (the machine that drives the device calls must keep them too).

    python benchmarks/carry_run.py pack RUN_DIR DEST [--part-mib 14]   # on the machine that trained
    python benchmarks/carry_run.py unpack SRC RUN_DIR                  # on the next machine
    python benchmarks/carry_run.py batch SRC DEST N [--mib 56]         # copy the Nth call's share of SRC

`pack` takes RUN_DIR's last sealed checkpoint. Its generator weights travel as their change from
the base generator (loaded as RUN_DIR/config.yaml names it, e.g. from SmolLM2's GGUF, the same
bits on any machine), each matrix row quantized to int8 with its own scale (absmax / 127): a
reconstructed weight is within half a step, |Δ_row|max / 254, of the checkpoint's; vectors
(norms, biases) travel exactly. The weights themselves could not go in 8 or 16 bits: a step of
lr 1e-6 is far below bf16's resolution at |w| ~ 0.05, so only the change keeps the training.
The generator's AdamW moments (twice the weights) are dropped: the resumed run starts them
afresh, as at step 1 (with a constant learning rate, the schedule is unaffected). Everything
else of the checkpoint (trainer state, RNG states, scheduler) and of the run directory
(config, metrics.jsonl, samples.jsonl, ...) travels as it is, except `evaluate.json`, which
describes a generator the resumed run will leave behind. DEST gets NAME.carry.json (the parts'
SHA-256) and NAME.carry.NN, NAME the run directory's name.

`unpack` checks every part, rebuilds RUN_DIR with the checkpoint (base + change), and seals it
last, so `dpg train` with the run's config resumes from it; a run directory that already holds
checkpoints is refused. `batch` picks the files of device call N (from 0), at most 4 and `--mib`
MiB, in order, for `carry` folders (here) or $OUT (there).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpg.config import TrainConfig, load_config  # noqa: E402
from dpg.errors import DpgError  # noqa: E402
from dpg.models import load  # noqa: E402
from dpg.safety import SEAL, last_complete_checkpoint  # noqa: E402

MIB = 1 << 20
LEFT_BEHIND = {"evaluate.json"}  # run-directory files that do not travel (module docstring)


def weight_files(checkpoint: Path) -> list[Path]:
    """The full model's weight shards (model.safetensors or model-0000k-of-0000n.safetensors)."""
    return sorted(checkpoint.glob("model*.safetensors"))


def base_weights(run: Path) -> dict[str, torch.Tensor]:
    """The generator the run started from, as RUN_DIR/config.yaml names it (fp32, CPU)."""
    cfg = load_config(TrainConfig, run / "config.yaml")
    model, _ = load(cfg.generator, device="cpu")
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def encode(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each matrix as int8 codes `q:KEY` and per-row scales `s:KEY` of its change from `base`;
    each vector (and any tensor that is not floating point) exactly, as `x:KEY`."""
    out = {}
    for key, value in tensors.items():
        if value.dim() < 2 or not value.is_floating_point():
            out[f"x:{key}"] = value.contiguous()
            continue
        if key not in base or base[key].shape != value.shape:
            raise DpgError(f"the checkpoint's {key} {tuple(value.shape)} is not in the base generator")
        change = (value.float() - base[key]).reshape(value.shape[0], -1)
        scale = change.abs().amax(dim=1) / 127.0
        codes = torch.where(scale[:, None] > 0, change / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None], 0.0)
        out[f"q:{key}"] = codes.round().clamp(-127, 127).to(torch.int8).reshape(value.shape)
        out[f"s:{key}"] = scale
    return out


def decode(
    coded: dict[str, torch.Tensor], base: dict[str, torch.Tensor], dtypes: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The weights `encode` was given, up to its rounding (half a step per row), each matrix
    in its dtype in `dtypes` (default float32)."""
    out = {key[2:]: value for key, value in coded.items() if key.startswith("x:")}
    for key in (k[2:] for k in coded if k.startswith("q:")):
        codes, scale = coded[f"q:{key}"], coded[f"s:{key}"]
        if key not in base or base[key].shape != codes.shape:
            raise DpgError(f"the packed {key} {tuple(codes.shape)} is not in the base generator")
        change = codes.reshape(codes.shape[0], -1).float() * scale[:, None]
        dtype = getattr(torch, (dtypes or {}).get(key, "float32"))
        out[key] = (base[key] + change.reshape(codes.shape)).to(dtype).contiguous()
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def bundle(run: Path) -> tuple[bytes, Path]:
    """RUN_DIR's last sealed checkpoint and its small files as one gzipped tar (bytes)."""
    checkpoint = last_complete_checkpoint(run)
    if checkpoint is None:
        raise DpgError(f"{run} holds no sealed checkpoint to carry")
    if (run / "generator").is_dir():
        raise DpgError(f"{run} has finished (its generator is in {run / 'generator'}): nothing to resume")
    shards = weight_files(checkpoint)
    base = base_weights(run) if shards else {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for path in sorted(run.rglob("*")):
            rel = path.relative_to(run)
            if not path.is_file() or rel.parts[0] in ("generator", "base_generator") or rel.name in LEFT_BEHIND:
                continue
            if rel.parts[0].startswith("checkpoint-") and rel.parts[0] != checkpoint.name:
                continue
            if path in shards:
                weights = load_file(path)
                dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in weights.items()}
                _add(tar, f"{rel}.int8", save(encode(weights, base), metadata={"dtypes": json.dumps(dtypes)}))
            elif not (shards and path.parent == checkpoint and path.name.startswith("optimizer")):
                tar.add(path, arcname=str(rel))
    return buffer.getvalue(), checkpoint


def pack(run: Path, dest: Path, part_mib: float) -> list[Path]:
    data, checkpoint = bundle(run)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(f"{run.name}.carry.*"):  # an earlier pack's parts would travel for nothing
        stale.unlink()
    size = int(part_mib * MIB)
    parts = []
    for i in range(0, max(len(data), 1), size):
        part = dest / f"{run.name}.carry.{i // size:02d}"
        part.write_bytes(data[i : i + size])
        parts.append(part)
    manifest = {
        "run": run.name, "checkpoint": checkpoint.name, "bytes": len(data),
        "parts": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in parts},
    }  # fmt: skip
    (dest / f"{run.name}.carry.json").write_text(json.dumps(manifest, indent=1))
    print(f"{run} {checkpoint.name}: {len(data) / MIB:.1f} MiB in {len(parts)} parts under {dest}")
    return parts


def read_parts(src: Path, name: str) -> tuple[bytes, dict]:
    manifest_path = src / f"{name}.carry.json"
    if not manifest_path.is_file():
        raise DpgError(f"no {manifest_path}: pack the run first (carry_run.py pack)")
    manifest = json.loads(manifest_path.read_text())
    chunks = []
    for part, digest in manifest["parts"].items():
        path = src / part
        if not path.is_file():
            raise DpgError(f"{path} is missing: carry all {len(manifest['parts'])} parts of {name}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise DpgError(f"{path} is damaged (its SHA-256 differs from {manifest_path}'s)")
        chunks.append(data)
    return b"".join(chunks), manifest


def unpack(src: Path, run: Path) -> Path:
    if run.exists() and any(run.glob("checkpoint-*")):
        raise DpgError(f"{run} already holds checkpoints: unpack into a new run directory")
    data, manifest = read_parts(src, run.name)
    with tempfile.TemporaryDirectory(dir=run.parent if run.parent.exists() else None) as tmp:
        staged = Path(tmp) / run.name
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(staged, filter="data")
        checkpoint = staged / manifest["checkpoint"]
        (checkpoint / SEAL).unlink(missing_ok=True)  # sealed again once its weights are back
        packed = sorted(checkpoint.glob("*.safetensors.int8"))
        base = base_weights(staged) if packed else {}
        for path in packed:
            with safe_open(path, "pt") as f:
                dtypes = json.loads((f.metadata() or {}).get("dtypes", "{}"))
            weights = decode(load_file(path), base, dtypes)
            save_to = checkpoint / path.name.removesuffix(".int8")
            save_to.write_bytes(save(weights, metadata={"format": "pt"}))
            path.unlink()
        run.parent.mkdir(parents=True, exist_ok=True)
        if run.exists():
            shutil.rmtree(run)  # an empty or checkpoint-less directory
        shutil.move(str(staged), run)
    tmp_seal = run / manifest["checkpoint"] / (SEAL + ".tmp")
    tmp_seal.write_text(json.dumps({"global_step": int(manifest["checkpoint"].rsplit("-", 1)[-1])}))
    os.replace(tmp_seal, tmp_seal.with_name(SEAL))
    print(f"{run}: {manifest['checkpoint']} rebuilt; `dpg train` with its config resumes from it")
    return run


def batch(src: Path, dest: Path, call: int, mib: float) -> list[Path]:
    """The files of device call `call`: SRC's files in name order, greedily ≤ 4 and ≤ `mib` a call."""
    calls: list[list[Path]] = [[]]
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        size = sum(p.stat().st_size for p in calls[-1]) + path.stat().st_size
        if calls[-1] and (len(calls[-1]) == 4 or size > mib * MIB):
            calls.append([])
        calls[-1].append(path)
    chosen = calls[call] if call < len(calls) else []
    dest.mkdir(parents=True, exist_ok=True)
    for path in chosen:
        shutil.copy2(path, dest / path.name)
    print(f"call {call} of {len(calls)}: {', '.join(p.name for p in chosen) or 'nothing left'}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack")
    p.add_argument("run", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--part-mib", type=float, default=14.0)
    u = sub.add_parser("unpack")
    u.add_argument("src", type=Path)
    u.add_argument("run", type=Path)
    b = sub.add_parser("batch")
    b.add_argument("src", type=Path)
    b.add_argument("dest", type=Path)
    b.add_argument("call", type=int)
    b.add_argument("--mib", type=float, default=56.0)
    args = parser.parse_args(argv)
    try:
        if args.verb == "pack":
            pack(args.run, args.dest, args.part_mib)
        elif args.verb == "unpack":
            unpack(args.src, args.run)
        else:
            batch(args.src, args.dest, args.call, args.mib)
    except DpgError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
