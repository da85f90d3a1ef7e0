"""dpg train end to end on the tiny presets: it learns (the transfer check improves), logs, saves, resumes."""

import json
import math
import shutil

import pytest
import torch

from dpg import DpgError
from dpg.config import TrainConfig, load_config
from dpg.data import ascii_only, load_prompts
from dpg.demo import demo_config
from dpg.evaluate import run_evaluate
from dpg.models import byte_tokenizer, load_model
from dpg.safety import SEAL
from dpg.train import grpo_config, run_train

TINY = [
    "generator.model=tiny-gpt2", "target.model=tiny-llama", "recipe.optimizer=sgd", "recipe.lr=1.0",
    "reward.max_length=16", "grpo.prompts_per_step=4", "grpo.num_generations=2", "grpo.max_completion_length=8",
    "grpo.learning_rate=1e-2", "grpo.allowed_tokens=ascii", "grpo.png_every=1", "prompts.heldout=4",
]  # fmt: skip


def tiny(tmp_path, *more):
    return load_config(TrainConfig, None, [f"output_dir={tmp_path}", *TINY, *more])


def test_two_steps_train_the_generator_and_log(tmp_path):
    cfg = tiny(tmp_path, "grpo.steps=2", "grpo.save_every=0")
    before = {k: v.clone() for k, v in load_model("tiny-gpt2", seed=1)[0].state_dict().items()}
    final = run_train(cfg)
    after = load_model(str(final))[0].state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and "lm_head.weight" in changed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["phi"]) and 0 <= r["proxy/pixel_accuracy"] <= 1
        assert r["raw_std"] > 0 and math.isfinite(r["raw_min"]) and math.isfinite(r["raw_max"])
        assert -1 <= r["length_corr"] <= 1  # the reward against the completions' length, within groups
        phases = [r["engine/train"], r["engine/metric"], r["engine/reverse"]]  # the engine's time, by phase
        assert min(phases) >= 0 and sum(phases) <= r["engine_seconds"] and r["engine/train"] > 0
        assert r["time/generation"] > 0 and r["time/reward"] > 0
    assert sorted(p.name for p in (tmp_path / "patterns").iterdir()) == ["step_00001.png", "step_00002.png"]
    texts = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [t["step"] for t in texts] == [1, 2]  # each step's texts, beside its metrics row
    for t, r in zip(texts, rows):
        assert t["distinct_share"] == r["distinct_share"]
        counts = [e["count"] for e in t["most_common"]]
        assert counts == sorted(counts, reverse=True) and sum(counts) <= 8  # 4 prompts × 2 completions
        assert t["best"]["reward"] >= t["worst"]["reward"]
    saved = load_config(TrainConfig, tmp_path / "config.yaml")
    assert saved == cfg


def test_grpo_on_metagrad_rewards_learns_what_the_transfer_check_measures(tmp_path):
    """The demo's settings, shorter (30 GRPO steps of 4 prompts × 16 completions, seconds):
    over two sampling seeds, the trained generator's data gives a fresh target a better Φ and
    pixel accuracy than the untrained generator's. Measured (one H200's CPU, training seeds
    0..4): mean Φ −0.76 → −0.51 … −0.67, pixel accuracy 0.571 → 0.595 … 0.750. With the
    reward negated it ends far below the base (Φ ≈ −5.8, pixel accuracy 0.32 at 20 steps); a
    reward with no information (all equal) gives every advantage zero and leaves the
    generator where it was: neither passes."""
    cfg = load_config(TrainConfig, None, [
        f"output_dir={tmp_path}", "grpo.steps=30", "grpo.prompts_per_step=4", "grpo.num_generations=16",
        "grpo.learning_rate=5e-3", "grpo.lr_schedule=constant", "grpo.save_every=0", "grpo.png_every=0",
        "evaluate.samples=64", "evaluate.seeds=[0, 1]", "device=cpu",
    ], base=demo_config())  # fmt: skip
    run_train(cfg)
    results = run_evaluate(cfg)

    def mean(generator: str, figure) -> float:
        values = [figure(r) for r in results if r.generator == generator]
        assert len(values) == 2  # both sampling seeds
        return sum(values) / 2

    phi = {g: mean(g, lambda r: r.metric) for g in ("base", "trained")}
    accuracy = {g: mean(g, lambda r: r.proxy["pixel_accuracy"]) for g in ("base", "trained")}
    assert phi["trained"] >= phi["base"] + 0.05, phi
    assert accuracy["trained"] > accuracy["base"] + 0.01, accuracy


