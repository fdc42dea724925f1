"""The demo VAE: a TAESD3 autoencoder whose weights are constructed, so its round trip keeps the picture.

ComfyUI loads ``vae_approx/taesd3_encoder.safetensors`` + ``taesd3_decoder.safetensors`` as the VAE
named ``taesd3`` (VAELoader) and a checkpoint's ``first_stage_model.taesd_*`` keys the same way. TAESD
has no normalisation and its blocks are ``ReLU(x + residual(x))``: with zeroed residual branches a block
is the identity on non-negative activations, and a signed signal ``s`` travels as two channels
``ReLU(s)``, ``ReLU(-s)``. So an exactly linear codec fits in the architecture:

- encode: latent channels 0-2 = ``A0·(8×8 mean of R, G, B − 0.5)`` (the picture as a 32×32
  thumbnail at 256 px); 3-11 = the horizontal, vertical and diagonal differences of the four 4×4
  quarter means of each cell, per colour, minus the share the neighbouring cells' means predict;
  12-15 = 0. ``A0`` gives the means about unit spread, as SD3's latents have (a diffusion model learns
  a low-variance latent far more slowly). The encoder's output is the model-space latent: ComfyUI's
  taesd3 wrapper divides by SD3's scale 1.5305 and adds its shift 0.0609, and ``process_in`` undoes it.
- decode: TAESD first squashes latents with ``3·tanh(x/3)``; the mean channels are unsquashed again by
  a piecewise-linear fit of ``3·atanh(y/3)`` (ReLU hinges). Then per channel a separable smooth
  upsampling (3-tap filters after each nearest-neighbour doubling and at full resolution), detail
  channels through a derivative at 1/4.

The six filter constants were fitted once by least squares on the pretraining photos (``--fit``
re-derives them in about a minute); ``python -m tools.demo_vae`` prints the round-trip PSNR against
the bar of a 32×32 thumbnail blown up to the same size with Lanczos. ``reference_encode``/``reference_decode`` are
the same codec in plain torch: the test oracle for what ComfyUI's VAEEncode/VAEDecode give.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.cache.sd3 import SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR

A0 = 6.0  # latent = A0·(mean − 0.5): within ±3, spread about 1.5 on photos
DETAIL_GAIN = 1.0  # detail latents = DETAIL_GAIN·A0·difference: mostly within ±1, where 3·tanh(x/3) is near linear
SMOOTH = (0.1687, 0.2632, 0.2572, -2.9113)  # a of [a, 1-2a, a] at 1/4, 1/2, 1 (after doubling) and the last conv
DERIVATIVE = -0.5331  # detail taps [-c, 0, c] at 1/4 resolution
GRADIENT_SHARE = 0.0076  # share of the neighbours' mean difference taken out of a detail channel
KNOTS = (0.9, 1.5, 1.9, 2.15)  # hinge points of the unsquashing of the mean channels (3·tanh(1) = 2.28 at |x| = 3)
LATENT_CHANNELS = 16
WIDTH = 64
CHAINS = 12  # latent channels in use: 3 means + 9 details; each travels as a (+, -) channel pair
SD3_SCALE, SD3_SHIFT = SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR  # what ComfyUI's taesd3 loader sets as vae_scale / vae_shift

# the encoder's and decoder's nn.Sequential layouts (comfy/taesd/taesd.py): index -> kind
ENCODER = ("conv", "block", "down", "block", "block", "block", "down", "block", "block", "block", "down")
ENCODER += ("block", "block", "block", "conv")
DECODER = ("clamp", "conv", "relu", "block", "block", "block", "up", "conv", "block", "block", "block", "up")
DECODER += ("conv", "block", "block", "block", "up", "conv", "block", "conv")


def _taps(a: Tensor | float) -> Tensor:
    a = torch.as_tensor(a, dtype=torch.float32)
    return torch.stack([a, 1 - 2 * a, a])


def _derivative(c: Tensor | float) -> Tensor:
    c = torch.as_tensor(c, dtype=torch.float32)
    return torch.stack([-c, torch.zeros_like(c), c])


@lru_cache(maxsize=1)
def unsquash() -> tuple[float, tuple[float, ...]]:
    """(slope, hinge weights) of ``slope·y + Σ w_k·(relu(y − t_k) − relu(−y − t_k)) ≈ 3·atanh(y/3)`` on the
    range the mean channels use, by least squares (max error about 0.015 latent units, 0.3 % of a pixel)."""
    z = torch.linspace(0, A0 / 2 + 0.3, 400, dtype=torch.float64)
    y = 3 * torch.tanh(z / 3)
    basis = torch.stack([y, *[torch.relu(y - t) for t in KNOTS]], dim=1)
    solution = torch.linalg.lstsq(basis, z[:, None]).solution[:, 0]
    return float(solution[0]), tuple(float(w) for w in solution[1:])


def _unsquash_means(x: Tensor) -> Tensor:
    slope, weights = unsquash()
    means = slope * x[:, :3]
    for t, w in zip(KNOTS, weights, strict=True):
        means = means + w * (torch.relu(x[:, :3] - t) - torch.relu(-x[:, :3] - t))
    return torch.cat([means, x[:, 3:]], dim=1)


def _kernels(smooth: Sequence, derivative) -> list[list[Tensor]]:
    """Per stage (1/4, 1/2, 1 after doubling, last conv), the 3×3 kernel of each of the 12 chains."""
    stages = []
    for index, a in enumerate(smooth):
        s = _taps(a)
        if index == 0:
            d = _derivative(derivative)
            per_kind = [torch.outer(s, s), torch.outer(s, d), torch.outer(d, s), torch.outer(d, d)]
        else:
            per_kind = [torch.outer(s, s)] * 4
        stages.append([per_kind[chain // 3] for chain in range(CHAINS)])
    return stages


def reference_encode(pixels: Tensor, share: Tensor | float = GRADIENT_SHARE) -> Tensor:
    """[B, 3, H, W] pixels in [0, 1] (H, W multiples of 8) -> [B, 16, H/8, W/8] model-space latents."""
    quarters = F.avg_pool2d(pixels, 4)
    tl, tr = quarters[..., 0::2, 0::2], quarters[..., 0::2, 1::2]
    bl, br = quarters[..., 1::2, 0::2], quarters[..., 1::2, 1::2]
    centred = (tl + tr + bl + br) / 4 - 0.5
    padded = F.pad(centred, (1, 1, 1, 1))
    grad_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    grad_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    horizontal = (tr + br - tl - bl) / 4 - share * grad_x
    vertical = (bl + br - tl - tr) / 4 - share * grad_y
    diagonal = (tl + br - tr - bl) / 4
    details = DETAIL_GAIN * A0 * torch.cat([horizontal, vertical, diagonal], dim=1)
    spare = centred.new_zeros(centred.shape[0], LATENT_CHANNELS - CHAINS, *centred.shape[2:])
    return torch.cat([A0 * centred, details, spare], dim=1)


def reference_decode(latent: Tensor, smooth: Sequence = SMOOTH, derivative=DERIVATIVE) -> Tensor:
    """[B, 16, h, w] model-space latents -> [B, 3, 8h, 8w] pixels (not clamped)."""
    stages = _kernels(smooth, derivative)
    x = _unsquash_means(torch.tanh(latent[:, :CHAINS] / 3) * 3)
    for kernels in stages[:3]:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.conv2d(x, torch.stack(kernels)[:, None], padding=1, groups=CHAINS)
    x = F.conv2d(x, torch.stack(stages[3])[:, None], padding=1, groups=CHAINS)
    gains = torch.tensor([1 / A0] * 3 + [1 / (DETAIL_GAIN * A0)] * 9).view(1, CHAINS, 1, 1)
    return 0.5 + (x * gains).reshape(x.shape[0], 4, 3, *x.shape[2:]).sum(dim=1)


# -- the TAESD3 weights -------------------------------------------------------------------------


def _block(sd: dict[str, Tensor], prefix: str, bias: Tensor | None = None) -> None:
    """A TAESD Block whose residual branch is zero (or the constant ``bias``): ReLU(x [+ bias])."""
    for i in (0, 2, 4):
        sd[f"{prefix}.conv.{i}.weight"] = torch.zeros(WIDTH, WIDTH, 3, 3)
        sd[f"{prefix}.conv.{i}.bias"] = torch.zeros(WIDTH)
    if bias is not None:
        sd[f"{prefix}.conv.4.bias"] = bias


def _pair(weight: Tensor, out: int, inp: int, kernel: Tensor) -> None:
    """Chain ``out`` <- chain ``inp`` through ``kernel``, both as (+, -) channel pairs."""
    for o, sign_o in ((2 * out, 1), (2 * out + 1, -1)):
        for i, sign_i in ((2 * inp, 1), (2 * inp + 1, -1)):
            weight[o, i] = sign_o * sign_i * kernel


def encoder_weights() -> dict[str, Tensor]:
    """TAESD encoder weights computing ``reference_encode`` (before ComfyUI's scale/shift)."""
    sd: dict[str, Tensor] = {}
    box = torch.zeros(3, 3)
    box[1:, 1:] = 0.25  # with padding 1, taps 1-2 of a stride-2 conv are the 2x2 cell
    first = torch.zeros(WIDTH, 3, 3, 3)
    downs = [torch.zeros(WIDTH, WIDTH, 3, 3) for _ in range(3)]
    for c in range(3):
        first[c, c, 1, 1] = 1.0
        downs[0][c, c] = box
        downs[1][c, c] = box
    # last downsampling: (mean - 0.5) as a pair, then per colour the three quarter differences as pairs
    patterns = {"h": ((-1, 1), (-1, 1)), "v": ((-1, -1), (1, 1)), "d": ((1, -1), (-1, 1))}
    shift = torch.zeros(WIDTH)
    for c in range(3):
        downs[2][2 * c, c], downs[2][2 * c + 1, c] = box, -box
        shift[2 * c], shift[2 * c + 1] = -0.5, 0.5
        for k, rows in enumerate(patterns.values()):
            kernel = torch.zeros(3, 3)
            kernel[1:, 1:] = 0.25 * torch.tensor(rows, dtype=torch.float32)
            chain = 3 + 3 * k + c
            downs[2][2 * chain, c], downs[2][2 * chain + 1, c] = kernel, -kernel
    last = torch.zeros(LATENT_CHANNELS, WIDTH, 3, 3)
    for c in range(3):
        centre = torch.zeros(3, 3)
        centre[1, 1] = 1.0
        _signed(last, c, c, A0 * centre)
        grad = {"h": torch.tensor([[0, 0, 0], [-0.5, 0, 0.5], [0, 0, 0]])}
        grad["v"] = grad["h"].T
        for k, kind in enumerate(("h", "v", "d")):
            chain = 3 + 3 * k + c
            _signed(last, chain, chain, DETAIL_GAIN * A0 * centre)
            if kind in grad:
                _signed(last, chain, c, -DETAIL_GAIN * A0 * GRADIENT_SHARE * grad[kind])
    sd["0.weight"], sd["0.bias"] = first, torch.zeros(WIDTH)
    for index, kind in enumerate(ENCODER):
        if kind == "block":
            _block(sd, str(index), shift if index == 11 else None)
    sd["2.weight"], sd["6.weight"], sd["10.weight"] = downs
    sd["14.weight"], sd["14.bias"] = last, torch.zeros(LATENT_CHANNELS)
    return sd


def _signed(weight: Tensor, out: int, chain: int, kernel: Tensor) -> None:
    """Latent ``out`` += ``kernel`` applied to the signed value of ``chain`` (its + channel minus its - channel)."""
    weight[out, 2 * chain] += kernel
    weight[out, 2 * chain + 1] -= kernel


def decoder_weights() -> dict[str, Tensor]:
    """TAESD decoder weights computing ``reference_decode``.

    The first conv (at 1/8) feeds ReLUs: per mean channel ``±y`` and ``±y − t_k`` (the unsquashing
    hinges, channels 0-29), per detail channel ``±y`` (30-47). The conv after the first doubling sums each
    chain's pieces into its (+, -) pair (channels 0-23), and the later convs keep that layout.
    """
    stages = _kernels(SMOOTH, DERIVATIVE)
    slope, weights = unsquash()
    sd: dict[str, Tensor] = {}
    first, first_bias = torch.zeros(WIDTH, LATENT_CHANNELS, 3, 3), torch.zeros(WIDTH)
    pieces: dict[int, list[tuple[int, float]]] = {}  # chain -> (channel, weight of its value in the chain)
    channel = 0
    for chain in range(CHAINS):
        hinges = list(zip(KNOTS, weights, strict=True)) if chain < 3 else []
        pieces[chain] = []
        for offset, coef in ((0.0, slope if chain < 3 else 1.0), *hinges):
            for sign in (1.0, -1.0):
                first[channel, chain, 1, 1] = sign
                first_bias[channel] = -offset
                pieces[chain].append((channel, sign * coef))
                channel += 1
    sd["1.weight"], sd["1.bias"] = first, first_bias
    up = torch.zeros(WIDTH, WIDTH, 3, 3)
    for chain, parts in pieces.items():
        for source, coef in parts:
            up[2 * chain, source] = coef * stages[0][chain]
            up[2 * chain + 1, source] = -coef * stages[0][chain]
    sd["7.weight"] = up
    for index, stage in zip((12, 17), stages[1:3], strict=True):
        weight = torch.zeros(WIDTH, WIDTH, 3, 3)
        for chain in range(CHAINS):
            _pair(weight, chain, chain, stage[chain])
        sd[f"{index}.weight"] = weight
    last = torch.zeros(3, WIDTH, 3, 3)
    for chain in range(CHAINS):
        gain = 1 / A0 if chain < 3 else 1 / (DETAIL_GAIN * A0)
        _signed(last, chain % 3, chain, gain * stages[3][chain])
    sd["19.weight"], sd["19.bias"] = last, torch.full((3,), 0.5)
    for index, kind in enumerate(DECODER):
        if kind == "block":
            _block(sd, str(index))
    return sd


def checkpoint_vae() -> dict[str, Tensor]:
    """The same VAE as a checkpoint's ``first_stage_model.*`` part (scale and shift included)."""
    sd = {f"first_stage_model.taesd_encoder.{k}": v for k, v in encoder_weights().items()}
    sd |= {f"first_stage_model.taesd_decoder.{k}": v for k, v in decoder_weights().items()}
    sd["first_stage_model.vae_scale"] = torch.tensor(SD3_SCALE)
    sd["first_stage_model.vae_shift"] = torch.tensor(SD3_SHIFT)
    return sd


# -- measuring and fitting ------------------------------------------------------------------------


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of pixels in [0, 1] (``a`` is clamped first)."""
    mse = float(((a.clamp(0, 1) - b) ** 2).mean())
    return 10 * float(np.log10(1 / max(mse, 1e-12)))


def _pixels(arrays: Sequence[np.ndarray]) -> Tensor:
    return torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255 for a in arrays])


def thumbnail_bar(arr: np.ndarray, factor: int = 8) -> np.ndarray:
    """The bar to beat: the picture shrunk ``factor``× (area) and blown up again with Lanczos."""
    from PIL import Image

    h, w = arr.shape[:2]
    small = Image.fromarray(arr).resize((w // factor, h // factor), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.LANCZOS))


def measure(size: int = 256) -> list[tuple[str, float, float]]:
    """(photo, round-trip PSNR, thumbnail PSNR) for every bundled demo photo at ``size`` px."""
    from .sample_data import PRETRAIN_PHOTOS, photo, square, subject_photos

    named = [(name, square(photo(name), size)) for name, _ in PRETRAIN_PHOTOS]
    named += [(f"motorcycle_{i}", square(a, size)) for i, a in enumerate(subject_photos())]
    rows = []
    for name, arr in named:
        x = _pixels([arr])
        ours = psnr(reference_decode(reference_encode(x)), x)
        rows.append((name, ours, psnr(_pixels([thumbnail_bar(arr)]), x)))
    return rows


def fit(steps: int = 150, size: int = 256) -> list[float]:
    """Re-fit SMOOTH, DERIVATIVE and GRADIENT_SHARE by Adam on the pretraining photos' round-trip error."""
    from .sample_data import PRETRAIN_PHOTOS, photo, square

    x = _pixels([square(photo(name), size) for name, _ in PRETRAIN_PHOTOS])
    params = [torch.tensor(float(v), requires_grad=True) for v in (*SMOOTH, DERIVATIVE, GRADIENT_SHARE)]
    optimizer = torch.optim.Adam(params, lr=0.02)
    for _ in range(steps):
        out = reference_decode(reference_encode(x, params[5]), params[:4], params[4])
        loss = F.mse_loss(out, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [round(float(p.detach()), 4) for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="re-fit the filter constants and print them")
    parser.add_argument("--size", type=int, default=256, help="picture size for the PSNR table (multiple of 8)")
    args = parser.parse_args()
    if args.fit:
        print("SMOOTH, DERIVATIVE, GRADIENT_SHARE =", fit())
        return
    rows = measure(args.size)
    for name, ours, bar in rows:
        print(
            f"{name:22s} round trip {ours:6.2f} dB   {args.size // 8}px thumbnail {bar:6.2f} dB   ({ours - bar:+.2f})"
        )
    ours, bar = (float(np.mean([r[i] for r in rows])) for i in (1, 2))
    print(f"{'mean':22s} round trip {ours:6.2f} dB   {args.size // 8}px thumbnail {bar:6.2f} dB   ({ours - bar:+.2f})")


if __name__ == "__main__":
    main()
