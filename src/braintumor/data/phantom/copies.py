"""The phantom's planted copies: the duplicate kinds recorded in ``planted.json``, made from an original's pixels.

Planted copies are made from the decoded original file, as a real re-upload would be, and their
masks go through exactly the same geometric transform (nearest-neighbour, so they stay 0/255).
The kinds are the fields of :class:`PhantomDuplicates` (``exact``, ``resized``, ``reencoded``,
``grayscale_rgb``, ``cropped``, ``padded``, ``rotated``, ``flipped``, ``rescaled``,
``conflicting_label``, ``augmented``, ``annotated``), except ``adjacent_slice``: not a copy but the
neighbouring slice of the same head, rendered again by :func:`braintumor.data.phantom.source.render_copy`.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from braintumor.core.config import PhantomDuplicates
from braintumor.core.imageio import to_grayscale
from braintumor.data.head import head_bbox
from braintumor.data.phantom.anatomy import uniform

DUPLICATE_KINDS: tuple[str, ...] = tuple(PhantomDuplicates.model_fields)

# Grey level (after a light blur) below which a pixel is background, when a copy needs the head box.
_HEAD_THRESHOLD = 12  # the default of preprocess.head_threshold


def head_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """The head's bounding box (y0, y1, x0, x1), as the pipeline finds it (:func:`head_bbox`)."""
    return head_bbox(to_grayscale(image), _HEAD_THRESHOLD)


