"""Frozen half-precision Linear layers on a CPU: the matrix products in float32, a layer at a time.

On a CPU without bf16 matrix instructions (AVX2: most desktops and laptops) torch has no fast kernel
for a bf16 or fp16 matmul and falls back to a generic one. For the backward pass of a frozen Linear,
whose one product is the input's gradient ``grad_out @ W`` (W read across its rows), that fallback is
~200x slower than the same product in float32: measured on this project's CPU (torch 2.13, AVX2) for
589 tokens through a 1536 -> 6144 layer, 19.5 s against 0.09 s with the conversions included; the
forward product is ~6x slower too. That product dominated a real-size bf16 training step.

So on a CPU a frozen bf16/fp16 Linear converts its weight to float32 for the product (one layer's
worth, freed at once, the way ComfyUI's "manual cast" computes), multiplies in float32 and returns its
input's dtype. bf16 products are exact in float32 and torch's bf16 kernels accumulate in float32
too, so only the order of the sums differs. The stored weight is unchanged and shared; nothing is
kept beyond what ``F.linear`` would keep for the backward pass. On any other device, for a weight that
trains, or under autocast the layer is an ordinary ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.bfloat16, torch.float16)


class _Float32Product(torch.autograd.Function):
    """``F.linear`` through float32 with a frozen weight and bias: the gradient goes to the input only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        return (grad.float() @ weight.float()).to(grad.dtype), None, None


class Float32OnCpuLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose products run in float32 while its weight is a frozen bf16/fp16 CPU tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (
            weight.device.type != "cpu"
            or weight.dtype not in _HALF
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
            or torch.is_autocast_enabled("cpu")
        ):
            return super().forward(x)
        return _Float32Product.apply(x, weight, bias)


def float32_products_on_cpu(model: torch.nn.Module) -> int:
    """Make every plain frozen ``nn.Linear`` in ``model`` a ``Float32OnCpuLinear`` (the same module,
    its class changed: weights, hooks and peft's wrapping stay as they are). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad:
            module.__class__ = Float32OnCpuLinear
            count += 1
    return count
