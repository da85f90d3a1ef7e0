"""How much of a transfer check's gap is sampling noise? A bootstrap of the check's own samples,
exact and cheap, for pattern metrics ("67", QR).

    python benchmarks/transfer_spread.py configs/paper/67.yaml \\
        benchmarks/results/paper/67.evaluate.json benchmarks/results/paper/67-naive.evaluate.json \\
        [--replicates 2000] [--sizes 64 128 256] [--out benchmarks/results/paper/67.spread.json]

Every row of every file (a generator's samples, as `dpg evaluate` wrote them) is one set; sets
with the same samples (each file's base row) are measured once.

Why it is exact: the check fine-tunes a fresh target for one step on the mean of w_i·∇l_i, and
a pattern metric reads one block B of the LM head alone. AdamW and SGD are elementwise, so the
block's update depends on the block of that mean gradient alone, (1/N)·Σ c_i·∇_B l_i, which is
linear in the samples' multiplicities c_i. So one gradient per sample, once, gives the check's
Φ and pixel accuracy on any resample of them, through dpg's own optimizer step and metric.
Resamples redraw each held-out prompt's completions with replacement among themselves (sample i
answers prompt i mod P), as another sampling seed would redraw them for the same prompts.
--sizes also gives each set's check on fewer of its samples (the same number from every
prompt, drawn without replacement): how the check moves with its sample count.
With every c_i = 1 the script gives the recorded check back ("recorded" against "all once";
they differ only where the check ran on a GPU and a block entry's tiny gradient rounds the
other way), and `tests/test_transfer_spread.py` checks it against `fine_tune` with weights c.

The cost is one forward and backward pass of the target per sample: ~1 s for SmolLM2 on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dpg.config import TrainConfig, load_config
from dpg.data import encode_texts, load_prompts
from dpg.errors import DpgError
from dpg.metagrad import optim
from dpg.metagrad.target import losses_and_hidden, make_microbatch, prepared
from dpg.metrics import PatternMetric, build_metric
from dpg.models import load
from dpg.runtime import resolve_dtype


def read_rows(paths: list[str]) -> dict[str, dict]:
    """Every row of every transfer-check file, by name: "STEM:GENERATOR@SEED"."""
    rows = {}
    for path in paths:
        stem = Path(path).name.removesuffix(".json").removesuffix(".evaluate")
        for row in json.loads(Path(path).read_text()):
            rows[f"{stem}:{row['generator']}@{row['seed']}"] = row
    return rows


def read_sets(rows: dict[str, dict]) -> dict[str, list[str]]:
    """name -> samples, the same samples kept once under their first name."""
    sets: dict[str, list[str]] = {}
    for name, row in rows.items():
        if row["samples"] not in sets.values():
            sets[name] = row["samples"]
    return sets


def block_grads(cfg: TrainConfig, model, tokenizer, metric: PatternMetric, samples: list[str]) -> torch.Tensor:
    """∇_B l_i for every sample: (N, w, h), in the head's layout, in the run's dtype, on the CPU."""
    examples = encode_texts(tokenizer, samples, cfg.reward.max_length)
    h, w = metric.pattern.shape
    rows = slice(metric.vocab_offset, metric.vocab_offset + w)
    cols = slice(metric.hidden_offset, metric.hidden_offset + h)
    dtype = resolve_dtype(cfg.dtype)
    out = torch.empty(len(samples), w, h, dtype=dtype)
    with prepared(model, dtype, torch.device("cpu")) as target:
        if metric.head not in target.params:
            raise DpgError(f"the metric's head {metric.head} is not a trainable parameter of the target")
        for i in tqdm(range(len(samples)), desc="block gradients", unit="sample", leave=False):
            n = int(examples.attention_mask[i].sum())
            mb = make_microbatch(torch.tensor([i]), examples.input_ids[i : i + 1, :n],
                                 examples.attention_mask[i : i + 1, :n], examples.loss_mask[i : i + 1, :n],
                                 torch.ones(1), dtype)  # fmt: skip
            head = target.params[metric.head].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = losses_and_hidden(target, {**target.params, metric.head: head}, mb)[0][0]
                out[i] = torch.autograd.grad(loss, head)[0][rows, cols]
    return out


def checked(cfg: TrainConfig, metric: PatternMetric, grads: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Φ and the proxy of the check on the samples taken counts[i] times each: dpg's optimizer
    step on the block from its mean gradient, read by the metric itself (on the block alone)."""
    opt = cfg.recipe.optimizer_record()
    g = torch.einsum("n,nwh->wh", counts.to(grads), grads) / counts.sum()
    start = metric.initial.to(grads)
    new = optim.step(opt, {"b": start}, optim.init(opt, {"b": start}), {"b": g}, keep_state=False)[0]["b"]
    on_block = dataclasses.replace(metric, vocab_offset=0, hidden_offset=0)
    params = {metric.head: new}
    return {"phi": float(on_block(params)), **on_block.proxy(params)}


