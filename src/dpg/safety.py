"""What keeps a run from going wrong, and a stopped run resumable.

Before any compute: `check_settings` (first, before anything loads: counts and sizes in
range) and `check_run` (once the models and the metric are built, before GRPO starts):
every prompt has a token to continue, every sequence fits its model's position limit, each
inner run has an example per inner step, and the metric gives a finite scalar on the
target that depends on its weights.

Every policy update (`FiniteGuard`): one whose gradient is not finite is skipped, as verl
(the paper's trainer) skips it, and counted in the run log; `grpo.nonfinite_skips` of them in
a row stop the run with a DpgError naming the step. The weights must be finite after every
update, or the run stops. Either stop comes before that step's checkpoint is written. The
rewards check Φ, its gradient and the metagradients the same way (dpg.rewards). So no
checkpoint holds a poisoned generator, and the same command resumes from the last one.

Checkpoints (`CheckpointSeal`, `last_complete_checkpoint`): transformers writes a checkpoint
as a folder of files with no mark of completion, and its `get_last_checkpoint` takes the
highest-numbered folder, finished or not. Once a save returns, the seal syncs the folder's
files to disk and then puts `SEAL` in it by an atomic rename; resume takes the last sealed
folder and skips later unsealed ones (left by a run stopped while writing them).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from dpg.errors import DpgError
from dpg.metagrad.records import check_hvp_microbatch_size, check_metric_value, position_limit

SEAL = "dpg_complete"  # in a checkpoint folder: every file of it was written and synced


def check_settings(cfg) -> None:
    """Counts and sizes in range, before anything loads: out of range they crash mid-run or,
    worse, do something else (a negative grpo.steps would train transformers' default 3 epochs)."""
    g = cfg.grpo
    least = {
        "grpo.steps": (g.steps, 1), "grpo.prompts_per_step": (g.prompts_per_step, 1),
        "grpo.num_generations": (g.num_generations, 1), "grpo.max_completion_length": (g.max_completion_length, 1),
        "grpo.updates_per_step": (g.updates_per_step, 1), "grpo.num_iterations": (g.num_iterations, 1),
        "grpo.save_every": (g.save_every, 0), "grpo.png_every": (g.png_every, 0),
        "grpo.update_microbatch": (g.update_microbatch, 0), "grpo.nonfinite_skips": (g.nonfinite_skips, 0),
        "prompts.limit": (cfg.prompts.limit, 1), "prompts.heldout": (cfg.prompts.heldout, 0),
        "reward.max_length": (cfg.reward.max_length, 2), "metric.max_length": (cfg.metric.max_length, 2),
        "prompts.max_tokens": (cfg.prompts.max_tokens, 1), "evaluate.samples": (cfg.evaluate.samples, 1),
        "lora.r": (cfg.lora.r, 0), "grpo.beta": (g.beta, 0.0), "lora.dropout": (cfg.lora.dropout, 0.0),
    }  # fmt: skip
    check_at_least(least)
    if g.allowed_tokens not in ("all", "ascii"):
        raise DpgError(f"grpo.allowed_tokens must be 'all' or 'ascii', got {g.allowed_tokens!r}")
    choices = {"sampler": ("dpg", "trl"), "precision": ("auto", "fp32", "bf16"),
               "sampler_dtype": ("auto", "float32", "bfloat16")}  # fmt: skip
    for key, known in choices.items():
        value = getattr(g, key)
        if value not in known:
            raise DpgError(f"grpo.{key} must be one of {', '.join(known)}, got {value!r}")
    check_hvp_microbatch_size(cfg.reward.hvp_microbatch_size, "reward.hvp_microbatch_size")
    # Rates: a zero or negative one trains nothing, or trains away from the goal, without a word.
    check_positive({"grpo.temperature": g.temperature, "grpo.learning_rate": g.learning_rate,
                    "grpo.epsilon": g.epsilon, "lora.alpha": cfg.lora.alpha})  # fmt: skip
    if cfg.lora.dropout >= 1:
        raise DpgError(f"lora.dropout must be below 1, got {cfg.lora.dropout}")
    if cfg.time_limit < 0:
        raise DpgError(f"time_limit must be at least 0 minutes (0: none), got {cfg.time_limit}")


def check_at_least(least: dict) -> None:
    """{key: (value, lowest allowed)}; a None value is unset and passes."""
    for key, (value, low) in least.items():
        if value is not None and value < low:
            raise DpgError(f"{key} must be at least {low}, got {value}")


def check_positive(values: dict) -> None:
    """{key: value}: each a positive finite number."""
    for key, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise DpgError(f"{key} must be positive and finite, got {value}")


def check_run(cfg, prompts: list, generator, generator_tok, target, metric) -> int:
    """Everything about a dpg train run that can fail later, checked now. `prompts` as the
    trainer gets them (text, or messages for chat); `metric` None for baseline rewards.
    Returns the longest prompt's length in generator tokens."""
    g = cfg.grpo
    if len(prompts) < g.prompts_per_step:
        # TRL would build no batch at all, train zero steps, save the untouched generator and exit 0.
        raise DpgError(
            f"{len(prompts)} training prompts (after prompts.heldout = {cfg.prompts.heldout}) are fewer than "
            f"grpo.prompts_per_step = {g.prompts_per_step}: not one GRPO step could be trained. Give more prompts "
            "(prompts.file, prompts.limit), or lower prompts.heldout or grpo.prompts_per_step"
        )
    if cfg.prompts.chat:
        encoded = generator_tok.apply_chat_template(
            prompts, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    else:
        encoded = generator_tok(text=prompts)  # as TRL tokenizes them
    lengths = [len(ids) for ids in encoded["input_ids"]]
    if 0 in lengths:
        raise DpgError(f"prompt {lengths.index(0)} is empty (no token for the generator to continue)")
    limit, longest = position_limit(generator), max(lengths) + cfg.grpo.max_completion_length
    if limit is not None and longest > limit:
        raise DpgError(
            f"the longest prompt ({max(lengths)} tokens) + grpo.max_completion_length "
            f"({cfg.grpo.max_completion_length}) = {longest} tokens is over the generator's position limit of "
            f"{limit}: set prompts.max_tokens to cut the prompts, or lower grpo.max_completion_length"
        )
    if metric is None:
        return max(lengths)
    limit = position_limit(target)
    sizes = {"reward.max_length": cfg.reward.max_length}
    if cfg.metric.name == "lm_loss":
        sizes["metric.max_length"] = cfg.metric.max_length
    for key, value in sizes.items():
        if limit is not None and value > limit:
            raise DpgError(f"{key} = {value} is over the target's position limit of {limit} tokens")
    per_run = g.prompts_per_step * (g.num_generations if cfg.reward.cross_group_batching else 1)
    if cfg.recipe.batch_size is None and cfg.recipe.steps > per_run:
        raise DpgError(
            f"recipe.steps = {cfg.recipe.steps} inner steps need as many completions per inner run, which has {per_run}"
        )
    probe_metric(metric, target, cfg.metric.name)
    return max(lengths)


def probe_metric(metric, target, name: str) -> float:
    """Φ at the target's own weights: a finite scalar that depends on them, or a DpgError."""
    try:
        with torch.enable_grad():
            phi = metric(dict(target.named_parameters()))
    except DpgError:
        raise
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise DpgError(f"metric {name!r} does not fit the target: {type(err).__name__}: {err}") from err
    check_metric_value(phi, f"metric {name!r}", "on the target's initial weights")
    return phi.item()


def _not_finite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    if not named:
        return []
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()  # one device sync
    return [n for (n, _), good in zip(named, ok) if not good]


class FiniteGuard(TrainerCallback):
    """Skip a policy update whose gradient is not finite, as verl skips it (its actor drops the
    gradients and takes no optimizer step): the gradients are dropped before the step, so the
    weights and the optimizer's moments stay as they were (the learning-rate schedule still
    advances, as verl's does). `max_skips` in a row are skipped; the next stops the run (0: the
    first does). Stop the run at the first non-finite weight after an update. `per_step`
    optimizer steps make one generated batch, one step of dpg's log.

    Session 18 met one on the H200 (SmolLM2 under bf16 autocast, the UUID's levenshtein run,
    step 59); the same step redone from its checkpoint was finite."""

    def __init__(self, per_step: int, max_skips: int = 0):
        self.per_step, self.max_skips = per_step, max_skips
        self.in_a_row = 0
        self.skipped = 0  # since the last take(): the run log's skipped_updates
        self.out: Path | None = None  # watch(): where a skipped update's inputs go
        self.passes: list[dict] = []  # the inputs of each pass of the update under way

    def take(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped

    def watch(self, trainer, out: Path) -> None:
        """Hold the inputs of each pass of the update under way (TRL's compute_loss sees them;
        references only, TRL keeps the batch anyway), so that a skipped update's inputs go to
        OUT/nonfinite/ for a post-mortem, and the log says what in them was out of the ordinary."""
        self.out, inner = Path(out), trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            self.passes.append(inputs)
            return inner(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss  # an instance attribute: the class is untouched

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        with_grad = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        bad = _not_finite([(n, p.grad) for n, p in with_grad])
        if not bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        step, update = state.global_step // self.per_step + 1, state.global_step % self.per_step + 1
        where = f"step {step}: the generator's gradient is not finite in {bad[:3]} (the GRPO loss was not finite)"
        if self.in_a_row > self.max_skips:
            raise DpgError(
                f"{where}, {self.in_a_row} update(s) in a row (grpo.nonfinite_skips = {self.max_skips}); "
                f"stopped before the update, no checkpoint has it{self._keep(step, update, args)}"
            )
        for _, p in with_grad:
            p.grad = None  # torch's optimizers pass over a parameter without a gradient: no step, no moments
        self.skipped += 1
        print(f"{where}: update {update} of {self.per_step} skipped, as verl skips it "
              f"({self.in_a_row} in a row; grpo.nonfinite_skips = {self.max_skips}){self._keep(step, update, args)}",
              flush=True)  # fmt: skip

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.passes = []  # the next update's passes
        bad = _not_finite([(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad])
        if bad:
            raise DpgError(
                f"step {(state.global_step - 1) // self.per_step + 1}: the generator's weights are not finite "
                f"after its update, in {bad[:3]} (grpo.learning_rate too high?); stopped before any checkpoint has them"
            )

    def _keep(self, step: int, update: int, args) -> str:
        """Save the skipped update's inputs (their tensors, on the CPU) and say what they hold."""
        if self.out is None or not self.passes:
            return ""
        rank = f"_rank{args.process_index}" if args.world_size > 1 else ""
        path = self.out / "nonfinite" / f"step_{step}_update_{update}{rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        passes = [{k: v.detach().cpu() for k, v in x.items() if isinstance(v, torch.Tensor)} for x in self.passes]
        torch.save(passes, path)
        return f"; its inputs are in {path} ({post_mortem(passes)})"


def post_mortem(passes: list[dict]) -> str:
    """What a skipped update's inputs hold that could make the GRPO loss not finite: advantages
    that are not, and the lowest log-probability of a completion token at sampling time (the
    clipped ratio exp(logp - logp_old) overflows past ~88 nats, and its gradient is then 0 · inf)."""
    parts = []
    advantages = [p["advantages"].flatten() for p in passes if "advantages" in p]
    if advantages:
        adv = torch.cat(advantages)
        parts.append(f"advantages: {int((~torch.isfinite(adv)).sum())} of {adv.numel()} not finite")
    masked = [(p, p["completion_mask"].bool()) for p in passes if "completion_mask" in p]
    masks = [m for _, m in masked]
    old = [(p["old_per_token_logps"], m) for p, m in masked if p.get("old_per_token_logps") is not None and m.any()]
    if old:
        low = min(lp.float()[m].min().item() for lp, m in old)
        parts.append(f"lowest old log-probability of a completion token: {low:.4g}")
    if masks:
        lengths = torch.cat([m.sum(-1) for m in masks])
        parts.append(f"completion lengths {int(lengths.min())} to {int(lengths.max())}")
    return "; ".join(parts) or "no GRPO inputs"


class CheckpointSeal(TrainerCallback):
    """After TRL has written a checkpoint: sync its files, then seal it (atomic rename)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.is_world_process_zero:  # a folder written over is unsealed until done
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / SEAL).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for path in folder.rglob("*"):
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())  # on disk before the seal says so, even if the machine dies
        tmp = folder / (SEAL + ".tmp")
        tmp.write_text(json.dumps({"global_step": state.global_step}))
        os.replace(tmp, folder / SEAL)
        _fsync_dir(folder)


class TimeLimit(TrainerCallback):
    """Stops training at the end of the first step (generated batch) that ends more than
    `minutes` after `start` (time.monotonic()), with a checkpoint, so that a long run goes in
    pieces (device calls of at most 10 minutes) and the same command resumes it. `stopped`
    tells the caller the run is unfinished."""

    def __init__(self, minutes: float, per_step: int, start: float):
        self.seconds, self.per_step, self.start = minutes * 60.0, per_step, start
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        whole_step = state.global_step % self.per_step == 0  # policy updates of one generated batch done
        late = self.seconds > 0 and time.monotonic() - self.start > self.seconds
        if whole_step and late and state.global_step < state.max_steps:
            control.should_save = True  # sealed by CheckpointSeal like any other checkpoint
            control.should_training_stop = True
            self.stopped = True
        return control


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_complete_checkpoint(out: Path) -> Path | None:
    """The sealed checkpoint with the highest step. A later unsealed folder (a run stopped
    while writing it) is skipped, and written over when the run reaches its step again."""
    folders = sorted(
        (
            (int(m.group(1)), p)
            for p in Path(out).glob("checkpoint-*")
            if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
        ),
        reverse=True,
    )
    for _, path in folders:
        if (path / SEAL).is_file():
            return path
        print(f"skipping {path}: incomplete (the run stopped while writing it)")
    return None
