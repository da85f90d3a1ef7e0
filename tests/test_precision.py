"""dpg.metagrad.precision: the TF32 switch and the score-agreement figures, by hand."""

import math

import torch

from dpg.metagrad.precision import agreement, tf32_matmuls


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
    torch.set_float32_matmul_precision("highest")
    with tf32_matmuls(True):
        assert torch.get_float32_matmul_precision() == "high"
        with tf32_matmuls(False):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"
