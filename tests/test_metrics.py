"""Target metrics against hand computations (fp64 tiny models, CPU)."""

import copy
import math

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpg import DpgError, Recipe, example_metagrads, make_examples
from dpg.metrics import (
    PATTERN_67,
    MetricConfig,
    build_metric,
    custom_metric,
    head_param_name,
    image_pattern,
    L2Metric,
    l2_metric,
    LMLossMetric,
    lm_loss_metric,
    pattern_metric,
    qr_pattern,
)
from reference import VOCAB, tiny_model, unrolled_scores

WORDS = "the cat dog sat ran on a mat rug and big small red blue".split()


def tiny_tokenizer():
    """Word-level tokenizer whose ids fit the tiny models (bos = eos = 0, as their configs say)."""
    vocab = {"<|endoftext|>": 0, "<pad>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )


def all_params(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


# ---------------------------------------------------------------- head and patterns


@pytest.mark.parametrize(
    "family,tied,name",
    [
        ("gpt2", True, "transformer.wte.weight"),
        ("gpt2", False, "lm_head.weight"),
        ("llama", True, "model.embed_tokens.weight"),
        ("llama", False, "lm_head.weight"),
    ],
)
def test_head_param_name(family, tied, name):
    model = tiny_model(family, tied)
    assert head_param_name(model) == name


def test_head_param_name_errors():
    with pytest.raises(DpgError, match="no LM head"):
        head_param_name(torch.nn.Linear(3, 4))

    class Detached(torch.nn.Module):  # a head that is not one of the module's parameters
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(3, 4)
            self._head = [torch.nn.Linear(4, 5)]

        def get_output_embeddings(self):
            return self._head[0]

    with pytest.raises(DpgError, match="not among"):
        head_param_name(Detached())


def test_pattern_67_values():
    rows = ["####...", "...###.", ".#####.", "...###.", ".#.###.", "...####"]
    expected = torch.tensor([[1.0 if c == "#" else -1.0 for c in r] for r in rows])
    assert PATTERN_67.shape == (6, 7)
    assert torch.equal(PATTERN_67, expected)
    assert int((PATTERN_67 == 1).sum()) == 4 + 3 + 5 + 3 + 4 + 4


def finder():
    """The 7×7 QR finder pattern: dark ring, light ring, 3×3 dark centre."""
    return torch.tensor([[1.0 if max(abs(i - 3), abs(j - 3)) != 2 else -1.0 for j in range(7)] for i in range(7)])


def test_qr_pattern_finder_patterns():
    m = qr_pattern("hello 67")
    assert m.shape == (21, 21)  # version 1, no border
    assert set(m.unique().tolist()) == {-1.0, 1.0}
    f = finder()
    assert torch.equal(m[:7, :7], f)
    assert torch.equal(m[:7, -7:], f)
    assert torch.equal(m[-7:, :7], f)
    assert not torch.equal(m[-7:, -7:], f)  # no finder at the bottom right
    # Light separators around the top-left finder.
    assert (m[7, :8] == -1).all() and (m[:8, 7] == -1).all()
    # Timing pattern: row 6 alternates dark/light between the finders.
    assert m[6, 8:13].tolist() == [1, -1, 1, -1, 1]
    # A longer text needs a larger version: 17 + 4·version modules a side.
    big = qr_pattern("x" * 100)
    assert big.shape[0] == big.shape[1] > 21 and (big.shape[0] - 17) % 4 == 0


def test_image_pattern_round_trip(tmp_path):
    gray = [[0, 255, 127, 128], [255, 0, 255, 10]]  # 127 is dark, 128 is light
    img = Image.new("L", (4, 2))
    img.putdata([v for row in gray for v in row])
    img.save(tmp_path / "p.png")
    assert image_pattern(tmp_path / "p.png").tolist() == [[1, -1, 1, -1], [-1, 1, -1, 1]]
    # Colour with transparency: opaque black is dark, transparent pixels are background.
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(0, 0, 0, 255), (0, 0, 0, 0)])
    rgba.save(tmp_path / "a.png")
    assert image_pattern(tmp_path / "a.png").tolist() == [[1, -1]]
    # The file feeds pattern_metric: a 2×4 image at the corner of the head.
    metric = pattern_metric(tiny_model("gpt2", False), str(tmp_path / "p.png"))
    assert metric.pattern.tolist() == [[1, -1, 1, -1], [-1, 1, -1, 1]]


