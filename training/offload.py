"""Block offload: the frozen joint blocks stay in CPU RAM and visit the training device one at a time.

kohya's ``blocks_to_swap`` for cards too small for the whole base. Each joint block's frozen tensors
(its base weights, quanto-quantised or not, and its buffers) live on the CPU. A forward pre-hook puts
a device copy of them into the block, a forward hook puts the CPU tensors back, so the device holds
the block that computes and nothing of the others. The LoRA's parameters are never moved: they stay
on the device, and they are what the optimizer holds; the embedders and the output layers (small)
stay there too.

The device copy is a new tensor put in the module's place, never the old tensor changed in place, so
what autograd saved for the backward pass stays valid on the device until that backward has used it.
With gradient checkpointing (required with offload: without it every block's copy is kept for the
backward pass and nothing is saved) the backward pass recomputes each block, which brings it back
through the same hooks. diffusers' group offloading is not used: it moves whole modules (the LoRA and
its gradients with them) and moves tensors in place (``param.data = ...``, ``Module.to``), which
autograd may still hold for the backward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

HOME = torch.device("cpu")


@dataclass
class _Frozen:
    """One frozen tensor of a block: the module that holds it, its name, and its CPU (home) copy."""

    module: torch.nn.Module
    name: str
    home: torch.Tensor
    parameter: bool


@dataclass
class OffloadedBlock:
    """One joint block whose frozen tensors visit ``device`` only while it computes."""

    block: torch.nn.Module
    device: torch.device
    frozen: list[_Frozen] = field(default_factory=list)
    onloads: int = 0  # how often the block came to the device (twice per step with checkpointing)

    def onload(self, *_) -> None:
        for f in self.frozen:
            copy = f.home.to(self.device, copy=True)  # a copy even on the same device: a real second placement
            self._put(f, torch.nn.Parameter(copy, requires_grad=False) if f.parameter else copy)
        self.onloads += 1

    def offload(self, *_) -> None:
        for f in self.frozen:
            self._put(f, f.home)

    @staticmethod
    def _put(f: _Frozen, tensor: torch.Tensor) -> None:
        (f.module._parameters if f.parameter else f.module._buffers)[f.name] = tensor

    def resident(self) -> bool:
        """Whether the block's frozen tensors are its device copies now (only while it computes)."""
        return any(f.module._parameters.get(f.name, f.module._buffers.get(f.name)) is not f.home for f in self.frozen)


def _frozen_tensors(block: torch.nn.Module) -> list[_Frozen]:
    out = []
    for module in block.modules():
        for name, param in module._parameters.items():
            if param is not None and not param.requires_grad:
                home = param if param.device == HOME else torch.nn.Parameter(param.to(HOME), requires_grad=False)
                out.append(_Frozen(module, name, home, parameter=True))
        for name, buffer in module._buffers.items():
            if buffer is not None:
                out.append(_Frozen(module, name, buffer.to(HOME), parameter=False))
    return out


def offload_blocks(transformer, device: str | torch.device) -> list[OffloadedBlock]:
    """Keep ``transformer``'s joint blocks' frozen tensors in CPU RAM, brought to ``device`` per block
    for each forward (and each recomputation in the backward pass); everything else goes to ``device``.
    Call after the LoRA is attached (its parameters are told apart by ``requires_grad``) and before the
    optimizer is made."""
    device = torch.device(device)
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(device)
    blocks = []
    for block in transformer.transformer_blocks:
        for param in block.parameters():
            if param.requires_grad:  # the LoRA: resident on the device, the same Parameter the optimizer gets
                param.data = param.data.to(device)
        offloaded = OffloadedBlock(block, device, _frozen_tensors(block))
        offloaded.offload()
        block.register_forward_pre_hook(offloaded.onload)
        block.register_forward_hook(offloaded.offload, always_call=True)
        blocks.append(offloaded)
    if device == HOME:
        logger.info("block offload on the CPU: blocks are copied per forward pass, which only costs time")
    return blocks
