"""How many of a model's matrix weights sit exactly on, or exactly halfway between, TF32 values.

    python benchmarks/tf32_grid.py smollm2-135m-instruct [--out tf32_grid.json]

TF32 matmuls round each fp32 input to a 10-bit mantissa (the low 13 of fp32's 23 bits). A
weight whose low 13 bits are 0x1000 is exactly halfway between two TF32 values: any step,
however small, decides which way it rounds, and half of such weights then move a whole TF32
step (~1e-3 relative) in the direction of the update. A weight whose low bits are 0 is on the
grid: a step toward zero rounds it (when truncated) a whole TF32 step. De-quantized weights
(GGUF's Q4_1: a 4-bit code times an fp16 scale plus an fp16 minimum) are of this kind, random
or trained fp32 weights are not (about 1/8192 of them each way). This is why Φ(θ_1) − Φ(θ_0) of
an inner step measured with TF32 matmuls is not the step's effect (benchmarks/inner_agreement.py)
and why the engine measures Φ in full fp32.
"""

from __future__ import annotations

import argparse
import json

import torch

from dpg.models import load_model


def grid_shares(model: torch.nn.Module) -> dict[str, float]:
    """Shares of the fp32 matrix weights (2-D and up) exactly on and exactly halfway between TF32 values."""
    total = on = half = 0
    for p in model.parameters():
        if p.dtype != torch.float32 or p.dim() < 2:
            continue
        low = p.detach().contiguous().view(torch.int32) & 0x1FFF
        total += low.numel()
        on += int((low == 0).sum())
        half += int((low == 0x1000).sum())
    return {"matrix_weights": total, "on_tf32_grid": on / total, "halfway": half / total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a preset, a Hugging Face directory or a GGUF file (dpg.models.load)")
    ap.add_argument("--out", default="tf32_grid.json")
    args = ap.parse_args()
    model, _ = load_model(args.model, device="cpu")
    shares = grid_shares(model) | {"model": args.model}
    print(f"{args.model}: {shares['matrix_weights']:,} matrix weights; exactly on a TF32 value "
          f"{shares['on_tf32_grid']:.3f}, exactly halfway between two {shares['halfway']:.3f}")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(shares, f, indent=2)


if __name__ == "__main__":
    main()
