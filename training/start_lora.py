"""Start a run from an existing LoRA (as ComfyUI core's trainer does with ``existing_lora``).

The LoRA fixes the adapter's targets and rank; the run then continues its weights. Accepted layout:
diffusers' SD3 LoRA keys, ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (what this pack,
diffusers' SD3 trainer and SimpleTuner write), read the way ComfyUI's LoraLoader reads them: a
``<module>.alpha`` tensor scales ``lora_B`` by alpha/rank, no alpha means scale 1. Other layouts are
refused with a message naming a key, never half-loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_KEY = re.compile(r"transformer\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)")


@dataclass(frozen=True)
class StartLora:
    """A LoRA to continue: per target module its ``(A, B)`` with alpha/rank already folded into B."""

    name: str
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], name: str) -> StartLora:
        """Read a LoRA's tensors; ValueError naming ``name`` and a key when it cannot be continued."""
        if not state:
            raise ValueError(f"{name} holds no tensors")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _KEY.fullmatch(key)
            if match is None:
                raise ValueError(
                    f"{name}: key {key!r} is not in diffusers' SD3 LoRA layout ('transformer.<module>.lora_A.weight' "
                    "/ 'lora_B.weight'); only LoRAs in that layout (this pack's, diffusers', SimpleTuner's) can be "
                    "continued; start a new run instead"
                )
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        weights, ranks = {}, set()
        for module, part in sorted(parts.items()):
            if "lora_A.weight" not in part or "lora_B.weight" not in part:
                raise ValueError(f"{name}: {module} has no lora_A/lora_B pair; the file is incomplete")
            a, b = part["lora_A.weight"].float(), part["lora_B.weight"].float()
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{name}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
            scale = float(part["alpha"]) / a.shape[0] if "alpha" in part else 1.0
            weights[module] = (a.clone(), b * scale)
            ranks.add(a.shape[0])
        if len(ranks) != 1:
            raise ValueError(f"{name} mixes LoRA ranks {sorted(ranks)}; only a LoRA of one rank can be continued")
        return cls(name, weights, ranks.pop())

    def check_fits(self, transformer) -> None:
        """Refuse a LoRA made for another model (a target missing or of another shape), naming one module."""
        modules = dict(transformer.named_modules())
        for module, (a, b) in self.weights.items():
            layer = modules.get(module)
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(
                    f"{self.name} targets {module}, which this base model has no linear layer for: the LoRA was "
                    "trained for another model; pick a LoRA made for this base"
                )
            if (b.shape[0], a.shape[1]) != (layer.out_features, layer.in_features):
                raise ValueError(
                    f"{self.name}: {module} is {b.shape[0]}x{a.shape[1]} in the LoRA but "
                    f"{layer.out_features}x{layer.in_features} in this base model: it was trained for another model"
                )

    def adapter_tensors(self, alpha: float) -> dict[str, torch.Tensor]:
        """The weights under peft's names for an adapter of this rank and ``alpha`` (its scale unfolded)."""
        unfold = self.rank / alpha
        out = {}
        for module, (a, b) in self.weights.items():
            out[f"{module}.lora_A.weight"] = a
            out[f"{module}.lora_B.weight"] = b * unfold
        return out
