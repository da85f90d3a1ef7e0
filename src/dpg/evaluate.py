"""dpg evaluate: the transfer check, which is how results are reported.

For each generator (the base one, the trained one, any others named): sample a fresh dataset
on the held-out prompts, fine-tune a fresh copy of the target on it with the same inner
recipe by plain training (no metagradients), and measure Φ and its proxy — and, for text
goals, the share of samples in a language or containing a string. A generator is only as
good as the target it produces from data it was never rewarded for.

Each sampled dataset is also written as a samples file (dpg.sampling), and
`evaluate.samples_file=FILE` runs the check on such a file's completions alone — the file
from `dpg sample`, or one an earlier check wrote — so a result can be repeated from its data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from dpg.config import TrainConfig
from dpg.data import ascii_only, distinct_ngrams, distinct_share, encode_texts, load_prompts
from dpg.errors import DpgError
from dpg.metagrad.engine import fine_tune
from dpg.metagrad.records import proxy_figures
from dpg.metrics import build_metric
from dpg.models import ModelConfig, load
from dpg.report import results_table, save_pattern
from dpg.runtime import resolve_device, resolve_dtype
from dpg.safety import last_complete_checkpoint
from dpg.sampling import cycle_prompts, read_samples, sample_completions, write_samples


class TransferResult(NamedTuple):
    generator: str  # its name in the table ("base", "trained", or the spec)
    seed: int  # sampling seed
    metric: float  # Φ of the target fine-tuned on the samples
    proxy: dict[str, float]  # the metric's readable figures (pixel accuracy, norm, loss, ...)
    text: dict[str, float]  # language share / string rates, when asked for
    decoded: torch.Tensor | None  # the pattern the target holds (pattern metrics)
    samples: list[str]  # the sampled completions


def text_figures(samples: list[str], language: str | None, target_string: str | None) -> dict[str, float]:
    figures = {"distinct_share": distinct_share(samples), "distinct_2": distinct_ngrams(samples, 2)}
    if language:
        from dpg.baselines import LanguageIdReward

        p = LanguageIdReward(language)(prompts=[""] * len(samples), completions=samples)
        figures[f"share_{language}"] = sum(x > 0.5 for x in p) / len(p)
        figures[f"mean_p_{language}"] = sum(p) / len(p)
    if target_string:
        figures["exact_rate"] = sum(target_string in s for s in samples) / len(samples)
        near = sum(edit_distance_to_substring(target_string, s) <= 5 for s in samples)
        figures["within_5_rate"] = near / len(samples)
    return figures


def edit_distance_to_substring(needle: str, haystack: str) -> int:
    """Smallest Levenshtein distance between `needle` and any substring of `haystack`
    (Sellers' algorithm: free start and end in the haystack)."""
    previous = [0] * (len(haystack) + 1)
    for i, a in enumerate(needle, 1):
        current = [i] + [0] * len(haystack)
        for j, b in enumerate(haystack, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b))
        previous = current
    return min(previous)


def transfer_check(cfg: TrainConfig, name: str, generator: ModelConfig, seed: int) -> TransferResult:
    """Sample cfg.evaluate.samples completions from `generator` on the held-out prompts, then
    measure what a fresh target fine-tuned on them becomes (measure_samples)."""
    device = resolve_device(cfg.device)
    gen, gen_tok = load(generator, device=device)
    _, heldout = load_prompts(cfg.prompts, gen_tok)
    suppress = ascii_only(gen_tok) if cfg.grpo.allowed_tokens == "ascii" else None
    samples = sample_completions(
        gen, gen_tok, heldout, cfg.evaluate.samples, chat=cfg.prompts.chat, temperature=cfg.grpo.temperature,
        max_new_tokens=cfg.grpo.max_completion_length, suppress=suppress, seed=seed, device=device,
    )  # fmt: skip
    del gen
    return measure_samples(cfg, name, seed, samples)


