"""dpg.metagrad.precision: the TF32 switch and the score-agreement figures, by hand."""

import math

import pytest
import torch

from dpg.metagrad.precision import agreement, matmul_precision, tf32_matmuls


def test_agreement_by_hand():
    reference = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
    other = torch.tensor([1.1, -2.0, 2.9, -4.0], dtype=torch.float64)
    a = agreement(reference, other)
    assert math.isclose(a["relative_error"], math.sqrt(64.02) / math.sqrt(30), rel_tol=1e-12)
    # ranks 1,0,2,3 against 2,1,3,0: d = 1,1,1,-3, Σd² = 12, 1 - 6·12 / (4·15) = -0.2
    assert math.isclose(a["spearman"], -0.2, abs_tol=1e-12)
    assert a["sign_agreement"] == 0.75
    same = agreement(reference, reference * 2)
    assert same["spearman"] == 1.0 and same["sign_agreement"] == 1.0 and math.isclose(same["relative_error"], 1.0)


def test_tf32_switch_restores_the_setting():
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    with tf32_matmuls(True):
        assert matmul_precision() == "tf32"
        with tf32_matmuls(False):
            assert matmul_precision() == "ieee"
        assert matmul_precision() == "tf32"
    assert matmul_precision() == "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"


@pytest.mark.parametrize("global_setting", ["tf32", "ieee"])
def test_tf32_switch_under_a_global_setting_from_the_new_api(global_setting):
    """transformers' TrainingArguments(torch_compile=True) sets `torch.backends.fp32_precision`
    (torch's new API) to "tf32"; torch's legacy getter then raises, and so did this switch when it
    used it (session 12's torch_compile run on the H200). It must work and still force full fp32
    when asked, over the global setting, and leave the global setting as it found it."""
    before = torch.backends.fp32_precision
    torch.backends.fp32_precision = global_setting
    try:
        if global_setting == "tf32":
            with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
                torch.get_float32_matmul_precision()  # why the switch must not use the legacy API
        with tf32_matmuls(False):
            assert matmul_precision() == "ieee"
        with tf32_matmuls(True):
            assert matmul_precision() == "tf32"
        assert matmul_precision() == global_setting
        torch.backends.fp32_precision = "ieee" if global_setting == "tf32" else "tf32"
        assert matmul_precision() == torch.backends.fp32_precision  # inherited again, not pinned
    finally:
        torch.backends.fp32_precision = before
        torch.backends.cuda.matmul.fp32_precision = "none"
