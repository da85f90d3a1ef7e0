"""Data files as rows: read a JSONL or Parquet file keeping every row whole, write a subset of
its rows back in the same format.

`dpg attribute` scores one example per row, so row i of the scores is row i of the file (blank
JSONL lines are not rows). A selected subset is written row for row as it was read: JSONL lines
verbatim, Parquet rows with the file's own schema, in file order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dpg.data import decode_bytes
from dpg.errors import DpgError

ROW_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class Rows(NamedTuple):
    format: str  # "jsonl" or "parquet"
    texts: list[str]  # the text field of every row, in file order
    prompts: list[str] | None  # the prompt field of every row ("" where a row has none), or None
    ids: list[Any] | None  # the id field of every row (None where a row has none), or None
    source: Any  # jsonl: the raw lines; parquet: the pyarrow Table


def is_row_file(path: str | Path) -> bool:
    return Path(path).suffix in ROW_FORMATS


def read_rows(path: str | Path, text_field: str = "text", prompt_field: str = "prompt", id_field: str = "id") -> Rows:
    """Every row of a .jsonl/.json (one object per line) or .parquet file. `text_field` must be
    in every row; `prompt_field` and `id_field` are used where present ("" turns one off)."""
    path = Path(path)
    if not path.is_file():
        raise DpgError(f"data file not found: {path}")
    if not is_row_file(path):
        raise DpgError(f"{path}: rows are read from .jsonl, .json or .parquet files")
    if ROW_FORMATS[path.suffix] == "parquet":
        return _read_parquet(path, text_field, prompt_field, id_field)
    lines = [line for line in decode_bytes(path.read_bytes()).splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DpgError(f"{path}: row {n}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DpgError(f"{path}: row {n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return _rows("jsonl", path, records, text_field, prompt_field, id_field, lines)


def _read_parquet(path: Path, text_field: str, prompt_field: str, id_field: str) -> Rows:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise DpgError(f"{path}: no column {text_field!r} (has {table.column_names}); set text_field")
    columns = [c for c in (text_field, prompt_field, id_field) if c and c in table.column_names]
    records = table.select(columns).to_pylist()
    return _rows("parquet", path, records, text_field, prompt_field, id_field, table)


def _rows(fmt: str, path: Path, records: list[dict], text_field: str, prompt_field: str, id_field: str, source) -> Rows:
    if not records:
        raise DpgError(f"{path} holds no rows")
    texts = []
    for n, record in enumerate(records):
        text = record.get(text_field)
        if text is None:
            raise DpgError(f"{path}: row {n} has no {text_field!r} (set text_field to the field that holds the text)")
        texts.append(str(text))
    prompts = ids = None
    if prompt_field and any(r.get(prompt_field) is not None for r in records):
        prompts = ["" if r.get(prompt_field) is None else str(r[prompt_field]) for r in records]
    if id_field and any(id_field in r for r in records):
        ids = [r.get(id_field) for r in records]
    return Rows(fmt, texts, prompts, ids, source)


def write_rows(rows: Rows, indices: Sequence[int], path: str | Path) -> Path:
    """Rows `indices` of `rows` (kept in file order) to `path`, in the format they came in."""
    path = Path(path)
    if ROW_FORMATS.get(path.suffix) != rows.format:
        raise DpgError(f"{path}: the subset is written in the data's own format ({rows.format}); name a "
                       f"{'.parquet' if rows.format == 'parquet' else '.jsonl'} file")  # fmt: skip
    keep = sorted(set(int(i) for i in indices))
    path.parent.mkdir(parents=True, exist_ok=True)
    if rows.format == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(rows.source.take(keep), path)
    else:
        path.write_text("".join(rows.source[i] + "\n" for i in keep), encoding="utf-8")
    return path
