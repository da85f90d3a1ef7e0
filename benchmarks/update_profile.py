"""Where one `dpg train` step's time goes on the device, by torch.profiler.

    python benchmarks/update_profile.py CONFIG [KEY=VALUE ...] [--warmup 2] [--top 25] [--out FILE.json]

Trains CONFIG with the overrides for `--warmup` + 1 GRPO steps in a temporary output_dir (no
checkpoints) and profiles the last one: generation, the reward and the policy updates, as
`dpg train` runs them. Prints and writes the step's wall time and dpg's split of it (the
metrics row's time/generation, time/reward, time/update), the time the device was busy (the
sum of its kernels' time), and the top ops by device time and by CPU time. A device busy for a
small share of the wall time, with many short ops high in the CPU list, is a step bound by
kernel launches and Python, not by arithmetic: the case to try larger passes
(grpo.update_microbatch), fused kernels or compilation on. Baseline in the same process: the
wall time of the same step (the ratio busy / wall is the figure to compare). The split is the
step's metrics row, whose update time also holds the profiler's processing of its trace at the
step's end (seconds, for ~10^5 kernels); the wall time stops before it.

Example (the device machine, "67" as the paper's run trains it):
    python benchmarks/update_profile.py configs/paper/67.yaml device=cuda grpo.update_microbatch=64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dpg.train as train  # noqa: E402
from dpg.config import TrainConfig, load_config  # noqa: E402


def profiler_callback(start_step: int, end_step: int, found: dict):
    """A TrainerCallback that profiles optimizer steps start_step..end_step (one generated batch)."""
    from transformers import TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start_step:
                found["profiler"] = torch.profiler.profile(activities=activities)
                found["profiler"].__enter__()
                found["began"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == end_step and "profiler" in found:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                found["wall_s"] = time.perf_counter() - found["began"]
                found["profiler"].__exit__(None, None, None)

    return Profile()


def op_rows(events, key: str, top: int) -> list[dict]:
    """The `top` ops by `key` (device_time_total or cpu_time_total), times in ms."""
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "device_ms": e.device_time_total / 1e3, "cpu_ms": e.cpu_time_total / 1e3}
            for e in rows]  # fmt: skip


def device_busy(events) -> tuple[float, int]:
    """Seconds the device was busy (the sum of its events' times: kernels that overlap on
    concurrent streams count each) and the number of device events (kernels, copies, sets),
    summed over the device's own events only. A CPU op's self device time is the time of the
    kernels it launched, which also appear as events of their own: summing every event's self
    device time, as this script did until session 11, counted each launched kernel twice."""
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in device) / 1e6, sum(e.count for e in device)


def summarize(found: dict, metrics: Path, top: int) -> dict:
    events = found["profiler"].key_averages()
    busy, kernels = device_busy(events)
    row = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
    return {
        "step": row["step"], "wall_s": found["wall_s"],
        "split_s": {k: row.get(f"time/{k}") for k in ("generation", "reward", "update")},
        "device_busy_s": busy, "device_busy_share": busy / found["wall_s"], "kernels": kernels,
        "top_by_device": op_rows(events, "device_time_total", top),
        "top_by_cpu": op_rows(events, "cpu_time_total", top),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--warmup", type=int, default=2, help="GRPO steps before the profiled one")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        over = [*a.overrides, f"output_dir={tmp}/run", f"grpo.steps={a.warmup + 1}", "grpo.save_every=0",
                "grpo.png_every=0", "resume=false", "time_limit=0"]  # fmt: skip
        cfg = load_config(TrainConfig, a.config, over)
        g = cfg.grpo
        per_step = g.updates_per_step * g.num_iterations
        found: dict = {}
        build = train.build_trainer

        def build_profiled(*args, **kw):
            trainer, log = build(*args, **kw)
            trainer.add_callback(profiler_callback(a.warmup * per_step, (a.warmup + 1) * per_step, found))
            return trainer, log

        train.build_trainer = build_profiled
        train.run_train(cfg)
        figures = summarize(found, Path(tmp) / "run/metrics.jsonl", a.top)
    result = {"config": a.config, "overrides": a.overrides} | figures
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("top_")}, indent=1))
    for key in ("top_by_device", "top_by_cpu"):
        print(f"\n{key}:")
        for r in result[key]:
            print(f"  {r['device_ms']:10.1f} ms device {r['cpu_ms']:10.1f} ms cpu {r['calls']:7d}×  {r['op'][:70]}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
