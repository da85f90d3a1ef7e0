"""Reference rows for a demonstration's table: a samples file (as `dpg sample` writes it) made
of real text instead of a generator's, so `dpg evaluate CONFIG evaluate.samples_file=FILE`
gives the transfer check of data that already is what the generator is meant to learn to
write (e.g. real German sentences for the German demonstration). The rows of a paper table
then have a scale: base generator < trained generator ≤ real text in the language.

    python benchmarks/reference_samples.py ../shared/data/lohelp_en_de.tsv --column 1 \
        --prompt-column 0 --rows 10304:10816 --out /tmp/ref/de.jsonl
    dpg evaluate configs/paper/german.yaml evaluate.samples_file=/tmp/ref/de.jsonl

Writes the file only (in /tmp: the data stay in ../shared, not in the repository); the
evaluate.json beside it holds Φ, the proxy figures and the language share.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpg.data import read_texts, row_slice
from dpg.errors import DpgError
from dpg.sampling import write_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="a text source dpg reads (.tsv, .jsonl, .parquet, .txt)")
    ap.add_argument("--column", default="text", help="the field or TSV column of the completions")
    ap.add_argument("--prompt-column", default=None, help="the field or TSV column of the prompts (none: empty)")
    ap.add_argument("--rows", default=":512", help="which rows, as a Python slice A:B")
    ap.add_argument("--name", default=None, help="the generator field (default reference:FILE:COLUMN)")
    ap.add_argument("--out", required=True, help="the samples file (.jsonl or .parquet)")
    args = ap.parse_args()
    texts, _ = read_texts(args.file, args.column)
    piece = row_slice(args.rows, "--rows")
    if not texts[piece]:
        raise DpgError(f"--rows {args.rows} selects no row of the {len(texts)} in {args.file}")
    prompts = read_texts(args.file, args.prompt_column)[0][piece] if args.prompt_column else None
    texts = texts[piece]
    name = args.name or f"reference:{Path(args.file).name}:{args.column}"
    path = write_samples(args.out, prompts or [""] * len(texts), texts, name, 0)
    print(f"{len(texts)} rows of {args.file} (column {args.column}, rows {args.rows}) -> {path}")


if __name__ == "__main__":
    main()
