"""What a run shows: the distinct-completion share, the per-step row and console line, the
curves' panels."""

import json

from dpg.report import RunLog, console_line, curve_keys, plot_runs, rows_from_console
from dpg.rewards import DistinctShare, batch_samples


class Scored:
    """A reward with the attributes RunLog reads from dpg's rewards."""

    __name__ = "scored"

    def __init__(self):
        self.history, self.calls = [], []

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append((list(prompts), list(completions), kwargs))
        self.history.append({"step": len(self.history) + 1, "phi": -0.5, "seconds": 0.25})
        return [float(len(c)) for c in completions]


class FixedTimer:
    """The generation timer RunLog reads, giving a fixed time."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def take(self) -> float:
        return self.seconds


def test_distinct_share_counts_texts_and_passes_everything_through():
    inner = Scored()
    reward = DistinctShare(inner)
    assert reward.__name__ == "scored" and reward.share is None
    chat = [[{"role": "assistant", "content": "a b"}], [{"role": "assistant", "content": "a b"}]]
    out = reward(prompts=["p"] * 6, completions=["x", "y", "x", "x", *["zz"] * 2], completion_ids=None, trainer_state=1)
    assert out == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0] and reward.share == 3 / 6  # x, y, zz
    assert inner.calls[0][2] == {"completion_ids": None, "trainer_state": 1}
    reward(prompts=["p", "q"], completions=chat)  # chat completions: the message text
    assert reward.share == 1 / 2
    assert reward.history is inner.history and len(reward.history) == 2  # the reward's own attributes
    assert not hasattr(reward, "no_such_attribute")


def test_batch_samples_names_the_texts_behind_the_share():
    """The most common texts with their counts (ties: first seen first), the best and the worst
    text by mean reward over its copies; a None reward (TRL's "not scored") is left out of the
    means and the ranking."""
    pairs = [("a", 1.0), ("b", -2.0), ("a", 3.0), ("c", 0.5), ("b", 0.0), ("d", None), ("c", 0.5)]
    got = batch_samples(pairs, most_common=2)
    assert got["distinct_share"] == 4 / 7 and got["distinct_2"] == 1.0  # one-word texts: no bigram at all
    assert got["most_common"] == [{"text": "a", "count": 2, "reward": 2.0}, {"text": "b", "count": 2, "reward": -1.0}]
    assert got["best"] == {"text": "a", "count": 2, "reward": 2.0}
    assert got["worst"] == {"text": "b", "count": 2, "reward": -1.0}
    assert batch_samples([("x", None)])["best"] is None


def test_run_log_writes_each_steps_texts_and_drops_redone_steps_on_resume(tmp_path):
    from transformers import TrainerControl, TrainerState

    reward = DistinctShare(Scored())
    log = RunLog(tmp_path, reward, FixedTimer(0.0), total_steps=3, per_step=2, png_every=0, batch=4)
    state = TrainerState()
    for step, texts in enumerate([["a", "a", "bb", "a"], ["ccc", "ccc", "ccc", "ccc"]], start=1):
        reward(prompts=["p"] * 4, completions=texts)
        state.global_step = 2 * step
        log.on_log(None, state, TrainerControl(), logs={"loss": 0.1})
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["distinct_share"]) for r in rows] == [(1, 0.5), (2, 0.25)]
    assert rows[0]["most_common"][0] == {"text": "a", "count": 3, "reward": 1.0}  # Scored: reward = len(text)
    assert rows[0]["best"]["text"] == "bb" and rows[1]["worst"] == {"text": "ccc", "count": 4, "reward": 3.0}
    log.resume(global_step=2)  # resuming from step 1's checkpoint: step 2 will be redone
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1]


def test_run_log_row_has_examples_entropy_and_distinct_share(tmp_path, capsys):
    from transformers import TrainerControl, TrainerState

    reward = DistinctShare(Scored())
    reward(prompts=["p"] * 4, completions=["a x", "a x", "b x", "c x y"])  # bigrams: a x twice, b x, c x, x y

    log = RunLog(tmp_path, reward, FixedTimer(1.5), total_steps=10, per_step=8, png_every=0, batch=1024)
    state = TrainerState()
    state.global_step = 24  # step 3 of 8 policy updates each
    log.on_log(None, state, TrainerControl(), logs={"loss": 0.1, "entropy": 2.5, "reward": 0.0})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (row["step"], row["examples"], row["distinct_share"], row["trl/entropy"]) == (3, 3 * 1024, 0.75, 2.5)
    assert row["distinct_2"] == 4 / 5 and row["phi"] == -0.5
    line = capsys.readouterr().out
    assert line.startswith("step    3/10  Φ -0.5") and "entropy 2.5  distinct 0.75  bigrams 0.80" in line


def test_console_line_shows_the_inner_runs_gain():
    row = {"step": 2, "phi": -721.398193, "phi_before": -721.398186, "time/generation": 1.0, "time/reward": 0.5,
           "time/update": 0.25}  # fmt: skip
    assert console_line(row, 9).startswith("step    2/9  Φ -721.4  ΔΦ -7e-06  | gen 1.00s")


def test_console_line_without_distinct_share():
    row = {"step": 1, "trl/reward": 0.5, "time/generation": 1.0, "time/reward": 0.5, "time/update": 0.25}
    assert console_line(row, 2).startswith("step    1/2  reward 0.5  | gen 1.00s")


def test_curve_panels(tmp_path):
    meta = [{"step": 1, "examples": 1024, "phi": -0.7, "proxy/pixel_accuracy": 0.5, "trl/entropy": 3.0,
             "distinct_share": 1.0}]  # fmt: skip
    base = [{"step": 1, "examples": 1024, "trl/reward": 0.1, "trl/entropy": 3.1, "distinct_share": 0.9}]
    assert curve_keys(meta) == ["phi", "proxy/pixel_accuracy", "trl/entropy", "distinct_share"]
    assert curve_keys(base) == ["trl/reward", "trl/entropy", "distinct_share"]
    plot_runs({"metagrad": meta, "language_id": base}, tmp_path / "c.png", title="t")
    from PIL import Image

    width, height = Image.open(tmp_path / "c.png").size
    assert width > 4 * height  # five panels side by side


def test_results_table_prints_the_digits_that_tell_rows_apart():
    """L2 norms of 124 that differ in their 9th digit print with 9 digits, not 4 (which would
    show three equal rows); a column whose values differ early keeps the 4."""
    from dpg.evaluate import TransferResult
    from dpg.report import results_table, telling_digits

    def row(gen, seed, norm, acc):
        return TransferResult(gen, seed, -norm, {"l2_norm": norm}, {"share": acc}, None, [])

    rows = [row("base", 0, 123.958031, 0.5), row("base", 1, 123.958029, 0.25), row("trained", 0, 123.957912, 0.75)]
    table = results_table(rows)
    base = "| base | 2 | -123.95803 [-123.958031, -123.958029] | 123.95803 [123.958029, 123.958031] | "
    base += "0.375 [0.25, 0.5] |"
    assert base in table
    assert "| trained | 1 | -123.957912 | 123.957912 | 0.75 |" in table
    assert telling_digits([1.0, 1.0 + 1e-13]) == 4 and telling_digits([123.958031, 123.958029]) == 9


def test_run_log_times_a_reward_that_keeps_no_history(tmp_path):
    """A baseline reward (no history of its own): the row's reward time is the wrapper's clock
    over its calls since the last row, not left inside the update's time."""
    import time

    from transformers import TrainerControl, TrainerState

    class Slow:
        __name__ = "slow"

        def __call__(self, prompts, completions, **kwargs):
            time.sleep(0.2)
            return [0.0] * len(completions)

    reward = DistinctShare(Slow())
    log = RunLog(tmp_path, reward, FixedTimer(0.0), total_steps=2, per_step=1, png_every=0, batch=2)
    state = TrainerState()
    for step in (1, 2):
        for _ in range(step):  # one call before row 1, two before row 2
            reward(prompts=["p"] * 2, completions=["a", "b"])
        state.global_step = step
        log.on_log(None, state, TrainerControl(), logs={"loss": 0.1})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 0.2 <= rows[0]["time/reward"] < 0.4 and 0.4 <= rows[1]["time/reward"] < 0.6
    for r in rows:
        assert abs(r["time/step"] - r["time/reward"] - r["time/update"]) < 1e-9


def test_run_log_row_holds_the_peak_gpu_memory_on_cuda(tmp_path, monkeypatch):
    """On CUDA each row holds the process's peak allocated and reserved memory, in GiB (dpg's
    "GB"); off CUDA neither key is there."""
    import torch
    from transformers import TrainerControl, TrainerState

    reward = DistinctShare(Scored())
    log = RunLog(tmp_path, reward, FixedTimer(0.0), total_steps=2, per_step=1, png_every=0, batch=2)
    state = TrainerState()
    reward(prompts=["p"] * 2, completions=["a", "b"])
    state.global_step = 1
    log.on_log(None, state, TrainerControl(), logs={"loss": 0.1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 4.5 * 2**30)
    reward(prompts=["p"] * 2, completions=["a", "b"])
    state.global_step = 2
    log.on_log(None, state, TrainerControl(), logs={"loss": 0.1})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "memory/peak_reserved_gb" not in rows[0]
    assert (rows[1]["memory/peak_allocated_gb"], rows[1]["memory/peak_reserved_gb"]) == (3.0, 4.5)


def test_rows_from_console_read_back_what_console_line_printed():
    """console_line, then rows_from_console: every figure comes back at the digits printed
    (Φ 5, ΔΦ 3, proxies 4, entropy 3, share 2, times 2 decimals); a redone step keeps its
    last line; other log lines are skipped."""
    metagrad = {"step": 7, "phi": -3.17312345, "phi_before": -3.17436789, "proxy/loss": 3.1731234,
                "raw_std": 1.7912e-06, "trl/entropy": 3.5512, "distinct_share": 0.99751,
                "trl/completions/mean_length": 49.14, "time/generation": 2.944, "time/reward": 3.491,
                "time/update": 8.752}  # fmt: skip
    baseline = {"step": 8, "trl/reward": 0.040512, "trl/entropy": 4.2, "distinct_share": 1.0,
                "time/generation": 5.03, "time/reward": 0.0, "time/update": 10.04}  # fmt: skip
    old = console_line(metagrad | {"phi": -9.0}, 360)
    text = f"{old}\nestimated peak memory 66.5 GB\r{console_line(metagrad, 360)}\n{console_line(baseline, 109)}\n"
    rows = rows_from_console(text, batch=1024)
    assert [r["step"] for r in rows] == [7, 8] and rows[0]["examples"] == 7 * 1024
    got = rows[0]
    assert got["phi"] == -3.1731 and abs(got["phi_before"] - (-3.1731 - 0.00124)) < 1e-12
    assert (got["proxy/loss"], got["raw_std"], got["trl/entropy"]) == (3.173, 1.79e-06, 3.55)
    assert got["distinct_share"] == 1.0  # 0.99751 at two decimals
    assert (got["trl/completions/mean_length"], got["time/generation"], got["time/update"]) == (49.1, 2.94, 8.75)
    figures = {"trl/reward": 0.04051, "trl/entropy": 4.2, "distinct_share": 1.0}
    times = {"time/generation": 5.03, "time/reward": 0.0, "time/update": 10.04}
    assert rows[1] == {"step": 8, "examples": 8 * 1024} | figures | times
