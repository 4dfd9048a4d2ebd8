"""The out-of-distribution rule: its statistics on hand-made arrays, its verdicts on MRI-like and non-MRI
images with the committed thresholds, and its false-alarm rate on the shared real MRI slices."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from braintumor.core.config import CLASS_NAMES, load_params
from braintumor.serve.ood import OodLimits, assess, confidence_flag, flat_share, head_share, image_flags, image_stats
from braintumor.data.phantom.source import render_slice
from braintumor.serve.uploads import decode_upload
from conftest import REPO, shared_dataset

PARAMS = load_params(REPO / "params.yaml")
LIMITS = OodLimits(PARAMS.merge.max_colour_share, PARAMS.app.ood.min_contrast, PARAMS.app.ood.max_flat_share,
                   PARAMS.app.ood.min_head_share)
HEAD_THRESHOLD = PARAMS.preprocess.head_threshold


def checks(gray: np.ndarray, colour_share: float = 0.0) -> set[str]:
    return {flag.check for flag in image_flags(image_stats(gray, colour_share, HEAD_THRESHOLD), LIMITS)}


def text_image(white_on_black: bool, scale: float = 1.0, thickness: int = 2) -> np.ndarray:
    background, ink = (0, 255) if white_on_black else (255, 0)
    image = np.full((400, 600), background, np.uint8)
    for row, line in enumerate(["Radiology report", "No acute findings.", "Impression: normal", "Signed: Dr X"]):
        cv2.putText(image, line, (20, 70 + row * 80), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thickness, cv2.LINE_AA)
    return image


# --------------------------------------------------------------------------- statistics, by hand


def test_flat_share_counts_the_mode_plus_minus_two_levels():
    gray = np.array([[100, 101, 102, 103, 200, 0]], np.uint8)
    foreground = gray > 12  # five pixels; the mode is 100 (ties go to the lowest), 100..102 are within 2
    assert flat_share(gray, foreground) == pytest.approx(3 / 5)
    assert flat_share(gray, np.zeros_like(foreground)) == 0.0


def test_head_share_is_the_largest_regions_part_of_the_foreground():
    foreground = np.zeros((20, 20), bool)
    foreground[2:12, 2:12] = True  # 100 pixels
    foreground[15:17, 15:19] = True  # 8 pixels, a separate region
    assert head_share(foreground) == pytest.approx(100 / 108)
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[5:15, 5:15] = False  # a hole inside the outer contour still belongs to the head
    ring[9:11, 9:11] = True
    assert head_share(ring) == 1.0
    assert head_share(np.zeros((5, 5), bool)) == 0.0


def test_image_stats_contrast_is_the_grey_standard_deviation():
    gray = np.array([[0, 255], [0, 255]], np.uint8)
    assert image_stats(gray, 0.25, HEAD_THRESHOLD).contrast == pytest.approx(127.5)
    assert image_stats(gray, 0.25, HEAD_THRESHOLD).colour_share == 0.25
    with pytest.raises(ValueError, match="uint8"):
        image_stats(gray.astype(np.float32), 0.0, HEAD_THRESHOLD)


# --------------------------------------------------------------------------- verdicts, committed limits


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_phantom_slices_pass(label):
    for seed in range(3):
        image, _ = render_slice(np.random.default_rng([7, seed]), label, 256)
        assert checks(image) == set(), (label, seed, image_stats(image, 0.0, HEAD_THRESHOLD))


def test_colour_photo_is_flagged():
    rng = np.random.default_rng(0)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (9, 9), 0)
    decoded = decode_upload(cv2.imencode(".jpg", photo)[1].tobytes(), 2**20, 10**6)
    assert "colour_photo" in checks(decoded.gray, decoded.colour_share)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_and_constant_images_are_flagged(value):
    gray = np.full((100, 100), value, np.uint8)
    gray[50, 50] = value ^ 1  # not perfectly constant: one pixel off by one
    assert checks(gray) == {"near_constant"}


@pytest.mark.parametrize("scale, thickness", [(1.0, 2), (2.0, 5)])
def test_black_text_on_white_is_flagged_as_flat(scale, thickness):
    gray = text_image(white_on_black=False, scale=scale, thickness=thickness)
    jpeg = cv2.imdecode(cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 75])[1], cv2.IMREAD_GRAYSCALE)
    assert "flat_regions" in checks(gray) and "flat_regions" in checks(jpeg)


@pytest.mark.parametrize("scale, thickness", [(1.0, 2), (2.0, 5), (3.0, 12)])
def test_white_text_on_black_is_flagged_as_no_head(scale, thickness):
    assert "no_head" in checks(text_image(white_on_black=True, scale=scale, thickness=thickness))


def test_messages_name_the_measured_value_and_the_limit():
    flags = image_flags(image_stats(np.zeros((10, 10), np.uint8), 0.5, HEAD_THRESHOLD), LIMITS)
    colour = next(f for f in flags if f.check == "colour_photo")
    assert "50%" in colour.message and "6%" in colour.message


# --------------------------------------------------------------------------- the model check


def test_confidence_below_the_validation_quantile_is_flagged():
    assert confidence_flag(0.50, 0.41, "0.01") is None
    assert confidence_flag(0.41, 0.41, "0.01") is None
    flag = confidence_flag(0.40, 0.41, "0.01")
    assert flag.check == "low_confidence" and "0.40" in flag.message and "1%" in flag.message


def test_assess_combines_image_and_model_checks():
    image, _ = render_slice(np.random.default_rng(1), "glioma", 128)
    stats = image_stats(image, 0.0, HEAD_THRESHOLD)
    confident = assess(stats, LIMITS, 0.9, 0.5, "0.01")
    assert confident.in_distribution and confident.confidence_checked
    unsure = assess(stats, LIMITS, 0.3, 0.5, "0.01")
    assert not unsure.in_distribution and unsure.looks_like_mri
    assert [f.check for f in unsure.flags] == ["low_confidence"]
    unchecked = assess(stats, LIMITS, 0.3, None, "0.01")
    assert unchecked.in_distribution and not unchecked.confidence_checked
    blank = assess(image_stats(np.zeros((50, 50), np.uint8), 0.0, HEAD_THRESHOLD), LIMITS, 0.99, 0.5, "0.01")
    assert not blank.looks_like_mri and not blank.in_distribution


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_mri_slices_pass_and_food_photos_are_flagged():
    mri = sorted(shared_dataset("nickparvar-224").rglob("*.jpg"))[::14]  # ~500 of the 7,023 (all pass too), every class
    food = sorted(p for p in shared_dataset("sartaj-sample").rglob("*") if p.is_file())[::3]
    flagged_mri = []
    for path in mri:
        decoded = decode_upload(path.read_bytes(), 20 * 2**20, 50_000_000)
        if found := checks(decoded.gray, decoded.colour_share):
            flagged_mri.append((path.name, found))
    assert len(mri) > 450 and flagged_mri == []
    for path in food:
        decoded = decode_upload(path.read_bytes(), 20 * 2**20, 50_000_000)
        assert "colour_photo" in checks(decoded.gray, decoded.colour_share), path.name
