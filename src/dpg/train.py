"""dpg train: train a generator with GRPO (TRL) on metagradient rewards, from one config.

    dpg train CONFIG.yaml [key=value ...]

The loop is TRL's GRPOTrainer, used through its public interface: a reward callable
(dpg.rewards), a callback (dpg.report.RunLog: console line, metrics.jsonl, pattern PNGs)
and GRPOConfig. TRL brings generation, LoRA through peft, several GPUs through accelerate,
logging to TensorBoard / W&B, and checkpoints; dpg brings the rewards and the wiring.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import torch

from dpg import memory
from dpg.config import LoraSettings, TrainConfig, to_yaml
from dpg.data import as_chat, ascii_only, load_prompts, read_texts
from dpg.errors import DpgError
from dpg.metrics import build_metric
from dpg.models import load
from dpg.runtime import process_device, resolve_dtype


def build_reward(cfg: TrainConfig, target, target_tok, device, dtype, steps_per_batch: int = 1):
    from dpg import baselines, metrics
    from dpg.rewards import InnerRunReward

    r = cfg.reward
    if r.name in ("metagrad", "naive"):
        metric = build_metric(cfg.metric, target, target_tok)
        return InnerRunReward(
            r.name, target, target_tok, metric, cfg.recipe, max_length=r.max_length,
            cross_group_batching=r.cross_group_batching, num_generations=cfg.grpo.num_generations,
            dtype=dtype, device=device, steps_per_batch=steps_per_batch, hvp_microbatch_size=r.hvp_microbatch_size,
            tf32=r.tf32,
        )  # fmt: skip
    targets = list(r.targets) + (read_texts(r.targets_file)[0] if r.targets_file else [])
    if r.name == "levenshtein":
        return baselines.LevenshteinReward(targets)
    if r.name == "embedding":
        return baselines.EmbeddingReward(targets)
    if r.name == "language_id":
        return baselines.LanguageIdReward(r.language)
    if ":" in r.name:
        fn = metrics.custom_metric(r.name)  # same "module:function" resolution
        if not hasattr(fn, "__name__"):
            raise DpgError(f"reward {r.name!r} needs a __name__ (TRL logs rewards under it)")
        return fn
    raise DpgError(
        f"unknown reward {r.name!r}; known: metagrad, naive, levenshtein, language_id, embedding, module:function"
    )


# GRPOConfig fields that dpg computes from its own keys, and the key to set instead. Step
# numbering, the finite guard, checkpoints and resume all rely on these values, so
# grpo.extra may not override them.
COMPUTED = {
    "output_dir": "output_dir", "seed": "seed", "use_cpu": "device",
    "bf16": "grpo.precision", "fp16": "grpo.precision", "gradient_checkpointing": "grpo.gradient_checkpointing",
    "learning_rate": "grpo.learning_rate", "lr_scheduler_type": "grpo.lr_schedule", "max_steps": "grpo.steps",
    "num_train_epochs": "grpo.steps", "per_device_train_batch_size": "grpo.update_microbatch",
    "gradient_accumulation_steps": "grpo.update_microbatch", "steps_per_generation": "grpo.updates_per_step",
    "generation_batch_size": "grpo.prompts_per_step", "num_generations": "grpo.num_generations",
    "temperature": "grpo.temperature", "max_completion_length": "grpo.max_completion_length",
    "num_iterations": "grpo.num_iterations", "epsilon": "grpo.epsilon", "beta": "grpo.beta",
    "loss_type": "grpo.loss_type", "scale_rewards": "grpo.scale_rewards", "report_to": "grpo.report_to",
    "logging_steps": "none: one log row per generated batch", "logging_strategy": "none: as logging_steps",
    "save_strategy": "grpo.save_every", "save_steps": "grpo.save_every",
    "disable_tqdm": "none: one console line per step",
    "generation_kwargs": "grpo.allowed_tokens",
}  # fmt: skip


def check_extra(extra: dict) -> None:
    """grpo.extra passes other GRPOConfig fields through; those dpg computes are refused."""
    taken = [k for k in extra if k in COMPUTED]
    if taken:
        instead = "; ".join(f"{k}: {COMPUTED[k]}" for k in taken)
        raise DpgError(f"grpo.extra may not set {', '.join(taken)}, which dpg computes (set instead: {instead})")


def grpo_config(cfg: TrainConfig, device: torch.device, generator_tok):
    from trl import GRPOConfig

    g = cfg.grpo
    check_extra(g.extra)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = g.prompts_per_step * g.num_generations  # completions per generated batch
    if batch % (g.updates_per_step * world):
        raise DpgError(
            f"grpo.prompts_per_step × num_generations = {batch} completions do not split into "
            f"updates_per_step = {g.updates_per_step} mini-batches over {world} process(es)"
        )
    per_step = g.updates_per_step * g.num_iterations  # optimizer steps per generated batch
    minibatch = batch // (g.updates_per_step * world)  # sequences per optimizer step and process
    micro = g.update_microbatch or minibatch  # sequences per forward/backward pass
    if minibatch % micro:
        raise DpgError(f"grpo.update_microbatch = {micro} does not divide the {minibatch} sequences of a policy update")
    passes = minibatch // micro  # forward/backward passes per optimizer step
    bf16 = g.bf16_update(device.type)
    kwargs = dict(
        output_dir=cfg.output_dir, seed=cfg.seed, use_cpu=device.type == "cpu", bf16=bf16, fp16=False,
        learning_rate=g.learning_rate, lr_scheduler_type=g.lr_schedule, max_steps=g.steps * per_step,
        per_device_train_batch_size=micro, gradient_accumulation_steps=passes,
        steps_per_generation=g.updates_per_step * passes,
        num_generations=g.num_generations, temperature=g.temperature, max_completion_length=g.max_completion_length,
        num_iterations=g.num_iterations, epsilon=g.epsilon, beta=g.beta, loss_type=g.loss_type,
        scale_rewards=g.scale_rewards, logging_steps=per_step, report_to=g.report_to, disable_tqdm=True,
        save_strategy="steps" if g.save_every else "no", save_steps=max(g.save_every, 1) * per_step,
        generation_kwargs={"suppress_tokens": ascii_only(generator_tok)} if g.allowed_tokens == "ascii" else None,
        disable_dropout=True,  # one policy, not a dropout draw, in π/π_old (TRL's default keeps it; extra may too)
    )  # fmt: skip
    # grpo.gradient_checkpointing (dpg's default: off; TRL's: on), under the name this transformers
    # reads: from 5.x `activation_checkpointing`, which wins over the deprecated old name when set.
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = (
        g.gradient_checkpointing
    )
    kwargs |= g.extra
    try:
        return GRPOConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise DpgError(f"GRPO settings rejected by TRL: {err}") from None


def lora_config(cfg: LoraSettings):
    if cfg.r == 0:
        return None
    from peft import LoraConfig

    modules = (
        cfg.target_modules if cfg.target_modules == "all-linear" else [m.strip() for m in cfg.target_modules.split(",")]
    )
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=modules, task_type="CAUSAL_LM"
    )


def run_train(cfg: TrainConfig) -> Path | None:
    """Train; return the directory of the final generator (a standard HF model directory), or
    None when `time_limit` stopped the run before its last step (the same call resumes it)."""
    from dpg.rewards import DistinctShare
    from dpg.safety import TimeLimit, check_run, check_settings

    began = time.monotonic()
    check_settings(cfg)  # counts and sizes, before anything loads
    # TRL calls transformers' gradient_checkpointing_* methods, deprecated for activation_checkpointing_*:
    # warnings no dpg user can act on.
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated", FutureWarning)
    device, main = process_device(cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    generator, generator_tok, prompts = load_generator(cfg)
    args = grpo_config(cfg, device, generator_tok)
    target, target_tok = load(cfg.target, device=device)
    reward = build_reward(cfg, target, target_tok, device, resolve_dtype(cfg.dtype), steps_per_batch=args.logging_steps)
    reward = DistinctShare(reward)  # logs the share of distinct completions of every step
    metric = getattr(reward, "metric", None)
    longest = check_run(cfg, prompts, generator, generator_tok, target, metric)  # before any compute
    estimate = memory.train_estimate(cfg, target, generator, device, longest)
    memory.ensure_fits(estimate, "dpg train", memory.TRAIN_FIXES)
    if main:
        print(f"estimated peak memory {estimate.total / memory.GB:.1f} GB ({estimate.describe()})")
    if main:
        (out / "config.yaml").write_text(to_yaml(cfg))
    if cfg.grpo.beta:
        give_reference_a_directory(generator, generator_tok, out, main)
    limit = TimeLimit(cfg.time_limit, args.logging_steps, start=began)
    trainer, log = build_trainer(cfg, args, generator, generator_tok, reward, prompts, main, limit)
    start = time.perf_counter()
    train_or_restore(trainer, log, cfg, args, main)
    if main and "memory/peak_reserved_gb" in log.last_row:
        reserved, allocated = log.last_row["memory/peak_reserved_gb"], log.last_row["memory/peak_allocated_gb"]
        print(f"peak GPU memory {reserved:.1f} GB reserved, {allocated:.1f} GB allocated "
              f"(estimated {estimate.total / memory.GB:.1f} GB)")  # fmt: skip
    if limit.stopped:
        if main:
            print(f"stopped after step {trainer.state.global_step // args.logging_steps}/{cfg.grpo.steps}: "
                  f"time_limit of {cfg.time_limit:g} minutes; the same command resumes")  # fmt: skip
        return None
    skipped = skipped_updates(log.path) if main else 0
    if skipped:
        print(f"{skipped} policy update(s) skipped for a non-finite gradient (metrics.jsonl: skipped_updates)")
    summary = {"steps": cfg.grpo.steps, "seconds": time.perf_counter() - start, "skipped_updates": skipped,
               "last": log.last_row}  # fmt: skip
    return save_generator(trainer, generator_tok, out, summary, main)


def skipped_updates(metrics: Path) -> int:
    """Policy updates the run skipped for a non-finite gradient, over all its pieces."""
    from dpg.report import read_rows

    return sum(r.get("skipped_updates") or 0 for r in read_rows(metrics)) if metrics.exists() else 0


def load_generator(cfg: TrainConfig):
    """(generator on the CPU, its tokenizer, the training prompts as the trainer takes them).
    TRL / accelerate move the generator to its device."""
    generator, generator_tok = load(cfg.generator, device="cpu")
    train_prompts, _ = load_prompts(cfg.prompts, generator_tok)
    generator.train()
    if cfg.prompts.chat and not getattr(generator_tok, "chat_template", None):
        raise DpgError(f"prompts.chat is true but the generator {cfg.generator.model!r} has no chat template")
    return generator, generator_tok, as_chat(train_prompts, cfg.prompts.chat)


def give_reference_a_directory(generator, generator_tok, out: Path, main: bool) -> None:
    """TRL loads the KL reference model (grpo.beta > 0) with from_pretrained(config._name_or_path):
    an in-memory generator (a preset) is saved once and pointed at, so that call finds it."""
    from accelerate import PartialState

    if Path(generator.config._name_or_path or "").is_dir():
        return
    base = out / "base_generator"
    if main:
        generator.save_pretrained(base)
        generator_tok.save_pretrained(base)
    PartialState().wait_for_everyone()
    generator.config._name_or_path = str(base)


def sampler_for(g, args):
    """dpg's sampler as TRL's rollout_func (dpg.rollout), or None for TRL's own `generate`."""
    if g.sampler == "trl":
        return None
    from dpg.rollout import TRLRollout

    on_cuda = not args.use_cpu and torch.cuda.is_available()
    dtype = {"auto": torch.bfloat16 if on_cuda else None, "float32": torch.float32, "bfloat16": torch.bfloat16}
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's documented hook for this
    return TRLRollout(dtype=dtype[g.sampler_dtype])


