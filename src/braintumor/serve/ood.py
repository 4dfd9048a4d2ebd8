"""The app's out-of-distribution rule: is an upload a brain MRI slice the model may label?

A classifier labels anything it is given, a photograph of a cat included, often with high confidence.
The app therefore labels an upload only if it passes every check below; otherwise it says which check
failed and gives no label.

Image checks, on the decoded grey slice before preprocessing ("foreground": pixels brighter than the
model's ``preprocess.head_threshold`` after a 3x3 blur, as the preprocessing's head search sees them):

* ``colour_photo``: more coloured pixels than ``max_colour_share`` (the merge stage's rule: MRI slices
  are grey; coloured watermarks touch under 5% of the pixels of the 7,023 Nickparvar images).
* ``near_constant``: grey-level standard deviation below ``min_contrast`` (blank, black, white, flat
  images; Nickparvar's lowest is 20.7).
* ``flat_regions``: the foreground is mostly one grey level (the most common level +-2 holds more
  than ``max_flat_share`` of it): a page of text, a chart, a screenshot. Tissue is textured:
  Nickparvar's highest share is 0.58; black text on white is >= 0.85.
* ``no_head``: the largest foreground region (outer contour, filled) holds less than
  ``min_head_share`` of the foreground: scattered bright marks, such as white text on black, rather
  than one head. Nickparvar's lowest share is 0.83; rendered text is <= 0.15.

Model checks, after the (temperature-calibrated) prediction:

* ``unlike_training``: the image's features (the backbone's stride-16 stage, averaged over space)
  are farther from every class of the training split (Mahalanobis distance) than the threshold set
  on the validation split (``models/ood.npz``, written by the evaluate stage; see
  :mod:`braintumor.evaluate.feature_check`). This is what catches a real MRI slice shown to a model
  trained on phantoms, or another modality, view or scanner the model never saw.
* ``low_confidence``: the top calibrated probability is below a quantile of the top probabilities of
  the validation split (``models/calibration.json``, written by the evaluate stage): the model is less
  sure than on, say, 99% of real validation slices.

What the image checks do not catch (a grey, textured, head-like image that is not a brain MRI: a grey
photograph of a fruit, a CT slice) is left to the model checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

IMAGE_CHECKS = ("colour_photo", "near_constant", "flat_regions", "no_head")
MODEL_CHECKS = ("unlike_training", "low_confidence")
CHECKS = IMAGE_CHECKS + MODEL_CHECKS


@dataclass(frozen=True)
class ImageStats:
    """What the image checks look at (see the module docstring)."""

    colour_share: float  # share of coloured pixels, 0..1
    contrast: float  # grey-level standard deviation, 0..127.5
    flat_share: float  # share of the foreground within +-2 grey levels of its most common level, 0..1
    head_share: float  # share of the foreground inside its largest region, 0..1


@dataclass(frozen=True)
class OodLimits:
    """Thresholds of the rule: ``app.ood`` in params.yaml plus ``merge.max_colour_share``."""

    max_colour_share: float
    min_contrast: float
    max_flat_share: float
    min_head_share: float


@dataclass(frozen=True)
class Flag:
    check: str  # one of CHECKS
    message: str  # for the user


@dataclass(frozen=True)
class Verdict:
    """The rule's outcome for one upload.

    Attributes:
        flags: every failed check, image checks first.
        confidence_checked: False when no validation quantile was available (no calibration file).
        features_checked: False when the model has no feature check (no ``models/ood.npz`` entry).
    """

    flags: tuple[Flag, ...]
    confidence_checked: bool
    features_checked: bool = False

    @property
    def in_distribution(self) -> bool:
        return not self.flags

    @property
    def looks_like_mri(self) -> bool:
        """Whether the image checks passed (a model check may still have failed)."""
        return not any(flag.check in IMAGE_CHECKS for flag in self.flags)

    @property
    def unlike_training(self) -> bool:
        return any(flag.check == "unlike_training" for flag in self.flags)


def _foreground(gray: np.ndarray, head_threshold: int) -> np.ndarray:
    """Boolean (H, W): pixels above ``head_threshold`` after a 3x3 Gaussian blur, as the head search sees them."""
    return cv2.GaussianBlur(gray, (3, 3), 0) > head_threshold


def flat_share(gray: np.ndarray, foreground: np.ndarray) -> float:
    """Share of the foreground pixels within +-2 grey levels of the foreground's most common level (0 if none)."""
    values = gray[foreground]
    if values.size == 0:
        return 0.0
    histogram = np.bincount(values, minlength=256)
    mode = int(histogram.argmax())
    return float(histogram[max(0, mode - 2):mode + 3].sum() / values.size)


