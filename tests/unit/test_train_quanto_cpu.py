"""The CPU fast path makes exactly the frozen int8/int4 weights optimum-quanto itself makes."""

from __future__ import annotations

import pytest
import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.nn import quantize_module

from training.loading import quanto_cpu
from training.loading.quantize import quantize_linear, workspace

QTYPES = {"int8": qint8, "int4": qint4}


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Weights with what trips quantisers: a constant group, an all-zero row, a row 1000x larger,
    values exactly on a rounding half-way point, and a heavy tail."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[0, :128] = 0.5
    w[2] = 0
    w[3] *= 1000
    w[4] = torch.arange(in_features) % 16 / 15 - 0.5
    w[5] = torch.distributions.StudentT(1.5).sample((in_features,)) * 0.01
    return w.bfloat16()


def _quanto(weight: torch.Tensor, quantization: str) -> torch.nn.Module:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.bfloat16)
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    linear.bias = None
    qlinear = quantize_module(linear, weights=QTYPES[quantization])
    qlinear.freeze()
    return qlinear


def _ours(weight: torch.Tensor, quantization: str, scratch=None) -> torch.nn.Module:
    root = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.bfloat16))
    root[0].weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    root[0].bias = None
    quantize_linear(root, "0", quantization, scratch if scratch is not None else workspace(quantization))
    return root[0]


def _inner(qweight) -> list[torch.Tensor]:
    """The plain tensors a frozen quanto weight is made of (its packed codes, scales, shifts)."""
    if not hasattr(qweight, "__tensor_flatten__"):
        return [qweight]
    names, _ = qweight.__tensor_flatten__()
    return [t for name in names for t in _inner(getattr(qweight, name))]


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(6144, 1536), (1536, 1536), (96, 256), (64, 384)])
def test_bit_identical_to_quanto(quantization: str, shape: tuple[int, int]) -> None:
    weight = _weight(*shape, seed=shape[0] + shape[1])
    reference = _quanto(weight, quantization)
    assert quanto_cpu.supports(reference, weight)
    ours = _ours(weight, quantization)
    assert type(ours.weight) is type(reference.weight)
    for mine, theirs in zip(_inner(ours.weight), _inner(reference.weight), strict=True):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    x = torch.randn(3, shape[1], dtype=torch.bfloat16)
    assert torch.equal(ours(x), reference(x))


def test_one_workspace_serves_layers_of_any_size() -> None:
    scratch = workspace("int4")
    for shape in [(64, 256), (6144, 1536), (96, 256)]:
        weight = _weight(*shape, seed=1)
        ours, reference = _ours(weight, "int4", scratch), _quanto(weight, "int4")
        assert torch.equal(ours.weight.dequantize(), reference.weight.dequantize())


@pytest.mark.parametrize(("quantization", "shape"), [("int4", (48, 256)), ("int4", (64, 200)), ("int8", (64, 1))])
def test_other_shapes_take_quantos_own_path(quantization: str, shape: tuple[int, int]) -> None:
    weight = _weight(*shape, seed=2) if shape[1] >= 128 else torch.randn(*shape).bfloat16()
    reference = _quanto(weight, quantization)
    assert not quanto_cpu.supports(reference, weight)
    ours = _ours(weight, quantization)
    assert torch.equal(ours.weight.dequantize(), reference.weight.dequantize())


def test_other_dtypes_take_quantos_own_path() -> None:
    weight = _weight(64, 256, seed=3).float()
    linear = torch.nn.Linear(256, 64)
    assert not quanto_cpu.supports(quantize_module(linear, weights=qint4), weight)


def test_torch_packs_int4_in_the_layout_we_write() -> None:
    assert quanto_cpu._layout_matches()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_non_finite_weight_is_refused(quantization: str) -> None:
    weight = _weight(64, 256, seed=4)
    weight[7, 9] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        _ours(weight, quantization)
