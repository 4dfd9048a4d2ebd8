"""Test-time augmentation (``evaluate.tta``): the views of a slice whose softmax outputs are averaged.

One definition for every place that predicts: the evaluate stage (inside the Keras graph), the exported
models, the app and batch prediction, so that the probabilities the temperature was fitted on are the ones
a user gets.

- ``none``: the slice alone.
- ``flip``: the slice and its left-right mirror image.
- ``flip_shift``: those two, each as it is and moved by :data:`SHIFT_SHARE` of the side left, right, up
  and down (10 views). The moves stay inside training's own (``augment.shift`` 0.1); what moves in is
  black, like the background around the cropped head.

The first view is always the slice itself: Grad-CAM and the feature check read that one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

TTA_MODES = ("none", "flip", "flip_shift")
TTA_DESCRIPTIONS = {  # what the app's model card says about how it predicts
    "none": "the slice alone",
    "flip": "mean of the slice's and its mirror image's probabilities (flip test-time augmentation)",
    "flip_shift": "mean of the probabilities of the slice and its mirror image, each as it is and moved left, "
                  "right, up and down (10 views of test-time augmentation)",
}

# 10 px at 224 px. Chosen on nickparvar-224's validation split among 4-view rotations (8 degrees), zooms
# (0.93, 1.08) and shifts (README, "The current split").
SHIFT_SHARE = 10 / 224


def check_tta_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`TTA_MODES`, else ValueError naming them."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {list(TTA_MODES)}, got {mode!r}")
    return mode


def shift_pixels(size: int) -> int:
    """How far ``flip_shift`` moves a slice of ``size`` pixels: :data:`SHIFT_SHARE` of it, at least 1."""
    return max(1, round(size * SHIFT_SHARE))


def _shifted(images: Any, axis: int, step: int) -> Any:
    """``images`` moved ``step`` pixels along ``axis`` (positive: towards higher indices), black filling in."""
    if step == 0:
        return images
    size = int(images.shape[axis])
    keep = np.ones(size)
    if step > 0:
        keep[:step] = 0
    else:
        keep[step:] = 0
    shape = [1] * len(images.shape)
    shape[axis] = size
    keep = keep.reshape(shape)
    if isinstance(images, np.ndarray):
        return np.roll(images, step, axis=axis) * keep.astype(images.dtype)
    import keras  # only for tensors inside a model: the app and config import this module without it

    return keras.ops.roll(images, step, axis=axis) * keras.ops.cast(keep, images.dtype)


def tta_views(images: Any, mode: str) -> list[Any]:
    """The views of a batch of slices, (N, S, S) or (N, S, S, 1): NumPy arrays in, NumPy arrays out; a Keras
    tensor in (inside a model), Keras tensors out. The first view is ``images`` itself."""
    check_tta_mode(mode)
    if mode == "none":
        return [images]
    if isinstance(images, np.ndarray):
        mirrored = np.flip(images, axis=2)
    else:
        import keras

        mirrored = keras.ops.flip(images, axis=2)
    if mode == "flip":
        return [images, mirrored]
    step = shift_pixels(int(images.shape[2]))
    moves = [(1, 0), (2, step), (2, -step), (1, step), (1, -step)]  # (axis, pixels): as it is, right, left, down, up
    return [_shifted(view, axis, pixels) for view in (images, mirrored) for axis, pixels in moves]


def mean_of_views(probabilities: list[np.ndarray]) -> np.ndarray:
    """The averaged softmax: the mean over views of (N, k) probabilities, computed in float64."""
    shapes = {np.shape(p) for p in probabilities}
    if len(shapes) != 1:
        raise ValueError(f"mean_of_views: the views' probabilities differ in shape: {sorted(shapes)}")
    dtype = np.asarray(probabilities[0]).dtype
    return np.mean(np.stack([np.asarray(p, np.float64) for p in probabilities]), axis=0).astype(dtype)
