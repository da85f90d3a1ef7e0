"""Time and memory of each differentiation pass on one microbatch (GPT-2-small shape).

    python benchmarks/profile_passes.py [--tf32] [--profile]

Rows: the training pass (first order), the forward-mode scoring pass with a tangent on
every parameter, and the forward-over-reverse pass (HVP + scores), each via torch.func and
via torch.autograd.forward_ad, at several microbatch sizes. --profile prints the top CUDA
kernels of the forward-over-reverse pass. A study tool for the engine's design choices.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpg import Recipe, make_examples
from dpg.metagrad.engine import plan_steps
from dpg.metagrad.target import batch_loss_grad, example_losses, hvp_and_tangent_scores, prepare_target, tangent_scores
from metagrad_ratio import SHAPES, build


def fwad_scores(target, params, tangent, mb):
    with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        duals = {k: fwAD.make_dual(p, tangent[k]) for k, p in params.items()}
        return fwAD.unpack_dual(example_losses(target, duals, mb)).tangent


def fwad_hvp(target, params, tangent, mb, size):
    with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        duals = {k: fwAD.make_dual(p.detach().requires_grad_(True), tangent[k]) for k, p in params.items()}
        with torch.enable_grad():
            losses = example_losses(target, duals, mb)
            grads = torch.autograd.grad((mb.weights * losses).sum() / size, list(duals.values()))
        hv = {k: fwAD.unpack_dual(g).tangent for k, g in zip(duals, grads)}
        return hv, fwAD.unpack_dual(losses).tangent


def measure(fn, reps=3):
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps, torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    shape = SHAPES["gpt2-small"]
    device = torch.device("cuda")
    model = build(shape, device)
    target = prepare_target(model, torch.float32, device)
    ids = torch.randint(0, shape["vocab_size"], (128, shape["seq_len"]), generator=torch.Generator().manual_seed(0))
    tangent = {k: torch.randn_like(p) * 1e-3 for k, p in target.params.items()}
    print(f"tf32={args.tf32}  {'pass':40s} {'mb':>4s} {'s/mb':>8s} {'s/128 seqs':>10s} {'peak GB':>8s}", flush=True)
    for mb_size in (128, 64, 32):
        ex = make_examples(ids[:mb_size].tolist())
        (step,) = plan_steps(ex, torch.ones(mb_size), Recipe(), device, torch.float32)
        (mb,) = step.microbatches
        rows = [
            ("train (autograd.grad)", lambda: batch_loss_grad(target, target.params, mb, mb_size)),
            ("scores jvp (torch.func)", lambda: tangent_scores(target, target.params, tangent, mb)),
            ("scores jvp (forward_ad)", lambda: fwad_scores(target, target.params, tangent, mb)),
            (
                "hvp+scores (torch.func jvp∘grad)",
                lambda: hvp_and_tangent_scores(target, target.params, tangent, mb, mb_size),
            ),
            ("hvp+scores (forward_ad + autograd)", lambda: fwad_hvp(target, target.params, tangent, mb, mb_size)),
        ]
        for name, fn in rows:
            try:
                secs, peak = measure(fn)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if "out of memory" not in str(err):
                    raise
                print(f"{'':10s} {name:40s} {mb_size:4d}      OOM", flush=True)
                torch.cuda.empty_cache()
                continue
            print(f"{'':10s} {name:40s} {mb_size:4d} {secs:8.3f} {secs * 128 / mb_size:10.3f} {peak:8.1f}", flush=True)
    if args.profile:
        ex = make_examples(ids[:32].tolist())
        (step,) = plan_steps(ex, torch.ones(32), Recipe(), device, torch.float32)
        (mb,) = step.microbatches
        from torch.profiler import ProfilerActivity, profile

        for name, fn in [
            ("torch.func hvp", lambda: hvp_and_tangent_scores(target, target.params, tangent, mb, 32)),
            ("forward_ad hvp", lambda: fwad_hvp(target, target.params, tangent, mb, 32)),
        ]:
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"\n== {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
