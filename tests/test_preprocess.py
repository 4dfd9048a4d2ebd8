"""Preprocessing: each step on tiny hand-computed arrays, then the parallel cache writer on files."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from braintumor.core.config import PreprocessParams
from braintumor.data.head import head_bbox
from braintumor.preprocess.slices import (
    PreprocessError,
    apply_clahe,
    crop_to_head,
    pad_to_square,
    preprocess_file,
    preprocess_slice,
    preprocess_to_array,
    resize_square,
    unsharp_mask,
)


def _head_with_distractors() -> np.ndarray:
    """64x80: a head (rows 10..39, cols 20..59, grey 200) on faint noise (0..6), plus distractors."""
    gray = np.random.default_rng(0).integers(0, 7, (64, 80)).astype(np.uint8)
    gray[10:40, 20:60] = 200
    gray[56:58, 74:76] = 255  # a bright speck far away (a separate, smaller component)
    gray[3, 70] = 40  # a lone pixel above threshold; the 3x3 blur brings it to 40/4 = 10 <= 12
    return gray


def _mean_patch_std(gray: np.ndarray, patch: int = 8) -> float:
    h, w = gray.shape
    blocks = gray[: h // patch * patch, : w // patch * patch].astype(np.float64)
    blocks = blocks.reshape(h // patch, patch, w // patch, patch)
    return float(blocks.std(axis=(1, 3)).mean())


def _laplacian_variance(gray: np.ndarray) -> float:
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


# --------------------------------------------------------------------------- head box


def test_head_bbox_is_the_rectangle_grown_by_the_blur():
    # The 3x3 Gaussian ([1 2 1]/4 per axis) gives the pixel just outside each edge 200/4 = 50 > 12 and
    # the next one 0 + noise <= 6, so the box is the rectangle plus 1 px per side; the speck and the
    # lone pixel do not stretch it.
    assert head_bbox(_head_with_distractors(), 12) == (9, 41, 19, 61)


def test_head_bbox_prefers_enclosed_area_over_pixel_count():
    gray = np.zeros((60, 120), np.uint8)
    gray[10:13, 5:106] = 200  # a frame line: after the blur 5 x 103 = 515 px, enclosing 4 x 102 = 408
    gray[30:50, 30:50] = 200  # the head: after the blur 22 x 22 = 484 px, enclosing 21 x 21 = 441
    assert head_bbox(gray, 12) == (29, 51, 29, 51)


def test_head_bbox_without_foreground_is_the_whole_image():
    assert head_bbox(np.zeros((5, 7), np.uint8), 12) == (0, 5, 0, 7)
    assert head_bbox(np.full((5, 7), 12, np.uint8), 12) == (0, 5, 0, 7)  # "above", not "at"


def test_head_bbox_rejects_bad_threshold_and_image():
    with pytest.raises(ValueError, match="300"):
        head_bbox(np.zeros((4, 4), np.uint8), 300)
    with pytest.raises(ValueError, match=r"\(4, 4, 3\)"):
        head_bbox(np.zeros((4, 4, 3), np.uint8), 12)


def test_crop_to_head_returns_the_box():
    gray = _head_with_distractors()
    crop = crop_to_head(gray, 12)
    assert crop.shape == (32, 42) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, gray[9:41, 19:61])


# --------------------------------------------------------------------------- geometry


def test_pad_to_square_centres_with_black():
    wide = np.ones((2, 5), np.uint8)
    expected = np.zeros((5, 5), np.uint8)
    expected[1:3] = 1  # 3 rows of padding: 1 above, 2 below
    np.testing.assert_array_equal(pad_to_square(wide), expected)

    tall = np.full((4, 2), 9, np.uint8)
    padded = pad_to_square(tall)
    assert padded.shape == (4, 4) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:, 1:3], tall)
    assert padded[:, [0, 3]].max() == 0


def test_pad_to_square_keeps_a_square():
    square = np.arange(9, dtype=np.uint8).reshape(3, 3)
    assert pad_to_square(square) is square


@pytest.mark.parametrize("side", [100, 10])  # shrinking (area) and enlarging (cubic)
def test_resize_square_shape_dtype_and_flat_stays_flat(side):
    out = resize_square(np.full((side, side), 77, np.uint8), 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert (out == 77).all()


def test_resize_square_rejects_bad_size():
    with pytest.raises(ValueError, match="0"):
        resize_square(np.zeros((4, 4), np.uint8), 0)


# --------------------------------------------------------------------------- intensity


def test_clahe_raises_local_contrast_of_a_flat_looking_image():
    low_contrast = np.random.default_rng(1).integers(98, 103, (64, 64)).astype(np.uint8)
    out = apply_clahe(low_contrast, 2.0, 8)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert _mean_patch_std(out) > 2 * _mean_patch_std(low_contrast)


def test_clahe_clip_zero_is_identity_and_bad_values_are_named():
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert apply_clahe(gray, 0.0, 8) is gray
    with pytest.raises(ValueError, match="-1"):
        apply_clahe(gray, -1.0, 8)
    with pytest.raises(ValueError, match="tile_grid.*0"):
        apply_clahe(gray, 2.0, 0)


def test_unsharp_amount_zero_is_identity():
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert unsharp_mask(gray, 1.0, 0.0) is gray


def test_unsharp_leaves_flat_regions_and_clips_a_hard_step():
    flat = np.full((7, 7), 90, np.uint8)  # blur(flat) == flat, so img - blur == 0
    np.testing.assert_array_equal(unsharp_mask(flat, 1.0, 0.5), flat)
    # At a 0|255 step the overshoot is < 0 on the dark side and > 255 on the bright side: both clip back.
    step = np.zeros((7, 8), np.uint8)
    step[:, 4:] = 255
    out = unsharp_mask(step, 1.0, 0.5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, step)


def test_unsharp_sharpens_a_blurred_edge_by_the_formula():
    edge = np.zeros((32, 32), np.uint8)
    edge[:, 16:] = 160
    soft = cv2.GaussianBlur(edge, (0, 0), 2.0)
    out = unsharp_mask(soft, 1.0, 0.5)
    assert _laplacian_variance(out) > 1.1 * _laplacian_variance(soft)  # measured: 16.6 vs 14.1
    detail = soft.astype(np.float64) - cv2.GaussianBlur(soft, (0, 0), 1.0)
    expected = np.clip(np.rint(soft + 0.5 * detail), 0, 255)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1  # float32 vs float64 rounding


def test_unsharp_rejects_bad_values():
    gray = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="sigma.*0"):
        unsharp_mask(gray, 0.0, 0.5)
    with pytest.raises(ValueError, match="-0.5"):
        unsharp_mask(gray, 1.0, -0.5)


# --------------------------------------------------------------------------- the pipeline

SMALL = PreprocessParams(image_size=64)


def test_preprocess_slice_is_the_steps_in_order():
    gray = _head_with_distractors()
    out = preprocess_slice(gray, SMALL)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    step = pad_to_square(crop_to_head(gray, 12))
    step = unsharp_mask(apply_clahe(step, 2.0, 8), 1.0, 0.5)
    np.testing.assert_array_equal(out, resize_square(step, 64))
    np.testing.assert_array_equal(preprocess_slice(gray, SMALL), out)  # deterministic


def test_preprocess_slice_never_aliases_its_input():
    params = PreprocessParams(image_size=64, crop_to_head=False, clahe_clip_limit=0, sharpen_amount=0)
    gray = np.full((64, 64), 5, np.uint8)
    out = preprocess_slice(gray, params)
    np.testing.assert_array_equal(out, gray)
    assert not np.shares_memory(out, gray)


@pytest.mark.parametrize(
    "bad, named",
    [
        (np.zeros((8, 8, 3), np.uint8), r"\(8, 8, 3\)"),
        (np.zeros((8, 8)), "float64"),
        (np.zeros((0, 8), np.uint8), r"\(0, 8\)"),
    ],
)
def test_preprocess_slice_rejects_non_gray_input(bad, named):
    with pytest.raises(ValueError, match=named):
        preprocess_slice(bad, SMALL)


# --------------------------------------------------------------------------- the cache writer


def _write_slices(folder: Path, count: int = 20) -> list[Path]:
    """Synthetic slices: a noisy ellipse on black, sizes 60..117 px, PNG and JPEG, some in colour."""
    rng = np.random.default_rng(2)
    paths = []
    for i in range(count):
        h, w = 60 + 3 * i, 117 - 2 * i
        gray = rng.integers(0, 8, (h, w)).astype(np.uint8)
        cv2.ellipse(gray, (w // 2, h // 2), (w // 3, h // 3), 0, 0, 360, int(rng.integers(60, 200)), -1)
        texture = gray[h // 3 : h // 2, w // 3 : w // 2]
        texture += rng.integers(0, 50, texture.shape).astype(np.uint8)
        image = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) if i % 3 == 0 else gray
        path = folder / f"slice_{i:02d}.{'png' if i % 2 else 'jpg'}"
        assert cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


@pytest.fixture()
def slices(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return _write_slices(folder)


def test_parallel_cache_equals_serial_and_per_file(slices, tmp_path):
    threads = cv2.getNumThreads()
    serial = preprocess_to_array(slices, SMALL, tmp_path / "out" / "serial.npy", workers=1)
    assert cv2.getNumThreads() == threads  # the serial run restores OpenCV's setting
    parallel = preprocess_to_array(slices, SMALL, tmp_path / "out" / "parallel.npy", workers=2)
    assert serial["images"] == parallel["images"] == 20
    assert (serial["workers"], parallel["workers"]) == (1, 2)
    assert parallel["images_per_second"] > 0 and parallel["seconds"] > 0

    a = np.load(tmp_path / "out" / "serial.npy", mmap_mode="r")
    b = np.load(tmp_path / "out" / "parallel.npy", mmap_mode="r")
    assert isinstance(b, np.memmap) and b.shape == (20, 64, 64) and b.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    for i in (0, 7, 19):
        np.testing.assert_array_equal(b[i], preprocess_file(slices[i], SMALL))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["parallel.npy", "serial.npy"]


def test_workers_zero_means_one_per_core_capped_by_images(slices, tmp_path):
    stats = preprocess_to_array(slices[:1], SMALL, tmp_path / "one.npy", workers=0)
    assert stats["workers"] == 1 and np.load(tmp_path / "one.npy").shape == (1, 64, 64)
    with pytest.raises(ValueError, match="-1"):
        preprocess_to_array(slices, SMALL, tmp_path / "bad.npy", workers=-1)


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_file_is_named_and_leaves_no_output(slices, tmp_path, workers):
    bad = slices[13].with_name("corrupt.jpg")
    bad.write_bytes(b"this is not an image")
    paths = slices[:13] + [bad] + slices[14:]
    out = tmp_path / "out" / "cache.npy"
    out.parent.mkdir()
    out.write_bytes(b"stale output of an earlier run")
    with pytest.raises(PreprocessError, match="corrupt.jpg") as info:
        preprocess_to_array(paths, SMALL, out, workers=workers)
    assert info.value.path == str(bad) and "not_an_image" in str(info.value)
    assert list(out.parent.iterdir()) == []  # neither the stale file nor a temporary one


def test_preprocess_error_survives_pickling():
    error = pickle.loads(pickle.dumps(PreprocessError("/data/x.jpg", "truncated")))
    assert error.path == "/data/x.jpg" and str(error) == "cannot preprocess /data/x.jpg: truncated"


def test_parallel_workers_after_opencv_threads_ran_in_the_parent(tmp_path):
    # The phantom generator runs OpenCV on threads; forking workers afterwards must not deadlock.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: cv2.GaussianBlur(np.full((256, 256), i, np.uint8), (0, 0), 3), range(20)))
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), np.full((40, 40), 30 * i, np.uint8))
    stats = preprocess_to_array(paths, PreprocessParams(image_size=32), tmp_path / "out.npy", workers=2)
    assert stats["images"] == 8


def test_head_box_includes_a_scalp_ring_separated_from_the_brain():
    image = np.zeros((100, 100), np.uint8)
    cv2.circle(image, (50, 50), 40, 200, 3)  # scalp ring
    cv2.circle(image, (50, 50), 30, 120, -1)  # brain, apart from the ring by a dark CSF gap
    cv2.putText(image, "L", (2, 98), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1)  # a burnt-in label
    y0, y1, x0, x1 = head_bbox(image, 12)
    assert (y0, y1, x0, x1) == pytest.approx((8, 93, 8, 93), abs=1)  # the ring, not the brain (20..81)
