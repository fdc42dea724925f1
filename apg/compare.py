"""Figures and a labelled side-by-side picture for comparing CFG and APG samples of one seed.

Oversaturation is what APG removes, so the figures are the ones a user can read off without code: mean
HSV saturation and mean brightness (Rec. 709 luma) per image, and the APG/CFG ratio of each. Images are
ComfyUI ``IMAGE`` tensors ``[B, H, W, C]`` with values in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ImageFigures", "as_rgb", "comparison_text", "image_figures", "label_band", "labelled_grid", "side_by_side"]

LUMA = (0.2126, 0.7152, 0.0722)


@dataclass(frozen=True)
class ImageFigures:
    saturation: list[float]
    brightness: list[float]


def as_rgb(images: Tensor) -> Tensor:
    """An IMAGE batch as float RGB in [0, 1] (grey expanded, alpha dropped)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE batch [B, H, W, C] with C in (1, 3, 4), got {tuple(images.shape)}")
    rgb = images[..., :3] if images.shape[-1] >= 3 else images.expand(*images.shape[:-1], 3)
    return rgb.float().clamp(0.0, 1.0)


def image_figures(images: Tensor) -> ImageFigures:
    """Mean HSV saturation ((max − min) / max, 0 for black) and mean luma of every image in the batch."""
    rgb = as_rgb(images)
    high = rgb.amax(dim=-1)
    low = rgb.amin(dim=-1)
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))
    luma = (rgb * torch.tensor(LUMA, dtype=rgb.dtype, device=rgb.device)).sum(dim=-1)
    return ImageFigures(
        saturation=saturation.mean(dim=(1, 2)).tolist(),
        brightness=luma.mean(dim=(1, 2)).tolist(),
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def comparison_text(
    cfg: ImageFigures,
    apg: ImageFigures,
    cfg_label: str,
    apg_label: str,
    updates: tuple[list[float], list[float]] | None = None,
) -> str:
    """One line per image: saturation and brightness of both halves, and APG/CFG ratios.

    ``updates``: per image, the size of the guidance update each sampler applied (``apg.sweep.GuidanceMeter``),
    for CFG and for APG; when given it is reported too, since equal w is not equal strength.
    """
    lines = [f"left: {cfg_label}", f"right: {apg_label}"]
    for i, (s_c, s_a, b_c, b_a) in enumerate(
        zip(cfg.saturation, apg.saturation, cfg.brightness, apg.brightness, strict=True)
    ):
        line = (
            f"image {i}: saturation CFG {s_c:.4f} APG {s_a:.4f} (APG/CFG {_ratio(s_a, s_c):.3f}); "
            f"brightness CFG {b_c:.4f} APG {b_a:.4f} (APG/CFG {_ratio(b_a, b_c):.3f})"
        )
        if updates is not None:
            u_c, u_a = updates[0][i], updates[1][i]
            line += f"; update CFG {u_c:.4f} APG {u_a:.4f} (APG/CFG {_ratio(u_a, u_c):.3f})"
        lines.append(line)
    return "\n".join(lines)


def _split_long_word(word: str, width_px: int, font, draw) -> list[str]:
    pieces, current = [], ""
    for char in word:
        if current and draw.textlength(current + char, font=font) > width_px:
            pieces.append(current)
            current = char
        else:
            current += char
    return [*pieces, current]


def _wrap(text: str, width_px: int, font, draw) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        words = [p for w in paragraph.split(" ") for p in _split_long_word(w, width_px, font, draw)]
        for word in words:
            candidate = f"{current} {word}".strip()
            if current and draw.textlength(candidate, font=font) > width_px:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return lines


def label_band(text: str, width: int, font_size: int) -> Tensor:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(2, font_size // 4)
    lines = _wrap(text, width - 2 * margin, font, probe)
    line_height = font_size + max(1, font_size // 4)
    band = Image.new("RGB", (width, margin * 2 + line_height * len(lines)), (24, 24, 24))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, fill=(240, 240, 240), font=font)
    return torch.frombuffer(bytearray(band.tobytes()), dtype=torch.uint8).reshape(band.height, width, 3)


def side_by_side(left: Tensor, right: Tensor, left_label: str, right_label: str, gap: int = 4) -> Tensor:
    """``left | right`` per batch item, each under a caption band carrying its label; an IMAGE batch.

    The caption font scales with the image width (at least 10 px), and long labels wrap.
    """
    left_rgb, right_rgb = as_rgb(left), as_rgb(right)
    if left_rgb.shape != right_rgb.shape:
        raise ValueError(f"the two halves differ in shape: {tuple(left.shape)} vs {tuple(right.shape)}")
    batch, height, width, _ = left_rgb.shape
    font_size = max(10, width // 24)
    bands = [label_band(text, width, font_size).float().div(255.0) for text in (left_label, right_label)]
    band_height = max(b.shape[0] for b in bands)
    padded = [torch.cat([b, b.new_full((band_height - b.shape[0], width, 3), 24 / 255)], dim=0) for b in bands]
    out = left_rgb.new_ones((batch, band_height + height, 2 * width + gap, 3))
    for column, (band, half) in enumerate(zip(padded, (left_rgb, right_rgb), strict=True)):
        x = column * (width + gap)
        out[:, :band_height, x : x + width] = band.to(out)
        out[:, band_height:, x : x + width] = half
    return out


def labelled_grid(rows: dict[str, Tensor], columns: list[str], gap: int = 4) -> Tensor:
    """One picture of several guidances over several prompts: a header band per column (its prompt), then per
    row a band with the row's label (e.g. the guidance and its settings) over that row's images side by side.

    ``rows``: label -> IMAGE batch [N, H, W, C] with one image per column; returns a one-image batch.
    """
    batches = [as_rgb(images) for images in rows.values()]
    shapes = {tuple(b.shape) for b in batches}
    if len(shapes) != 1 or batches[0].shape[0] != len(columns):
        raise ValueError(f"every row needs {len(columns)} image(s) of one size, got shapes {sorted(shapes)}")
    _, height, width, _ = batches[0].shape
    font_size = max(10, width // 24)
    full = len(columns) * width + (len(columns) - 1) * gap
    header = [label_band(text, width, font_size).float().div(255.0) for text in columns]
    header_height = max(h.shape[0] for h in header)
    parts = [torch.full((header_height, full, 3), 24 / 255)]
    for column, band in enumerate(header):
        x = column * (width + gap)
        parts[0][: band.shape[0], x : x + width] = band
    for label, images in zip(rows, batches, strict=True):
        parts.append(label_band(label, full, font_size).float().div(255.0))
        line = torch.ones((height, full, 3))
        for column, image in enumerate(images):
            line[:, column * (width + gap) : column * (width + gap) + width] = image
        parts.append(line)
    return torch.cat(parts, dim=0)[None]