def measure_samples(cfg: TrainConfig, name: str, seed: int, samples: list[str]) -> TransferResult:
    """Fine-tune a fresh target on `samples` with the inner recipe (plain training), then Φ,
    its proxy and the text figures."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    target, target_tok = load(cfg.target, device=device)
    metric = build_metric(cfg.metric, target, target_tok)
    examples = encode_texts(target_tok, samples, cfg.reward.max_length)
    trained = fine_tune(target, examples, cfg.recipe, dtype=dtype, device=device).params
    everything = {k: p.detach().to(device, dtype) for k, p in target.named_parameters()} | trained
    with torch.no_grad():
        phi = metric(everything).item()
        decode = getattr(metric, "decode", None)
        proxy = proxy_figures(metric, everything, phi)
        decoded = decode(everything).cpu() if callable(decode) else None
    if not math.isfinite(phi):
        raise DpgError(f"transfer check of {name}: Φ is not finite ({phi})")
    text = text_figures(samples, cfg.evaluate.language, cfg.evaluate.target_string)
    return TransferResult(name, seed, phi, proxy, text, decoded, samples)


def check_samples_file(cfg: TrainConfig) -> TransferResult:
    """The transfer check on a samples file's completions alone (evaluate.samples_file)."""
    rows = read_samples(cfg.evaluate.samples_file)
    names, seeds = {r["generator"] for r in rows}, {r["seed"] for r in rows}
    name = names.pop() if len(names) == 1 else Path(cfg.evaluate.samples_file).stem
    return measure_samples(cfg, name, seeds.pop() if len(seeds) == 1 else -1, [r["completion"] for r in rows])


def generators_to_compare(cfg: TrainConfig) -> list[tuple[str, ModelConfig]]:
    out = [("base", cfg.generator)]
    trained = Path(cfg.output_dir) / "generator"
    if trained.is_dir():
        out.append(("trained", ModelConfig(model=str(trained))))
    elif (last := last_complete_checkpoint(Path(cfg.output_dir))) is not None:
        # A run stopped early (time_limit, a lost machine): its latest sealed checkpoint is the
        # generator it has so far, named for its step so no one takes it for the finished run.
        print(f"note: {cfg.output_dir} has no finished run (no generator/): evaluating its latest checkpoint, "
              f"{last.name}")  # fmt: skip
        out.append((last.name, ModelConfig(model=str(last))))
    out += [(spec, ModelConfig(model=spec)) for spec in cfg.evaluate.generators]
    return out


def run_evaluate(cfg: TrainConfig) -> list[TransferResult]:
    """The transfer check of every generator and seed (or of evaluate.samples_file): prints the
    table and writes OUTPUT/evaluate.json (FILE.evaluate.json beside a samples file), and each
    sampled dataset as a samples file, OUTPUT/evaluate/NAME_seedS.jsonl, to repeat it from."""
    out = Path(cfg.output_dir)
    if cfg.evaluate.samples_file:
        results, path = [check_samples_file(cfg)], Path(cfg.evaluate.samples_file).with_suffix(".evaluate.json")
    else:
        results, path = [], out / "evaluate.json"
        _, heldout = load_prompts(cfg.prompts)
        for name, spec in generators_to_compare(cfg):
            for seed in cfg.evaluate.seeds:
                res = transfer_check(cfg, name, spec, seed)
                results.append(res)
                stem = f"{name.replace('/', '_')}_seed{seed}"
                prompts = cycle_prompts(heldout, len(res.samples))
                write_samples(out / "evaluate" / f"{stem}.jsonl", prompts, res.samples, spec.model, seed)
                if res.decoded is not None:
                    save_pattern(res.decoded, out / "evaluate" / f"{stem}.png")
    print(results_table(results))
    note = unchanged_note(results)
    if note:
        print(note)
    rows = [r._asdict() | {"decoded": None if r.decoded is None else r.decoded.tolist()} for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return results


def unchanged_note(results: list[TransferResult]) -> str | None:
    """A one-line note when a generator wrote exactly the base generator's samples for every
    seed: it did not change, or changed too little to alter a single sampled token (a run of
    zero steps; a learning rate too small for the steps taken), and its row equals the base row
    to every digit for that reason alone."""
    base = {r.seed: r.samples for r in results if r.generator == "base"}
    same = [
        name for name in dict.fromkeys(r.generator for r in results if r.generator != "base")
        if all(r.samples == base.get(r.seed) for r in results if r.generator == name)
    ]  # fmt: skip
    if not base or not same:
        return None
    return (
        f"note: {', '.join(same)} wrote exactly the base generator's samples on every seed: the generator "
        "did not change, or too little to alter any sampled token (zero training steps, or a learning rate "
        "too small for the steps taken? see train_summary.json and grpo.learning_rate)"
    )
