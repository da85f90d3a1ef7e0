"""One config source: typed dataclasses, loaded from YAML, overridable on the command line.

    cfg = load_config(AttributeConfig, "exp.yaml", ["recipe.lr=1e-4", "target.model=tiny-llama"])

Every key is checked against the dataclass: an unknown key or a value of the wrong type is a
DpgError that names the key. Each dataclass field carries a one-line comment in its source;
`describe` turns those comments into the `--help` listing, so docs and code cannot drift.

`TrainConfig` and its sections (below the loader) are the one config of dpg train, dpg
evaluate and dpg demo; attribute and check keep their own small configs beside their code.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

import yaml

from dpg.data import PromptConfig
from dpg.errors import DpgError
from dpg.metagrad.records import Recipe
from dpg.metrics import MetricConfig
from dpg.models import ModelConfig

T = TypeVar("T")


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, base: T | None = None
) -> T:
    """Build `cls` from a YAML file (optional) then `key.sub=value` overrides, on top of
    `base` (default: `cls()`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DpgError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise DpgError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DpgError(f"{path}: the top level must be a mapping of keys to values")
        data = loaded or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DpgError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DpgError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _Raw(raw)
    return from_dict(cls, data, base=base)


class _Raw(str):
    """A command-line value: text for a string field, YAML for any other (numbers, lists)."""


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return str(raw)  # plain text: a _Raw left in the config could not be saved as YAML


def from_dict(cls: type[T], data: Any, prefix: str = "", base: Any = None) -> T:
    """`cls` with the keys of `data` set on top of `base` (default: `cls()`), so a section
    given in part keeps the defaults its parent chose for the rest."""
    base = cls() if base is None else base
    if not isinstance(data, dict):
        raise DpgError(f"config key {prefix.rstrip('.') or '<top>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in known:
            raise DpgError(f"unknown config key '{prefix}{key}' (known keys here: {', '.join(known)})")
    kwargs = {}
    for name in (n for n in known if n in data):
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], data[name], prefix + name + ".", getattr(base, name))
        else:
            kwargs[name] = _coerce(hints[name], data[name], prefix + name)
    return dataclasses.replace(base, **kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Raw):
        if tp is str or (origin in (Union, types.UnionType) and str in args and value not in ("null", "~")):
            return str(value)
        value = _parse_scalar(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except DpgError as err:
                errors.append(str(err))
        raise DpgError(errors[0] if len(errors) == 1 else f"config key {key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise DpgError(f"config key {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise DpgError(f"config key {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DpgError(f"config key {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    """A bool, int, float or str config value, checked (YAML's own types, strictly)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DpgError(f"config key {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DpgError(f"config key {key} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise DpgError(f"config key {key} must be a number, got {value!r}")
        if not math.isfinite(number):  # no setting of dpg means anything at inf or nan
            raise DpgError(f"config key {key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # `pattern=67` on a command line arrives as the integer 67
        raise DpgError(f"config key {key} must be a string, got {value!r}")
    raise DpgError(f"config key {key}: unsupported type {tp}")  # a bug in dpg, not in the config


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The config as YAML that loads back to the same config. Non-ASCII text is escaped:
    with allow_unicode PyYAML writes U+0085 (and U+2028/9) raw, and a YAML reader takes them
    for line breaks."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=False)


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for every field; comments are read from the source.

    Defaults come from an instance (`cls()` unless given), so a section whose default is
    built by a factory (e.g. a recipe with another lr) shows the value that applies."""
    defaults = cls() if defaults is None else defaults
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], prefix + f.name + ".", value)
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
            rows.append((prefix + f.name, shown, comments.get(f.name, "")))
    return rows


def _field_comments(cls: type) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


@dataclass
class LoraSettings:
    """LoRA on the generator (through peft); rank 0 trains every weight."""

    r: int = 0  # LoRA rank; 0: full fine-tuning
    alpha: int = 32  # LoRA alpha (scale = alpha / r)
    dropout: float = 0.0  # dropout on the LoRA path
    target_modules: str = "all-linear"  # modules to adapt: "all-linear" or comma-separated names


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
    tf32: bool = False  # metagrad / naive on CUDA: TF32 matmuls in inner runs (dpg check shows their error)


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
    update_microbatch: int = 0  # sequences per pass of a policy update (gradients accumulate); 0: the mini-batch
    num_iterations: int = 1  # passes over each generated batch; >1 reuses it under the clipped ratio
    epsilon: float = 0.2  # PPO clip range of the policy ratio
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    loss_type: str = "grpo"  # TRL loss aggregation: grpo | dapo | dr_grpo | bnpo | ...
    scale_rewards: str = "group"  # advantage normalisation: group | batch | none
    allowed_tokens: str = "all"  # all | ascii: a byte-level generator samples printable ASCII, space, newline only
    nonfinite_skips: int = 8  # policy updates in a row skipped for a non-finite gradient, as verl does, before a stop
    save_every: int = 50  # steps between checkpoints; 0: none
    png_every: int = 10  # steps between PNGs of the pattern the target holds (pattern metrics); 0: none
    report_to: str = "none"  # none | tensorboard | wandb (through TRL)
    sampler: str = "dpg"  # dpg: static KV cache, CUDA-graph decode (dpg.rollout) | trl: TRL's generate
    sampler_dtype: str = "auto"  # dpg sampler: auto (bfloat16 on CUDA, else the policy's) | float32 | bfloat16
    precision: str = "auto"  # policy update: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    gradient_checkpointing: bool = False  # recompute activations in the policy update (less memory, slower)
    extra: dict[str, Any] = field(default_factory=dict)  # any other GRPOConfig field, passed through as is

    def bf16_update(self, device_type: str) -> bool:
        """Whether the policy update runs under bf16 autocast (`precision` resolved for the device)."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


@dataclass
class EvaluateSettings:
    """dpg evaluate: the transfer check."""

    samples: int = 256  # completions sampled from each generator (on the held-out prompts)
    seeds: list[int] = field(default_factory=lambda: [0])  # sampling seeds; each is a fresh dataset and target run
    generators: list[str] = field(default_factory=list)  # more generators to compare (paths or presets)
    language: str | None = None  # also report the share of samples in this language (fastText language ID)
    target_string: str | None = None  # also report how often samples contain this string (exact, edit distance ≤ 5)
    samples_file: str | None = None  # check this file's completions alone (as dpg sample writes it), sample nothing


@dataclass
class SampleSettings:
    """dpg sample: a dataset from a generator, the product of a run."""

    generator: str = "trained"  # base (generator.model) | trained (OUTPUT/generator) | preset, model dir, .gguf
    n: int = 512  # completions to write, cycling through the prompts
    seed: int = 0  # sampling seed
    split: str = "heldout"  # which prompts: heldout (the last prompts.heldout) | train | all
    output: str | None = None  # .jsonl or .parquet; none: OUTPUT/samples/GENERATOR_seedSEED.jsonl


@dataclass
class TrainConfig:
    """dpg train / evaluate / sample / demo: everything a DPG run needs."""

    output_dir: str = "runs/dpg"  # checkpoints, metrics.jsonl, pattern PNGs, the final generator
    seed: int = 0  # seeds sampling, the data order and the policy updates
    device: str = "auto"  # auto | cpu | cuda | cuda:N (generator and target)
    dtype: str = "float32"  # metagradient precision: float32 | float64
    resume: bool = True  # continue from the last checkpoint in output_dir, if any
    time_limit: float = 0.0  # minutes; stop after the first step past it, with a checkpoint (rerun resumes); 0: none
    generator: ModelConfig = field(default_factory=lambda: ModelConfig(seed=1))  # the model GRPO trains
    lora: LoraSettings = field(default_factory=LoraSettings)  # LoRA on the generator
    target: ModelConfig = field(default_factory=ModelConfig)  # the model fine-tuned on the completions
    prompts: PromptConfig = field(default_factory=PromptConfig)  # what the generator is asked
    metric: MetricConfig = field(default_factory=MetricConfig)  # Φ, what the target should become
    reward: RewardConfig = field(default_factory=RewardConfig)  # how completions are scored
    recipe: Recipe = field(default_factory=Recipe)  # the target's inner run (fine-tuning on a batch)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)  # the RL loop
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)  # the transfer check
    sample: SampleSettings = field(default_factory=SampleSettings)  # dpg sample: a dataset from a generator
