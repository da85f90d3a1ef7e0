"""The transfer check and its text figures."""

import pytest
import torch

from reference import example_losses_ref

from dpg.config import TrainConfig, load_config
from dpg.data import encode_texts, load_prompts
from dpg.evaluate import edit_distance_to_substring, sample_completions, text_figures, transfer_check
from dpg.metrics import PATTERN_67, pattern_metric
from dpg.models import ModelConfig, load_model
from dpg.report import console_line, results_table, save_pattern


@pytest.mark.parametrize(
    "needle,haystack,d",
    [
        ("abc", "xxabcxx", 0), ("abc", "xxabxx", 1), ("kitten", "sitting", 2), ("abc", "", 3), ("", "x", 0),
        ("uuid", "a uiud b", 2),
    ],  # fmt: skip
)
def test_edit_distance_to_substring_by_hand(needle, haystack, d):
    # kitten vs the substring "sittin": k→s, e→i. "a uiud b" vs "uuid": best window "uiud", 2 edits.
    assert edit_distance_to_substring(needle, haystack) == d


def test_text_figures():
    f = text_figures(["id: 1234-5678", "id 1234-567x", "nothing", "nothing"], None, "1234-5678")
    # word bigrams: ("id:", "1234-5678") and ("id", "1234-567x"), both distinct; "nothing" has none
    assert f == {"distinct_share": 3 / 4, "distinct_2": 1.0, "exact_rate": 1 / 4, "within_5_rate": 2 / 4}


def test_sampling_is_seeded():
    model, tok = load_model("tiny-gpt2", seed=1)
    kw = dict(chat=False, temperature=1.0, max_new_tokens=6, suppress=None, device=torch.device("cpu"))
    a = sample_completions(model, tok, ["hi", "yo"], 5, seed=3, **kw)
    assert a == sample_completions(model, tok, ["hi", "yo"], 5, seed=3, **kw)
    assert a != sample_completions(model, tok, ["hi", "yo"], 5, seed=4, **kw) and len(a) == 5


def test_transfer_check_is_a_plain_sft_step_on_the_samples(tmp_path):
    cfg = load_config(TrainConfig, None, [
        f"output_dir={tmp_path}", "target.model=tiny-llama", "recipe.optimizer=sgd", "recipe.lr=1.0",
        "evaluate.samples=8", "grpo.max_completion_length=8",
    ])  # fmt: skip
    res = transfer_check(cfg, "base", ModelConfig(model="tiny-gpt2", seed=1), seed=0)
    gen, gen_tok = load_model("tiny-gpt2", seed=1)
    _, heldout = load_prompts(cfg.prompts)
    assert res.samples == sample_completions(
        gen, gen_tok, heldout, 8, chat=False, temperature=1.0, max_new_tokens=8, suppress=None, seed=0,
        device=torch.device("cpu"),
    )  # fmt: skip
    # The same SGD step by hand (tests/reference.py's loss, no engine code), then Φ and its proxy.
    target, tok = load_model("tiny-llama")
    ids, attn, labels = encode_texts(tok, res.samples, cfg.reward.max_length)
    params = dict(target.named_parameters())
    grads = torch.autograd.grad(example_losses_ref(target, params, ids, attn, labels).mean(), list(params.values()))
    stepped = {k: (p - 1.0 * g).detach() for (k, p), g in zip(params.items(), grads)}
    metric = pattern_metric(target, "67")
    assert res.metric == pytest.approx(metric(stepped).item(), rel=1e-5)
    assert res.proxy == pytest.approx(metric.proxy(stepped), rel=1e-5)
    assert abs(res.metric - metric(params).item()) > 1e-3  # the step moved Φ: the check measures the trained target
    # The decoded pattern is the sign of the block's change: its accuracy is the proxy.
    assert (res.decoded == PATTERN_67).double().mean().item() == pytest.approx(res.proxy["pixel_accuracy"])
    table = results_table([res, res._replace(generator="trained", metric=-0.5)])
    assert f"| base | 1 | {res.metric:.4g} |" in table and "| trained | 1 | -0.5 |" in table


def test_pattern_png_pixels(tmp_path):
    from PIL import Image

    save_pattern(torch.tensor([[1.0, -1.0], [0.0, 1.0]]), tmp_path / "p.png", scale=2)
    img = Image.open(tmp_path / "p.png")
    assert img.size == (4, 4)
    assert [img.getpixel((x, y)) for x, y in ((0, 0), (2, 0), (0, 2), (2, 2))] == [0, 255, 127, 0]


def test_console_line():
    row = {"step": 3, "phi": -0.5, "proxy/pixel_accuracy": 0.75, "raw_std": 1e-9, "trl/entropy": 5.0,
           "time/generation": 1.0, "time/reward": 0.5, "time/update": 0.25}  # fmt: skip
    line = console_line(row, 10)
    assert line.startswith("step    3/10  Φ -0.5  pixel_accuracy 0.75  raw reward σ 1.00e-09")
    assert "gen 1.00s  reward 0.50s  update 0.25s" in line
