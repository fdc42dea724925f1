"""Stability's MMDiT key layout <-> diffusers' ``SD3Transformer2DModel`` layout, as a declarative table.

Why a table of our own (and not diffusers' converter): the loader reads, converts and quantises one
block at a time, must account for every tensor in the file (diffusers' converter silently ignores
what it does not know, which is how fp8 scales got dropped), and must be able to *share* a tensor
with ComfyUI (a fused ``qkv`` becomes three views, not three copies). The config is read from the
tensor shapes alone, so nothing is downloaded and every SD3 size loads through one path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# How one MMDiT tensor becomes diffusers tensors.
COPY, SPLIT3, SWAP = "copy", "split3", "swap"


@dataclass(frozen=True)
class Entry:
    """One source tensor: its MMDiT name, the diffusers name(s) it becomes and how."""

    source: str
    targets: tuple[str, ...]
    how: str = COPY


def _pair(src: str, dst: str, how: str = COPY) -> list[Entry]:
    """bias + weight of one linear layer (bias first: the layer is quantised as soon as its weight is in)."""
    if how == SPLIT3:
        return [Entry(f"{src}.{p}", tuple(f"{d}.{p}" for d in dst.split("|")), SPLIT3) for p in ("bias", "weight")]
    return [Entry(f"{src}.{p}", (f"{dst}.{p}",), how) for p in ("bias", "weight")]


GLOBAL_ENTRIES: tuple[Entry, ...] = (
    Entry("pos_embed", ("pos_embed.pos_embed",)),
    *_pair("x_embedder.proj", "pos_embed.proj"),
    *_pair("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    *_pair("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    *_pair("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    *_pair("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    *_pair("context_embedder", "context_embedder"),
    *_pair("final_layer.linear", "proj_out"),
    *_pair("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP),
)


def block_entries(i: int, *, last: bool, dual: bool, qk_norm: bool) -> list[Entry]:
    """The tensors of joint block ``i`` (the last block's context stream is 'pre-only')."""
    s, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
    out = [
        *_pair(s + "x_block.attn.qkv", "|".join(d + f"attn.to_{x}" for x in "qkv"), SPLIT3),
        *_pair(s + "context_block.attn.qkv", "|".join(d + f"attn.add_{x}_proj" for x in "qkv"), SPLIT3),
        *_pair(s + "x_block.attn.proj", d + "attn.to_out.0"),
        *_pair(s + "x_block.adaLN_modulation.1", d + "norm1.linear"),
        *_pair(s + "context_block.adaLN_modulation.1", d + "norm1_context.linear", SWAP if last else COPY),
        *_pair(s + "x_block.mlp.fc1", d + "ff.net.0.proj"),
        *_pair(s + "x_block.mlp.fc2", d + "ff.net.2"),
    ]
    if not last:
        out += [
            *_pair(s + "context_block.attn.proj", d + "attn.to_add_out"),
            *_pair(s + "context_block.mlp.fc1", d + "ff_context.net.0.proj"),
            *_pair(s + "context_block.mlp.fc2", d + "ff_context.net.2"),
        ]
    if qk_norm:
        out += [
            Entry(s + "x_block.attn.ln_q.weight", (d + "attn.norm_q.weight",)),
            Entry(s + "x_block.attn.ln_k.weight", (d + "attn.norm_k.weight",)),
            Entry(s + "context_block.attn.ln_q.weight", (d + "attn.norm_added_q.weight",)),
            Entry(s + "context_block.attn.ln_k.weight", (d + "attn.norm_added_k.weight",)),
        ]
    if dual:
        out += [
            *_pair(s + "x_block.attn2.qkv", "|".join(d + f"attn2.to_{x}" for x in "qkv"), SPLIT3),
            *_pair(s + "x_block.attn2.proj", d + "attn2.to_out.0"),
        ]
        if qk_norm:
            out += [
                Entry(s + "x_block.attn2.ln_q.weight", (d + "attn2.norm_q.weight",)),
                Entry(s + "x_block.attn2.ln_k.weight", (d + "attn2.norm_k.weight",)),
            ]
    return out


def layout(keys: Iterable[str]) -> tuple[int, tuple[int, ...], bool]:
    """Number of joint blocks, the dual-attention blocks and whether q/k are RMS-normed, from MMDiT keys."""
    keys = set(keys)
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    dual = tuple(sorted(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in keys))
    return len(blocks), dual, "joint_blocks.0.x_block.attn.ln_q.weight" in keys


def all_entries(keys: Iterable[str]) -> tuple[list[Entry], list[list[Entry]]]:
    """The global entries and the entries of each block for a file with these MMDiT keys."""
    n, dual, qk_norm = layout(keys)
    blocks = [block_entries(i, last=i == n - 1, dual=i in dual, qk_norm=qk_norm) for i in range(n)]
    return list(GLOBAL_ENTRIES), blocks


def config_from_shapes(shape: Callable[[str], tuple[int, ...]], keys: Iterable[str]) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of an MMDiT file, from its tensor shapes (no tensor is read)."""
    keys = set(keys)
    n, dual, qk_norm = layout(keys)
    hidden, in_channels, patch = shape("x_embedder.proj.weight")[:3]
    head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk_norm else 64
    return {
        "sample_size": 128,
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(shape("final_layer.linear.weight")[0] // (patch * patch)),
        "num_layers": n,
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(shape("context_embedder.weight")[1]),
        "caption_projection_dim": int(shape("context_embedder.weight")[0]),
        "pooled_projection_dim": int(shape("y_embedder.mlp.0.weight")[1]),
        "pos_embed_max_size": int(math.isqrt(shape("pos_embed")[1])),
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def convert(entry: Entry, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One MMDiT tensor as its diffusers tensor(s). ``SPLIT3`` gives views of the fused tensor (shared
    storage); ``SWAP`` (adaLN of the final layer: shift|scale -> scale|shift) has to copy."""
    if entry.how == SPLIT3:
        return dict(zip(entry.targets, torch.chunk(tensor, 3, dim=0), strict=True))
    if entry.how == SWAP:
        shift, scale = tensor.chunk(2, dim=0)
        return {entry.targets[0]: torch.cat([scale, shift], dim=0)}
    return {entry.targets[0]: tensor}


def diffusers_to_mmdit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse map (diffusers keys -> Stability keys), for writing test and benchmark files."""
    names = {k.removesuffix(".weight").removesuffix(".bias") for k in state}
    n = len({int(m.group(1)) for k in names if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    dual = {int(m.group(1)) for k in names if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.to_q$", k))}
    qk = "transformer_blocks.0.attn.norm_q.weight" in state
    entries = list(GLOBAL_ENTRIES) + [
        e for i in range(n) for e in block_entries(i, last=i == n - 1, dual=i in dual, qk_norm=qk)
    ]
    out = {}
    for e in entries:
        parts = [state[t] for t in e.targets]
        if e.how == SPLIT3:
            out[e.source] = torch.cat(parts, dim=0)
        elif e.how == SWAP:
            scale, shift = parts[0].chunk(2, dim=0)
            out[e.source] = torch.cat([shift, scale], dim=0)
        else:
            out[e.source] = parts[0]
    return out
