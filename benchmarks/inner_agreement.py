"""Does the engine's inner run equal plain fine-tuning? θ_M and Φ(θ_M), side by side.

    python benchmarks/inner_agreement.py configs/paper/german.yaml \
        --samples benchmarks/results/paper/german.evaluate.json --n 1024 \
        --micro 64 128 --chunk 16 64 --tf32 0 1 [--out inner_agreement.json]

For every setting (microbatch, lm_loss chunk, TF32 on CUDA) it runs, on the same completions
(a samples file, or one generator's samples in a transfer check's JSON, repeated to --n), the
exact metagradient (`example_metagrads`, which reports Φ(θ_0) and Φ(θ_M) and hands θ_M to
`on_trained`) and the plain inner run (`fine_tune`, as the naive reward and `dpg evaluate` do).
It prints both Φ(θ_M) (the plain run's measured in full fp32, as the engine and the naive reward
measure Φ), Φ of the engine's θ_M measured the same way, Φ(θ_0) and the plain run's Φ(θ_M)
measured with TF32 matmuls, the largest relative difference of θ_M − θ_0 between the two runs,
and the size of the step. The two runs must agree to rounding: they train with the same code.

What it found (one H200, SmolLM2, 1,024 base German-run samples, README "German run"): the two
runs agree in every setting, and a step trained in TF32 gains in fp32 what an fp32 step gains
(0.00229 against 0.00230), but Φ measured with TF32 matmuls shows 9× that gain (0.0204): the
step is far below TF32's resolution and SmolLM2's de-quantized weights sit on or halfway
between TF32 values (`benchmarks/tf32_grid.py`). The engine now measures Φ in fp32 always.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from dataclasses import replace

import torch

from dpg import example_metagrads
from dpg.config import TrainConfig, load_config
from dpg.data import encode_texts
from dpg.metagrad.engine import fine_tune
from dpg.metagrad.precision import tf32_matmuls
from dpg.metrics import build_metric
from dpg.models import load
from dpg.sampling import read_samples


COLUMNS = [  # key, title, width, format
    ("micro", "micro", 5, "d"), ("chunk", "chunk", 5, "d"), ("tf32", "tf32", 4, "d"),
    ("phi_before", "Φ before", 10, ".6f"), ("phi_engine", "Φ engine", 10, ".6f"),
    ("phi_engine_theta", "Φ(θ eng)", 10, ".6f"), ("phi_plain", "Φ plain", 10, ".6f"),
    ("phi_before_tf32", "Φ0 TF32", 10, ".6f"), ("phi_plain_tf32", "Φ pl TF32", 10, ".6f"),
    ("step_rel_diff", "Δθ rel diff", 11, ".2e"), ("largest_step", "max |Δθ|", 9, ".2e"),
]  # fmt: skip


def step_difference(theta0: dict, a: dict, b: dict) -> tuple[float, float]:
    """max over tensors of |Δa − Δb| / max|Δa| (Δ = θ_M − θ_0), and the largest |Δa|."""
    worst, size = 0.0, 0.0
    for k, p0 in theta0.items():
        da, db = a[k].double().cpu() - p0, b[k].double().cpu() - p0
        scale = float(da.abs().max())
        size = max(size, scale)
        if scale > 0:
            worst = max(worst, float((da - db).abs().max()) / scale)
    return worst, size


def one_setting(cfg: TrainConfig, texts: list[str], micro: int, chunk: int, tf32: bool, device) -> dict:
    cfg = replace(cfg, recipe=replace(cfg.recipe, microbatch_size=micro), metric=replace(cfg.metric, chunk=chunk))
    target, tok = load(cfg.target, device=device)
    metric = build_metric(cfg.metric, target, tok)
    examples = encode_texts(tok, texts, cfg.reward.max_length)
    theta0 = {k: p.detach().double().cpu() for k, p in target.named_parameters()}
    seen = {}
    with tf32_matmuls(tf32):
        res = example_metagrads(
            target,
            examples,
            cfg.recipe,
            metric,
            device=device,
            on_trained=lambda p: seen.update({k: v.detach().clone() for k, v in p.items()}),
        )
        plain = fine_tune(target, examples, cfg.recipe, device=device).params
    everything = {k: p.detach() for k, p in target.named_parameters()} | plain
    with torch.no_grad(), tf32_matmuls(False):  # as the engine and the naive reward measure Φ: full fp32
        phi_plain = float(metric(everything))
        phi_seen = float(metric(everything | seen))  # the engine's θ_M, measured as the plain run's
    with torch.no_grad(), tf32_matmuls(True):  # the same θ_0 and θ_M, measured with TF32 matmuls
        phi_before_tf32 = float(metric({k: p.detach() for k, p in target.named_parameters()}))
        phi_plain_tf32 = float(metric(everything))
    worst, size = step_difference({k: theta0[k] for k in plain}, seen, plain)
    return {
        "micro": micro,
        "chunk": chunk,
        "tf32": tf32,
        "phi_before": res.metric_before,
        "phi_engine": res.metric,
        "phi_engine_theta": phi_seen,
        "phi_plain": phi_plain,
        "phi_before_tf32": phi_before_tf32,
        "phi_plain_tf32": phi_plain_tf32,
        "step_rel_diff": worst,
        "largest_step": size,
    }


def completions(path: str, generator: str) -> list[str]:
    """The completions of a samples file, or of one generator's row of a transfer check's JSON."""
    if not path.endswith(".evaluate.json"):
        return [r["completion"] for r in read_samples(path)]
    rows = [r for r in json.loads(Path(path).read_text()) if r["generator"] == generator]
    if not rows:
        raise SystemExit(f"{path} has no row of generator {generator!r}")
    return rows[0]["samples"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--samples", required=True, help="a samples file (dpg sample writes them) or a NAME.evaluate.json")
    ap.add_argument("--generator", default="base", help="NAME.evaluate.json: whose samples (its row's generator)")
    ap.add_argument("--n", type=int, default=1024, help="completions in the inner step (the file, repeated)")
    ap.add_argument("--micro", type=int, nargs="+", default=[128])
    ap.add_argument("--chunk", type=int, nargs="+", default=[16])
    ap.add_argument("--tf32", type=int, nargs="+", default=[0], help="0/1 (CUDA only)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--overrides", nargs="*", default=[], help="config overrides, key=value")
    ap.add_argument("--out", default="inner_agreement.json")
    args = ap.parse_args()
    cfg = load_config(TrainConfig, args.config, args.overrides)
    rows = completions(args.samples, args.generator)
    texts = (rows * (args.n // len(rows) + 1))[: args.n]
    device = torch.device(args.device)
    results = []
    print(" ".join(f"{title:>{width}s}" for _, title, width, _ in COLUMNS), flush=True)
    for tf32 in args.tf32:
        for micro in args.micro:
            for chunk in args.chunk:
                r = one_setting(cfg, texts, micro, chunk, bool(tf32), device)
                results.append(r)
                print(" ".join(f"{r[key]:{width}{fmt}}" for key, _, width, fmt in COLUMNS), flush=True)
                with open(args.out, "w") as f:  # rewritten after every row: a crash keeps what was measured
                    json.dump(
                        {"config": args.config, "n": args.n, "samples": args.samples, "rows": results}, f, indent=2
                    )


if __name__ == "__main__":
    main()