def test_resume_after_interruption_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    import dpg.rewards

    whole = run_train(tiny(tmp_path / "whole", "grpo.steps=3", "grpo.save_every=1"))
    reference = load_model(str(whole))[0].state_dict()

    real = dpg.rewards.InnerRunReward.__call__
    calls = {"n": 0}

    def crash_on_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run dies in step 3, after checkpoint 2
        return real(self, *a, **k)

    monkeypatch.setattr(dpg.rewards.InnerRunReward, "__call__", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny(tmp_path / "cut", "grpo.steps=3", "grpo.save_every=1"))
    cut = tmp_path / "cut"
    assert (cut / "checkpoint-2").is_dir() and not (cut / "generator").exists()
    # As if killed while writing checkpoint 3: step 3 logged, its folder holds a truncated
    # optimizer state and no trainer state.
    shutil.copytree(cut / "checkpoint-2", cut / "checkpoint-3")
    (cut / "checkpoint-3" / "trainer_state.json").unlink()
    (cut / "checkpoint-3" / SEAL).unlink()
    optimizer = cut / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with (cut / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "global_step": 3}) + "\n")
    monkeypatch.setattr(dpg.rewards.InnerRunReward, "__call__", real)
    resumed = run_train(tiny(cut, "grpo.steps=3", "grpo.save_every=1"))
    rows = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]  # step 3 logged once, by the resumed run
    assert (cut / "checkpoint-3" / SEAL).is_file()  # written over by the resumed run, and sealed
    state = load_model(str(resumed))[0].state_dict()
    for k in reference:
        assert torch.allclose(state[k], reference[k], rtol=1e-5, atol=1e-7), k
    # Run once more: every step is in the last checkpoint, so nothing is trained again (it
    # once took a 4th step) and the generator restored from checkpoint 3 is the same.
    (cut / "generator").rename(cut / "generator_before")
    again = run_train(tiny(cut, "grpo.steps=3", "grpo.save_every=1"))
    rows = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]
    restored = load_model(str(again))[0].state_dict()
    for k in reference:
        assert torch.equal(restored[k], state[k]), k