def build_trainer(cfg: TrainConfig, args, generator, generator_tok, reward, prompts: list, main: bool, limit=None):
    """TRL's GRPOTrainer with dpg's callbacks: the run log, the finite guard, the checkpoint
    seal, and the time limit (safety.TimeLimit), if any."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    from dpg.report import GenerationTimer, RunLog
    from dpg.safety import CheckpointSeal, FiniteGuard

    rollout = sampler_for(cfg.grpo, args)  # None: TRL's own `generate`
    timer = rollout or GenerationTimer(generator)  # TRL reports its own timings only to W&B / MLflow
    guard = FiniteGuard(args.logging_steps, cfg.grpo.nonfinite_skips)
    log = RunLog(
        Path(cfg.output_dir), reward, timer, total_steps=cfg.grpo.steps, per_step=args.logging_steps,
        png_every=cfg.grpo.png_every, enabled=main, batch=cfg.grpo.prompts_per_step * cfg.grpo.num_generations,
        skips=guard,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=generator, reward_funcs=[reward], args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=generator_tok, peft_config=lora_config(cfg.lora),
        callbacks=[log, guard, CheckpointSeal(), *([limit] if limit else [])],
        rollout_func=rollout,
    )  # fmt: skip
    guard.watch(trainer, Path(cfg.output_dir))
    trainer.remove_callback(PrinterCallback)  # RunLog prints one readable line per step instead
    hf_logging.disable_progress_bar()  # no bars for writing shards at every checkpoint
    return trainer, log


def train_or_restore(trainer, log, cfg: TrainConfig, args, main: bool) -> None:
    """Train from the last sealed checkpoint (or from the start). A checkpoint counts once
    sealed: a run killed while writing one resumes from the one before."""
    from accelerate import PartialState

    from dpg.report import read_rows
    from dpg.safety import last_complete_checkpoint

    resume_from = last_complete_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
    if resume_from and main:
        print(f"resuming from {resume_from}")
    PartialState().wait_for_everyone()  # every process has seen the checkpoints before rank 0 trims the log
    done = int(resume_from.name.rsplit("-", 1)[-1]) if resume_from else 0
    log.resume(done)  # later rows will be redone
    if done < args.max_steps:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        return
    # Every step is in the checkpoint (a run that stopped after its last save): training on
    # would take one step too many, so only the generator is restored. The one private call
    # of TRL / transformers in dpg, on purpose: `_load_from_checkpoint` is the very loader
    # that `train(resume_from_checkpoint=...)` runs, so the generator comes back exactly as
    # a resumed run would have it (full, sharded or peft-adapter checkpoints alike); trl is
    # pinned in pyproject.toml, and tests/test_train.py checks the restored weights bitwise.
    if main:
        print(f"{resume_from} holds all {cfg.grpo.steps} steps: saving its generator")
    trainer._load_from_checkpoint(str(resume_from))
    log.last_row = (read_rows(log.path) or [{}])[-1] if log.path.exists() else {}


def save_generator(trainer, generator_tok, out: Path, summary: dict, main: bool) -> Path:
    """The final generator as a plain HF model directory (LoRA merged), and train_summary.json."""
    from accelerate import PartialState

    final = out / "generator"
    if main:
        model = trainer.model
        if hasattr(model, "merge_and_unload"):  # LoRA: save a plain model, loadable without peft
            model = model.merge_and_unload()
        model.save_pretrained(final)
        generator_tok.save_pretrained(final)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=float))
        print(f"generator saved to {final}")
    PartialState().wait_for_everyone()
    return final
