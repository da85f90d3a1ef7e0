"""Layers the engine runs as one fused op (metagrad/fused.py): swapped in, the same values,
put back; a look-alike that computes something else is left alone."""

import contextlib

import pytest
import torch
from torch import nn
from reference import tiny_model

from dpg.metagrad.target import prepared


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def test_gpt2_gelu_is_fused_inside_the_engine_and_put_back():
    """HF's NewGELUActivation (seven ops) runs as F.gelu(approximate="tanh") inside the engine:
    the same function to rounding; the caller's module comes back."""
    from transformers.activations import NewGELUActivation

    from dpg.metagrad.target import prepared

    model = tiny_model("gpt2", False)
    acts = [m for m in model.modules() if type(m) is NewGELUActivation]
    assert acts
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    with prepared(model, torch.float64, torch.device("cpu")) as target:
        assert target.module is model  # same dtype and device: used in place
        inside = [m for m in target.module.modules() if type(m) is NewGELUActivation]
        fused = [m for m in target.module.modules() if type(m).__name__ == "_TanhGelu"]
        assert not inside and len(fused) == len(acts)
        assert rel_err(fused[0](x), acts[0](x)) < 1e-15
    assert [m for m in model.modules() if type(m) is NewGELUActivation] == acts


@pytest.mark.parametrize("dtype,everywhere", [(torch.float32, False), (torch.float64, True), (torch.float64, False)])
def test_llama_rms_norm_is_fused_inside_the_engine_and_put_back(dtype, everywhere):
    """Swapped where it is torch's rms_norm to the dtype's rounding: in fp32, and in fp64 under
    float64_everywhere; plain fp64 is left alone (HF's norm computes in fp32 whatever the dtype)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from dpg.metagrad.precision import float64_everywhere

    model = tiny_model("llama", False, dtype=dtype)
    norms = [m for m in model.modules() if type(m) is LlamaRMSNorm]
    assert len(norms) == 5  # two a layer, and the final one
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 16, dtype=torch.float64, generator=g) * 2).to(dtype)
    with torch.no_grad():
        norms[0].weight.copy_(torch.randn(16, dtype=torch.float64, generator=g).to(dtype))
    with float64_everywhere() if everywhere else contextlib.nullcontext():
        with prepared(model, dtype, torch.device("cpu")) as target:
            inside = [m for m in target.module.modules() if type(m).__name__ == "_RMSNorm"]
            if dtype == torch.float64 and not everywhere:
                assert not inside
                return
            assert len(inside) == 5 and not [m for m in target.module.modules() if type(m) is LlamaRMSNorm]
            assert inside[0].weight is norms[0].weight  # the same parameter, under the same name
            assert set(target.params) == {n for n, _ in model.named_parameters()}
            with torch.no_grad():
                assert rel_err(inside[0](x), norms[0](x)) < (1e-15 if dtype == torch.float64 else 1e-6)
    assert [m for m in model.modules() if type(m) is LlamaRMSNorm] == norms


class OffsetRMSNorm(nn.Module):
    """Gemma's form, x·rsqrt(mean(x²) + eps)·(1 + w): looks like an RMSNorm, is another function."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(d, dtype=torch.float64)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_an_rms_norm_of_another_form_is_left_alone():
    model = tiny_model("llama", False, dtype=torch.float32)
    model.model.norm = OffsetRMSNorm(16).float()
    with prepared(model, torch.float32, torch.device("cpu")) as target:
        assert type(target.module.model.norm) is OffsetRMSNorm
        assert sum(type(m).__name__ == "_RMSNorm" for m in target.module.modules()) == 4
