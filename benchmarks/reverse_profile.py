"""Where one reverse step's time goes: the step against a plain SFT step, and a profile of it.

    python benchmarks/reverse_profile.py --out reverse_profile.json            # GPT-2-small shape, CUDA
    python benchmarks/reverse_profile.py --shape small --device cpu --out reverse_profile_cpu.json

In one process, after a warm-up of each, interleaved (a load change on a shared machine hits
all three alike), the median of --reps timings of
  (a) a plain SFT step (HF forward with labels, backward, AdamW: metagrad_ratio.sft_steps),
  (b) an engine forward step: inner.train_step and the saving of its record (StepStore.put),
  (c) a reverse step t > 1: taking the record back (StepStore.pop, the host-to-device copy on
      CUDA) and reverse.reverse_step, the sweep's own code: optim.step_adjoint, one
      hvp_and_tangent_scores per HVP microbatch, the scores and the H·γ sum;
each as a ratio to (a) (on the CPU also by process CPU time). Then one reverse step under
torch.profiler: the top ops by self time on the device (CUDA kernels on cuda, CPU on cpu) and
the totals by category, each as a share of the profiled time and in SFT-step units (share ×
reverse step / SFT step), the op calls, the host's waits for the device, and (CUDA) kernel
time over wall time. The step's record, λ and the optimizer state's adjoint are those of a
middle step: λ and the state adjoint come from an earlier reverse step, so they are dense on
every parameter.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from metagrad_ratio import SHAPES, build, sft_steps, sync
from metagrad_steps import examples_for
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from dpg import Recipe
from dpg.metagrad import optim
from dpg.metagrad.engine import plan_steps
from dpg.metagrad.inner import train_step
from dpg.metagrad.reverse import reverse_step
from dpg.metagrad.store import StepStore
from dpg.metagrad.target import prepared

# op-name fragments -> category; the first category with a matching fragment wins
CATEGORIES = {
    "matmul": ("mm", "matmul", "linear", "gemm", "bmm"),
    "copy/cast": ("copy", "_to_copy", "clone", "contiguous", "memcpy", "cat", "stack", "fill", "zero", "empty"),
    "reduction": ("sum", "mean", "amax", "max", "norm", "var", "softmax", "reduce"),
    "index": ("index", "gather", "scatter", "embedding", "select", "slice"),
    "elementwise": ("add", "sub", "mul", "div", "rsqrt", "sqrt", "tanh", "pow", "exp", "where", "lerp", "neg",
                    "gelu", "masked", "elementwise", "clamp", "sigmoid", "silu", "triu", "tril", "abs", "log"),
}  # fmt: skip


def category(name: str) -> str:
    low = name.lower()
    for cat, parts in CATEGORIES.items():
        if any(p in low for p in parts):
            return cat
    return "other"


def setup(model, ids, args, device):
    """The two-step recipe, its training microbatches and its HVP microbatches."""
    recipe = Recipe(steps=2, microbatch_size=args.micro)
    examples, weights = examples_for(ids), torch.ones(len(ids))
    plan = plan_steps(examples, weights, recipe, device, torch.float32)
    hvp_plan = plan_steps(examples, weights, Recipe(steps=2, microbatch_size=args.hvp_micro), device, torch.float32)
    return recipe, plan, hvp_plan


def measure(model, ids, args, device) -> dict:
    recipe, plan, hvp_plan = setup(model, ids, args, device)
    sft_step = sft_steps(model, ids[: args.seqs].to(device), args.micro, 1, device)
    sft_step()  # warm-up
    bar, key = tqdm(disable=True), ("record", 2)
    # The engine's own copy: the SFT steps interleaved below run the caller's model as HF built it
    with prepared(copy.deepcopy(model), torch.float32, device) as target:
        opt, store = recipe.optimizer_record(), StepStore("cpu", device)
        first = train_step(target, opt, plan[0], target.params, optim.init(opt, target.params), bar)
        theta, state = first.params, first.state

        def forward():  # what the forward run does for step 2: the step, and its record saved
            out = train_step(target, opt, plan[1], theta, state, bar)
            store.put(key, {"theta": theta, "g": out.grads, "m": out.state.m, "v": out.state.v})

        scores = torch.zeros(len(ids), dtype=torch.float64, device=device)
        gen = torch.Generator().manual_seed(2)
        lam = {k: 1e-3 * torch.randn(p.shape, generator=gen).to(device) for k, p in target.params.items()}
        forward()  # the warm-up of both, and a middle step's λ and state adjoint (dense everywhere)
        lam, adj_state = reverse_step(target, opt, 2, store.pop(key), plan[1].size, hvp_plan[1], lam, None, scores)

        def reverse():
            record = store.pop(key)
            reverse_step(target, opt, 2, record, plan[1].size, hvp_plan[1], dict(lam), adj_state, scores, bar)

        # Interleaved, so that a change in the machine's load between them does not bias the ratios
        sft, fwd, rev = [], [], []
        for _ in range(args.reps):
            sft.append(_seconds(sft_step, device))
            fwd.append(_seconds(forward, device))
            rev.append(_seconds(reverse, device))
        forward()
        prof = profiled(reverse, device)
        store.close()
    out = _medians("sft", sft) | _medians("forward", fwd) | _medians("reverse", rev)
    sft_s = out["sft_step_s"]
    out |= {"forward_over_sft": out["forward_step_s"] / sft_s, "reverse_over_sft": out["reverse_step_s"] / sft_s}
    out["reverse_over_sft_each"] = [r[0] / s[0] for r, s in zip(rev, sft)]  # each interleaved pair
    out["reverse_over_sft_paired"] = statistics.median(out["reverse_over_sft_each"])
    if device.type == "cpu":
        out["cpu_time_ratios"] = {k: out[f"{k}_step_cpu_s"] / out["sft_step_cpu_s"] for k in ("forward", "reverse")}
    return out | {"profile": summarise(prof, device, out["reverse_step_s"], sft_s, args.top)}


def _seconds(fn, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CPU time: blind to other jobs' time slices)."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _medians(what: str, runs: list[tuple[float, float]]) -> dict:
    wall, cpu = zip(*runs)
    return {f"{what}_step_s": statistics.median(wall), f"{what}_all_s": wall,
            f"{what}_step_cpu_s": statistics.median(cpu), f"{what}_all_cpu_s": cpu}  # fmt: skip


def profiled(fn, device):
    """The profile of one call, and its wall-clock seconds under the profiler."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    return prof, wall


