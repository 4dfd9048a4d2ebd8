"""Where the head is in a slice: the one box the data stages (dedup thumbnails, the phantom's copies)
and preprocessing (the crop) share. It lives here, apart from preprocessing, so that editing CLAHE or
sharpening does not make DVC rerun the download and merge stages.
"""

from __future__ import annotations

import cv2
import numpy as np

from braintumor.core.imageio import require_gray


def head_bbox(gray: np.ndarray, threshold: int) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1), end-exclusive, of the head in a slice.

    The head is the foreground region (pixels above ``threshold`` after a 3x3 Gaussian blur) whose
    outer contour encloses the largest area. Enclosed area rather than pixel count, because where dark
    CSF and bone separate the scalp ring from the brain, the ring is a region of its own and the brain
    alone would otherwise be taken for the head; JPEG noise, burnt-in text labels, specks and the
    broken frame lines some scanners draw enclose little and do not enlarge the box. ~0.09 ms at 224 px.

    Args:
        gray: uint8 (H, W) slice.
        threshold: grey level (0..255); pixels strictly above it after the blur are foreground.

    Returns:
        (y0, y1, x0, x1); the whole image (0, H, 0, W) if no pixel exceeds ``threshold``.
    """
    require_gray(gray)
    if not 0 <= threshold <= 255:
        raise ValueError(f"threshold must be in 0..255, got {threshold}")
    _, mask = cv2.threshold(cv2.GaussianBlur(gray, (3, 3), 0), threshold, 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0, gray.shape[0], 0, gray.shape[1]
    # A one-pixel region has zero contour area; ties then go to the region with more outline points.
    head = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    x, y, w, h = cv2.boundingRect(head)
    return y, y + h, x, x + w
