"""dpg train: train a generator with GRPO (TRL) on metagradient rewards, from one config.

    dpg train CONFIG.yaml [key=value ...]

The loop is TRL's GRPOTrainer, used through its public interface: a reward callable
(dpg.rewards), a callback (dpg.report.RunLog: console line, metrics.jsonl, pattern PNGs)
and GRPOConfig. TRL brings generation, LoRA through peft, several GPUs through accelerate,
logging to TensorBoard / W&B, and checkpoints; dpg brings the rewards and the wiring.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dpg.attribute import resolve_device, resolve_dtype
from dpg.data import builtin_prompts, read_texts
from dpg.errors import DpgError
from dpg.metagrad.engine import Recipe
from dpg.metrics import MetricConfig, build_metric
from dpg.models import ModelConfig, load


@dataclass
class LoraSettings:
    """LoRA on the generator (through peft); rank 0 trains every weight."""

    r: int = 0  # LoRA rank; 0: full fine-tuning
    alpha: int = 32  # LoRA alpha (scale = alpha / r)
    dropout: float = 0.0  # dropout on the LoRA path
    target_modules: str = "all-linear"  # modules to adapt: "all-linear" or comma-separated names


@dataclass
class PromptConfig:
    """What the generator is asked."""

    file: str | None = None  # JSONL / Parquet / TSV / text file of prompts; none: built-in short prompts
    field: str = "prompt"  # JSONL or Parquet field, TSV column name or number
    template: str = "{prompt}"  # the prompt the generator sees; {prompt} is the file's text
    chat: bool = False  # send it as a user message through the generator's chat template (instruct models)
    limit: int | None = None  # use only the first this many prompts
    heldout: int = 16  # the last prompts, kept out of training for `dpg evaluate`


@dataclass
class RewardConfig:
    """How each completion is scored."""

    name: str = "metagrad"  # metagrad | naive | levenshtein | language_id | embedding | module:function
    cross_group_batching: bool = True  # metagrad: one inner run for the whole batch; false: inverse groups
    max_length: int = 128  # target tokens per completion (longer text is cut)
    targets: list[str] = field(default_factory=list)  # levenshtein / embedding: the target texts
    targets_file: str | None = None  # levenshtein / embedding: more target texts (see prompts.file formats)
    language: str = "de"  # language_id: ISO 639-1 code of the language to reward
    hvp_microbatch_size: int | None = None  # metagrad, M > 1: examples per HVP pass (none: the recipe's)
    tf32: bool = False  # metagrad / naive on CUDA: TF32 matmuls in the inner run (dpg check reports their error)


@dataclass
class GRPOSettings:
    """The RL loop (TRL's GRPOTrainer). One step = one generated batch."""

    steps: int = 100  # generated batches to train on
    prompts_per_step: int = 16  # prompts per generated batch
    num_generations: int = 4  # completions per prompt (the GRPO group)
    temperature: float = 1.0  # sampling temperature
    max_completion_length: int = 128  # generator tokens per completion
    learning_rate: float = 5e-6  # generator learning rate (AdamW)
    lr_schedule: str = "constant"  # constant | linear | cosine (transformers schedulers)
    updates_per_step: int = 1  # optimizer steps per generated batch (it is cut into this many mini-batches)
    num_iterations: int = 1  # passes over each generated batch; >1 reuses it under the clipped ratio
    epsilon: float = 0.2  # PPO clip range of the policy ratio
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    loss_type: str = "grpo"  # TRL loss aggregation: grpo | dapo | dr_grpo | bnpo | ...
    scale_rewards: str = "group"  # advantage normalisation: group | batch | none
    allowed_tokens: str = "all"  # all | ascii: a byte-level generator samples printable ASCII, space, newline only
    save_every: int = 50  # steps between checkpoints; 0: none
    png_every: int = 10  # steps between PNGs of the pattern the target holds (pattern metrics); 0: none
    report_to: str = "none"  # none | tensorboard | wandb (through TRL)
    sampler: str = "dpg"  # dpg: static KV cache + CUDA-graph decode (dpg.rollout) | trl: TRL's own generate
    sampler_dtype: str = "auto"  # dpg sampler's weights: auto (bfloat16 on CUDA, the policy's on CPU) | float32 | bfloat16
    precision: str = "auto"  # policy update: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    gradient_checkpointing: bool = False  # recompute activations in the policy update (saves memory, costs time)
    extra: dict[str, Any] = field(default_factory=dict)  # any other GRPOConfig field, passed through as is


@dataclass
class EvaluateSettings:
    """dpg evaluate: the transfer check."""

    samples: int = 256  # completions sampled from each generator (on the held-out prompts)
    seeds: list[int] = field(default_factory=lambda: [0])  # sampling seeds; each is a fresh dataset and target run
    generators: list[str] = field(default_factory=list)  # more generators to compare (paths or presets)
    language: str | None = None  # also report the share of samples in this language (fastText language ID)
    target_string: str | None = None  # also report how often samples contain this string (exact, edit distance ≤ 5)


@dataclass
class TrainConfig:
    """dpg train / evaluate / demo: everything a DPG run needs."""

    output_dir: str = "runs/dpg"  # checkpoints, metrics.jsonl, pattern PNGs, the final generator
    seed: int = 0  # seeds sampling, the data order and the policy updates
    device: str = "auto"  # auto | cpu | cuda | cuda:N (generator and target)
    dtype: str = "float32"  # metagradient precision: float32 | float64
    resume: bool = True  # continue from the last checkpoint in output_dir, if any
    generator: ModelConfig = field(default_factory=lambda: ModelConfig(seed=1))  # the model GRPO trains
    lora: LoraSettings = field(default_factory=LoraSettings)  # LoRA on the generator
    target: ModelConfig = field(default_factory=ModelConfig)  # the model fine-tuned on the completions
    prompts: PromptConfig = field(default_factory=PromptConfig)  # what the generator is asked
    metric: MetricConfig = field(default_factory=MetricConfig)  # Φ, what the target should become
    reward: RewardConfig = field(default_factory=RewardConfig)  # how completions are scored
    recipe: Recipe = field(default_factory=Recipe)  # the target's inner run (fine-tuning on a batch)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)  # the RL loop
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)  # the transfer check


