"""Counterfactual benchmark: dpg's exact metagradients against the influence tools people use.

    pip install -e '.[attribution-bench]'      # kronfluence, traker, dattri (pinned)
    python benchmarks/attribution.py [--out benchmarks/results/attribution.json] [key=value ...]

Task. A tiny Llama (dpg's `tiny-llama` preset, byte tokenizer) is pre-trained briefly on
English text, then fine-tuned for M AdamW steps on a mixed pool: English and German text from
../shared/data, Spanish (wrong language) and word-shuffled English and German (corrupted).
Every example is exactly `seq_len` tokens, so no padding enters any library. Two metrics Φ
(higher is better): `german`, minus the loss on held-out German text; `pattern`, the "67"
pattern on the LM head (dpg.metrics.pattern_metric).

Ground truth is real retraining (the same AdamW recipe, from the same pre-trained weights, on
the kept examples in pool order, split into M batches):
  LDS    for each fraction (50 %, 90 %), `subsets` random subsets; LDS is the Spearman
         correlation, across subsets, of the retrained Φ with the sum of the kept examples'
         scores.
  top-k  for each k: drop the k examples a method calls most harmful, or keep only the k it
         calls most helpful; retrain; ΔΦ against training on the whole pool.
The `random` method is the baseline: random scores, one draw per seed (`random_seeds` of
them), judged like every method; its LDS is ≈ 0 and its top-k picks are random k examples;
reported as mean ± standard deviation over the seeds.

`inner=sgd` is the control: the same benchmark with plain SGD (lr `sgd_lr`) as the inner run,
where Φ(w) is close to linear in the weights, against AdamW's sign-like first steps.

Every method returns one score per example on dpg's scale: positive = helps Φ. The methods
themselves live in attribution_methods.py (they import the bench-only libraries); this file
holds what the tests check (subsets, retraining loop, Spearman, LDS, top-k selection).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpg.config import load_config
from dpg.data import encode_texts, read_texts
from dpg.metagrad.engine import Examples, Recipe, fine_tune
from dpg.metrics import lm_loss_metric, pattern_metric
from dpg.models import load_model

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TASKS = ("german", "pattern")
METHODS = ("dpg", "grad_dot", "tracin", "kronfluence_ekfac", "trak", "dattri_datainf")
# dattri_datainf is left out of the default run: on this pool (full fine-tuning, 107k
# parameters) it took 72 s per training batch of 32 (about 19 minutes a task) and grew to
# 16.8 GB of memory before the OOM killer stopped it on a 23 GB machine; DataInf is designed
# for LoRA adapters. Run it with methods=[...,dattri_datainf] where memory allows.
DEFAULT_METHODS = [m for m in METHODS if m != "dattri_datainf"]
# inner=sgd's learning rate. Under SGD, scaling every weight w_i by c is scaling lr by c (weight
# decay aside), so Φ along w = c·1 is Φ against lr. Measured on the german task (Φ after the
# whole pool minus Φ(θ_0)): lr 0.003 +0.024, 0.01 +0.060, 0.03 +0.113, 0.1 +0.183, 0.2 −0.070,
# 0.3 −0.698 (AdamW at lr 3e-3: +0.324). At 0.01 the gain per unit lr is 75 % of 0.003's (at 0.1,
# 23 %): close to linear in w while Φ still moves. Chosen from this curve alone, not from any
# method's scores.
SGD_LR = 0.01


@dataclass
class BenchConfig:
    """Sizes of the benchmark; the defaults are the documented run."""

    pool: int = 512  # examples in the fine-tuning pool
    seq_len: int = 32  # tokens per example (bytes: the tiny target's tokenizer)
    steps: int = 4  # M, inner optimizer steps; the pool is split in order into M batches
    inner: str = "adamw"  # the inner run's optimizer: adamw | sgd (the linear control)
    lr: float = 3e-3  # inner AdamW learning rate (the other AdamW settings are dpg's defaults)
    sgd_lr: float = SGD_LR  # inner learning rate under inner=sgd (dpg's default weight decay)
    pretrain_steps: int = 100  # AdamW steps of English pre-training before the benchmark
    pretrain_batch: int = 32  # examples per pre-training step
    heldout: int = 32  # held-out German texts that the `german` metric measures the loss on
    subsets: int = 64  # random subsets per fraction for the LDS
    fractions: list[float] = field(default_factory=lambda: [0.5, 0.9])  # kept share of the pool, per LDS
    ks: list[int] = field(default_factory=lambda: [16, 64])  # top-k sizes
    random_seeds: int = 5  # draws of the `random` method's scores (the baseline's mean ± std)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # german | pattern
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # see attribution_methods.py
    data_dir: str = str(DATA)  # ../shared/data: fortunes_{en,de,es}.txt
    seed: int = 0  # pool sampling, subsets, random picks
    device: str = "cpu"  # cpu | cuda: where the target trains and every method runs
    # subset: train on the kept examples alone, split into M batches afresh;
    # zero_weight: the pool's own batches, removed examples weighted 0
    retrain: str = "subset"
    threads: int = 1  # torch CPU threads (on a shared machine one thread wastes no time spinning)


# ---------------------------------------------------------------- scoring a ranking


def ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties get the mean of the ranks they span."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in torch.unique(x):
        tied = x == v
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks."""
    rx, ry = ranks(torch.as_tensor(x)), ranks(torch.as_tensor(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / denom) if denom > 0 else float("nan")


def random_subsets(n: int, fraction: float, count: int, seed: int) -> list[Tensor]:
    """`count` subsets of round(fraction·n) of range(n), each sorted (pool order kept)."""
    gen = torch.Generator().manual_seed(seed)
    size = round(fraction * n)
    return [torch.randperm(n, generator=gen)[:size].sort().values for _ in range(count)]


def lds(scores: Tensor, subsets: Sequence[Tensor], actual: Sequence[float]) -> float:
    """Linear datamodeling score: Spearman of Φ(S) with Σ_{i∈S} score_i over the subsets."""
    predicted = [float(scores[s].sum()) for s in subsets]
    return spearman(predicted, actual)


def top_k(scores: Tensor, k: int) -> dict[str, Tensor]:
    """The training sets a ranking picks: the pool without its k lowest scores, and its k
    highest alone; sorted indices (pool order). Ties go to the lower index (stable sort)."""
    order = torch.argsort(scores, stable=True)  # ascending: most harmful first
    return {
        f"drop_harmful_{k}": order[k:].sort().values,
        f"keep_helpful_{k}": order[-k:].sort().values,
    }


def random_scores(n: int, seed: int) -> Tensor:
    """The `random` method's scores for one seed: i.i.d. standard normal, (n,) float64."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- ground truth


Retrain = Callable[[Tensor], dict[str, float]]  # sorted kept indices -> {task: Φ after retraining on them}


def make_retrain(
    model, examples: Examples, recipe: Recipe, metrics: dict[str, Callable], dtype: torch.dtype = torch.float32,
    mode: str = "subset",
) -> Retrain:  # fmt: skip
    """Φ of every metric after fine-tuning `model` from its weights (same recipe) on the kept
    examples alone ("subset": they are split into M batches afresh, so removing one shifts the
    batch boundaries) or on the whole pool's batches with the others weighted 0 ("zero_weight":
    every kept example stays in its step and each batch keeps its divisor |B_t|, the
    counterfactual dΦ/dw_i is the derivative of). The tasks share pool and recipe, so one
    retraining serves them all; each training set is trained once (cached by its indices)."""
    if mode not in ("subset", "zero_weight"):
        raise SystemExit(f"retrain must be subset or zero_weight, got {mode!r}")
    base = {k: p.detach() for k, p in model.named_parameters()}
    cache: dict[bytes, dict[str, float]] = {}

    def retrain(keep: Tensor) -> dict[str, float]:
        key = keep.numpy().tobytes()
        if key not in cache:
            if mode == "subset":
                trained = fine_tune(model, Examples(*(x[keep] for x in examples)), recipe, dtype=dtype)
            else:
                weights = torch.zeros(examples.input_ids.shape[0], dtype=torch.float64)
                weights[keep] = 1.0
                trained = fine_tune(model, examples, recipe, weights, dtype=dtype)
            params = {**base, **trained.params}
            with torch.no_grad():
                cache[key] = {name: float(metric(params)) for name, metric in metrics.items()}
        return cache[key]

    return retrain


def ground_truth(retrain: Retrain, n: int, cfg: BenchConfig) -> dict[float, tuple[list[Tensor], list[dict]]]:
    """For each fraction: the random subsets and Φ retrained on each (method-independent)."""
    out = {}
    for j, fraction in enumerate(cfg.fractions):
        subsets = random_subsets(n, fraction, cfg.subsets, seed=cfg.seed * 1000 + j)
        bar = tqdm(subsets, desc=f"retraining on {round(fraction * 100)} % subsets", unit="run", leave=False)
        out[fraction] = (subsets, [retrain(s) for s in bar])
    return out


def evaluate_scores(scores: Tensor, task: str, truth: dict, retrain: Retrain, phi_full: float, ks) -> dict:
    """LDS per fraction and ΔΦ (against the whole pool) of each top-k training set, on `task`."""
    row = {f"lds_{round(f * 100)}": lds(scores, s, [p[task] for p in phis]) for f, (s, phis) in truth.items()}
    row["topk_gain"] = {name: retrain(keep)[task] - phi_full for k in ks for name, keep in top_k(scores, k).items()}
    return row


def random_baseline(retrain: Retrain, task: str, truth: dict, phi_full: float, n: int, cfg: BenchConfig) -> dict:
    """The `random` method on `task`: `random_scores` for each of `random_seeds` seeds, judged
    by `evaluate_scores`; every figure is the mean over the seeds, with its standard deviation
    beside it (lds_50_std, topk_gain_std)."""
    rows = [
        evaluate_scores(random_scores(n, cfg.seed * 1000 + 500 + s), task, truth, retrain, phi_full, cfg.ks)
        for s in range(cfg.random_seeds)
    ]  # fmt: skip
    return mean_std(rows)


def mean_std(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for one row) of `evaluate_scores` rows."""

    def stats(values: list[float]) -> tuple[float, float]:
        t = torch.tensor(values, dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0

    out: dict = {"topk_gain": {}, "topk_gain_std": {}}
    for key in (k for k in rows[0] if k.startswith("lds_")):
        out[key], out[f"{key}_std"] = stats([r[key] for r in rows])
    for name in rows[0]["topk_gain"]:
        out["topk_gain"][name], out["topk_gain_std"][name] = stats([r["topk_gain"][name] for r in rows])
    return out


# ---------------------------------------------------------------- the task


@dataclass
class Task:
    """What every method sees: θ_0, the pool, the inner run and Φ."""

    name: str  # german | pattern
    model: torch.nn.Module  # the pre-trained target, θ_0 (never modified)
    examples: Examples  # the pool, (N, seq_len) each, no padding
    kinds: list[str]  # per example: en, de, es, shuffled-en, shuffled-de
    recipe: Recipe  # the inner run (AdamW, M steps)
    metric: Callable  # Φ(params), higher is better
    query: Examples | None  # german: the held-out texts, Φ = −mean of their losses; pattern: None


def clean_blocks(path: Path, min_bytes: int) -> list[str]:
    """A fortune file's quotes, whitespace collapsed, at least `min_bytes` long in UTF-8."""
    texts, _ = read_texts(path)
    texts = [re.sub(r"\s+", " ", t).strip() for t in texts]
    return [t for t in texts if len(t.encode()) >= min_bytes]


def shuffled_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def build_pool(cfg: BenchConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """(pool texts, their kinds, held-out German, English pre-training texts), disjoint."""
    rng = random.Random(cfg.seed)
    data = Path(cfg.data_dir)
    lang = {x: clean_blocks(data / f"fortunes_{x}.txt", cfg.seq_len) for x in ("en", "de", "es")}
    for texts in lang.values():
        rng.shuffle(texts)
    n = cfg.pool
    counts = {"en": 3 * n // 8, "de": n // 4, "es": n // 8, "shuffled-en": n // 8}
    counts["shuffled-de"] = n - sum(counts.values())
    en, de = iter(lang["en"]), iter(lang["de"])
    pool = [(next(en), "en") for _ in range(counts["en"])] + [(next(de), "de") for _ in range(counts["de"])]
    pool += [(lang["es"][i], "es") for i in range(counts["es"])]
    pool += [(shuffled_words(next(en), rng), "shuffled-en") for _ in range(counts["shuffled-en"])]
    pool += [(shuffled_words(next(de), rng), "shuffled-de") for _ in range(counts["shuffled-de"])]
    rng.shuffle(pool)
    heldout = [next(de) for _ in range(cfg.heldout)]
    pretrain = list(en)[: cfg.pretrain_steps * cfg.pretrain_batch]
    return [t for t, _ in pool], [k for _, k in pool], heldout, pretrain


def pretrained_target(cfg: BenchConfig, texts: list[str]):
    """dpg's tiny-llama, trained briefly on English so that it is not random."""
    model, tok = load_model("tiny-llama")
    model.to(cfg.device)
    model.config._attn_implementation = "eager"  # per-example gradients (vmap) in every library
    examples = encode_texts(tok, texts, cfg.seq_len)
    recipe = Recipe(lr=3e-3, steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch, weight_decay=0.0)
    params = fine_tune(model, examples, recipe).params
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model, tok


def build_tasks(cfg: BenchConfig) -> list[Task]:
    if cfg.inner not in ("adamw", "sgd"):
        raise SystemExit(f"inner must be adamw or sgd, got {cfg.inner!r}")
    texts, kinds, heldout, pretrain = build_pool(cfg)
    model, tok = pretrained_target(cfg, pretrain)
    examples = encode_texts(tok, texts, cfg.seq_len)
    assert bool(examples.attention_mask.all()), "every pool text fills seq_len"
    recipe = Recipe(optimizer=cfg.inner, lr=cfg.lr if cfg.inner == "adamw" else cfg.sgd_lr, steps=cfg.steps)
    tasks = []
    for name in cfg.tasks:
        if name == "german":
            metric = lm_loss_metric(model, tok, heldout, cfg.seq_len)
            tasks.append(Task(name, model, examples, kinds, recipe, metric, metric.examples))
        elif name == "pattern":
            tasks.append(Task(name, model, examples, kinds, recipe, pattern_metric(model, "67"), None))
        else:
            raise SystemExit(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return tasks


# ---------------------------------------------------------------- the run


def run_task(task: Task, retrain: Retrain, truth: dict, cfg: BenchConfig) -> dict:
    """Every method's scores on one task, judged against retraining."""
    from attribution_methods import run_method  # imports the bench-only libraries lazily

    n = task.examples.input_ids.shape[0]
    phi_full = retrain(torch.arange(n))[task.name]
    print(f"[{task.name}] Φ(θ_0) {_phi0(task):.6g}, after fine-tuning on the whole pool {phi_full:.6g}", flush=True)
    methods = {}
    for name in cfg.methods:
        scores, seconds = run_method(name, task)
        methods[name] = {**evaluate_scores(scores, task.name, truth, retrain, phi_full, cfg.ks), "seconds": seconds}
        methods[name]["by_kind"] = _mean_by_kind(scores, task.kinds)
        print(f"[{task.name}] {name}: {_fmt(methods[name])}", flush=True)
    methods["random"] = {**random_baseline(retrain, task.name, truth, phi_full, n, cfg), "seconds": 0.0}
    print(f"[{task.name}] random (mean of {cfg.random_seeds}): {_fmt(methods['random'])}", flush=True)
    subsets = {}
    for f, (_, phis) in truth.items():
        values = [p[task.name] for p in phis]
        subsets[str(round(f * 100))] = {"phi": values, "phi_std": float(torch.tensor(values).std())}
    return {"phi_before": _phi0(task), "phi_full": phi_full, "subsets": subsets, "methods": methods}


def _phi0(task: Task) -> float:
    with torch.no_grad():
        return float(task.metric({k: p.detach() for k, p in task.model.named_parameters()}))


def _mean_by_kind(scores: Tensor, kinds: list[str]) -> dict[str, float]:
    """Mean score per kind of text (en, de, ...): which data a method calls helpful."""
    return {k: float(scores[[i for i, x in enumerate(kinds) if x == k]].mean()) for k in sorted(set(kinds))}


def _fmt(row: dict) -> str:
    lds_part = ", ".join(f"{k} {row[k]:.3f}" for k in row if k.startswith("lds_") and not k.endswith("_std"))
    gains = ", ".join(f"{k} {v:+.3g}" for k, v in row["topk_gain"].items())
    return f"{lds_part}; ΔΦ {gains}; {row['seconds']:.1f} s"


def table(results: dict) -> str:
    """The README's markdown table: one row per task and method; ΔΦ against the whole pool."""
    first = next(iter(results["tasks"].values()))["methods"]
    keys = list(next(iter(first.values()))["topk_gain"])  # drop_harmful_16, keep_helpful_16, ...
    lds_keys = [k for k in next(iter(first.values())) if k.startswith("lds_") and not k.endswith("_std")]
    head = ["task", "method", *(f"LDS {k[4:]} %" for k in lds_keys), *(k.replace("_", " ") for k in keys), "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task, res in results["tasks"].items():
        for name, row in res["methods"].items():
            std = row.get("topk_gain_std", {})
            cells = [f"{row[k]:.3f}" + (f" ± {row[k + '_std']:.3f}" if k + "_std" in row else "") for k in lds_keys]
            for key in keys:
                value = row["topk_gain"].get(key)
                cell = "—" if value is None else f"{value:+.2e}"
                cells.append(cell + (f" ± {std[key]:.1e}" if key in std else ""))
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    return "\n".join(lines)


def lds_table(runs: dict[str, dict]) -> str:
    """LDS 50 % / 90 % of several runs (rows: run, its inner optimizer and lr, seed, task;
    columns: the methods any run has, "—" where a run lacks one)."""
    present = {m for r in runs.values() for t in r["tasks"].values() for m in t["methods"]}
    names = [m for m in (*METHODS, "random") if m in present]
    lines = ["| run | inner, lr | seed | task | " + " | ".join(names) + " |", "|---" * (len(names) + 4) + "|"]
    for label, run in runs.items():
        c = run["config"]
        inner = f"{c['inner']} {c['lr'] if c['inner'] == 'adamw' else c['sgd_lr']:g}"
        for task, res in run["tasks"].items():
            cells = [
                f"{row['lds_50']:.2f} / {row['lds_90']:.2f}" if (row := res["methods"].get(m)) else "—"
                for m in names
            ]  # fmt: skip
            lines.append(f"| {label} | {inner} | {c['seed']} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/attribution.json")
    ap.add_argument("--table", metavar="JSON", help="only print the table of a finished run's JSON")
    ap.add_argument("--lds", metavar="JSON", nargs="+", help="only print several finished runs' LDS side by side")
    ap.add_argument("overrides", nargs="*", help="BenchConfig fields, e.g. pool=128 subsets=16")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.lds:
        print(lds_table({Path(p).stem: json.loads(Path(p).read_text()) for p in args.lds}))
        return
    cfg = load_config(BenchConfig, None, args.overrides)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    tasks = build_tasks(cfg)
    pool = tasks[0].examples
    metrics = {t.name: t.metric for t in tasks}
    retrain = make_retrain(tasks[0].model, pool, tasks[0].recipe, metrics, mode=cfg.retrain)
    start = time.perf_counter()
    truth = ground_truth(retrain, pool.input_ids.shape[0], cfg)
    runs = cfg.subsets * len(cfg.fractions)
    truth_seconds = time.perf_counter() - start
    print(f"ground truth: {runs} retrainings, {truth_seconds:.0f} s", flush=True)
    command = " ".join(["python benchmarks/attribution.py", *(argv if argv is not None else sys.argv[1:])])
    results = {"command": command, "config": asdict(cfg), "environment": _environment(), "tasks": {}}
    results["ground_truth"] = {"retrainings": runs, "seconds": truth_seconds}
    for t in tasks:  # written after each task, marked partial until the last
        results["tasks"][t.name] = run_task(t, retrain, truth, cfg)
        results["methods"] = results["tasks"][cfg.tasks[0]]["methods"]  # the first task's, as the schema
        results["seconds"] = {"wall": time.perf_counter() - wall, "cpu_process": time.process_time() - cpu}
        results["partial"] = len(results["tasks"]) < len(tasks)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"wall {results['seconds']['wall']:.0f} s, process CPU {results['seconds']['cpu_process']:.0f} s; {args.out}")


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {"torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "kronfluence", "traker", "dattri"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


if __name__ == "__main__":
    main()
