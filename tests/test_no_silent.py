"""No silent fallbacks: the trunk/head probe lets out-of-memory through, and a model that
keeps another attention than SDPA says so."""

import pytest
import torch
from torch import nn

from dpg.metagrad.target import _split
from dpg.models import load_model


class Trunk(nn.Module):
    def __init__(self, error: type[Exception] | None):
        super().__init__()
        self.emb, self.error = nn.Embedding(8, 4), error

    def forward(self, input_ids, use_cache=False):
        if self.error is not None:
            raise self.error("probe")
        return type("Out", (), {"last_hidden_state": self.emb(input_ids)})()


class Model(nn.Module):
    base_model_prefix = "trunk"

    def __init__(self, error: type[Exception] | None = None):
        super().__init__()
        self.trunk, self.head = Trunk(error), nn.Linear(4, 8)

    @property
    def base_model(self):
        return self.trunk

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.head(self.trunk(input_ids).last_hidden_state)})()


def test_probe_splits_a_plain_trunk_and_head():
    model = Model()
    assert _split(model, model.head) == (model.trunk, "trunk.")


@pytest.mark.parametrize("error", [TypeError, AttributeError, RuntimeError])
def test_probe_runs_whole_a_model_it_cannot_split(error):
    model = Model(error)
    assert _split(model, model.head) == (None, "")


def test_probe_lets_out_of_memory_through():
    model = Model(torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError):
        _split(model, model.head)


def test_a_model_without_sdpa_says_which_attention_it_keeps(monkeypatch):
    from transformers import PreTrainedModel

    def refuse(self, impl):
        raise ValueError(f"{impl} is not supported here")

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", refuse)
    with pytest.warns(UserWarning, match="'tiny-gpt2' has no SDPA attention, keeps .*sdpa is not supported here"):
        load_model("tiny-gpt2")
