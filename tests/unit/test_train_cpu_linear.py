"""Frozen bf16/fp16 Linear layers on a CPU computed in float32 (``training.cpu_linear``).

The layer must give what a bf16 ``nn.Linear`` gives up to the order of float32 sums (compared against
a float64 reference: our error is never larger than torch's own bf16 kernel's), the same gradients to
the input, leave trainable and full-precision layers alone, share the stored weights, and train a real
(tiny) SD3.5 transformer to the LoRA gradients the plain layers give.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_train_offload import _source, base  # noqa: F401  (base is a fixture: the tiny SD3.5 in memory)
from training.config import TrainConfig
from training.cpu_linear import Float32OnCpuLinear, float32_products_on_cpu
from training.loading import InMemoryBase
from training.loop import train
from training.model import lora_parameters
from training.run import prepare_model


def _pair(dtype: torch.dtype, bias: bool = True) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 160, bias=bias).to(dtype).requires_grad_(False)
    ours = torch.nn.Linear(96, 160, bias=bias).to(dtype).requires_grad_(False)
    ours.load_state_dict(plain.state_dict())
    float32_products_on_cpu(ours)
    return plain, ours


def _output_and_grad(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_input_gradient_are_the_plain_layers_to_rounding(dtype: torch.dtype, bias: bool) -> None:
    plain, ours = _pair(dtype, bias)
    assert type(ours) is Float32OnCpuLinear
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, 96, generator=g).to(dtype)
    grad = torch.randn(3, 37, 160, generator=g).to(dtype)
    out, x_grad = _output_and_grad(ours, x, grad)
    want_out, want_grad = _output_and_grad(plain, x, grad)
    assert out.dtype == x_grad.dtype == dtype

    w, b = plain.weight.double(), plain.bias.double() if bias else 0.0
    exact_out = x.double() @ w.T + b
    exact_grad = grad.double() @ w
    for got, torch_kernel, exact in ((out, want_out, exact_out), (x_grad, want_grad, exact_grad)):
        ours_err = (got.double() - exact).abs().max().item()
        torch_err = (torch_kernel.double() - exact).abs().max().item()
        assert ours_err <= torch_err * 1.01 + 1e-12
        torch.testing.assert_close(got, torch_kernel)


def test_an_input_without_gradient_and_no_grad_mode_work() -> None:
    plain, ours = _pair(torch.bfloat16)
    x = torch.randn(5, 96).to(torch.bfloat16)
    torch.testing.assert_close(ours(x), plain(x))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x))
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), plain(x))


def test_full_precision_and_trainable_layers_are_left_alone() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False),  # swapped
        torch.nn.Linear(8, 8).requires_grad_(False),  # swapped, but fp32: the plain path at run time
        torch.nn.Linear(8, 8).to(torch.bfloat16),  # trains: not swapped
    )
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert float32_products_on_cpu(model) == 2
    assert [type(m) for m in model] == [Float32OnCpuLinear, Float32OnCpuLinear, torch.nn.Linear]
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # the same tensors, not copies

    x = torch.randn(4, 8).to(torch.bfloat16)
    fp32 = model[1]
    assert torch.equal(fp32(x.float()), torch.nn.functional.linear(x.float(), fp32.weight, fp32.bias))

    # a layer swapped while frozen that is made to train again computes (and gets gradients) as nn.Linear
    layer = model[0].requires_grad_(True)
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_a_bf16_transformer_trains_as_with_the_plain_layers(base: InMemoryBase) -> None:  # noqa: F811
    """prepare_model swaps every frozen Linear of the base (peft's base layers included, the LoRA's own
    layers not); three steps give the losses and the LoRA that the same model with plain layers gives,
    to bf16 rounding."""
    cfg = TrainConfig(steps=3, rank=4, alpha=4, base_dtype="bf16", preset="all_linear", learning_rate=1e-3)
    model, _ = prepare_model(base, cfg, "cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    swapped = [m for m in linears if type(m) is Float32OnCpuLinear]
    assert swapped and all(not m.weight.requires_grad for m in swapped)
    assert all(type(m) is torch.nn.Linear for m in linears if m.weight.requires_grad)  # lora_A / lora_B
    assert all(type(m.base_layer) is Float32OnCpuLinear for m in model.modules() if hasattr(m, "lora_A"))

    plain, _ = prepare_model(base, cfg, "cpu")
    for m in plain.modules():
        if type(m) is Float32OnCpuLinear:
            m.__class__ = torch.nn.Linear

    ours, theirs = train(model, _source(), cfg).losses, train(plain, _source(), cfg).losses
    assert len(ours) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-2, atol=0)
    for a, b in zip(lora_parameters(model), lora_parameters(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