def test_prompts_template_and_heldout(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("english\tgerman\n" + "".join(f"line {i}\tzeile {i}\n" for i in range(10)))
    overrides = [f"prompts.file={f}", "prompts.field=english", "prompts.template=Rephrase: {prompt}",
                 "prompts.heldout=3"]  # fmt: skip
    cfg = load_config(TrainConfig, None, overrides)
    train, heldout = load_prompts(cfg.prompts)
    assert train[0] == "Rephrase: line 0" and len(train) == 7 and heldout == [f"Rephrase: line {i}" for i in (7, 8, 9)]


@pytest.mark.parametrize(
    "override,message",
    [
        ("reward.name=magic", "unknown reward 'magic'"),
        ("grpo.allowed_tokens=latin", "allowed_tokens"),
        ("grpo.updates_per_step=3", "do not split"),  # 4 prompts × 2 completions into 3 mini-batches
        ("prompts.template=Say {nothing}", "not a valid template"),
        ("prompts.heldout=500", "leave none for training"),
        ("grpo.extra={no_such_option: 1}", "rejected by TRL"),
        ("reward.name=naive", "cross_group_batching: false"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, override, message):
    cfg = tiny(tmp_path, "grpo.steps=1", "grpo.updates_per_step=2", override)
    with pytest.raises(DpgError, match=message):
        run_train(cfg)
    assert not (tmp_path / "checkpoint-1").exists()


def test_ascii_only_keeps_printable_ascii():
    tok = byte_tokenizer()
    suppressed = set(ascii_only(tok))
    for ch in "aZ0 !~\n":
        assert tok.convert_tokens_to_ids(tok.tokenize(ch))[0] not in suppressed
    assert tok.eos_token_id not in suppressed  # completions can still end
    assert len(suppressed) == 257 - 95 - 1 - 1  # all but 95 printable, newline, and <|endoftext|>


def test_grpo_config_maps_steps_and_batches():
    cfg = load_config(TrainConfig, None, ["grpo.steps=10", "grpo.prompts_per_step=8", "grpo.num_generations=4",
                                          "grpo.updates_per_step=2", "grpo.num_iterations=3",
                                          "grpo.save_every=5"])  # fmt: skip
    args = grpo_config(cfg, torch.device("cpu"), byte_tokenizer())
    assert args.max_steps == 10 * 2 * 3 and args.per_device_train_batch_size == 16 and args.steps_per_generation == 2
    assert args.generation_batch_size == 32 and args.logging_steps == 6 and args.save_steps == 30
    assert args.beta == 0.0 and args.num_generations == 4 and args.num_iterations == 3
    assert args.gradient_accumulation_steps == 1
    cfg.grpo.update_microbatch = 4  # each update of 16 sequences in 4 passes: same optimizer steps, same batches
    args = grpo_config(cfg, torch.device("cpu"), byte_tokenizer())
    assert args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 4
    assert args.steps_per_generation == 8 and args.generation_batch_size == 32 and args.max_steps == 60
    assert args.disable_dropout  # the policy's dropout is off unless grpo.extra keeps it
    cfg.grpo.extra = {"disable_dropout": False}
    assert not grpo_config(cfg, torch.device("cpu"), byte_tokenizer()).disable_dropout
    cfg.grpo.extra = {}
    cfg.grpo.update_microbatch = 5
    with pytest.raises(DpgError, match="update_microbatch = 5 does not divide the 16 sequences"):
        grpo_config(cfg, torch.device("cpu"), byte_tokenizer())


@pytest.mark.parametrize("loss_type,generator", [("grpo", "tiny-llama"), ("dapo", "tiny-llama"), ("grpo", "tiny-gpt2")])
def test_update_in_passes_trains_the_same_generator(tmp_path, loss_type, generator):
    """grpo.update_microbatch accumulates gradients over passes: the same samples, rewards and
    optimizer steps, so the same generator as updating each mini-batch in one pass. SGD for the
    generator, whose step is linear in the gradient (Adam's first step, g/|g|, would turn rounding
    in a near-zero gradient into a whole step). tiny-gpt2 has dropout 0.1 in its config: it holds
    only because dpg turns the policy's dropout off (its masks would differ between the two)."""
    more = ["grpo.steps=2", "grpo.updates_per_step=2", "grpo.prompts_per_step=4", "grpo.num_generations=4",
            f"grpo.loss_type={loss_type}", f"generator.model={generator}", "grpo.extra={optim: sgd}",
            "grpo.learning_rate=0.5"]  # fmt: skip
    whole = load_model(str(run_train(tiny(tmp_path / "whole", *more))))[0].state_dict()
    passes = load_model(str(run_train(tiny(tmp_path / "passes", *more, "grpo.update_microbatch=2"))))[0].state_dict()
    rows = [[json.loads(r) for r in (tmp_path / n / "metrics.jsonl").open()] for n in ("whole", "passes")]
    assert [r["trl/reward_std"] for r in rows[0]] == [r["trl/reward_std"] for r in rows[1]]  # the same samples
    for a, b in zip(*rows, strict=True):
        assert math.isclose(a["trl/grad_norm"], b["trl/grad_norm"], rel_tol=1e-5)
    base = load_model(generator)[0].state_dict()
    for k in whole:
        moved = (whole[k] - base[k]).abs().max().item()
        assert moved > 1e-4, k  # the updates moved every tensor, so the comparison can fail
        assert (passes[k] - whole[k]).abs().max().item() <= 1e-4 * moved, k


@pytest.mark.parametrize(
    "extra,message",
    [
        ("{max_steps: 5}", r"grpo.extra may not set max_steps, which dpg computes \(set instead: max_steps: grpo.st"),
        ("{logging_steps: 1, per_device_train_batch_size: 2}", r"may not set logging_steps, per_device_train_batch"),
        ("{save_steps: 3}", r"save_steps: grpo.save_every"),
    ],
)
def test_grpo_extra_refuses_what_dpg_computes(extra, message):
    cfg = load_config(TrainConfig, None, [f"grpo.extra={extra}"])
    with pytest.raises(DpgError, match=message):
        grpo_config(cfg, torch.device("cpu"), byte_tokenizer())
    other = load_config(TrainConfig, None, ["grpo.extra={top_p: 0.5}"])
    passed = grpo_config(other, torch.device("cpu"), byte_tokenizer())
    assert passed.top_p == 0.5  # any other GRPOConfig field goes through


def test_lora_generator_is_saved_merged(tmp_path):
    cfg = tiny(tmp_path, "grpo.steps=1", "grpo.save_every=0", "lora.r=4", "lora.target_modules=c_attn,c_proj")
    final = run_train(cfg)
    assert not (final / "adapter_config.json").exists()  # a plain model, loadable without peft
    base = load_model("tiny-gpt2", seed=1)[0].state_dict()
    merged = load_model(str(final))[0].state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(("c_attn" in k or "c_proj" in k) for k in changed)


def test_chat_prompts_need_a_chat_template(tmp_path):
    with pytest.raises(DpgError, match="no chat template"):
        run_train(tiny(tmp_path, "grpo.steps=1", "prompts.chat=true"))


def test_parquet_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [f"q{i}" for i in range(6)]}), tmp_path / "p.parquet")
    overrides = [f"prompts.file={tmp_path / 'p.parquet'}", "prompts.field=question", "prompts.heldout=2"]
    cfg = load_config(TrainConfig, None, overrides)
    assert load_prompts(cfg.prompts) == (["q0", "q1", "q2", "q3"], ["q4", "q5"])


