"""Test-time augmentation views (braintumor.model.tta): what each mode shows the model, in NumPy and in a graph."""
from __future__ import annotations

import typing

import keras
import numpy as np
import pytest

from braintumor.core.config import EvaluateParams
from braintumor.model.tta import TTA_MODES, mean_of_views, shift_pixels, tta_views


def _slices(count: int = 2, size: int = 9) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 256, (count, size, size), dtype=np.uint8)  # no black pixel inside


def test_views_are_the_slice_its_mirror_image_and_both_moved_with_black_filling_in():
    images = _slices(size=45)  # moved round(45 * 10 / 224) = 2 px
    assert shift_pixels(45) == 2 and shift_pixels(224) == 10 and shift_pixels(8) == 1
    none, flip, moved = (tta_views(images, mode) for mode in TTA_MODES)
    assert len(none) == 1 and none[0] is images
    assert len(flip) == 2 and np.array_equal(flip[1], images[:, :, ::-1])
    assert len(moved) == 10
    for base, views in ((images, moved[:5]), (images[:, :, ::-1], moved[5:])):
        assert np.array_equal(views[0], base)
        right, left, down, up = views[1:]
        assert np.array_equal(right[:, :, 2:], base[:, :, :-2]) and not right[:, :, :2].any()
        assert np.array_equal(left[:, :, :-2], base[:, :, 2:]) and not left[:, :, -2:].any()
        assert np.array_equal(down[:, 2:], base[:, :-2]) and not down[:, :2].any()
        assert np.array_equal(up[:, :-2], base[:, 2:]) and not up[:, -2:].any()
        assert all(v.dtype == np.uint8 and v.shape == images.shape for v in views)


def test_a_model_makes_the_same_views_as_numpy():
    images = _slices(size=45)[..., None].astype("float32")
    source = keras.Input((45, 45, 1))
    views = keras.Model(source, tta_views(source, "flip_shift"))
    for graph, array in zip(views.predict(images, verbose=0), tta_views(images, "flip_shift")):
        np.testing.assert_array_equal(graph, array)


def test_unknown_modes_are_named_and_the_config_allows_exactly_the_modes():
    with pytest.raises(ValueError, match=r"tta must be one of \['none', 'flip', 'flip_shift'\], got 'rotate'"):
        tta_views(_slices(), "rotate")
    assert typing.get_args(EvaluateParams.model_fields["tta"].annotation) == TTA_MODES


def test_mean_of_views_averages_in_float64_and_refuses_mismatched_views():
    p = np.array([[0.7, 0.3], [0.2, 0.8]], np.float32)
    q = np.array([[0.1, 0.9], [0.6, 0.4]], np.float32)
    mean = mean_of_views([p, q])
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, [[0.4, 0.6], [0.4, 0.6]], rtol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        mean_of_views([p, q[:1]])