def _self_time(evt, cuda: bool) -> float:
    """Self time in µs: on the device (CUDA kernels) or on the CPU."""
    if not cuda:
        return evt.self_cpu_time_total
    return getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)


def summarise(profiled_run, device, rev_s: float, sft_s: float, top: int) -> dict:
    """Top ops and category totals: µs, share of the profiled self time, SFT-step units.
    On CUDA an op's self time is that of the kernels it launched (the kernels' own rows,
    which would count them twice, are left out)."""
    prof, wall = profiled_run
    cuda = device.type == "cuda"
    host_ops = [e for e in prof.key_averages() if not cuda or e.device_type == torch.autograd.DeviceType.CPU]
    events = [e for e in host_ops if _self_time(e, cuda) > 0]
    total = max(sum(_self_time(e, cuda) for e in events), 1e-9)
    unit = rev_s / sft_s  # a share of the step, in SFT steps

    def row(name, us, count=None):
        share = us / total
        return {"name": name, "us": us, "share": share, "sft_steps": share * unit} | ({"calls": count} if count else {})

    ops = sorted(events, key=lambda e: -_self_time(e, cuda))
    cats: dict[str, float] = {}
    for e in events:
        cats[category(e.key)] = cats.get(category(e.key), 0.0) + _self_time(e, cuda)
    # host waits for the device: .item() and friends (the profiler's own closing sync is one)
    syncs = {e.key: e.count for e in prof.key_averages() if "synchronize" in e.key.lower() or "local_scalar" in e.key}
    attn = [e for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention"]
    attn_us = sum((e.device_time_total if cuda else e.cpu_time_total) for e in attn)
    return {
        "clock": "CUDA kernel time" if cuda else "CPU time", "total_us": total, "profiled_wall_s": wall,
        "busy": total / 1e6 / wall,  # kernel time / wall time under the profiler (CUDA: below 1 = device idle)
        "top_ops": [row(e.key, _self_time(e, cuda), e.count) for e in ops[:top]],
        "categories": [row(c, us) for c, us in sorted(cats.items(), key=lambda kv: -kv[1])],
        "attention_forward_and_tangent_inclusive": row("attention (inside the categories)", attn_us),
        "sync_events": syncs, "op_calls": sum(e.count for e in host_ops),
    }  # fmt: skip


def show(res: dict) -> None:
    p = res["profile"]
    print(f"\nplain SFT step {res['sft_step_s']:.3f} s; engine forward step {res['forward_step_s']:.3f} s "
          f"({res['forward_over_sft']:.2f} SFT); reverse step {res['reverse_step_s']:.3f} s "
          f"({res['reverse_over_sft']:.2f} SFT; median of the pairs {res['reverse_over_sft_paired']:.2f})")  # fmt: skip
    if "cpu_time_ratios" in res:
        r = res["cpu_time_ratios"]
        print(f"by process CPU time: forward {r['forward']:.2f} SFT, reverse {r['reverse']:.2f} SFT")
    print(f"\nreverse step by {p['clock']}: {p['total_us'] / 1e6:.3f} s of {p['profiled_wall_s']:.3f} s profiled; "
          f"{p['op_calls']} op calls; waits for the device {p['sync_events']}")  # fmt: skip
    print(f"{'op':52s} {'calls':>6s} {'ms':>9s} {'share':>6s} {'SFT':>6s}")
    for r in p["top_ops"]:
        print(f"{r['name'][:52]:52s} {r['calls']:6d} {r['us'] / 1e3:9.1f} {r['share']:6.1%} {r['sft_steps']:6.2f}")
    print(f"\n{'category':52s} {'':6s} {'ms':>9s} {'share':>6s} {'SFT':>6s}")
    for r in [*p["categories"], p["attention_forward_and_tangent_inclusive"]]:
        print(f"{r['name'][:52]:52s} {'':6s} {r['us'] / 1e3:9.1f} {r['share']:6.1%} {r['sft_steps']:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="gpt2-small")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--seqs", type=int, default=None, help="sequences per inner step (default: the shape's)")
    ap.add_argument("--micro", type=int, default=None, help="training microbatch (default: the shape's)")
    ap.add_argument("--hvp-micro", type=int, default=None, help="HVP microbatch (default: half the training one)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each (median), after a warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--top", type=int, default=25, help="ops listed in the profile table")
    ap.add_argument("--out", default="reverse_profile.json")
    args = ap.parse_args()
    shape, device = SHAPES[args.shape], torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    args.seqs, args.micro = args.seqs or shape["seqs"], args.micro or shape["micro"]
    args.hvp_micro = args.hvp_micro or max(1, args.micro // 2)
    model = build(shape, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (2 * args.seqs, shape["seq_len"]), generator=gen)
    res = {
        "shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tf32": args.tf32, "threads": torch.get_num_threads(), "seqs_per_step": args.seqs,
        "seq_len": shape["seq_len"], "microbatch": args.micro, "hvp_microbatch": args.hvp_micro, "reps": args.reps,
    }  # fmt: skip
    res |= measure(model, ids, args, device)
    show(res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
