"""benchmarks/carry_run.py: a run stopped on one machine, packed into parts, rebuilt on another
and resumed there. The rebuilt weights are checked against the checkpoint, within the bound the
int8 change promises, and the resumed run against the log of the one that was packed."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_benchmark_scripts import load_script
from test_train import tiny

from dpg.errors import DpgError
from dpg.safety import SEAL
from dpg.train import run_train

carry = load_script("carry_run")


def assert_within_half_a_step(rebuilt: torch.Tensor, original: torch.Tensor, base: torch.Tensor, key: str) -> None:
    """The docstring's bound, row by row: |rebuilt − original| ≤ |Δ_row|max / 254 (+ fp32 rounding)."""
    rows = (original.float() - base).reshape(original.shape[0], -1)
    bound = rows.abs().amax(dim=1, keepdim=True) / 254 + 1e-6 * original.float().reshape(rows.shape).abs()
    assert ((rebuilt.float() - original.float()).reshape(rows.shape).abs() <= bound).all(), key


def test_int8_change_round_trips_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "m": torch.randn(2, 3, 4, generator=g), "n": torch.ones(5)}
    change = {"w": torch.randn(6, 5, generator=g) * 1e-4, "m": torch.zeros(2, 3, 4)}
    change["m"][1, 2, 3] = 3e-5  # one row of the 3-d tensor changes, the other stays put
    weights = {"w": base["w"] + change["w"], "m": base["m"] + change["m"], "n": torch.full((5,), 1.25)}
    weights["b"] = weights["w"].to(torch.bfloat16)
    base["b"] = weights["b"].float() + 1e-3
    coded = carry.encode(weights, base)
    assert coded["q:w"].dtype == torch.int8 and "x:n" in coded and "q:n" not in coded
    back = carry.decode(coded, base, {"b": "bfloat16"})
    assert torch.equal(back["n"], weights["n"])  # vectors travel exactly
    assert back["b"].dtype == torch.bfloat16 and torch.equal(back["b"], weights["b"])
    for key in ("w", "m"):
        assert_within_half_a_step(back[key], weights[key], base[key], key)
    assert torch.equal(back["m"][0], base["m"][0])  # an unchanged row comes back as the base's


def test_encode_refuses_weights_of_another_model():
    with pytest.raises(DpgError, match="not in the base generator"):
        carry.encode({"w": torch.zeros(3, 3)}, {"w": torch.zeros(3, 4)})


def test_a_run_packed_in_parts_resumes_where_it_stopped(tmp_path):
    run = tmp_path / "a" / "run"
    first = run_train(tiny(run, "grpo.steps=3", "grpo.save_every=1", "time_limit=1e-6"))
    assert first is None and (run / "checkpoint-1" / SEAL).is_file()  # stopped after step 1
    (run / "evaluate.json").write_text("{}")  # describes a generator the resumed run leaves behind
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "run.carry.99").write_bytes(b"an earlier pack's")
    parts = carry.pack(run, tmp_path / "parts", part_mib=0.02)
    assert len(parts) > 2  # really cut into parts
    assert sorted((tmp_path / "parts").iterdir()) == sorted([*parts, tmp_path / "parts" / "run.carry.json"])
    manifest = json.loads((tmp_path / "parts" / "run.carry.json").read_text())
    assert manifest["checkpoint"] == "checkpoint-1" and len(manifest["parts"]) == len(parts)

    moved = tmp_path / "b" / "run"  # another machine: only the parts came
    carry.unpack(tmp_path / "parts", moved)
    ckpt, old = moved / "checkpoint-1", run / "checkpoint-1"
    assert (ckpt / SEAL).is_file() and not (ckpt / "optimizer.pt").exists() and (old / "optimizer.pt").is_file()
    assert not (moved / "evaluate.json").exists()
    for name in ("trainer_state.json", "rng_state.pth", "scheduler.pt"):
        assert (ckpt / name).read_bytes() == (old / name).read_bytes(), name
    assert (moved / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    rebuilt, original = load_file(ckpt / "model.safetensors"), load_file(old / "model.safetensors")
    base = carry.base_weights(run)
    assert rebuilt.keys() == original.keys()
    for key, value in original.items():
        if value.dim() < 2:
            assert torch.equal(rebuilt[key], value), key
            continue
        assert_within_half_a_step(rebuilt[key], value, base[key], key)
        assert (value - base[key]).abs().max() > 0, key  # the step changed it, so the test sees the change travel

    with pytest.raises(DpgError, match="already holds checkpoints"):
        carry.unpack(tmp_path / "parts", moved)
    final = run_train(tiny(moved, "grpo.steps=3", "grpo.save_every=1"))  # resumes from the rebuilt one
    rows = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and final == moved / "generator"
    with pytest.raises(DpgError, match="has finished"):
        carry.pack(moved, tmp_path / "again", part_mib=1)


def test_unpack_refuses_a_damaged_or_missing_part(tmp_path):
    run = tmp_path / "run"
    run_train(tiny(run, "grpo.steps=2", "grpo.save_every=1", "time_limit=1e-6"))
    parts = carry.pack(run, tmp_path / "parts", part_mib=0.02)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "parts", bad)
    data = bytearray((bad / parts[1].name).read_bytes())
    data[10] ^= 1
    (bad / parts[1].name).write_bytes(bytes(data))
    with pytest.raises(DpgError, match="damaged"):
        carry.unpack(bad, tmp_path / "x" / "run")
    (bad / parts[1].name).unlink()
    with pytest.raises(DpgError, match="missing"):
        carry.unpack(bad, tmp_path / "x" / "run")
    assert not (tmp_path / "x" / "run").exists()


def test_batch_picks_each_calls_files_in_order(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([3, 3, 1, 1, 1, 1, 2]):
        (src / f"f{i}").write_bytes(b"x" * size * carry.MIB)
    sizes = []
    for call in range(5):
        got = carry.batch(src, tmp_path / f"call{call}", call, mib=5)
        sizes.append([p.name for p in got])
    assert sizes == [["f0"], ["f1", "f2", "f3"], ["f4", "f5", "f6"], [], []]  # ≤ 5 MiB and ≤ 4 files a call


def test_batch_takes_at_most_four_files_a_call(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"p{i}").write_bytes(b"x")
    assert [len(carry.batch(src, tmp_path / "d", call, mib=56)) for call in range(3)] == [4, 2, 0]
