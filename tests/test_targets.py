"""A pretrained target through the one loading path: a model directory written by
save_pretrained, or a GGUF file, named as `target.model`, with no code for its family. The
reward on such a target is checked against autograd through the unrolled inner run
(tests/reference.py), with the paper's inner AdamW (b2 0.95, eps_root 1e-9, wd 1e-4) and an
LM-loss metric, as in the new-language and UUID configs."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpg import Recipe
from dpg.check import check_metagrads
from dpg.data import encode_texts
from dpg.metagrad.precision import float64_everywhere
from dpg.metrics import lm_loss_metric
from dpg.models import byte_tokenizer, load_model
from dpg.rewards import InnerRunReward
from reference import unrolled_scores
from test_models import write_llama_gguf

TEXTS = ["Guten Tag, wie geht es?", "ein kurzer Satz", "Hallo Welt!", "noch ein Text hier", "x", "abc abc abc"]
HELD_OUT = ["Das ist ein Test.", "Wir sprechen Deutsch."]


def save_tiny_llama(path, tied: bool, seed: int = 5):
    """A tiny Llama saved as any HF checkpoint is: weights, config and tokenizer files. Tied, it
    has SmolLM2's layout (one matrix for embeddings and head)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def without_padding_idx(model):
    """The model as the engine trains it: the embedding's pad row like every other row (HF sets
    nn.Embedding.padding_idx from pad_token_id, here 256, which is also bos: in every example)."""
    model = copy.deepcopy(model)
    model.get_input_embeddings().padding_idx = None
    return model


def reward_against_reference(model, tok):
    # Truly fp64 (HF's Llama casts RMSNorm and RoPE to fp32): AdamW's first step weighs coordinates
    # whose gradient is near √eps_root heavily, and fp32 noise there would blur the comparison.
    with float64_everywhere():
        return _reward_against_reference(model, tok)


def _reward_against_reference(model, tok):
    recipe = Recipe(optimizer="adamw", lr=1e-3, b2=0.95, eps_root=1e-9, weight_decay=1e-4, steps=1)
    metric = lm_loss_metric(model, tok, HELD_OUT, max_length=32)
    reward = InnerRunReward("metagrad", model, tok, metric, recipe, max_length=32, num_generations=2,
                            dtype=torch.float64)  # fmt: skip
    got = torch.tensor(reward(prompts=[""] * len(TEXTS), completions=TEXTS), dtype=torch.float64)
    ref, phi = unrolled_scores(without_padding_idx(model), encode_texts(tok, TEXTS, 32), recipe, metric)
    want = (ref - ref.mean()) / ref.std(unbiased=False)  # the reward standardises over the batch
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert reward.history[-1]["phi"] == pytest.approx(phi, rel=1e-9)
    return ref


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_directory_as_target(tmp_path, tied):
    path = save_tiny_llama(tmp_path / "model", tied)
    model, tok = load_model(str(path), dtype=torch.float64)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert model.get_input_embeddings().padding_idx == 256
    ref = reward_against_reference(model, tok)
    assert ref.abs().min() > 0 and ref.std() > 0  # every example moves Φ, not all alike
    assert model.get_input_embeddings().padding_idx == 256  # the caller's model as it was


def test_tied_target_whose_pad_token_is_bos_against_finite_differences(tmp_path):
    """Independent of the reference: Φ recomputed after the inner run at w_i = 1 ± h (dpg
    check). Before the engine trained the pad row, a tied head whose pad token is also bos
    (every example starts with it) gave scores off by O(1) here: the forward-mode pass moved
    the pad row through the lookups that reverse mode's padding_idx rule skips."""
    model, tok = load_model(str(save_tiny_llama(tmp_path / "model", tied=True)), dtype=torch.float64)
    metric = lm_loss_metric(model, tok, HELD_OUT, max_length=32)
    # state_budget_gb: the engine's default budget is a share of the free host memory, which a busy machine can lack
    adamw = Recipe(optimizer="adamw", lr=1e-3, steps=3, state_budget_gb=1.0)
    for recipe in (Recipe(optimizer="sgd", lr=0.5, steps=1), adamw):
        report = check_metagrads(model, encode_texts(tok, TEXTS, 32), recipe, metric, count=2, steps=(1e-4, 1e-5, 1e-6))
        assert report.max_error < 1e-5, report


def test_gguf_file_as_target(tmp_path):
    """The same weights from a directory and from a GGUF file give the same rewards."""
    model, tok = load_model(str(save_tiny_llama(tmp_path / "model", tied=False)))
    write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    back, back_tok = load_model(str(tmp_path / "tiny.gguf"), dtype=torch.float64)
    assert type(back).__name__ == "LlamaForCausalLM" and len(back_tok) == 257
    assert all(p.dtype == torch.float64 for p in back.parameters())  # dense weights, trainable
    ref = reward_against_reference(back, back_tok)
    direct, _ = load_model(str(tmp_path / "model"), dtype=torch.float64)
    recipe = Recipe(optimizer="adamw", lr=1e-3, b2=0.95, eps_root=1e-9, weight_decay=1e-4, steps=1)
    with float64_everywhere():
        metric = lm_loss_metric(direct, tok, HELD_OUT, 32)
        same, _ = unrolled_scores(without_padding_idx(direct), encode_texts(tok, TEXTS, 32), recipe, metric)
    torch.testing.assert_close(ref, same, rtol=1e-6, atol=0)