def test_time_limit_stops_after_a_step_with_a_checkpoint_and_the_same_command_resumes(tmp_path, capsys):
    """time_limit lets a run go in pieces (device calls of ≤ 10 minutes): past the limit the
    run ends with the step in progress, seals a checkpoint, saves no generator, and running the
    same command again goes on from there."""
    assert run_train(tiny(tmp_path, "grpo.steps=3", "grpo.save_every=0", "time_limit=1e-9")) is None
    assert "stopped after step 1/3: time_limit of 1e-09 minutes; the same command resumes" in capsys.readouterr().out
    assert (tmp_path / "checkpoint-1" / SEAL).is_file() and not (tmp_path / "generator").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    # dpg evaluate on the unfinished run checks its latest sealed checkpoint, named for its step.
    capsys.readouterr()
    results = run_evaluate(tiny(tmp_path, "grpo.steps=3", "evaluate.samples=4"))
    assert [r.generator for r in results] == ["base", "checkpoint-1"]
    assert "evaluating its latest checkpoint, checkpoint-1" in capsys.readouterr().out
    spec = f"evaluate.generators=[{tmp_path / 'checkpoint-1'}]"
    explicit = run_evaluate(tiny(tmp_path / "x", "evaluate.samples=4", spec))
    assert results[1].samples == explicit[1].samples and results[1].metric == explicit[1].metric
    assert results[1].samples != results[0].samples  # the checkpoint is not the base generator
    final = run_train(tiny(tmp_path, "grpo.steps=3", "grpo.save_every=0"))
    assert "resuming from" in capsys.readouterr().out and final == tmp_path / "generator" and final.is_dir()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["examples"] for r in rows] == [8, 16, 24]
    assert all(0 < r["distinct_share"] <= 1 for r in rows)
    with pytest.raises(DpgError, match="time_limit must be at least 0 minutes"):
        run_train(tiny(tmp_path / "bad", "time_limit=-1"))


def test_a_step_runs_under_a_global_tf32_setting_from_the_new_api(tmp_path):
    """transformers' TrainingArguments(torch_compile=True) on an Ampere-or-newer GPU turns TF32 on
    through torch's new precision API (`torch.backends.fp32_precision = "tf32"`), after which
    torch's legacy getter raises; dpg's reward read that getter and died at step 1 (session 12,
    `grpo.extra.torch_compile=true` on the H200). A step must run under that setting and leave
    it as it found it."""
    from dpg.metagrad.precision import matmul_precision

    before = torch.backends.fp32_precision
    torch.backends.fp32_precision = "tf32"
    try:
        run_train(tiny(tmp_path, "grpo.steps=1", "grpo.save_every=0", "grpo.png_every=0"))
        assert torch.backends.fp32_precision == "tf32" and matmul_precision() == "tf32"
    finally:
        torch.backends.fp32_precision = before
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(row["phi"]) and row["raw_std"] > 0
