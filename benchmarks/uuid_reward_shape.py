"""What the UUID demonstration's reward pays for: each example's exact dΦ/dw_i (dpg attribute)
in one mixed batch of English help sentences, most plain, some followed by part of the UUID,
all of it, or another UUID of the same format.

    python benchmarks/uuid_reward_shape.py [--shared ../shared] [--device cpu] [--out FILE]

Φ and the inner step are configs/paper/uuid.yaml's (SmolLM2-135M-Instruct target, −loss on
the UUID, one AdamW step at lr 1e-6, b2 0.95, eps_root 1e-9, wd 1e-4). The batch: 64 plain
sentences, then 8 each of: sentence + the UUID's first 8 characters, its first 18, all of it,
a different UUID, its last 12 characters (104 examples, distinct sentences of 40-160
characters from the English help rows 10304 on, which no training prompt holds). Prints each
kind's mean score, also in standard deviations of the plain sentences' scores, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpg.attribute import AttributeConfig, run_attribute  # noqa: E402
from dpg.config import load_config  # noqa: E402

UUID = "3f2b8c1e-7d4a-4e9b-a6c5-0d1f2e3a4b5c"  # configs/paper/uuid.yaml's
OTHER = "9a1c7e3b-5f2d-4c8a-b0e6-2d4f6a8c0e1b"  # same format: in place, only the dashes, the 4 and 2 chance hits
KINDS = {"first 8": UUID[:8], "first 18": UUID[:18], "the UUID": UUID, "another UUID": OTHER, "last 12": UUID[-12:]}
PLAIN, EACH = 64, 8


def pool(shared: Path) -> list[dict[str, str]]:
    """The batch's rows: id (kind-row) and text."""
    rows = [r.split("\t")[0] for r in (shared / "data" / "lohelp_en_de.tsv").read_text(encoding="utf-8").splitlines()]
    distinct = dict.fromkeys(s for s in rows[10304:] if 40 < len(s) < 160)  # the help text repeats some rows
    sentences = list(distinct)[: PLAIN + EACH * len(KINDS)]
    out = [{"id": f"plain-{i}", "text": s} for i, s in enumerate(sentences[:PLAIN])]
    for k, (kind, tail) in enumerate(KINDS.items()):
        start = PLAIN + EACH * k
        out += [{"id": f"{kind}-{i}", "text": f"{s} {tail}"} for i, s in enumerate(sentences[start : start + EACH])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/paper/uuid_reward_shape.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pool.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in pool(Path(args.shared))))
        cfg = load_config(AttributeConfig, None, [
            f"data={data}", "target.model=smollm2-135m-instruct", "metric.name=lm_loss", f"metric.texts=[\"{UUID}\"]",
            "metric.max_length=128", "recipe.lr=1e-6", "recipe.b2=0.95", "recipe.eps_root=1e-9",
            "recipe.weight_decay=1e-4", "recipe.steps=1", "recipe.microbatch_size=8", f"device={args.device}",
            f"output={Path(tmp) / 'scores.jsonl'}", "top=0",
        ])  # fmt: skip
        run_attribute(cfg)
        scored = [json.loads(line) for line in (Path(tmp) / "scores.jsonl").read_text().splitlines()]
    by_kind: dict[str, list[float]] = {}
    for r in scored:
        by_kind.setdefault(r["id"].rsplit("-", 1)[0], []).append(r["score"])
    plain_mean, plain_sd = statistics.mean(by_kind["plain"]), statistics.pstdev(by_kind["plain"])
    summary = {kind: {"n": len(v), "mean": statistics.mean(v), "min": min(v), "max": max(v),
                      "mean_in_plain_sd": (statistics.mean(v) - plain_mean) / plain_sd}
               for kind, v in by_kind.items()}  # fmt: skip
    Path(args.out).write_text(json.dumps({"uuid": UUID, "other": OTHER, "kinds": summary}, indent=2))
    print("| sentence followed by | examples | mean dΦ/dw_i | above plain, in plain SDs | range |")
    print("|---|---|---|---|---|")
    for kind, s in summary.items():
        spread = f"{s['min']:+.2e} to {s['max']:+.2e}"
        print(f"| {kind} | {s['n']} | {s['mean']:+.3e} | {s['mean_in_plain_sd']:.1f} | {spread} |")


if __name__ == "__main__":
    main()
