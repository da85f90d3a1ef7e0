"""The README's paper-demonstration table and curves, from the files benchmarks/gpu_demo.sh
brings back: benchmarks/results/paper/NAME.evaluate.json (transfer check, rows `base` and
`trained`) and NAME.metrics.jsonl (dpg train's per-step log), where NAME is a demonstration
(67, qr, l2, german, spanish, uuid) or NAME-REWARD for its naive run and baselines.

    python benchmarks/paper_results.py [DEMO ...]     # default: every demonstration with results

Prints one markdown table a demonstration (base generator, then each run's trained generator:
Φ and the proxy and text figures of its transfer check) and writes DEMO.curves.png: Φ (or the
reward), proxy, policy entropy and distinct-completion share against generated examples, every
run of the demonstration overlaid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpg.report import plot_runs, read_rows, telling_digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "paper"
RUNS = ("metagrad", "naive", "language_id", "embedding", "levenshtein")


def run_names(demo: str) -> list[tuple[str, str]]:
    """(run label, file stem) of each run of `demo` that left a file."""
    found = []
    for run in RUNS:
        stem = demo if run == "metagrad" else f"{demo}-{run}"
        if (RESULTS / f"{stem}.evaluate.json").exists() or (RESULTS / f"{stem}.metrics.jsonl").exists():
            found.append((run, stem))
    return found


def table(demo: str) -> str:
    rows = []
    for run, stem in run_names(demo):
        path = RESULTS / f"{stem}.evaluate.json"
        if not path.exists():
            rows.append((run, None))
            continue
        for r in json.loads(path.read_text()):
            if r["generator"] == "base" and not any(name == "base" for name, _ in rows):
                rows.append(("base", r))
            elif r["generator"] == "trained":
                rows.append((run, r))
            elif r["generator"].startswith("checkpoint-"):  # an unfinished run's latest checkpoint (PARTIAL=1)
                rows.append((f"{run} ({r['generator']})", r))
    keys = list(dict.fromkeys(k for _, r in rows if r for k in [*r["proxy"], *r["text"]]))
    rows = [(name, r and {"Φ": r["metric"], **r["proxy"], **r["text"]}) for name, r in rows]  # a row's figures
    found = [f for _, f in rows if f]
    digits = {k: telling_digits([f[k] for f in found if k in f], least=6 if k == "Φ" else 4) for k in ["Φ", *keys]}
    lines = [f"| {demo} | Φ | " + " | ".join(keys) + " |", "|---" * (2 + len(keys)) + "|"]
    for name, figures in rows:
        if figures is None:
            lines.append(f"| {name} | (training) |" + " |" * len(keys))
            continue
        cells = [f"{figures[k]:.{digits[k]}g}" if k in figures else "—" for k in ["Φ", *keys]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(demo: str) -> Path | None:
    runs = {
        run: read_rows(RESULTS / f"{stem}.metrics.jsonl", partial_ok=True)
        for run, stem in run_names(demo)
        if (RESULTS / f"{stem}.metrics.jsonl").exists()
    }
    if not runs:
        return None
    path = RESULTS / f"{demo}.curves.png"
    plot_runs(runs, path, title=f'"{demo}": during training, against generated examples')
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", nargs="*", help="demonstrations (default: all with results)")
    demos = parser.parse_args().demos or sorted(
        {p.name.split(".")[0].split("-")[0] for p in RESULTS.glob("*.evaluate.json")}
        | {p.name.split(".")[0].split("-")[0] for p in RESULTS.glob("*.metrics.jsonl")}
    )
    for demo in demos:
        print(table(demo), "\n")
        path = curves(demo)
        if path:
            print(f"curves: {path}\n")


if __name__ == "__main__":
    main()
