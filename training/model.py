"""LoRA on an SD3 / SD3.5 transformer: target presets, block ranges, attaching the adapter.

Loading and quantising the base lives in ``training.loading`` (re-exported here for existing callers).
LoRA targets are chosen by preset and block range and listed as full module names, so the adapter
covers exactly what was asked. A quantised base is quantised and frozen *before* the adapter is
added (the other order quantises the LoRA itself).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from .loading import (  # noqa: F401  (re-exported: the loader's public names)
    DTYPES,
    QUANT,
    STABILITY_PREFIX,
    ModelLoadError,
    config_from_state_dict,
    detect_family,
    load_base,
    load_transformer,
    quantize_base,
)

logger = logging.getLogger(__name__)

# Module-name suffixes inside one diffusers JointTransformerBlock.
_X_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v")
_X_ATTN = (*_X_ATTN, "attn2.to_out.0")
_CTX_ATTN = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_X_FF = ("ff.net.0.proj", "ff.net.2")
_CTX_FF = ("ff_context.net.0.proj", "ff_context.net.2")

PRESETS: dict[str, tuple[str, ...]] = {
    # SimpleTuner's default for SD3: the image stream's attention projections only.
    "attention": _X_ATTN,
    # Attention of both streams plus both feed-forwards (the adaLN modulation stays frozen).
    "attention_ff": (*_X_ATTN, *_CTX_ATTN, *_X_FF, *_CTX_FF),
    # Every linear layer inside the joint blocks, adaLN modulation included.
    "all_linear": (*_X_ATTN, *_CTX_ATTN, *_X_FF, *_CTX_FF, "norm1.linear", "norm1_context.linear"),
    "x_stream": (*_X_ATTN, *_X_FF, "norm1.linear"),
    "context_stream": (*_CTX_ATTN, *_CTX_FF, "norm1_context.linear"),
}


# -- LoRA targets --------------------------------------------------------------------------------


def parse_blocks(spec: str, num_layers: int, field: str = "blocks") -> list[int]:
    """Parse ``"12-24,30"`` into block indices. An empty spec means every block."""
    if not spec.strip():
        return list(range(num_layers))
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"{field}: cannot read {part!r}; write block indices like '12-24,30'")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo > hi or hi >= num_layers:
            raise ValueError(f"{field}: {part!r} is outside the model's blocks 0-{num_layers - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def lora_target_modules(transformer, preset: str, blocks: str = "", exclude_blocks: str = "") -> list[str]:
    """Full names of the linear modules a preset selects inside the chosen blocks."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    n = transformer.config.num_layers
    chosen = set(parse_blocks(blocks, n, "blocks")) - (
        set(parse_blocks(exclude_blocks, n, "exclude_blocks")) if exclude_blocks.strip() else set()
    )
    suffixes = PRESETS[preset]
    names = []
    for name, module in transformer.named_modules():
        match = re.match(r"transformer_blocks\.(\d+)\.(.+)$", name)
        # isinstance also admits optimum-quanto's QLinear (a torch.nn.Linear subclass) on a quantised base
        if (
            match
            and int(match.group(1)) in chosen
            and match.group(2) in suffixes
            and isinstance(module, torch.nn.Linear)
        ):
            names.append(name)
    if not names:
        raise ValueError(f"preset {preset!r} with blocks {blocks or 'all'!r} selects no layer to train")
    return names


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


def add_lora(
    transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0, seed: int = 0
) -> LoraSpec:
    """Attach a fresh peft LoRA adapter (``default``) to ``targets``; only its weights train, in fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=list(targets)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    cast_training_params(transformer, torch.float32)
    return LoraSpec(rank=rank, alpha=float(alpha), dropout=dropout, targets=tuple(targets))


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    """The adapter's parameters: after ``add_lora`` they are the only ones that train."""
    if not getattr(transformer, "peft_config", None):
        raise ValueError("the transformer carries no LoRA; call model.add_lora first")
    return [p for p in transformer.parameters() if p.requires_grad]


def adapter_state(transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (``<module>.lora_A.weight``), as checkpoints store them."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def adapter_mismatch(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> str | None:
    """Why tensors of shapes ``have`` cannot be the adapter with shapes ``want`` (None if they can)."""
    if want.keys() != have.keys():
        differ = sorted(want.keys() ^ have.keys())
        return f"it holds other LoRA targets ({len(differ)} names differ, e.g. {differ[0]})"
    for name, shape in want.items():
        if tuple(have[name]) != tuple(shape):
            return f"{name} has shape {tuple(have[name])} where this run's adapter has {tuple(shape)} (another rank)"
    return None


def load_adapter_state(transformer, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Set the adapter's weights in place from ``tensors`` (names as ``adapter_state`` gives them).

    The one way an adapter gets weights from outside: checkpoints, and a LoRA to start from. Refuses
    tensors for other targets or another rank, naming ``where``.
    """
    from peft.utils import set_peft_model_state_dict

    want = {k: tuple(v.shape) for k, v in adapter_state(transformer).items()}
    why = adapter_mismatch(want, {k: tuple(v.shape) for k, v in tensors.items()})
    if why:
        raise ValueError(f"{where} does not fit this run's LoRA: {why}; use the same preset, blocks and rank")
    set_peft_model_state_dict(transformer, tensors)


def count_trainable(transformer) -> int:
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)