def _warp_both(image: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply one affine ``matrix`` (2, 3) to image and mask on the same canvas; the mask stays 0/255."""
    height, width = mask.shape
    warped = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    return warped, cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST, borderValue=0)


def _resize_both(image: np.ndarray, mask: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    shrinking = width * height < mask.shape[0] * mask.shape[1]
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    return resized, cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def _centre(shape: tuple[int, ...]) -> tuple[float, float]:
    """(x, y) of the centre of an image of ``shape`` (H, W, ...), as OpenCV's warps expect it."""
    return (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0


def _copy_pixels(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # exact, reencoded and conflicting_label keep the pixels; only the file (or its folder) changes.
    return image, mask


def _copy_resized(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    side = mask.shape[0]
    # 512/224/384/192 for 256 px originals: the sizes the public re-uploads use.
    choices = sorted({max(32, round(side * f)) for f in (2.0, 0.875, 1.5, 0.75)} - {side})
    new_side = int(rng.choice(choices))
    return _resize_both(image, mask, new_side, new_side)


def _copy_grayscale_rgb(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), mask
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), mask


def _copy_cropped(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y0, y1, x0, x1 = head_box(image)
    cropped, cropped_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if rng.random() < 0.5:  # re-uploads often stretch the crop back to a square
        return _resize_both(cropped, cropped_mask, mask.shape[1], mask.shape[0])
    return np.ascontiguousarray(cropped), np.ascontiguousarray(cropped_mask)


def _copy_padded(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    height, width = mask.shape
    top, bottom = (round(f * height) for f in rng.uniform(0.1, 0.25, size=2))
    left, right = (round(f * width) for f in rng.uniform(0.1, 0.25, size=2))
    padded = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    padded_mask = cv2.copyMakeBorder(mask, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    return _resize_both(padded, padded_mask, width, height)


def _copy_rotated(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    angle = uniform(rng, 2.0, 7.0) * float(rng.choice([-1.0, 1.0]))
    # Heads stay within 0.47 of the frame from its centre (sample_head), so nothing is cut off.
    return _warp_both(image, mask, cv2.getRotationMatrix2D(_centre(mask.shape), angle, 1.0))


def _copy_flipped(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return cv2.flip(image, 1), cv2.flip(mask, 1)


def _largest_zoom_keeping_head(image: np.ndarray) -> float:
    """The largest zoom about the image centre that keeps the head's bounding box inside the frame."""
    y0, y1, x0, x1 = head_box(image)
    cx, cy = _centre(image.shape)
    # Each box side may move out to the frame edge: zoom <= (centre to frame edge) / (centre to box side).
    reach = [cx - x0, x1 - 1 - cx, cy - y0, y1 - 1 - cy]
    room = [cx, cx, cy, cy]
    return min(r / max(d, 1e-6) for r, d in zip(room, reach))


def _copy_rescaled(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    zoom_in_limit = min(1.08, _largest_zoom_keeping_head(image))
    if rng.random() < 0.5 and zoom_in_limit >= 1.03:
        zoom = uniform(rng, 1.03, zoom_in_limit)
    else:
        zoom = uniform(rng, 0.85, 0.95)
    return _warp_both(image, mask, cv2.getRotationMatrix2D(_centre(mask.shape), 0.0, zoom))


_FILLS = {"constant": cv2.BORDER_CONSTANT, "nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101}


def _copy_augmented(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """What "augmented" re-uploads hold (Keras's ImageDataGenerator and the like, saved to disk): one random
    affine (rotation up to +-20 degrees, zoom 0.8-1.25, which cuts off up to a fifth of the head, shift up
    to 15%, optional mirror) with constant, nearest or reflect fill, then brightness and contrast +-25%
    and gamma 0.7-1.4. The JPEG quality (30-95) comes from :func:`copy_file_format`."""
    height, width = mask.shape
    matrix = cv2.getRotationMatrix2D(_centre(mask.shape), uniform(rng, -20.0, 20.0), uniform(rng, 0.8, 1.25))
    matrix[:, 2] += rng.uniform(-0.15, 0.15, size=2) * (width, height)
    if rng.random() < 0.5:  # mirror: x -> width - 1 - x, composed after the affine
        matrix = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0.0, 0.0, 1.0]])
    fill = _FILLS[str(rng.choice(list(_FILLS)))]
    warped = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=fill, borderValue=0)
    warped_mask = cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST, borderMode=fill, borderValue=0)
    values = warped.astype(np.float32) / 255.0
    values = (values - 0.5) * uniform(rng, 0.75, 1.25) + 0.5 + uniform(rng, -0.25, 0.25)
    values = np.clip(values, 0.0, 1.0) ** uniform(rng, 0.7, 1.4)
    return np.round(values * 255.0).astype(np.uint8), warped_mask


def _copy_annotated(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Burnt-in marks over up to about 10% of the slice, in greys (coloured marks would make it a colour
    photograph to the merge): text, an arrow, a rectangle, a scale bar or a watermark, one to three of them."""
    out = image.copy()
    height, width = mask.shape
    side = min(height, width)
    for mark in rng.choice(["text", "arrow", "rectangle", "scale_bar", "watermark"], size=int(rng.integers(1, 4)), replace=False):
        grey = int(rng.integers(180, 256))
        colour = (grey, grey, grey) if out.ndim == 3 else grey
        x, y = (int(v) for v in rng.integers(0, side // 2, size=2))
        if mark == "text":
            text = str(rng.choice(["L", "R", "T1 C+", "AX", "SE 4 IM 12", "Case 17"]))
            cv2.putText(out, text, (x, y + side // 12), cv2.FONT_HERSHEY_SIMPLEX, side / 400, colour, max(1, side // 200))
        elif mark == "arrow":
            cv2.arrowedLine(out, (x, y), (x + side // 6, y + side // 6), colour, max(1, side // 150), tipLength=0.3)
        elif mark == "rectangle":
            cv2.rectangle(out, (x, y), (x + side // 5, y + side // 5), colour, max(1, side // 200))
        elif mark == "scale_bar":
            cv2.line(out, (side // 20, height - side // 20), (side // 20 + side // 5, height - side // 20), colour, max(2, side // 100))
        else:  # a faint watermark across the middle
            overlay = out.copy()
            cv2.putText(overlay, "SAMPLE", (side // 8, height // 2), cv2.FONT_HERSHEY_SIMPLEX, side / 160, colour, max(1, side // 60))
            out = cv2.addWeighted(overlay, 0.25, out, 0.75, 0)
    return out, mask


_CopyMaker = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
COPY_MAKERS: dict[str, _CopyMaker] = {
    "exact": _copy_pixels,
    "resized": _copy_resized,
    "reencoded": _copy_pixels,
    "grayscale_rgb": _copy_grayscale_rgb,
    "cropped": _copy_cropped,
    "padded": _copy_padded,
    "rotated": _copy_rotated,
    "flipped": _copy_flipped,
    "rescaled": _copy_rescaled,
    "conflicting_label": _copy_pixels,
    "augmented": _copy_augmented,
    "annotated": _copy_annotated,
}


def make_copy(
    kind: str, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a planted copy of ``kind`` and its mask, transformed identically.

    Args:
        kind: a :class:`PhantomDuplicates` field name.
        image: the decoded original, uint8 (H, W) or (H, W, 3).
        mask: its tumor mask, uint8 (H, W), 0/255.
        rng: the copy's generator.
    """
    if kind not in COPY_MAKERS:
        raise ValueError(f"unknown duplicate kind {kind!r}; allowed: {list(COPY_MAKERS)}")
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in size")
    return COPY_MAKERS[kind](image, mask, rng)


def copy_file_format(kind: str, rng: np.random.Generator) -> tuple[str, int]:
    """(file format, JPEG quality) of a planted copy of ``kind``."""
    if kind == "exact":
        return "same", 0
    if kind == "reencoded":
        return ("png", 0) if rng.random() < 0.3 else ("jpg", int(rng.integers(60, 86)))
    if kind == "conflicting_label":
        return ("same", 0) if rng.random() < 0.5 else ("jpg", int(rng.integers(60, 86)))
    if kind == "augmented":
        return "jpg", int(rng.integers(30, 96))
    return "jpg", int(rng.integers(80, 96))