def resample(strata: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Multiplicities of one resample: each stratum's members drawn with replacement among themselves."""
    counts = torch.zeros(len(strata))
    for s in strata.unique():
        members = (strata == s).nonzero().flatten()
        picks = members[torch.randint(len(members), (len(members),), generator=gen)]
        counts.index_add_(0, picks, torch.ones(len(picks)))
    return counts


def subsample(strata: torch.Tensor, per: int, gen: torch.Generator) -> torch.Tensor:
    """Multiplicities (0 or 1) of one smaller check: `per` of each stratum's members, drawn without replacement."""
    counts = torch.zeros(len(strata))
    for s in strata.unique():
        members = (strata == s).nonzero().flatten()
        if per > len(members):
            raise SystemExit(f"{per} samples a prompt asked, prompt {int(s)} has {len(members)}")
        counts[members[torch.randperm(len(members), generator=gen)[:per]]] = 1
    return counts


def size_curve(cfg, metric, grads: dict[str, torch.Tensor], prompts: int, sizes: list[int], replicates: int,
               seed: int) -> dict:  # fmt: skip
    """Each set's check on fewer of its samples (each size a multiple of the prompts, the same
    share of every prompt's): how the check's figures move with its sample count."""
    if bad := [n for n in sizes if n % prompts]:
        raise SystemExit(f"--sizes must be multiples of the {prompts} held-out prompts: {bad}")
    gen, out = torch.Generator().manual_seed(seed), {}
    for name, g in grads.items():
        strata = torch.arange(len(g)) % prompts
        out[name] = {}
        for n in sizes:
            drawn = draws(cfg, metric, g, lambda: subsample(strata, n // prompts, gen), replicates)
            out[name][n] = {k: spread(v) for k, v in drawn.items()}
    return out


def draws(cfg, metric, grads: torch.Tensor, counts_of, replicates: int) -> dict[str, torch.Tensor]:
    """The check's figures on `replicates` draws of multiplicities (counts_of() makes one)."""
    rows = [checked(cfg, metric, grads, counts_of()) for _ in range(replicates)]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]}


def spread(values: torch.Tensor) -> dict[str, float]:
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype)).tolist()
    return {"mean": values.mean().item(), "std": values.std().item(), "ci95": [lo, hi]}


def bootstrap(cfg, metric, grads: dict[str, torch.Tensor], prompts: int, replicates: int, seed: int) -> dict:
    """Each set's Φ and pixel accuracy over `replicates` resamples, and each pair's difference
    (the sets are independent draws, so a pair's replicates are paired at random)."""
    gen = torch.Generator().manual_seed(seed)
    drawn = {}
    for name, g in grads.items():
        strata = torch.arange(len(g)) % prompts
        drawn[name] = draws(cfg, metric, g, lambda: resample(strata, gen), replicates)
    out = {"sets": {n: {k: spread(v) for k, v in d.items()} for n, d in drawn.items()}, "pairs": {}}
    names = list(drawn)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = {k: drawn[a][k] - drawn[b][k] for k in drawn[a]}
            out["pairs"][f"{a} - {b}"] = {k: spread(v) | {"share_above_0": (v > 0).double().mean().item()}
                                          for k, v in diff.items()}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("files", nargs="+", help="transfer checks (NAME.evaluate.json), every row a set")
    ap.add_argument("--replicates", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", nargs="*", default=[], help="config overrides (key=value)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[],
                    help="also the check on fewer samples: these counts, multiples of the prompts")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_config(TrainConfig, args.config, args.override)
    if cfg.recipe.steps != 1 or cfg.recipe.batch_size is not None:
        raise SystemExit(f"needs a one-step check on all samples (recipe.steps = 1, no batch_size): {args.config}")
    model, tokenizer = load(cfg.target, device=torch.device("cpu"))
    metric = build_metric(cfg.metric, model, tokenizer)
    if not isinstance(metric, PatternMetric):
        raise SystemExit(f"needs a pattern metric: metric.name is {cfg.metric.name}")
    prompts = len(load_prompts(cfg.prompts)[1])
    rows, grads = read_rows(args.files), {}
    sets, before = read_sets(rows), {n: {"phi": r["metric"], **r["proxy"]} for n, r in rows.items()}
    for name, samples in sets.items():
        start = time.perf_counter()
        grads[name] = block_grads(cfg, model, tokenizer, metric, samples)
        once = checked(cfg, metric, grads[name], torch.ones(len(samples)))
        print(f"{name}: {len(samples)} samples in {time.perf_counter() - start:.0f} s; "
              f"all once {once}, recorded {before[name]}", flush=True)  # fmt: skip
        before[name] = {"recorded": before[name], "all_once": once}
    result = {"command": " ".join(["python", *sys.argv]), "prompts": prompts, "replicates": args.replicates,
              "checks": before, **bootstrap(cfg, metric, grads, prompts, args.replicates, args.seed)}  # fmt: skip
    if args.sizes:
        result["sizes"] = size_curve(cfg, metric, grads, prompts, args.sizes, args.replicates, args.seed)
        for name, by_size in result["sizes"].items():
            print(name, {n: f"{v['pixel_accuracy']['mean']:.3f} ± {v['pixel_accuracy']['std']:.3f}"
                         for n, v in by_size.items()})  # fmt: skip
    for name, figures in result["sets"].items():
        print(name, {k: f"{v['mean']:.7g} ± {v['std']:.2g}" for k, v in figures.items()})
    for name, figures in result["pairs"].items():
        print(name, {k: f"{v['mean']:+.3g}, 95 % [{v['ci95'][0]:+.3g}, {v['ci95'][1]:+.3g}], above 0 in "
                        f"{v['share_above_0']:.1%}" for k, v in figures.items()})  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
