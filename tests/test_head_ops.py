"""The reverse step's hand-written pieces against plain autograd in fp64 (head_ops.py, target.py)."""

import torch
from reference import tiny_model


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
