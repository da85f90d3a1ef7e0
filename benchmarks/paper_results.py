"""The README's paper-demonstration table and curves, from the files benchmarks/gpu_demo.sh
brings back: benchmarks/results/paper/NAME.evaluate.json (transfer check, rows `base` and
`trained`) and NAME.metrics.jsonl (dpg train's per-step log), where NAME is a demonstration
(67, qr, l2, german, spanish, uuid) or NAME-REWARD for its naive run and baselines.

    python benchmarks/paper_results.py [DEMO ...]     # default: every demonstration with results
    python benchmarks/paper_results.py 67_gpt2 67_gpt2_batch --overlay 67_gpt2_scale_rewards   # one figure

Prints one markdown table a demonstration (base generator, then each run's trained generator:
Φ and the proxy and text figures of its transfer check, the mean over its seeds and their range)
and writes DEMO.curves.png: Φ (or the reward), proxy, policy entropy, distinct-completion and
distinct-bigram shares against generated examples, every run of the demonstration overlaid. With --overlay NAME,
the runs of all the named demonstrations (variants: DEMO_TAG) go on one figure, NAME.curves.png,
each labelled with its demonstration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpg.evaluate import text_figures  # noqa: E402
from dpg.report import figures_table, plot_runs, read_rows, rows_from_console  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "paper"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"
RUNS = ("metagrad", "naive", "language_id", "embedding", "levenshtein")


def stem_of(demo: str, run: str) -> str:
    """The file stem of one run of `demo`: DEMO for metagrad, DEMO-RUN for the others."""
    return demo if run == "metagrad" else f"{demo}-{run}"


def run_names(demo: str) -> list[tuple[str, str]]:
    """(run label, file stem) of each run of `demo` that left a file."""
    found = []
    for run in RUNS:
        stem = stem_of(demo, run)
        if (RESULTS / f"{stem}.evaluate.json").exists() or (RESULTS / f"{stem}.metrics.jsonl").exists():
            found.append((run, stem))
    return found


def run_rows(demo: str) -> list[tuple[str, list[dict[str, float]] | None]]:
    """(row label, one figures dict per seed) of the demonstration's transfer checks: the base
    generator once (from the first run that checked it), then each run's trained generator, or
    its latest checkpoint for an unfinished run (gpu_demo.sh PARTIAL=1); None: no check yet."""
    rows: dict[str, list[dict[str, float]] | None] = {}
    for run, stem in run_names(demo):
        path = RESULTS / f"{stem}.evaluate.json"
        if not path.exists():
            rows[run] = None
            continue
        had_base = "base" in rows
        for r in json.loads(path.read_text()):
            name = r["generator"]
            if name == "base" and had_base:
                continue
            label = "base" if name == "base" else run if name == "trained" else f"{run} ({name})"
            text = r["text"]
            if r.get("samples") and not {"distinct_share", "distinct_2"} <= text.keys():
                text = text_figures(r["samples"], None, None) | text  # a file from before evaluate reported them
            rows.setdefault(label, []).append({"Φ": r["metric"], **r["proxy"], **text})
    return sorted(rows.items(), key=lambda item: item[0] != "base")  # base first, the rest as found


def table(demo: str) -> str:
    """One row per generator: the mean over seeds, and the range when there are several."""
    rows = run_rows(demo)
    return figures_table(demo, rows, phi_least=6) if rows else f"{demo}: no transfer check has come back yet"


def training_rows(demo: str) -> dict[str, list[dict[str, float]]]:
    """Each run's per-step rows: from its metrics.jsonl, or, for a run whose metrics file was
    lost, from the console lines of its NAME.log (their printed digits)."""
    runs = {}
    for run in RUNS:
        stem = stem_of(demo, run)
        if (RESULTS / f"{stem}.metrics.jsonl").exists():
            runs[run] = read_rows(RESULTS / f"{stem}.metrics.jsonl", partial_ok=True)
        elif (RESULTS / f"{stem}.log").exists():
            runs[f"{run} (from its log)"] = rows_from_console((RESULTS / f"{stem}.log").read_text(), batch(demo))
    return {run: rows for run, rows in runs.items() if rows}


def curves(demos: str | list[str], name: str | None = None) -> Path | None:
    """NAME.curves.png (default: the one demonstration's name) with every run of `demos`; with
    several demonstrations each run's label starts with its demonstration's."""
    demos = [demos] if isinstance(demos, str) else demos
    runs = {}
    for demo in demos:
        for run, rows in training_rows(demo).items():
            runs[run if len(demos) == 1 else f"{demo} {run}"] = rows
    if not runs:
        return None
    name = name or demos[0]
    path = RESULTS / f"{name}.curves.png"
    plot_runs(runs, path, title=f'"{name}": during training, against generated examples')
    return path


def batch(demo: str) -> int:
    """Completions a step of the demonstration's config (DEMO may be DEMO_TAG)."""
    grpo = yaml.safe_load((CONFIGS / f"{demo.split('_')[0]}.yaml").read_text())["grpo"]
    return grpo["prompts_per_step"] * grpo["num_generations"]


def main() -> None:
    global RESULTS  # --results: the functions above read the folder from here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", nargs="*", help="demonstrations (default: all with results)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the result files (and the curves)")
    parser.add_argument("--overlay", metavar="NAME", help="also draw the named demonstrations' runs on one figure")
    args = parser.parse_args()
    RESULTS = args.results
    demos = args.demos or sorted(
        {p.name.split(".")[0].split("-")[0] for p in RESULTS.glob("*.evaluate.json")}
        | {p.name.split(".")[0].split("-")[0] for p in RESULTS.glob("*.metrics.jsonl")}
    )
    for demo in demos:
        print(table(demo), "\n")
        path = curves(demo)
        if path:
            print(f"curves: {path}\n")
    if args.overlay and (path := curves(demos, args.overlay)):
        print(f"curves, overlaid: {path}")


if __name__ == "__main__":
    main()
