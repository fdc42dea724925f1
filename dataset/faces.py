"""Face detection with the Haar cascade that ships inside opencv-python 4.x.

No model is downloaded: ``cv2.data.haarcascades`` holds the XML. OpenCV 5 dropped both the
cascade files and ``cv2.CascadeClassifier``; ``haar_face_detector`` then returns the reason
instead of a detector and the crop falls back to saliency with that reason in its notes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FaceBox = tuple[int, int, int, int]  # x, y, w, h in image pixels
FaceDetector = Callable[[np.ndarray], list[FaceBox]]

CASCADE = "haarcascade_frontalface_default.xml"
# Detect on a copy whose long side is at most this: faces smaller than ~3% of the long side are
# not training subjects, and the cascade's cost grows with the pixel count.
DETECT_SIDE = 800


@lru_cache(maxsize=1)
def haar_face_detector() -> tuple[FaceDetector | None, str]:
    """(detector, "") when OpenCV's frontal-face cascade is usable, else (None, why not)."""
    try:
        import cv2
    except ImportError as err:
        return None, f"OpenCV is not installed ({err}); install opencv-python>=4.8,<5"
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        return None, f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 removed them); install opencv-python<5"
    path = Path(cv2.data.haarcascades) / CASCADE
    if not path.is_file():
        return None, f"{path} is missing from the OpenCV package; reinstall opencv-python<5"
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        return None, f"{path} could not be loaded by OpenCV"

    def detect(rgb: np.ndarray) -> list[FaceBox]:
        h, w = rgb.shape[:2]
        scale = min(1.0, DETECT_SIDE / max(h, w))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        return [
            (round(x / scale), round(y / scale), round(fw / scale), round(fh / scale))
            for x, y, fw, fh in (found if len(found) else [])
        ]

    return detect, ""
