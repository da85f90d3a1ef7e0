"""dpg sample: write a dataset from a generator, the product of a run.

    dpg sample CONFIG.yaml [sample.generator=trained] [sample.n=1024] [sample.output=data.jsonl]

Samples `sample.n` completions from any generator — the config's base generator, the trained
one in OUTPUT/generator, or any preset, model directory or .gguf file — on the config's prompts
(held-out, training or all of them), sampled as in training (grpo.temperature,
grpo.max_completion_length, grpo.allowed_tokens), and writes them as JSONL or Parquet with the
fields prompt, completion, generator, seed (dpg.sampling). `dpg evaluate
evaluate.samples_file=FILE` then repeats the transfer check from the file alone.
"""

from __future__ import annotations

from pathlib import Path

from dpg.config import TrainConfig
from dpg.data import ascii_only, load_prompts
from dpg.errors import DpgError
from dpg.models import ModelConfig, load
from dpg.runtime import resolve_device
from dpg.sampling import cycle_prompts, sample_completions, write_samples


def generator_spec(cfg: TrainConfig, which: str) -> ModelConfig:
    """base: the config's generator; trained: OUTPUT/generator; anything else: a model spec."""
    if which == "base":
        return cfg.generator
    if which == "trained":
        trained = Path(cfg.output_dir) / "generator"
        if not trained.is_dir():
            raise DpgError(f"no trained generator at {trained}: run dpg train first, or set sample.generator")
        return ModelConfig(model=str(trained))
    return ModelConfig(model=which)


def chosen_prompts(cfg: TrainConfig) -> list[str]:
    train, heldout = load_prompts(cfg.prompts)
    prompts = {"heldout": heldout, "train": train, "all": train + heldout}[cfg.sample.split]
    if not prompts:
        raise DpgError(f"sample.split = {cfg.sample.split} holds no prompts (prompts.heldout = {cfg.prompts.heldout})")
    return prompts


def run_sample(cfg: TrainConfig) -> Path:
    """Write the samples file; return its path."""
    s = cfg.sample
    if s.n < 1:
        raise DpgError(f"sample.n must be at least 1, got {s.n}")
    if s.split not in ("heldout", "train", "all"):
        raise DpgError(f"sample.split must be heldout, train or all, got {s.split!r}")
    name = s.generator if s.generator in ("base", "trained") else Path(s.generator).name
    out = Path(s.output) if s.output else Path(cfg.output_dir) / "samples" / f"{name}_seed{s.seed}.jsonl"
    if out.suffix not in (".jsonl", ".parquet"):
        raise DpgError(f"sample.output {out} must end in .jsonl or .parquet")
    spec = generator_spec(cfg, s.generator)
    prompts = chosen_prompts(cfg)
    device = resolve_device(cfg.device)
    model, tok = load(spec, device=device)
    if cfg.prompts.chat and not getattr(tok, "chat_template", None):
        raise DpgError(f"prompts.chat is true but the generator {spec.model!r} has no chat template")
    completions = sample_completions(
        model, tok, prompts, s.n, chat=cfg.prompts.chat, temperature=cfg.grpo.temperature,
        max_new_tokens=cfg.grpo.max_completion_length, seed=s.seed, device=device,
        suppress=ascii_only(tok) if cfg.grpo.allowed_tokens == "ascii" else None,
    )  # fmt: skip
    write_samples(out, cycle_prompts(prompts, s.n), completions, spec.model, s.seed)
    print(f"{s.n} completions of {spec.model} on {len(prompts)} {s.split} prompts written to {out}")
    return out
