"""Where the inner AdamW step saturates on a pattern's block, and what is left of the reward there.

    python benchmarks/adam_saturation.py configs/paper/67.yaml benchmarks/results/paper/67_long2.evaluate.json \
        [--samples 128] [--microbatch 16] [--out saturation.json]

From a fresh state AdamW's first update of a weight is u = g/(√(g² + eps_root) + eps): ±1, so a
move of exactly ±lr, wherever |g| ≫ √eps_root, and its derivative du/dg, through which every
example's metagradient passes, is (eps_root/(g² + eps_root))^{3/2} of its value at g = 0 (eps
aside). For each generator in a transfer check's file (base, trained), this takes the target's
batch gradient g on `--samples` of its samples (every k-th, the check's order), on the pattern's
block (the engine's own loss and gradient, in microbatches of `--microbatch`), and gives:
- ratio: |g|/√eps_root over the block's pixels (min, median, max), and the share past 100×;
- saturated_accuracy: the pixel accuracy of −sign(g), which the block holds once every pixel is
  saturated; `wrong`: the pixels (row, column) it gets wrong, with their ratios;
- factor: du/dg against its value at g = 0 (median, max over the pixels): how much of the
  metagradient's route through the update is left.
"""

from __future__ import annotations

import argparse
import json

import torch

from dpg.config import TrainConfig, load_config
from dpg.data import encode_texts
from dpg.metagrad.target import batch_loss_grad, make_microbatch, prepared
from dpg.metrics import PatternMetric, build_metric
from dpg.models import load


def block_gradient(model, tok, metric: PatternMetric, texts: list[str], max_length: int, microbatch: int):
    """g on the pattern's block, (h, w) in the pattern's layout: the gradient of the mean over
    `texts` of each text's mean token loss, as the inner step takes it."""
    examples = encode_texts(tok, texts, max_length)
    h, w = metric.pattern.shape
    vocab, hidden = metric.vocab_offset, metric.hidden_offset
    with prepared(model, torch.float32, torch.device("cpu")) as target:
        total = None
        for start in range(0, len(texts), microbatch):
            idx = torch.arange(start, min(start + microbatch, len(texts)))
            rows = (x[idx] for x in examples)
            mb = make_microbatch(idx, *rows, torch.ones(len(idx)), torch.float32)
            grads = batch_loss_grad(target, target.params, mb, len(texts))[0][metric.head]
            block = grads[vocab : vocab + w, hidden : hidden + h]
            total = block.double() if total is None else total + block.double()
    return total.T


def saturation(g: torch.Tensor, pattern: torch.Tensor, eps_root: float) -> dict:
    """The figures above, from the block's gradient g and the ±1 pattern, both (h, w)."""
    ratio = g.abs() / eps_root**0.5
    factor = (eps_root / (g.square() + eps_root)) ** 1.5
    wrong = (-torch.sign(g) != pattern).nonzero().tolist()
    return {
        "ratio": {"min": ratio.min().item(), "median": ratio.median().item(), "max": ratio.max().item()},
        "share_past_100x": (ratio > 100).double().mean().item(),
        "saturated_accuracy": 1.0 - len(wrong) / pattern.numel(),
        "wrong": [{"pixel": p, "ratio": ratio[p[0], p[1]].item()} for p in wrong],
        "factor": {"median": factor.median().item(), "max": factor.max().item()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("evaluate", help="a transfer check's NAME.evaluate.json (rows with their samples)")
    ap.add_argument("--samples", type=int, default=128, help="samples a generator (every k-th of its check's)")
    ap.add_argument("--microbatch", type=int, default=16, help="samples a forward pass")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    cfg = load_config(TrainConfig, args.config, [])
    if cfg.metric.name != "pattern" or cfg.recipe.optimizer != "adamw":
        raise SystemExit(f"{args.config}: needs a pattern metric and an AdamW inner run")
    model, tok = load(cfg.target)
    metric = build_metric(cfg.metric, model, tok)
    out = {"config": args.config, "evaluate": args.evaluate, "eps_root": cfg.recipe.eps_root}
    for row in json.load(open(args.evaluate)):
        texts = row["samples"][:: max(1, len(row["samples"]) // args.samples)][: args.samples]
        g = block_gradient(model, tok, metric, texts, cfg.reward.max_length, args.microbatch)
        out[row["generator"]] = {"samples": len(texts)} | saturation(g, metric.pattern.double(), cfg.recipe.eps_root)
        print(row["generator"], json.dumps(out[row["generator"]]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
