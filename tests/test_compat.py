"""Tests of utils.compat: the backend × operator matrix is filled by running each cell."""

from __future__ import annotations

import pytest
import torch

from utils.compat import CELLS, OPERATORS, _judge, outcome_kind, run_cell, run_matrix


def test_judge_hand_checked():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    assert _judge(ref.clone(), ref, "fp32") == "works"
    assert _judge(ref + torch.tensor([0.24, 0.32]), ref, "int8") == "works"  # rel err 0.08
    assert _judge(ref + torch.tensor([0.6, 0.8]), ref, "int8") == "wrong: rel err 0.2"
    assert _judge(ref.clone(), ref, "int8", integer_kernel=False) == "falls back to float"


def test_outcome_kind():
    assert outcome_kind("works") == "works"
    assert outcome_kind("fails: ValueError: x") == "fails"
    assert outcome_kind("falls back to float") == "falls back to float"
    assert outcome_kind("wrong: rel err 0.5") == "wrong"
    with pytest.raises(ValueError, match="must start with"):
        outcome_kind("maybe")
    with pytest.raises(TypeError, match="outcome must be a str"):
        outcome_kind(3)


def test_torch_cells_run_for_real():
    assert run_cell("linear", "PyTorch FP16") == "works"
    assert run_cell("conv 3×3", "PyTorch INT8 x86 per-channel") == "works"
    # eager INT8 has no quantized batched matmul: the attention cell fails with the error
    att = run_cell("attention", "PyTorch INT8 x86 per-channel")
    assert att.startswith("fails:") and "bmm" in att
    # dynamic INT8 quantizes Linear layers only
    assert run_cell("linear", "PyTorch INT8 dynamic") == "works"
    assert run_cell("conv 3×3", "PyTorch INT8 dynamic") == "falls back to float"
    assert run_cell("LayerNorm", "PyTorch INT8 dynamic") == "falls back to float"


def test_run_cell_and_matrix_bad_names():
    with pytest.raises(ValueError, match="operator"):
        run_cell("softmax?", "PyTorch FP16")
    with pytest.raises(ValueError, match="cell"):
        run_cell("linear", "TensorRT")
    with pytest.raises(ValueError, match="cell"):
        run_matrix(["linear"], ["nope"], cache=False)


def test_run_matrix_small_uncached():
    table = run_matrix(["GELU"], ["PyTorch FP16", "PyTorch BF16"], cache=False)
    assert table == {"GELU": {"PyTorch FP16": "works", "PyTorch BF16": "works"}}
    assert set(OPERATORS) >= {
        "conv 3×3",
        "depthwise conv",
        "linear",
        "LayerNorm",
        "GELU",
        "attention",
    }
    assert any("ONNX Runtime" in c for c in CELLS) and any("OpenVINO" in c for c in CELLS)


def test_dynamic_int8_with_a_float_layer_left_falls_back():
    from torch import nn

    from utils.compat import Operator, _torch_dynamic

    op = Operator(lambda: nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)), (2, 16))
    torch.manual_seed(0)
    assert _torch_dynamic(op.build().eval(), op) == "falls back to float"
