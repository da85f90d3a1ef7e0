"""How far choosing among ordinary sentences moves a pattern demonstration's target: a bound
on what a generator gains by writing more of the right everyday text, before it must invent
unusual text.

    python benchmarks/pattern_selection.py [--config configs/paper/67.yaml] [--pool 512] [--k 128]
                                           [--shared ../shared] [--device cpu] [--out FILE]

Scores a pool of distinct English help sentences (rows 10304 on of the help corpus, which no
training prompt holds; 40-300 characters) with `dpg attribute` under the config's target,
metric and inner recipe (exact dΦ/dw_i, one inner run on the whole pool), then runs the
config's transfer check (a fresh target, one inner step, Φ and the pixel accuracy) on k of
them chosen by score: the top k, the bottom k, three random draws of k, and the whole pool.
A score is the marginal effect of an example *within its batch*: under AdamW's first step
(about −lr·sign of the batch's gradient) a set of k trained alone takes a different step, so
the top k of one scoring need not be a good set. `pruned` follows the scores as GRPO does, in
small moves: `--rounds` times, drop the lowest-scored share of what is left and score the rest
again in its own inner run, down to k. The random draws are the baseline in the same run:
accuracy above theirs is what selection alone buys. Writes JSON (default
benchmarks/results/paper/pattern_selection_NAME.json) and, beside it, the pruned set as a samples
file (NAME.pruned.jsonl), so `dpg evaluate CONFIG evaluate.samples_file=FILE` repeats its check.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpg.attribute import AttributeConfig, run_attribute  # noqa: E402
from dpg.config import TrainConfig, load_config  # noqa: E402
from dpg.evaluate import measure_samples  # noqa: E402
from dpg.sampling import write_samples  # noqa: E402

FIRST_UNSEEN = 10304  # the paper configs' prompts.limit: later rows are no training prompt


def pool(shared: Path, n: int) -> list[str]:
    rows = [r.split("\t")[0] for r in (shared / "data" / "lohelp_en_de.tsv").read_text(encoding="utf-8").splitlines()]
    distinct = list(dict.fromkeys(s for s in rows[FIRST_UNSEEN:] if 40 < len(s) < 300))
    if len(distinct) < n:
        raise SystemExit(f"the corpus holds {len(distinct)} distinct sentences past row {FIRST_UNSEEN}, fewer than {n}")
    return distinct[:n]


def scores(cfg: TrainConfig, texts: list[str], tmp: Path) -> list[float]:
    """Each text's exact dΦ/dw_i in one inner run over all of them (dpg attribute)."""
    data = tmp / "pool.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    attribute = AttributeConfig(target=cfg.target, recipe=cfg.recipe, metric=cfg.metric, data=str(data),
                                max_length=cfg.reward.max_length, output=str(tmp / "scores.jsonl"), top=0,
                                device=cfg.device)  # fmt: skip
    run_attribute(attribute)
    rows = [json.loads(line) for line in (tmp / "scores.jsonl").read_text().splitlines()]
    return [r["score"] for r in sorted(rows, key=lambda r: r["id"])]


def pruned(cfg: TrainConfig, texts: list[str], first: list[float], k: int, rounds: int, tmp: Path) -> list[int]:
    """Indices of the k texts left after `rounds` rounds of dropping the lowest-scored share of
    those left and scoring the rest again (the first round uses `first`)."""
    left, score = list(range(len(texts))), first
    keep = (k / len(texts)) ** (1 / rounds)
    for r in range(rounds):
        n = k if r == rounds - 1 else max(k, round(len(left) * keep))
        best = sorted(range(len(left)), key=score.__getitem__, reverse=True)[:n]  # positions in `left`
        left = sorted(left[j] for j in best)
        if r < rounds - 1:
            score = scores(cfg, [texts[i] for i in left], tmp)
            print(f"round {r + 1}: {len(left)} sentences left, rescored", flush=True)
    return left


def subsets(score: list[float], k: int) -> dict[str, list[int]]:
    order = sorted(range(len(score)), key=lambda i: score[i], reverse=True)
    out = {"top": order[:k], "bottom": order[-k:]}
    for seed in range(3):
        out[f"random {seed}"] = random.Random(seed).sample(range(len(score)), k)
    out["whole pool"] = list(range(len(score)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/paper/67.yaml")
    ap.add_argument("--pool", type=int, default=512)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=4, help="pruning rounds from the pool down to k")
    ap.add_argument("--microbatch", type=int, default=16, help="recipe.microbatch_size (memory only)")
    ap.add_argument("--overrides", nargs="*", default=[], help="more KEY=VALUE for the config")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    cfg = load_config(TrainConfig, a.config, [f"device={a.device}", f"recipe.microbatch_size={a.microbatch}",
                                              *a.overrides])  # fmt: skip
    texts = pool(a.shared, a.pool)
    with tempfile.TemporaryDirectory() as tmp:
        score = scores(cfg, texts, Path(tmp))
        chosen = subsets(score, a.k) | {"pruned": pruned(cfg, texts, score, a.k, a.rounds, Path(tmp))}
    rows = {}
    for name, idx in chosen.items():
        check = measure_samples(cfg, name, 0, [texts[i] for i in idx])
        rows[name] = {"examples": len(idx), "phi": check.metric, "proxy": check.proxy,
                      "mean_score": sum(score[i] for i in idx) / len(idx)}  # fmt: skip
        print(f"{name:>10}: {len(idx):4d} sentences  Φ {check.metric:.7f}  {check.proxy}", flush=True)
    name = Path(a.config).stem
    out = a.out or Path(__file__).resolve().parent / "results" / "paper" / f"pattern_selection_{name}.json"
    best = [{"score": score[i], "text": texts[i]} for i in subsets(score, 8)["top"]]
    out.write_text(json.dumps({"config": a.config, "overrides": a.overrides, "pool": a.pool, "k": a.k,
                               "rounds": a.rounds, "device": a.device, "rows": rows, "best_8": best},
                              indent=1, ensure_ascii=False))  # fmt: skip
    # the pruned set as a samples file: `dpg evaluate CONFIG evaluate.samples_file=FILE` repeats its check
    kept = [texts[i] for i in chosen["pruned"]]
    sets = write_samples(out.with_suffix(".pruned.jsonl"), [""] * len(kept), kept, "pattern_selection:pruned", 0)
    print(f"→ {out}, {sets}")


if __name__ == "__main__":
    main()
