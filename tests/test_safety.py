"""Reliability of dpg train: kill and resume, sealed checkpoints, non-finite values stop the
step and the run resumes (a non-finite policy update is skipped, as verl skips it), bad input
fails before any compute."""

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from test_train import tiny

from dpg import DpgError
from dpg.cli import main
from dpg.models import load_model
from dpg.report import read_rows
from dpg.safety import SEAL, last_complete_checkpoint
from dpg.train import run_train

RUN = ["grpo.steps=3", "grpo.save_every=1", "device=cpu"]


def params(final: Path) -> dict[str, torch.Tensor]:
    return load_model(str(final))[0].state_dict()


def assert_same_run(out: Path, reference: tuple[dict, list]) -> None:
    """The run in `out` ended exactly where the uninterrupted one did, bit for bit: the
    generator's weights and every per-step figure of the reward."""
    state, rows = params(out / "generator"), read_rows(out / "metrics.jsonl")
    ref_state, ref_rows = reference
    assert [r["step"] for r in rows] == [1, 2, 3]  # each step logged once
    assert [r["step"] for r in read_rows(out / "samples.jsonl")] == [1, 2, 3]  # and its texts once
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k
    figures = ("phi", "raw_mean", "raw_std", "raw_min", "raw_max", "proxy/pixel_accuracy")
    assert [[r[k] for k in figures] for r in rows] == [[r[k] for k in figures] for r in ref_rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-step run: where every interrupted run must end."""
    out = tmp_path_factory.mktemp("whole")
    final = run_train(tiny(out, *RUN))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all((out / f"checkpoint-{s}" / SEAL).is_file() for s in (1, 2, 3))
    return params(final), read_rows(out / "metrics.jsonl")


# ---- kill and resume ----------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["generation", "reward"])
def test_sigkill_in_step_2_then_the_same_command_ends_bitwise_where_an_uninterrupted_run_ends(
    tmp_path, reference, moment
):
    """SIGKILL in the middle of step 2's sampling, or of its reward (after the inner run,
    before the reverse sweep); then the same command resumes from checkpoint 1."""
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(asdict(tiny(out, *RUN)), sort_keys=False))
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # the reference's thread count
    killer = [sys.executable, str(Path(__file__).parent / "killed_run.py"), moment, "2", str(config)]
    killed = subprocess.run(killer, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert last_complete_checkpoint(out) == out / "checkpoint-1" and not (out / "checkpoint-2").exists()
    assert [r["step"] for r in read_rows(out / "metrics.jsonl")] == [1] and not (out / "generator").exists()

    again = subprocess.run([sys.executable, "-m", "dpg.cli", "train", str(config)], env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-1'}" in again.stdout
    assert_same_run(out, reference)


def test_a_checkpoint_cut_short_while_written_is_skipped(tmp_path, capsys):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}" / SEAL).write_text("{}")
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')  # all but the seal
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"\0" * 10)  # killed mid-write
    (tmp_path / "checkpoint-final").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "skipping" in capsys.readouterr().out
    assert last_complete_checkpoint(tmp_path / "checkpoint-1") is None


def test_metrics_cut_short_by_a_kill_are_trimmed_on_resume(tmp_path):
    from dpg.report import RunLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "global_step": s, "phi": -s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "glo')
    RunLog(tmp_path, None, None, total_steps=4, per_step=1, png_every=0).resume(2)
    assert read_rows(path) == rows[:2]
    RunLog(tmp_path, None, None, total_steps=4, per_step=1, png_every=0).resume(0)  # a fresh start
    assert path.read_text() == ""
    path.write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    with pytest.raises(json.JSONDecodeError):  # damage before the last line is not a kill: never hidden
        read_rows(path, partial_ok=True)


# ---- non-finite values stop the step; the run resumes -------------------------------------


def test_a_nan_metric_stops_the_step_and_the_run_resumes(tmp_path, reference, monkeypatch):
    import dpg.rewards

    real = dpg.rewards.InnerRunReward.__call__
    calls = {"n": 0}

    def nan_in_step_3(self, *a, **k):
        calls["n"] += 1
        if calls["n"] != 3:
            return real(self, *a, **k)
        metric = self.metric
        self.metric = lambda params: metric(params) * float("nan")
        try:
            return real(self, *a, **k)
        finally:
            self.metric = metric

    monkeypatch.setattr(dpg.rewards.InnerRunReward, "__call__", nan_in_step_3)
    with pytest.raises(DpgError, match=r"step 3: the metagrad reward failed: the metric is not finite"):
        run_train(tiny(tmp_path, *RUN))
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2" and not (tmp_path / "generator").exists()
    monkeypatch.setattr(dpg.rewards.InnerRunReward, "__call__", real)
    run_train(tiny(tmp_path, *RUN))
    assert_same_run(tmp_path, reference)


def nan_loss_in(updates: range, monkeypatch) -> list[dict]:
    """The GRPO loss is NaN in these policy updates (optimizer steps, 0-based); the list gets
    the inputs of each pass made NaN."""
    from trl import GRPOTrainer

    real, seen = GRPOTrainer.compute_loss, []

    def nan_in(self, model, inputs, *a, **k):
        loss = real(self, model, inputs, *a, **k)
        if self.state.global_step not in updates:
            return loss
        seen.append({k: v.detach().cpu().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return loss * float("nan")

    monkeypatch.setattr(GRPOTrainer, "compute_loss", nan_in)
    return seen


def test_a_nan_grpo_loss_stops_before_the_update_and_the_run_resumes(tmp_path, reference, monkeypatch):
    nan_loss_in(range(1, 2), monkeypatch)  # step 2's update
    with pytest.raises(DpgError, match=r"step 2: the generator's gradient is not finite .*stopped before the update"):
        run_train(tiny(tmp_path, *RUN, "grpo.nonfinite_skips=0"))
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-1" and not (tmp_path / "checkpoint-2").exists()
    monkeypatch.undo()  # TRL's own loss again
    run_train(tiny(tmp_path, *RUN))
    assert_same_run(tmp_path, reference)  # nothing of the NaN step reached the generator


def checkpoint_state(folder: Path) -> tuple[dict, dict]:
    """A checkpoint's generator weights and its optimizer's per-parameter state."""
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
    return params(folder), optimizer


def test_a_nan_grpo_loss_is_skipped_as_verl_skips_it_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    seen = nan_loss_in(range(1, 2), monkeypatch)  # step 2's update (one update a step)
    run_train(tiny(tmp_path, *RUN))
    kept = tmp_path / "nonfinite" / "step_2_update_1.pt"
    out = capsys.readouterr().out
    assert "step 2: the generator's gradient is not finite in ['transformer.wte.weight'" in out
    assert (f"update 1 of 1 skipped, as verl skips it (1 in a row; grpo.nonfinite_skips = 8); its inputs are in "
            f"{kept} (advantages: 0 of 8 not finite; completion lengths") in out  # fmt: skip
    saved = torch.load(kept, weights_only=True)  # the post-mortem: the very inputs of the NaN update
    assert len(saved) == len(seen) == 1 and saved[0].keys() == seen[0].keys() >= {"completion_ids", "advantages"}
    assert all(torch.equal(saved[0][k], seen[0][k]) for k in seen[0])
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]  # only the skipped update's
    (w1, opt1), (w2, opt2), (w3, _) = (checkpoint_state(tmp_path / f"checkpoint-{s}") for s in (1, 2, 3))
    for k in w1:  # the skipped update moved no weight ...
        assert torch.equal(w1[k], w2[k]), k
    assert opt1.keys() == opt2.keys()
    for i in opt1:  # ... and no moment, nor AdamW's step count
        for name in opt1[i]:
            assert torch.equal(opt1[i][name], opt2[i][name]), (i, name)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # step 3's update went through
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0]
    assert rows[1]["trl/grad_norm"] is None and all(math.isfinite(rows[i]["trl/grad_norm"]) for i in (0, 2))
    assert (tmp_path / "generator").is_dir()
    assert json.loads((tmp_path / "train_summary.json").read_text())["skipped_updates"] == 1
    assert "1 policy update(s) skipped for a non-finite gradient (metrics.jsonl: skipped_updates)" in out


def test_more_nan_updates_in_a_row_than_grpo_nonfinite_skips_stop_the_run(tmp_path, monkeypatch):
    nan_loss_in(range(1, 3), monkeypatch)  # steps 2 and 3
    with pytest.raises(DpgError, match=r"step 3: the generator's gradient is not finite .*2 update\(s\) in a row "
                                       r"\(grpo.nonfinite_skips = 1\); stopped before the update"):  # fmt: skip
        run_train(tiny(tmp_path, *RUN, "grpo.nonfinite_skips=1"))
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2" and not (tmp_path / "generator").exists()
    assert sorted(p.name for p in (tmp_path / "nonfinite").iterdir()) == ["step_2_update_1.pt", "step_3_update_1.pt"]
    assert [r["skipped_updates"] for r in read_rows(tmp_path / "metrics.jsonl")] == [0, 1]


def test_post_mortem_reads_the_masked_completion_tokens_only():
    from dpg.safety import post_mortem

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    old = torch.tensor([[-2.0, -95.5, -1000.0], [-0.5, -3000.0, float("-inf")]])  # masked: padding
    passes = [
        {"advantages": torch.tensor([0.5, float("nan")]), "completion_mask": mask, "old_per_token_logps": old},
        {"advantages": torch.tensor([1.0, -1.0]), "completion_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])},
    ]
    assert post_mortem(passes) == (
        "advantages: 1 of 4 not finite; lowest old log-probability of a completion token: -95.5; "
        "completion lengths 0 to 3"
    )
    assert post_mortem([{}]) == "no GRPO inputs"


def test_a_generator_update_that_overflows_stops_before_any_checkpoint(tmp_path):
    with pytest.raises(DpgError, match=r"step 1: the generator's weights are not finite after its update"):
        run_train(tiny(tmp_path, "grpo.steps=2", "grpo.save_every=1", "grpo.learning_rate=1e39"))
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "generator").exists()
    assert not (tmp_path / "metrics.jsonl").exists()  # the step is not logged as if it had happened


def test_an_inner_run_that_diverges_stops_the_step(tmp_path):
    with pytest.raises(
        DpgError, match=r"step 1: the metagrad reward failed: the metric is not finite after the inner run"
    ):
        run_train(tiny(tmp_path, "grpo.steps=1", "grpo.save_every=0", "recipe.lr=1e30", "recipe.steps=2"))


# ---- bad input: a clear error before any compute ------------------------------------------


def metric_reads_lm_head(params):  # custom metrics for the tests below ("test_safety:...")
    return params["lm_head.weight"].sum()


def metric_not_scalar(params):
    return params["lm_head.weight"][0]


def metric_constant(params):
    return torch.tensor(1.0)


def metric_nan(params):
    return params["lm_head.weight"].sum() * float("nan")


@pytest.fixture
def no_training(monkeypatch):
    """Building the GRPO trainer means compute is about to start: too late for input errors."""
    from trl import GRPOTrainer

    def refuse(*a, **k):
        raise AssertionError("the GRPO trainer was built: the error came after setup")

    monkeypatch.setattr(GRPOTrainer, "__init__", refuse)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["generator.model=./no/such/generator"], "model not found: ./no/such/generator"),
        (["target.model=./no/such/target"], "model not found: ./no/such/target"),
        (["prompts.file={tmp}/none.jsonl"], "data file not found"),
        (["prompts.file={tmp}/blank.txt"], "holds no examples"),
        (["prompts.file={tmp}/empty_rows.jsonl"], "prompt 3 is empty"),
        (["metric.vocab_offset=300"], "falls outside the LM head, which has 64 hidden dims × 257 vocab ids"),
        (["reward.hvp_microbatch_size=0"], "reward.hvp_microbatch_size must be at least 1, got 0"),
        (["metric.hidden_offset=60"], "falls outside the LM head"),
        (["metric.name=lm_loss", "metric.texts_file={tmp}/none.txt"], "data file not found"),
        (["metric.name=test_safety:metric_reads_lm_head", "target.tie_word_embeddings=true"],
         "does not fit the target: KeyError: 'lm_head.weight'"),
        (["metric.name=test_safety:metric_not_scalar"], "must return a scalar tensor"),
        (["metric.name=test_safety:metric_constant"], "does not depend on any trainable weight"),
        (["metric.name=test_safety:metric_nan"], "not finite on the target's initial weights"),
        (["reward.max_length=1000"], "reward.max_length = 1000 is over the target's position limit of 256"),
        (["metric.name=lm_loss", "metric.texts=[hello]", "metric.max_length=300"], "metric.max_length = 300 is over"),
        (["grpo.max_completion_length=250"],
         r"\+ grpo.max_completion_length \(250\) = \d+ tokens is over the generator's position limit of 256"),
        (["recipe.steps=20"], "recipe.steps = 20 inner steps need as many completions per inner run, which has 8"),
        (["recipe.steps=5", "reward.name=naive", "reward.cross_group_batching=false"], "which has 4"),
        (["dtype=bfloat16"], "dtype must be float32 or float64"),
        (["grpo.steps=-1"], "grpo.steps must be at least 1, got -1"),  # transformers would train 3 epochs
        (["grpo.updates_per_step=0"], "grpo.updates_per_step must be at least 1, got 0"),  # was a ZeroDivisionError
        (["prompts.heldout=-2"], "prompts.heldout must be at least 0"),
        (["grpo.temperature=0"], "grpo.temperature must be positive"),
        (["recipe.lr=.nan"], "recipe.lr must be a finite number"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_any_compute(tmp_path, no_training, overrides, message):
    (tmp_path / "blank.txt").write_text("\n  \n")
    rows = [{"prompt": "" if i == 3 else f"p{i}"} for i in range(10)]
    (tmp_path / "empty_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DpgError, match=message):
        run_train(tiny(tmp_path / "out", "grpo.steps=1", *[o.format(tmp=tmp_path) for o in overrides]))


@pytest.mark.parametrize(
    "yaml_text,args,message",
    [
        ("grpo:\n  stpes: 3\n", [], "unknown config key 'grpo.stpes'"),
        ("grpo:\n  steps: 3\n", ["grpo.steps=many"], "grpo.steps must be an integer, got 'many'"),
        ("grpo: 3\n", [], "grpo must be a mapping"),
        ("recipe:\n  lr: fast\n", [], "recipe.lr must be a number"),
    ],
)
def test_config_errors_stop_dpg_train_before_anything_is_written(tmp_path, capsys, yaml_text, args, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n" + yaml_text)
    assert main(["train", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpg train: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_chat_prompts_are_measured_with_the_chat_template(tmp_path):
    from dpg.safety import check_run

    generator, tok = load_model("tiny-gpt2")  # 256 positions
    tok.chat_template = "{% for m in messages %}" + "x" * 200 + "{{ m['content'] }}{% endfor %}"
    prompts = [[{"role": "user", "content": "hi"}]] * 4  # 200 + 2 tokens through the template; 4 make a step
    check_run(tiny(tmp_path, "prompts.chat=true", "grpo.max_completion_length=54"), prompts, generator, tok, None, None)
    with pytest.raises(
        DpgError, match=r"longest prompt \(202 tokens\) \+ grpo.max_completion_length \(55\) = 257 tokens"
    ):
        check_run(
            tiny(tmp_path, "prompts.chat=true", "grpo.max_completion_length=55"), prompts, generator, tok, None, None
        )
