"""Spectral-residual saliency in numpy (Hou & Zhang, "Saliency Detection: A Spectral Residual
Approach", CVPR 2007) and the crop window that holds the most of it.

OpenCV's implementation lives in the contrib ``saliency`` module, which the plain
``opencv-python`` wheels (and OpenCV 5) do not ship, so it is a few lines of FFT here instead.
The idea: the log amplitude spectrum of natural images is smooth; what sticks out of its local
average (the "spectral residual") corresponds to the unexpected, salient parts of the picture.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Hou & Zhang work at 64 px; a little more keeps small objects in 1024-px photos visible.
MAP_SIDE = 96


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean, edges repeated."""
    import cv2

    return cv2.blur(a, (3, 3), borderType=cv2.BORDER_REPLICATE)


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a kernel of radius 3 sigma, edges mirrored."""
    import cv2

    size = 2 * max(1, int(3 * sigma)) + 1
    return cv2.GaussianBlur(a, (size, size), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def saliency_map(image: Image.Image, side: int = MAP_SIDE) -> np.ndarray:
    """A saliency map of ``image`` with its long side ``side`` px, float64 in [0, 1], same aspect."""
    w, h = image.size
    scale = side / max(w, h)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    gray = np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    spectrum = np.fft.fft2(gray)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amp - _box3(log_amp)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = _gaussian(sal, sigma=max(1.0, side / 40))
    lo, hi = sal.min(), sal.max()
    return (sal - lo) / (hi - lo) if hi > lo else np.zeros_like(sal)


def best_window(sal: np.ndarray, win_w: float, win_h: float) -> tuple[float, float, float]:
    """The top-left (x, y), in map pixels, of the ``win_w`` x ``win_h`` window with the largest
    saliency sum, and the share of the map's total saliency it holds. Windows are evaluated at
    every integer offset with a summed-area table; ties go to the window nearest the centre."""
    mh, mw = sal.shape
    ww, wh = min(mw, max(1, round(win_w))), min(mh, max(1, round(win_h)))
    sat = np.zeros((mh + 1, mw + 1))
    sat[1:, 1:] = sal.cumsum(0).cumsum(1)
    sums = sat[wh:, ww:] - sat[:-wh, ww:] - sat[wh:, :-ww] + sat[:-wh, :-ww]
    ys, xs = np.mgrid[0 : sums.shape[0], 0 : sums.shape[1]]
    centre_dist = (xs - (mw - ww) / 2) ** 2 + (ys - (mh - wh) / 2) ** 2
    best = np.lexsort((centre_dist.ravel(), -np.round(sums.ravel(), 9)))[0]
    y, x = divmod(int(best), sums.shape[1])
    total = sal.sum()
    return float(x), float(y), float(sums[y, x] / total) if total > 0 else 0.0
