"""dpg attribute on real datasets: JSONL and Parquet rows, scores that join back, selection."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpg.attribute import SelectConfig, select_rows
from dpg.cli import main
from dpg.errors import DpgError
from dpg.rows import read_rows, write_rows

TEXTS = ["hello there!", "a#b$c", "plain words only", "''''", "more \"quoted\" text"]


def test_select_rows_by_hand():
    scores = torch.tensor([0.3, -0.2, 0.1, -0.5, 0.4, 0.1])
    assert select_rows(scores, SelectConfig(keep_top=2)) == [0, 4]
    assert select_rows(scores, SelectConfig(drop_bottom=2)) == [0, 2, 4, 5]
    assert select_rows(scores, SelectConfig(keep_top=0.5)) == [0, 2, 4]  # 3 rows; the tie 0.1/0.1 goes to row 2
    assert select_rows(scores, SelectConfig(drop_bottom=0.5)) == [0, 4, 5]  # drops -0.5, -0.2 and the earlier 0.1
    assert select_rows(scores, SelectConfig()) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "select,message",
    [
        (SelectConfig(keep_top=2, drop_bottom=1), "not both"),
        (SelectConfig(keep_top=7), "at most 6"),
        (SelectConfig(drop_bottom=2.5), "a count of rows"),
        (SelectConfig(keep_top=-1), "a count of rows"),
    ],
)
def test_select_rows_refuses_bad_settings(select, message):
    with pytest.raises(DpgError, match=message):
        select_rows(torch.zeros(6), select)


def test_jsonl_rows_round_trip(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"id": f"r{i}", "body": t, "extra": [i]}) for i, t in enumerate(TEXTS)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line is no row
    rows = read_rows(path, text_field="body")
    assert rows.texts == TEXTS and rows.ids == [f"r{i}" for i in range(5)] and rows.prompts is None
    out = write_rows(rows, [3, 1], tmp_path / "sub.jsonl")
    assert out.read_text().splitlines() == [lines[1], lines[3]]  # verbatim, in file order
    gap = tmp_path / "gap.jsonl"
    gap.write_text('{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n')
    with pytest.raises(DpgError, match="row 2 has no 'text'"):
        read_rows(gap)  # the error names the row and the key to set


def test_parquet_rows_round_trip(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"uid": pa.array([10, 11, 12, 13, 14], pa.int32()), "content": TEXTS, "ask": ["q"] * 5})
    pq.write_table(table, path)
    rows = read_rows(path, text_field="content", prompt_field="ask", id_field="uid")
    assert rows.texts == TEXTS and rows.ids == [10, 11, 12, 13, 14] and rows.prompts == ["q"] * 5
    back = pq.read_table(write_rows(rows, [4, 0], tmp_path / "sub.parquet"))
    assert back.schema == table.schema and back.to_pylist() == [table.to_pylist()[0], table.to_pylist()[4]]
    with pytest.raises(DpgError, match="no column 'text'"):
        read_rows(path)
    with pytest.raises(DpgError, match="own format"):
        write_rows(rows, [0], tmp_path / "sub.jsonl")


def _scores(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_attribute_parquet_joins_back_and_selects(tmp_path):
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d", "e"], "content": TEXTS}), data)
    out = tmp_path / "scores.jsonl"
    args = ["attribute", f"data={data}", "text_field=content", f"output={out}", "recipe.steps=1", "dtype=float64"]
    assert main([*args, "select.keep_top=2"]) == 0
    rows = _scores(out)
    assert [(r["index"], r["id"], r["text"]) for r in rows] == list(zip(range(5), "abcde", TEXTS))
    best = sorted(rows, key=lambda r: -r["score"])[:2]
    chosen = pq.read_table(tmp_path / "selected.parquet").to_pylist()
    assert chosen == [{"id": r["id"], "content": r["text"]} for r in sorted(best, key=lambda r: r["index"])]


def test_attribute_jsonl_prompt_field_and_drop_bottom(tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"t": t, "p": "say:"}) for t in TEXTS]
    data.write_text("\n".join(lines) + "\n")
    out, sub = tmp_path / "s.jsonl", tmp_path / "kept.jsonl"
    rc = main(["attribute", f"data={data}", "text_field=t", "prompt_field=p", f"output={out}", "recipe.steps=1",
               "select.drop_bottom=0.4", f"select.output={sub}"])  # fmt: skip
    assert rc == 0
    rows = _scores(out)
    assert all(r["prompt"] == "say:" and "id" not in r for r in rows)
    worst = {r["index"] for r in sorted(rows, key=lambda r: r["score"])[:2]}
    assert sub.read_text().splitlines() == [lines[i] for i in range(5) if i not in worst]


def test_attribute_refuses_select_on_text_files(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("one\ntwo\n")
    assert main(["attribute", f"data={data}", "select.keep_top=1"]) != 0
    assert "must be .jsonl or .parquet" in capsys.readouterr().err
