"""Reward callables for TRL's GRPOTrainer: metagrad (DPG) and naive (dataset-level).

Both decode the generator's completions to text, re-tokenize them with the target's
tokenizer (`dpg.data.encode_texts`: truncated to `max_length`, never failing on odd text),
fine-tune the target on them with the inner recipe, and score the result with the metric Φ.

  metagrad   reward_i = dΦ/dw_i, the exact metagradient (the engine). By default the whole
             generated batch is one inner run (cross-group batching); with
             cross_group_batching=False the batch is cut into inverse groups, each holding at
             most one completion per prompt, and each group is its own inner run.
  naive      the same inner runs without metagradients: every completion of an inner run
             gets that run's Φ. It always uses inverse groups: the completions of one prompt
             then sit in different runs, so GRPO's group-normalised advantage of a completion
             is how much better its run's Φ was than the other runs' — the paper's
             dataset-level baseline. (One run for the batch would give every completion the
             same reward and every advantage zero.)

Rewards are standardised over the generated batch, (r − mean)/std: a positive affine map,
the same for every completion of a step, so GRPO's group-normalised advantages are those of
the raw values — but TRL's +1e-4 guard on the group std no longer swamps metagradients,
which are often ~1e-9 on real models. Raw values are logged. A reward that cannot be
computed raises DpgError naming the step and the cause; it never returns silent zeros.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpg.data import completion_text, distinct_ngrams, distinct_share, encode_texts
from dpg.errors import DpgError
from dpg.metagrad.parallel import data_parallel_group, summed
from dpg.metagrad.engine import Examples, Recipe, example_metagrads, fine_tune
from dpg.metagrad.precision import tf32_matmuls
from dpg.metagrad.records import check_metric_value, proxy_figures


def inverse_groups(n: int, num_generations: int) -> list[Tensor]:
    """Split a generated batch into groups with at most one completion per prompt.

    TRL lays out a batch prompt by prompt, [p0·g0 … p0·g(G−1), p1·g0, …]; group k takes the
    k-th completion of every prompt. (N,) indices each, in batch order.
    """
    if num_generations < 1 or n % num_generations:
        raise DpgError(f"a batch of {n} completions is not whole groups of num_generations = {num_generations}")
    grid = torch.arange(n).view(-1, num_generations)  # (prompts, G)
    return [grid[:, k] for k in range(num_generations)]


def length_correlation(raw: Tensor, lengths: Tensor, num_generations: int) -> float | None:
    """Pearson correlation of the raw rewards with the completions' lengths, both centred within
    each GRPO group (TRL's layout, inverse_groups), as group-normalised advantages see them:
    above 0, longer text of a prompt scores higher, and GRPO lengthens it. None where the
    completions are not whole groups (a rank's share of a data-parallel batch may not be)."""
    if num_generations < 2 or len(raw) % num_generations:
        return None
    r = raw.double().view(-1, num_generations)
    n = lengths.to(r.device).double().view(-1, num_generations)
    r, n = r - r.mean(1, keepdim=True), n - n.mean(1, keepdim=True)
    denom = (r.square().sum() * n.square().sum()).sqrt()
    return float((r * n).sum() / denom) if denom > 0 else 0.0


def select(examples: Examples, idx: Tensor) -> Examples:
    return Examples(*(x[idx] for x in examples))


def standardize(raw: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """(r − mean)/std over the batch; all-equal rewards give all zeros (no signal, honestly).
    With a process group, mean and std are those of the whole batch across the ranks."""
    moments = summed(torch.stack([raw.new_tensor(float(len(raw))), raw.sum()]), group)
    centred = raw - moments[1] / moments[0]
    std = (summed(centred.square().sum().reshape(1), group)[0] / moments[0]).sqrt()
    return centred / std if std > 0 else centred


class BatchShare:
    """How one generated batch is spread over the processes of a data-parallel run: the
    distributed plumbing of InnerRunReward, apart from the scoring.

    Cross-group batching (one inner run) or no process group: every rank runs the same inner
    runs data-parallel on its own completions (`engine_group` = the process group). Inverse
    groups across processes (`shared_out`): every rank sees the whole batch (TRL hands rank r
    the r-th contiguous slice, so the ranks' lists in order are the batch), runs every
    world-th inner run alone, and the raw rewards are summed over the ranks.
    """

    def __init__(self, group: dist.ProcessGroup | None, cross_group_batching: bool):
        self.group = group
        self.shared_out = group is not None and not cross_group_batching
        self.engine_group = None if self.shared_out else group  # the group each inner run spans
        self.mine = slice(0, 0)  # this process's completions within the batch (set by gather)

    def gather(self, texts: list[str]) -> list[str]:
        """The texts this rank scores: its own, or the whole batch when shared out."""
        self.mine = slice(0, len(texts))
        if not self.shared_out:
            return texts
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size(self.group))]
        dist.all_gather_object(gathered, texts, group=self.group)
        before = sum(len(t) for t in gathered[: dist.get_rank(self.group)])
        self.mine = slice(before, before + len(texts))
        return [t for part in gathered for t in part]

    def my_runs(self, runs: list[Tensor]) -> list[Tensor]:
        """The inner runs this rank computes."""
        if not self.shared_out:
            return runs
        return runs[dist.get_rank(self.group) :: dist.get_world_size(self.group)]

    def combine(self, raw: Tensor, figures: list[dict[str, float]]) -> tuple[Tensor, list[dict[str, float]]]:
        """Every rank's raw rewards and per-run figures, when shared out (each completion was
        scored by exactly one rank, the others hold zeros for it)."""
        if not self.shared_out:
            return raw, figures
        everyone: list[list[dict[str, float]]] = [[] for _ in range(dist.get_world_size(self.group))]
        dist.all_gather_object(everyone, figures, group=self.group)
        return summed(raw, self.group), [f for part in everyone for f in part]

    def rewards(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(standardised rewards, raw rewards) of this rank's own completions; the mean and
        std are those of the whole batch."""
        if self.shared_out:  # the whole batch is here: standardise, then slice
            return standardize(raw)[self.mine], raw[self.mine]
        return standardize(raw, self.group), raw


class InnerRunReward:
    """A TRL reward: fine-tune the target on the completions, score with Φ.

    kind = "metagrad": reward_i = dΦ/dw_i after the inner run on the batch (or on its
    inverse group). kind = "naive": every completion of an inner run gets that run's Φ
    (inverse groups, always).
    """

    def __init__(
        self,
        kind: str,
        target: nn.Module,
        tokenizer,
        metric: Callable[[dict[str, Tensor]], Tensor],
        recipe: Recipe,
        *,
        max_length: int = 128,
        cross_group_batching: bool = True,
        num_generations: int = 4,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        offload: str = "cpu",
        steps_per_batch: int = 1,
        hvp_microbatch_size: int | None = None,
        tf32: bool = False,
    ):
        if kind not in ("metagrad", "naive"):
            raise DpgError(f"an inner-run reward is 'metagrad' or 'naive', got {kind!r}")
        if kind == "naive" and cross_group_batching:
            raise DpgError(
                "the naive reward needs reward.cross_group_batching: false (inverse groups): one inner run "
                "for the whole batch gives every completion the same reward and every advantage zero"
            )
        self.kind = kind  # metagrad | naive: how an inner run scores its completions
        self.__name__ = kind  # TRL names the reward's logs after it
        self.target, self.tokenizer, self.metric, self.recipe = target, tokenizer, metric, recipe
        self.max_length, self.num_generations = max_length, num_generations
        self.cross_group_batching = cross_group_batching
        self.dtype, self.device, self.offload = dtype, device, offload
        self.steps_per_batch = steps_per_batch  # optimizer steps per generated batch: errors name dpg's step
        self.hvp_microbatch_size = hvp_microbatch_size  # examples per Hessian-vector-product pass (M > 1)
        self.tf32 = tf32  # inner runs with TF32 matmuls on CUDA (dpg.metagrad.precision.tf32_matmuls)
        self.history: list[dict[str, Any]] = []  # one row of figures per call (generated batch)
        self.decoded: Tensor | None = None  # the pattern the target held after the last inner run

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        state = kwargs.get("trainer_state")
        # The step in progress, numbered as dpg train logs it (1, 2, ...: one per generated batch).
        step = (state.global_step // self.steps_per_batch if state is not None else len(self.history)) + 1
        start = time.perf_counter()
        share = BatchShare(data_parallel_group(), self.cross_group_batching)
        texts = share.gather([completion_text(c) for c in completions])
        examples = encode_texts(self.tokenizer, texts, self.max_length)
        n = len(texts)
        runs = [torch.arange(n)] if self.cross_group_batching else inverse_groups(n, self.num_generations)
        raw, figures = share.combine(*self.score(examples, share.my_runs(runs), share.engine_group, step))
        if not torch.isfinite(raw).all():
            bad = (~torch.isfinite(raw)).nonzero().flatten().tolist()
            raise DpgError(f"step {step}: the {self.kind} reward is not finite for completions {bad[:5]}")
        lengths = examples.attention_mask.sum(1)  # target tokens, aligned with raw (both whole or both this rank's)
        length_corr = length_correlation(raw, lengths, self.num_generations)
        rewards, raw = share.rewards(raw)
        row = {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}  # mean over inner runs
        if length_corr is not None:
            row["length_corr"] = length_corr
        row |= {
            "step": step, "raw_mean": raw.mean().item(), "raw_std": raw.std().item() if len(raw) > 1 else 0.0,
            "raw_min": raw.min().item(), "raw_max": raw.max().item(), "inner_runs": len(runs),
            "target_tokens": float(examples.attention_mask.sum(1).double().mean()),
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
        self.history.append(row)
        log = kwargs.get("log_metric")
        if callable(log):
            for key in ("phi", *[k for k in row if k.startswith("proxy/")], "raw_std", "seconds"):
                log(f"dpg/{key}", row[key])
        return rewards.tolist()

    def score(
        self, examples: Examples, runs: list[Tensor], group: dist.ProcessGroup | None, step: int
    ) -> tuple[Tensor, list[dict[str, float]]]:
        """Raw rewards (zero for completions outside `runs`) and one row of figures per inner run."""
        raw = torch.zeros(len(examples.input_ids), dtype=torch.float64)
        figures: list[dict[str, float]] = []
        score = self._metagrad if self.kind == "metagrad" else self._naive
        for idx in runs:
            try:
                raw[idx], row = score(select(examples, idx), group)
            except DpgError as err:
                raise DpgError(f"step {step}: the {self.kind} reward failed: {err}") from err
            figures.append(row)
        return raw, figures

    def _metagrad(self, examples: Examples, group: dist.ProcessGroup | None) -> tuple[Tensor, dict[str, float]]:
        with tf32_matmuls(self.tf32):
            res = example_metagrads(
                self.target, examples, self.recipe, self.metric, dtype=self.dtype, device=self.device,
                offload=self.offload, on_trained=self._decode, group=group,
                hvp_microbatch_size=self.hvp_microbatch_size,
            )  # fmt: skip
        row = {"phi": res.metric, "phi_before": res.metric_before, "engine_seconds": res.timings["total"]}
        row |= {f"engine/{k}": v for k, v in res.timings.items() if k != "total"}  # where the reward's time goes
        return res.scores, row | {f"proxy/{k}": v for k, v in res.proxy.items()}

    def _naive(self, examples: Examples, group: dist.ProcessGroup | None) -> tuple[Tensor, dict[str, float]]:
        with tf32_matmuls(self.tf32):
            trained, losses = fine_tune(
                self.target, examples, self.recipe, dtype=self.dtype, device=self.device, group=group
            )
        bad = [t for t, loss in enumerate(losses, 1) if not math.isfinite(loss)]
        if bad:
            raise DpgError(f"the inner training loss is not finite at inner step {bad[0]} (recipe.lr too high?)")
        device = next(iter(trained.values())).device
        everything = {k: p.detach().to(device) for k, p in self.target.named_parameters()} | trained
        with torch.no_grad():
            phi = self.metric(everything)
        check_metric_value(phi, "the metric", "after the inner run", needs_grad=False)
        self._decode(everything)
        proxy = proxy_figures(self.metric, everything, phi.item())
        row = {"phi": phi.item()} | {f"proxy/{k}": v for k, v in proxy.items()}
        return torch.full((len(examples.input_ids),), phi.item(), dtype=torch.float64), row

    def _decode(self, params: dict[str, Tensor]) -> None:
        decode = getattr(self.metric, "decode", None)
        if callable(decode):
            self.decoded = decode(params).cpu()


class DistinctShare:
    """A TRL reward callable that also records, for each generated batch (over every process),
    the share of distinct completions and the texts behind it: the most common completions and
    the best and worst by reward. A policy collapsing onto a few texts shows here first, and
    `samples` says which texts. Calls, and every other attribute, are the wrapped reward's."""

    def __init__(self, reward, most_common: int = 3):
        self.reward = reward
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)  # TRL names the reward's logs after it
        self.most_common = most_common
        self.share: float | None = None  # distinct completions / completions, last generated batch
        self.samples: dict[str, Any] | None = None  # the last batch's texts, as batch_samples gives them
        self.seconds = 0.0  # the wrapped reward's time since take_seconds() last ran

    def __call__(self, prompts, completions, **kwargs):
        start = time.perf_counter()
        rewards = self.reward(prompts=prompts, completions=completions, **kwargs)
        self.seconds += time.perf_counter() - start
        pairs = list(zip([completion_text(c) for c in completions], rewards))
        group = data_parallel_group()
        if group is not None:  # each process holds a slice of the batch
            parts: list[list[tuple[str, float]]] = [[] for _ in range(dist.get_world_size(group))]
            dist.all_gather_object(parts, pairs, group=group)
            pairs = [pair for part in parts for pair in part]
        self.samples = batch_samples(pairs, self.most_common)
        self.share = self.samples["distinct_share"]
        return rewards

    def take_seconds(self) -> float:
        """The wrapped reward's time since the last take (every reward's, the baselines' too)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def __getattr__(self, name):  # only for names not set above: history, metric, decoded, ...
        if "reward" not in self.__dict__:  # a copy being built
            raise AttributeError(name)
        return getattr(self.__dict__["reward"], name)


def batch_samples(pairs: list[tuple[str, float]], most_common: int = 3) -> dict[str, Any]:
    """What a generated batch of (completion text, reward) holds: the share of distinct texts and
    of distinct word bigrams, the `most_common` texts with their counts, and the best and worst
    text; each text with its mean reward over its copies (None where the reward gave None: TRL's
    "no reward here")."""
    by_text: dict[str, list[float]] = {}
    for text, reward in pairs:
        by_text.setdefault(text, []).append(reward)

    def entry(text: str) -> dict[str, Any]:
        values = [v for v in by_text[text] if v is not None]
        mean = sum(values) / len(values) if values else None
        return {"text": text, "count": len(by_text[text]), "reward": mean}

    entries = [entry(text) for text in by_text]
    ranked = sorted((e for e in entries if e["reward"] is not None), key=lambda e: e["reward"])
    common = sorted(entries, key=lambda e: -e["count"])[:most_common]  # stable: first seen first among ties
    return {
        "distinct_share": distinct_share([text for text, _ in pairs]),
        "distinct_2": distinct_ngrams([text for text, _ in pairs], 2),
        "most_common": common,
        "best": ranked[-1] if ranked else None,
        "worst": ranked[0] if ranked else None,
    }