def load_prompts(cfg: PromptConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), each already through the template."""
    texts = read_texts(cfg.file, cfg.field)[0] if cfg.file else builtin_prompts()
    texts = texts[: cfg.limit] if cfg.limit else texts
    if len(texts) <= cfg.heldout:
        raise DpgError(f"{len(texts)} prompts leave none for training after prompts.heldout = {cfg.heldout}")
    try:
        prompts = [cfg.template.format(prompt=t) for t in texts]
    except (KeyError, IndexError, ValueError) as err:
        raise DpgError(f"prompts.template {cfg.template!r} is not a valid template with {{prompt}}: {err}") from None
    return prompts[: len(prompts) - cfg.heldout], prompts[len(prompts) - cfg.heldout :]


def as_chat(prompts: list[str], chat: bool) -> list:
    """TRL treats a list of messages as a conversation and applies the chat template."""
    return [[{"role": "user", "content": p}] for p in prompts] if chat else prompts


def ascii_only(tokenizer) -> list[int]:
    """Token ids a byte-level tokenizer should never sample for printable-ASCII text."""
    keep = set(range(0x20, 0x7F)) | {ord("\n")}
    suppress = []
    for token_id in range(len(tokenizer)):
        if token_id in tokenizer.all_special_ids:
            continue
        raw = tokenizer.decode([token_id]).encode("utf-8", errors="replace")
        if not raw or any(b not in keep for b in raw):
            suppress.append(token_id)
    return suppress


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


def grpo_config(cfg: TrainConfig, device: torch.device, generator_tok):
    from trl import GRPOConfig

    g = cfg.grpo
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = g.prompts_per_step * g.num_generations  # completions per generated batch
    if batch % (g.updates_per_step * world):
        raise DpgError(
            f"grpo.prompts_per_step × num_generations = {batch} completions do not split into "
            f"updates_per_step = {g.updates_per_step} mini-batches over {world} process(es)"
        )
    per_step = g.updates_per_step * g.num_iterations  # optimizer steps per generated batch
    if g.precision not in ("auto", "fp32", "bf16"):
        raise DpgError(f"grpo.precision must be auto, fp32 or bf16, got {g.precision!r}")
    bf16 = g.precision == "bf16" or (g.precision == "auto" and device.type == "cuda")
    kwargs = dict(
        output_dir=cfg.output_dir, seed=cfg.seed, use_cpu=device.type == "cpu", bf16=bf16, fp16=False,
        gradient_checkpointing=g.gradient_checkpointing,
        learning_rate=g.learning_rate, lr_scheduler_type=g.lr_schedule, max_steps=g.steps * per_step,
        per_device_train_batch_size=batch // (g.updates_per_step * world), steps_per_generation=g.updates_per_step,
        num_generations=g.num_generations, temperature=g.temperature, max_completion_length=g.max_completion_length,
        num_iterations=g.num_iterations, epsilon=g.epsilon, beta=g.beta, loss_type=g.loss_type,
        scale_rewards=g.scale_rewards, logging_steps=per_step, report_to=g.report_to, disable_tqdm=True,
        save_strategy="steps" if g.save_every else "no", save_steps=max(g.save_every, 1) * per_step,
        generation_kwargs={"suppress_tokens": ascii_only(generator_tok)} if g.allowed_tokens == "ascii" else None,
    )  # fmt: skip
    if g.allowed_tokens not in ("all", "ascii"):
        raise DpgError(f"grpo.allowed_tokens must be 'all' or 'ascii', got {g.allowed_tokens!r}")
    kwargs |= g.extra
    try:
        return GRPOConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise DpgError(f"GRPO settings rejected by TRL: {err}") from None


def sampler_for(g: GRPOSettings, device: torch.device):
    """dpg's sampler as TRL's rollout_func (None: TRL generates with `generate`)."""
    if g.sampler == "trl":
        return None
    if g.sampler != "dpg":
        raise DpgError(f"grpo.sampler must be dpg or trl, got {g.sampler!r}")
    from dpg.rollout import TRLRollout

    dtypes = {"auto": torch.bfloat16 if device.type == "cuda" else None, "float32": torch.float32,
              "bfloat16": torch.bfloat16}  # fmt: skip
    if g.sampler_dtype not in dtypes:
        raise DpgError(f"grpo.sampler_dtype must be auto, float32 or bfloat16, got {g.sampler_dtype!r}")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's documented hook for this
    return TRLRollout(dtype=dtypes[g.sampler_dtype])


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


def run_train(cfg: TrainConfig) -> Path:
    """Train; return the directory of the final generator (a standard HF model directory)."""
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    from dpg.report import GenerationTimer, RunLog, read_rows
    from dpg.safety import CheckpointSeal, FiniteGuard, check_run, check_settings, last_complete_checkpoint

    check_settings(cfg)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", local_rank)  # accelerate launch / torchrun: one GPU per process
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    main = rank == 0  # only the first process writes files and prints
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # Everything that can be checked is checked before any model runs (dpg.safety.check_run).
    train_prompts, _ = load_prompts(cfg.prompts)
    generator, generator_tok = load(cfg.generator, device="cpu")  # TRL / accelerate place it
    generator.train()
    if cfg.prompts.chat and not getattr(generator_tok, "chat_template", None):
        raise DpgError(f"prompts.chat is true but the generator {cfg.generator.model!r} has no chat template")
    args = grpo_config(cfg, device, generator_tok)
    target, target_tok = load(cfg.target, device=device)
    reward = build_reward(cfg, target, target_tok, device, dtype, steps_per_batch=args.logging_steps)
    prompts = as_chat(train_prompts, cfg.prompts.chat)
    check_run(cfg, prompts, generator, generator_tok, target, getattr(reward, "metric", None))
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False, allow_unicode=True))

    if cfg.grpo.beta and not Path(generator.config._name_or_path or "").is_dir():
        # TRL loads the KL reference model with from_pretrained(config._name_or_path): give an
        # in-memory generator (a preset) a directory to be loaded from.
        base = out / "base_generator"
        if main:
            generator.save_pretrained(base)
            generator_tok.save_pretrained(base)
        PartialState().wait_for_everyone()
        generator.config._name_or_path = str(base)
    rollout = sampler_for(cfg.grpo, device)
    timer = rollout or GenerationTimer(generator)  # TRL reports its own timings only to W&B / MLflow
    log = RunLog(out, reward, timer, total_steps=cfg.grpo.steps, per_step=args.logging_steps, png_every=cfg.grpo.png_every,
                 enabled=main)  # fmt: skip
    trainer = GRPOTrainer(
        model=generator,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=generator_tok,
        peft_config=lora_config(cfg.lora),
        callbacks=[log, FiniteGuard(args.logging_steps), CheckpointSeal()],
        rollout_func=rollout,
    )
    trainer.remove_callback(PrinterCallback)  # RunLog prints one readable line per step instead
    hf_logging.disable_progress_bar()  # no bars for writing shards at every checkpoint
    # A checkpoint counts once sealed: a run killed while writing one resumes from the one before.
    resume_from = last_complete_checkpoint(out) if cfg.resume else None
    if resume_from and main:
        print(f"resuming from {resume_from}")
    PartialState().wait_for_everyone()  # every process has seen the checkpoints before rank 0 trims the log
    done = int(resume_from.name.rsplit("-", 1)[-1]) if resume_from else 0
    log.resume(done)  # later rows will be redone
    start = time.perf_counter()
    if done >= args.max_steps:
        # Every step is in the checkpoint (a run that stopped after its last save): training
        # on would take one step too many, so only the generator is restored and saved.
        if main:
            print(f"{resume_from} holds all {cfg.grpo.steps} steps: saving its generator")
        trainer._load_from_checkpoint(str(resume_from))
        log.last_row = (read_rows(log.path) or [{}])[-1] if log.path.exists() else {}
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    final = out / "generator"
    if main:
        model = trainer.model
        if hasattr(model, "merge_and_unload"):  # LoRA: save a plain model, loadable without peft
            model = model.merge_and_unload()
        model.save_pretrained(final)
        generator_tok.save_pretrained(final)
        summary = {"steps": cfg.grpo.steps, "seconds": time.perf_counter() - start, "last": log.last_row}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=float))
        print(f"generator saved to {final}")
    PartialState().wait_for_everyone()
    return final
