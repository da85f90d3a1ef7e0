"""The dpg command: attribute and check on the offline presets."""

import json

import pytest
import torch

import dpg.check
from dpg.attribute import AttributeConfig
from dpg.check import CheckConfig
from dpg import Recipe, example_metagrads
from dpg.cli import main
from dpg.data import builtin_texts, encode_texts
from dpg.metagrad.precision import float64_everywhere
from dpg.metrics import l2_metric, pattern_metric
from dpg.models import load_model


def test_attribute_writes_scores_that_match_the_engine(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    texts = ["hello there!", "a#b$c", "plain words only", "''''"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "scores.jsonl"
    rc = main(["attribute", f"data={data}", f"output={out}", "recipe.steps=2", "dtype=float64", "top=2"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts and [r["index"] for r in rows] == [0, 1, 2, 3]
    model, tok = load_model("tiny-gpt2")
    direct = example_metagrads(
        model, encode_texts(tok, texts, 128), Recipe(steps=2), pattern_metric(model), dtype=torch.float64
    )
    assert torch.allclose(torch.tensor([r["score"] for r in rows], dtype=torch.float64), direct.scores, rtol=1e-12)
    printed = capsys.readouterr().out
    assert "most helpful" in printed and "pixel_accuracy" in printed


def test_attribute_builtin_default_writes_the_engine_scores(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["attribute", f"output={out}", "target.model=tiny-llama", "metric.name=l2", "top=1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    texts = builtin_texts()
    assert [r["text"] for r in rows] == texts
    model, tok = load_model("tiny-llama")
    recipe = AttributeConfig().recipe  # attribute's default inner run (the paper's AdamW, lr 5e-6)
    direct = example_metagrads(model, encode_texts(tok, texts, 128), recipe, l2_metric(model))
    assert torch.equal(torch.tensor([r["score"] for r in rows], dtype=direct.scores.dtype), direct.scores)
    printed = capsys.readouterr().out
    best, worst = int(direct.scores.argmax()), int(direct.scores.argmin())
    assert f"#{best} " in printed.split("most helpful")[1].split("most harmful")[0]
    assert f"#{worst} " in printed.split("most harmful")[1]


def test_check_prints_the_engine_scores_and_passes(capsys):
    assert main(["check", "count=2", "num_examples=6"]) == 0
    printed = capsys.readouterr().out
    table = [line.split() for line in printed.splitlines() if line.split() and line.split()[0].isdigit()]
    model, tok = load_model("tiny-gpt2", dtype=torch.float64)
    examples = encode_texts(tok, builtin_texts()[:6], 64)
    with float64_everywhere():
        recipe, metric = CheckConfig().recipe, pattern_metric(model)  # check's default inner run
        direct = example_metagrads(model, examples, recipe, metric, dtype=torch.float64)
    # The checked examples are the largest and the smallest score, printed as the engine gives them.
    assert [int(row[0]) for row in table] == [int(direct.scores.argmax()), int(direct.scores.argmin())]
    for index, engine, fd, _, error, resolution in table:
        assert float(engine) == pytest.approx(direct.scores[int(index)].item(), rel=1e-9)
        assert float(fd) == pytest.approx(float(engine), rel=1e-4) and float(error) <= 1e-4
        assert float(resolution) < 1e-4  # these differences resolve the tolerance
    assert "PASS" in printed


def test_check_fails_when_the_engine_is_wrong(monkeypatch, capsys):
    """The checker can fail: a 1% error in the engine's scores is caught."""
    real = dpg.check.example_metagrads

    def off_by_one_percent(*args, **kwargs):
        res = real(*args, **kwargs)
        res.scores *= 1.01
        return res

    monkeypatch.setattr(dpg.check, "example_metagrads", off_by_one_percent)
    assert main(["check", "count=2", "num_examples=6", "target.model=tiny-llama"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["attribute", "recipe.lrr=1"], "unknown config key 'recipe.lrr'"),
        (["attribute", "metric.name=nope"], "unknown metric 'nope'"),
        (["attribute", "data=/no/such/file.jsonl"], "data file not found"),
        (["attribute", "target.model=./missing-model"], "model not found"),
        (["check", "dtype=float64"], "unknown config key 'dtype'"),
        (["attribute", "dtype=bfloat16"], "bf16 are wrong"),
        (["attribute", "metric.vocab_offset=255"], "falls outside the LM head"),
    ],
)
def test_errors_are_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_check_says_unresolved_where_rounding_hides_the_scores():
    """Φ + 1e9: the same scores, but each Φ now rounds to ~1e-7, so a central difference at
    h = 1e-3 cannot see below ~2e-4 (eps·2e9/2e-3): the check says UNRESOLVED, not FAIL, and
    reports each difference's rounding; without the offset the same check passes."""
    from dpg.check import CheckReport, CheckRow, check_metagrads, verdict

    model, tok = load_model("tiny-gpt2", dtype=torch.float64)
    examples = encode_texts(tok, builtin_texts()[:6], 64)
    recipe, metric = CheckConfig().recipe, pattern_metric(model)
    plain = check_metagrads(model, examples, recipe, metric, count=2, steps=(1e-3, 1e-4), fp32=False)
    shifted = check_metagrads(model, examples, recipe, lambda p: metric(p) + 1e9, count=2, steps=(1e-3,), fp32=False)
    assert plain.passed and verdict(plain).startswith("PASS")
    assert [r.engine for r in shifted.rows] == pytest.approx([r.engine for r in plain.rows], rel=1e-9)
    for r in shifted.rows:
        scale = max(abs(r.engine), 1e-3 * max(abs(x.engine) for x in shifted.rows))
        assert r.resolution == pytest.approx(torch.finfo(torch.float64).eps * 2e9 / 2e-3 / scale, rel=1e-6)
    assert not shifted.passed and shifted.unresolved == [r.index for r in shifted.rows]
    assert verdict(shifted).startswith("UNRESOLVED") and "Not verified" in verdict(shifted)
    # an error beyond its difference's rounding is a failure, whatever the others
    wrong = shifted._replace(rows=[*shifted.rows, CheckRow(9, 1.0, 1.1, 1e-3, 0.1, 1e-12)])
    assert wrong.unresolved == shifted.unresolved and verdict(wrong).startswith("FAIL")
    assert isinstance(wrong, CheckReport)