def head_share(foreground: np.ndarray) -> float:
    """Share of the foreground pixels inside the largest outer contour (filled); 0 if there is no foreground."""
    mask = foreground.astype(np.uint8) * 255
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    total = int(np.count_nonzero(foreground))
    if not contours or total == 0:
        return 0.0
    largest = max(contours, key=cv2.contourArea)
    region = np.zeros_like(mask)
    cv2.drawContours(region, [largest], -1, 255, thickness=cv2.FILLED)
    return float(np.count_nonzero(foreground & (region > 0)) / total)


def image_stats(gray: np.ndarray, colour_share: float, head_threshold: int) -> ImageStats:
    """The statistics of a decoded grey slice that the image checks compare with their limits.

    Args:
        gray: uint8 (H, W) decoded slice (before preprocessing).
        colour_share: :func:`braintumor.core.imageio.colour_pixel_share` of the decoded file.
        head_threshold: ``preprocess.head_threshold`` of the model.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ValueError(f"image_stats: expected a non-empty uint8 (H, W) image, got {gray.shape} {gray.dtype}")
    foreground = _foreground(gray, head_threshold)
    return ImageStats(
        colour_share=float(colour_share),
        contrast=float(gray.std()),
        flat_share=flat_share(gray, foreground),
        head_share=head_share(foreground),
    )


def image_flags(stats: ImageStats, limits: OodLimits) -> list[Flag]:
    """The image checks that fail, each with a message naming the measured value and the limit."""
    flags = []
    if stats.colour_share > limits.max_colour_share:
        flags.append(Flag("colour_photo", f"{stats.colour_share:.0%} of the pixels are coloured (limit "
                                          f"{limits.max_colour_share:.0%}): MRI slices are grey; this looks like a photograph."))
    if stats.contrast < limits.min_contrast:
        flags.append(Flag("near_constant", f"almost no contrast (grey-level spread {stats.contrast:.1f}, minimum "
                                           f"{limits.min_contrast:g}): a blank or near-constant image."))
    elif stats.flat_share > limits.max_flat_share:
        flags.append(Flag("flat_regions", f"{stats.flat_share:.0%} of the bright area is one flat grey level (limit "
                                          f"{limits.max_flat_share:.0%}): text, a chart or a screenshot, not tissue."))
    if stats.contrast >= limits.min_contrast and stats.head_share < limits.min_head_share:
        flags.append(Flag("no_head", f"no single head region: the largest bright region holds {stats.head_share:.0%} "
                                     f"of the bright pixels (minimum {limits.min_head_share:.0%}); text or scattered marks?"))
    return flags


def confidence_flag(max_probability: float, threshold: float, quantile: str) -> Flag | None:
    """``low_confidence`` if the top calibrated probability is below the validation quantile ``threshold``."""
    if max_probability >= threshold:
        return None
    return Flag("low_confidence", f"the model is unsure: top calibrated probability {max_probability:.2f} is below "
                                  f"{threshold:.2f}, which {float(quantile):.0%} of validation slices fall under.")


def feature_flag(score: float, threshold: float, flag_share: float) -> Flag | None:
    """``unlike_training`` if the feature distance is above the threshold set on validation."""
    if score <= threshold:
        return None
    return Flag("unlike_training", f"this image is unlike the images the model was trained on (feature distance "
                                   f"{score:.0f}, limit {threshold:.0f}, which only {flag_share:.0%} of validation slices "
                                   "exceed): do not trust these probabilities.")


@dataclass(frozen=True)
class FeatureScore:
    """The feature check's outcome for one image (see :mod:`braintumor.evaluate.feature_check`)."""

    score: float
    threshold: float
    flag_share: float


def assess(stats: ImageStats, limits: OodLimits, max_probability: float,
           confidence_threshold: float | None, quantile: str, feature: FeatureScore | None = None) -> Verdict:
    """The whole rule: image checks, then the model checks whose thresholds are known.

    Args:
        stats: from :func:`image_stats`.
        limits: the image checks' limits.
        max_probability: the top calibrated class probability.
        confidence_threshold: the validation quantile of that probability, or None (not calibrated).
        quantile: which quantile ``confidence_threshold`` is ("0.01", ...), for the message.
        feature: the feature check's score and threshold, or None (the model has no feature check).
    """
    flags = image_flags(stats, limits)
    if feature is not None:
        unlike = feature_flag(feature.score, feature.threshold, feature.flag_share)
        flags += [unlike] if unlike else []
    if confidence_threshold is not None:
        low = confidence_flag(max_probability, confidence_threshold, quantile)
        flags += [low] if low else []
    return Verdict(tuple(flags), confidence_checked=confidence_threshold is not None,
                   features_checked=feature is not None)