def test_image_pattern_errors(tmp_path):
    with pytest.raises(DpgError, match="not found"):
        image_pattern(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(DpgError, match="cannot read"):
        image_pattern(tmp_path / "junk.png")


# ---------------------------------------------------------------- pattern metric


@pytest.mark.parametrize("tied", [True, False])
def test_pattern_value_and_gradient(tied):
    model = tiny_model("gpt2", tied)
    S = torch.tensor([[1, -1, 1, 1, -1, -1], [-1, -1, 1, -1, 1, 1], [1, 1, -1, 1, -1, 1], [-1, 1, 1, -1, -1, 1]])
    ho, vo, k = 3, 5, 20.0
    metric = pattern_metric(model, S, hidden_offset=ho, vocab_offset=vo, sharpness=k)
    name = "transformer.wte.weight" if tied else "lm_head.weight"
    params = all_params(model)
    g = torch.Generator().manual_seed(0)
    D = 0.1 * torch.randn(params[name].shape, generator=g, dtype=torch.float64)  # (V, d) change
    params[name] = (params[name] + D).requires_grad_(True)
    phi = metric(params)
    (grad,) = torch.autograd.grad(phi, params[name])

    h, w, n = 4, 6, 24
    phi_ref = 0.0
    grad_ref = torch.zeros(VOCAB, 16, dtype=torch.float64)
    for a in range(h):  # hidden dim ho + a
        for b in range(w):  # vocab id vo + b
            x = k * float(S[a, b]) * float(D[vo + b, ho + a])
            phi_ref -= math.log1p(math.exp(-x)) / n
            grad_ref[vo + b, ho + a] = k * float(S[a, b]) / (1 + math.exp(x)) / n
    assert phi.item() == pytest.approx(phi_ref, rel=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-15)


def test_pattern_at_initial_weights_and_proxy():
    model = tiny_model("gpt2", False)
    metric = pattern_metric(model)  # "67" on hidden dims 0..5 × vocab ids 0..6
    params = all_params(model)
    # Nothing has moved: every pixel is softplus(0) = log 2, and sign 0 counts as wrong.
    assert metric(params).item() == pytest.approx(-math.log(2), rel=1e-14)
    assert metric.proxy(params) == {"pixel_accuracy": 0.0}
    # Write the pattern in (transposed into (V, d)), then spoil 3 pixels and zero one.
    delta = 0.01 * PATTERN_67.double().clone()
    delta[0, 0] *= -1
    delta[2, 3] *= -1
    delta[5, 6] *= -1
    delta[4, 1] = 0.0
    params["lm_head.weight"] = params["lm_head.weight"].clone()
    params["lm_head.weight"][:7, :6] += delta.T
    assert metric.proxy(params)["pixel_accuracy"] == pytest.approx(38 / 42)
    expected = torch.sign(delta)
    assert torch.equal(metric.decode(params), expected)
    assert not metric.decode(params).requires_grad
    # The initial weights were captured at construction: changing the model later is ignored.
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert metric.proxy(params)["pixel_accuracy"] == pytest.approx(38 / 42)


def test_pattern_follows_params_dtype():
    model = tiny_model("gpt2", False)
    metric = pattern_metric(model, sharpness=5.0)
    params = {k: v.float() for k, v in all_params(model).items()}
    params["lm_head.weight"][:7, :6] += 0.1 * PATTERN_67.T
    phi = metric(params)
    assert phi.dtype == torch.float32
    assert phi.item() == pytest.approx(-math.log1p(math.exp(-0.5)), rel=1e-5)


def test_pattern_errors():
    model = tiny_model("gpt2", False)  # head: 37 vocab ids × 16 hidden dims
    with pytest.raises(DpgError, match="37 vocab ids"):
        pattern_metric(model, vocab_offset=31)  # 31 + 7 > 37
    with pytest.raises(DpgError, match="16 hidden dims"):
        pattern_metric(model, hidden_offset=11)  # 11 + 6 > 16
    with pytest.raises(DpgError, match="outside"):
        pattern_metric(model, "qr:hi")  # 21 hidden dims > 16
    pattern_metric(model, hidden_offset=10, vocab_offset=30)  # fits exactly
    with pytest.raises(DpgError, match=r"\+1 and −1"):
        pattern_metric(model, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(DpgError, match="2-D"):
        pattern_metric(model, torch.tensor([1.0, -1.0]))
    with pytest.raises(DpgError, match="not '67'"):
        pattern_metric(model, "no-such-file.png")
    with pytest.raises(DpgError, match="sharpness"):
        pattern_metric(model, sharpness=0.0)


# ---------------------------------------------------------------- l2


def test_l2_value_and_gradient():
    model = tiny_model("llama", True)
    metric = l2_metric(model)
    params = all_params(model)
    W = params["model.embed_tokens.weight"].requires_grad_(True)
    norm = math.sqrt(sum(float(x) ** 2 for x in W.detach().flatten()))
    phi = metric(params)
    assert phi.item() == pytest.approx(-norm, rel=1e-13)
    (grad,) = torch.autograd.grad(phi, W)
    torch.testing.assert_close(grad, -W.detach() / norm, rtol=1e-12, atol=0)
    assert metric.proxy(params) == {"l2_norm": pytest.approx(norm, rel=1e-13)}


def test_l2_resolves_an_inner_steps_change_on_an_fp32_head():
    """An fp32 head of GPT-2's size and scale (norm ~124), moved as one AdamW step at lr 5e-6
    moves it, by two datasets that shrink 50.2 % and 49.8 % of its weights: the metric's
    difference between the two (~1e-4, what real texts differ by) is the exact one (fp64 sums
    of the same fp32 numbers), not rounded to the fp32 norm's step of 7.6e-6."""
    torch.manual_seed(0)
    W = (0.02 * torch.randn(50257, 768)).float()
    metric = L2Metric("w")
    a = W - 5e-6 * torch.sign(W) * (torch.rand_like(W) < 0.502)
    b = W - 5e-6 * torch.sign(W) * (torch.rand_like(W) < 0.498)
    exact = (b.double().square().sum().sqrt() - a.double().square().sum().sqrt()).item()  # ‖b‖ − ‖a‖ > 0
    assert 2e-5 < exact < 5e-4
    assert (metric({"w": a}) - metric({"w": b})).item() == pytest.approx(exact, rel=1e-6)
    assert metric.proxy({"w": b})["l2_norm"] - metric.proxy({"w": a})["l2_norm"] == pytest.approx(exact, rel=1e-6)


# ---------------------------------------------------------------- lm_loss


def hf_loss(model, tokenizer, text):
    """Token-mean loss on [eos] text [eos] (the first token unlabelled) and its label count.

    Checked against HF's own `labels=` loss, which casts logits to fp32 even in an fp64 model
    (agreement ~1e-8); the value returned is the same mean from HF's logits in fp64."""
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([ids])
    labels = ids.clone()
    labels[0, 0] = -100  # HF shifts internally; this only keeps the label list aligned
    with torch.no_grad():
        out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
    loss = -sum(float(logp[t, ids[0, t + 1]]) for t in range(ids.shape[1] - 1)) / (ids.shape[1] - 1)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    return loss, ids.shape[1] - 1


def test_lm_loss_matches_hf_single_text():
    model, tok = tiny_model("gpt2", False), tiny_tokenizer()
    text = "the big cat sat on a red mat"
    metric = lm_loss_metric(model, tok, [text])
    ref, count = hf_loss(model, tok, text)
    assert count == 9  # 8 words and the closing eos
    params = all_params(model)
    assert metric(params).item() == pytest.approx(-ref, rel=1e-12)
    proxy = metric.proxy(params)
    assert proxy["loss"] == pytest.approx(-metric(params).item(), rel=1e-15)
    assert proxy["perplexity"] == pytest.approx(math.exp(proxy["loss"]), rel=1e-15)


def test_lm_loss_pools_tokens_over_texts_and_follows_params():
    model, tok = tiny_model("gpt2", True), tiny_tokenizer()
    texts = ["the cat sat", "a big red dog ran on the blue rug and sat", "dog"]  # ragged: padding in play
    metric = lm_loss_metric(model, tok, texts)
    model.train()  # dropout on in the caller's model: the metric must still be deterministic
    params = {k: v.requires_grad_(True) for k, v in all_params(model).items()}
    g = torch.Generator().manual_seed(1)
    moved = {k: (v.detach() + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)) for k, v in params.items()}
    for p in (params, moved):
        other = copy.deepcopy(model).eval()
        other.load_state_dict(p, strict=False)
        refs = [hf_loss(other, tok, t) for t in texts]
        # Pooled over label tokens: Σ (mean CE of text i)·(its label count) / Σ counts, not a mean of means.
        ref = sum(loss * c for loss, c in refs) / sum(c for _, c in refs)
        assert metric(p).item() == pytest.approx(-ref, rel=1e-12)
    assert model.training  # the caller's mode is restored
    phi = metric(params)
    grads = torch.autograd.grad(phi, list(params.values()))
    assert all(torch.isfinite(x).all() for x in grads)
    assert float(grads[0].abs().sum()) > 0  # embeddings (tied head) receive a gradient
    # The model was not modified.
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k].detach())


