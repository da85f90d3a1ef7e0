"""Relative error of the engine against autograd through the fully unrolled inner run.

    python benchmarks/exactness.py        # CPU, fp64 tiny models, about 20 s

The README's exactness table comes from here. Reference: tests/reference.py (its own loss,
batching and optimizer arithmetic; shares no code with the engine).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import tiny_model, unrolled_scores  # noqa: E402
from test_engine import head_metric, lm_metric, ragged_examples, rel_err  # noqa: E402

from dpg import Recipe, example_metagrads  # noqa: E402
from dpg.metagrad.precision import float64_everywhere  # noqa: E402


def main():
    torch.manual_seed(0)
    print(
        f"{'model':14s} {'head':6s} {'opt':5s} {'M':>2s} {'metric':7s} {'HF as is':>10s} {'true fp64':>10s} "
        f"{'fp32 vs fp64':>13s}"
    )
    for family in ("gpt2", "llama"):
        for tied in (False, True):
            for opt in ("adamw", "sgd"):
                for steps in (1, 3):
                    for kind in ("head", "lm"):
                        model = tiny_model(family, tied)
                        make = head_metric if kind == "head" else lm_metric
                        lr = 1e-2 if opt == "adamw" else 0.5
                        recipe = Recipe(optimizer=opt, lr=lr, steps=steps, microbatch_size=2)
                        ex = ragged_examples()
                        ref, _ = unrolled_scores(model, ex, recipe, make(model))
                        scores = example_metagrads(model, ex, recipe, make(model), dtype=torch.float64).scores
                        plain = rel_err(scores, ref)
                        with float64_everywhere():
                            ref64, _ = unrolled_scores(model, ex, recipe, make(model))
                            s64 = example_metagrads(model, ex, recipe, make(model), dtype=torch.float64).scores
                        strict = rel_err(s64, ref64)
                        s32 = example_metagrads(model, ex, recipe, make(model), dtype=torch.float32).scores
                        print(
                            f"tiny-{family:9s} {'tied' if tied else 'untied':6s} {opt:5s} {steps:2d} {kind:7s} "
                            f"{plain:10.1e} {strict:10.1e} {rel_err(s32, s64):13.1e}"
                        )


if __name__ == "__main__":
    main()