def test_lm_loss_in_chunks_equals_one_pass_value_and_gradient():
    """Texts go through in chunks, each recomputed in backward: Φ and ∇Φ equal one pass over all
    texts (an independent formula: HF's own forward on the whole batch), with dropout on in the
    caller's model (the recomputation must run in eval mode too)."""
    model, tok = tiny_model("gpt2", True), tiny_tokenizer()
    texts = ["the cat sat", "a big red dog ran on the blue rug and sat", "dog", "red mat", "the dog and the cat",
             "a rug", "big blue sky and a red sun"]  # fmt: skip
    metric = LMLossMetric(model, lm_loss_metric(model, tok, texts).examples, chunk=3)  # chunks of 3, 3, 1
    model.train()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in all_params(model).items()}
    ids, attn, labels = metric.examples
    other = copy.deepcopy(model).eval()
    ref_params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    logits = torch.func.functional_call(other, ref_params, (ids,), {"attention_mask": attn}).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    mask = labels[:, 1:].flatten()
    ref = -(ce[mask].sum() / mask.sum())
    phi = metric(params)
    assert phi.item() == pytest.approx(ref.item(), rel=1e-13)
    got = torch.autograd.grad(phi, list(params.values()))
    want = torch.autograd.grad(ref, list(ref_params.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-14)
    assert model.training


def test_lm_loss_params_in_another_dtype():
    """The engine may pass fp32 params for an fp64 model: buffers (Llama's RoPE) follow them."""
    model, tok = tiny_model("llama", False), tiny_tokenizer()
    text = "small blue dog and cat"
    metric = lm_loss_metric(model, tok, [text])
    params = {k: v.float() for k, v in all_params(model).items()}
    phi = metric(params)
    assert phi.dtype == torch.float32
    ref, _ = hf_loss(copy.deepcopy(model).float(), tok, text)
    assert phi.item() == pytest.approx(-ref, rel=1e-5)


def test_lm_loss_needs_texts():
    with pytest.raises(DpgError, match="at least one text"):
        lm_loss_metric(tiny_model("gpt2", False), tiny_tokenizer(), [])


# ---------------------------------------------------------------- the metrics inside the engine


@pytest.mark.parametrize("kind", ["pattern", "lm_loss"])
def test_metrics_in_engine(kind):
    model, tok = tiny_model("gpt2", False), tiny_tokenizer()
    g = torch.Generator().manual_seed(3)
    examples = make_examples([torch.randint(1, VOCAB, (6,), generator=g).tolist() for _ in range(4)])
    if kind == "pattern":
        metric = pattern_metric(model)
    else:
        metric = lm_loss_metric(model, tok, ["the cat sat on the mat", "a dog ran"])
    recipe = Recipe(optimizer="adamw", lr=1e-2, steps=1)
    ref, phi_ref = unrolled_scores(model, examples, recipe, metric)
    res = example_metagrads(model, examples, recipe, metric, dtype=torch.float64)
    assert float((res.scores - ref).norm() / ref.norm()) < 1e-8
    assert res.metric == pytest.approx(phi_ref, rel=1e-10)
    key = "pixel_accuracy" if kind == "pattern" else "loss"
    assert key in res.proxy


# ---------------------------------------------------------------- custom metrics and config


MODULE = """
import torch

def phi(params):
    return -(params["w"] ** 2).sum()

NOT_CALLABLE = 3
"""


def test_custom_metric(tmp_path, monkeypatch):
    (tmp_path / "my_metric_mod.py").write_text(MODULE)
    (tmp_path / "broken_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = custom_metric("my_metric_mod:phi")
    assert fn({"w": torch.tensor([1.0, -2.0, 3.0])}).item() == -14.0
    assert build_metric(MetricConfig(name="my_metric_mod:phi"), None, None) is fn
    for spec, message in [
        ("my_metric_mod", "module:function"),
        (":phi", "module:function"),
        ("my_metric_mod:", "module:function"),
        ("no_such_module_xyz:phi", "no module named"),
        ("my_metric_mod:absent", "no attribute 'absent'"),
        ("my_metric_mod:NOT_CALLABLE", "not a callable"),
    ]:
        with pytest.raises(DpgError, match=message):
            custom_metric(spec)
    # A module that exists but fails to import its own dependency keeps its real error.
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        custom_metric("broken_mod:phi")


def test_build_metric(tmp_path):
    model, tok = tiny_model("gpt2", False), tiny_tokenizer()
    params = all_params(model)
    pattern = build_metric(MetricConfig(hidden_offset=2, vocab_offset=4, sharpness=3.0), model, tok)
    assert (pattern.hidden_offset, pattern.vocab_offset, pattern.sharpness) == (2, 4, 3.0)
    assert torch.equal(pattern.pattern, PATTERN_67)
    l2 = build_metric(MetricConfig(name="l2"), model, tok)
    assert l2(params).item() == pytest.approx(-float(params["lm_head.weight"].norm()), rel=1e-13)
    # lm_loss: inline texts and a file's texts, pooled together.
    (tmp_path / "texts.txt").write_text("a dog ran\n\nthe red mat\n")
    lm = build_metric(
        MetricConfig(name="lm_loss", texts=["the cat sat"], texts_file=str(tmp_path / "texts.txt")), model, tok
    )
    texts = ["the cat sat", "a dog ran", "the red mat"]
    refs = [hf_loss(model, tok, t) for t in texts]
    ref = sum(loss * c for loss, c in refs) / sum(c for _, c in refs)
    assert lm(params).item() == pytest.approx(-ref, rel=1e-12)
    # metric.chunk: texts per pass, the same Φ (chunks of 2 and 1 against one pass of 3)
    lm2 = build_metric(MetricConfig(name="lm_loss", texts=texts, chunk=2), model, tok)
    assert lm2.chunk == 2 and lm2(params).item() == pytest.approx(-ref, rel=1e-12)
    with pytest.raises(DpgError, match="metric.chunk"):
        build_metric(MetricConfig(name="lm_loss", texts=texts, chunk=0), model, tok)
    with pytest.raises(DpgError, match="texts"):
        build_metric(MetricConfig(name="lm_loss"), model, tok)
    with pytest.raises(DpgError) as err:
        build_metric(MetricConfig(name="accuracy"), model, tok)
    for known in ("pattern", "l2", "lm_loss", "module:function"):
        assert known in str(err.value)


def test_lm_loss_texts_from_a_tsv_column_and_row_slice(tmp_path):
    from dpg.metrics import MetricConfig, build_metric

    rows = [("one en", "eins de"), ("two en", "zwei de"), ("three en", "drei de"), ("four en", "vier de")]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{a}\t{b}\n" for a, b in rows))
    model, tok = tiny_model("gpt2", False), tiny_tokenizer()
    params = dict(model.named_parameters())
    got = build_metric(
        MetricConfig(name="lm_loss", texts_file=str(path), texts_field="1", texts_rows="-2:"), model, tok
    )
    want = lm_loss_metric(model, tok, ["drei de", "vier de"])
    assert torch.allclose(got(params), want(params), rtol=1e-6, atol=0)
    with pytest.raises(DpgError, match="texts_rows"):
        build_metric(MetricConfig(name="lm_loss", texts_file=str(path), texts_field="1", texts_rows="2"), model, tok)
    with pytest.raises(DpgError, match="selects no rows"):
        build_metric(MetricConfig(name="lm_loss", texts_file=str(path), texts_field="1", texts_rows="10:"), model, tok)
