"""Feature-space out-of-distribution check: is an image like the ones the model was trained on?

The image checks of :mod:`braintumor.serve.ood` stop photographs, text and blank images, but a real
MRI slice shown to a model trained on synthetic phantoms (or a CT slice shown to an MRI model)
passes them, and the softmax stays confident. What does move is where the image lands in the
model's own feature space.

The check (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks"): class-conditional Gaussians with one shared covariance, fitted to the
features of the training split; an image's score is its squared Mahalanobis distance to the nearest
class mean. The features are the backbone's stride-16 stage output averaged over space (Xception's
middle flow, 728 values; ``Backbone.feature_check_layer``). The covariance is shrunk (Ledoit-Wolf),
since the training split of a small dataset is not much larger than the feature dimension. The
threshold is the validation split's ``1 - flag_share`` quantile: with ``flag_share`` 0.01, one in a
hundred real validation slices would be flagged.

Chosen by measurement (BENCHMARKS.md, "Out-of-distribution check"): on the demo's phantom model,
real MRI slices against phantom test slices, this check's AUROC is 0.9999; the same distance on the
penultimate layer (Lee et al.'s choice) 0.989, the energy score (Liu et al. 2020) 0.80, the top
softmax probability 0.80. The evaluate stage fits it for both models and writes ``models/ood.json``;
the app and batch prediction read it with :func:`load_feature_checks`.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FeatureCheck:
    """One model's fitted check.

    Attributes:
        layer: the layer whose input, averaged over space, are the features.
        means: (k, d) class means of the training features.
        precision: (d, d) inverse of the shared (shrunk) within-class covariance.
        threshold: scores above it are flagged.
        flag_share: the share of validation images the threshold was set to flag.
        val_flag_rate: the share it does flag on validation (ties can make it differ).
    """

    layer: str
    means: np.ndarray
    precision: np.ndarray
    threshold: float
    flag_share: float
    val_flag_rate: float

    @property
    def dimension(self) -> int:
        return int(self.means.shape[1])

    @cached_property
    def _whitened(self) -> tuple[np.ndarray, np.ndarray]:
        """(means @ L, L) with precision = L L^T: the distance becomes a Euclidean one after x @ L."""
        whitening = np.linalg.cholesky(self.precision)
        return self.means @ whitening, whitening

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(n,) squared Mahalanobis distance to the nearest class mean (as :func:`mahalanobis_scores`).

        Through the Cholesky factor: one vector-matrix product per image (d = 728: under a millisecond).
        """
        x = _check_features(features, "FeatureCheck.scores", self.dimension)
        means, whitening = self._whitened
        # einsum without BLAS: OpenBLAS's worker threads keep spinning after a call and would slow the
        # next TensorFlow forward pass by about 40 ms on 2 cores (measured in the app).
        whitened = np.einsum("nd,de->ne", x, whitening, optimize=False)
        return ((whitened[:, None, :] - means[None, :, :]) ** 2).sum(axis=-1).min(axis=1)

    def flags(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features) > self.threshold

    def arrays(self) -> dict[str, np.ndarray]:
        """The check as named arrays, for :func:`save_feature_checks`."""
        return {"layer": np.array(self.layer), "means": self.means.astype(np.float32),
                "precision": self.precision.astype(np.float32), "threshold": np.array(self.threshold),
                "flag_share": np.array(self.flag_share), "val_flag_rate": np.array(self.val_flag_rate)}


def _check_features(features: np.ndarray, caller: str, dimension: int | None = None) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise ValueError(f"{caller}: features must be a non-empty finite (n, d) float array, got shape {x.shape} "
                         f"dtype {x.dtype}")
    if dimension is not None and x.shape[1] != dimension:
        raise ValueError(f"{caller}: features have {x.shape[1]} dimensions, the check was fitted on {dimension}")
    return x.astype(np.float64)


def fit_class_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(means (k, d), precision (d, d)): class means and the inverse of the shared within-class covariance.

    The covariance of the class-centred features is estimated with Ledoit-Wolf shrinkage, which keeps
    it invertible and well conditioned when the images are few for the dimension.

    Raises:
        ValueError: misaligned labels, or a class with no training image.
    """
    from sklearn.covariance import LedoitWolf

    x = _check_features(features, "fit_class_gaussians")
    y = np.asarray(labels)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"fit_class_gaussians: labels must be ({len(x)},) integers, got {y.shape} {y.dtype}")
    counts = np.bincount(y, minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        raise ValueError(f"fit_class_gaussians: every class id in [0, {num_classes}) needs training images, "
                         f"got counts {counts.tolist()}")
    means = np.stack([x[y == c].mean(axis=0) for c in range(num_classes)])
    centred = x - means[y]
    estimator = LedoitWolf(assume_centered=True).fit(centred)
    return means, estimator.precision_


def mahalanobis_scores(means: np.ndarray, precision: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(n,) squared Mahalanobis distance of each feature vector to its nearest class mean."""
    x = _check_features(features, "mahalanobis_scores", means.shape[1])
    differences = x[:, None, :] - means[None, :, :]  # (n, k, d)
    distances = np.sum((differences @ precision) * differences, axis=-1)
    return distances.min(axis=1)


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """(n,) negative free energy ``-logsumexp(logits)`` (Liu et al. 2020): higher = less like training data."""
    z = np.asarray(logits, np.float64)
    peak = z.max(axis=1, keepdims=True)
    return -(peak[:, 0] + np.log(np.exp(z - peak).sum(axis=1)))


def threshold_for_flag_share(val_scores: np.ndarray, flag_share: float) -> float:
    """The score above which ``flag_share`` of the validation scores lie (their ``1 - flag_share`` quantile)."""
    if not 0.0 <= flag_share < 1.0:
        raise ValueError(f"flag_share must be in [0, 1), got {flag_share!r}")
    scores = np.asarray(val_scores, np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"threshold_for_flag_share: expected a non-empty 1-D array of scores, got {scores.shape}")
    return float(np.quantile(scores, 1.0 - flag_share, method="higher")) if flag_share > 0 else float(scores.max())


def fit_feature_check(layer: str, train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                      num_classes: int, flag_share: float) -> FeatureCheck:
    """Gaussians on the training features, threshold on the validation features."""
    means, precision = fit_class_gaussians(train_features, train_labels, num_classes)
    # Scored the way the app scores, so that the validation image at the threshold stays exactly on it.
    val_scores = FeatureCheck(layer, means, precision, math.inf, flag_share, 0.0).scores(val_features)
    threshold = threshold_for_flag_share(val_scores, flag_share)
    return FeatureCheck(layer, means, precision, threshold, float(flag_share), float(np.mean(val_scores > threshold)))


def detection_summary(in_scores: np.ndarray, shifted_scores: np.ndarray, threshold: float) -> dict:
    """How well scores separate in-distribution images from a shifted set: AUROC (shifted = positive) and
    the flag rate of each side at ``threshold``."""
    from sklearn.metrics import roc_auc_score

    inside, shifted = np.asarray(in_scores, np.float64), np.asarray(shifted_scores, np.float64)
    if inside.size == 0 or shifted.size == 0:
        raise ValueError(f"detection_summary: both score sets must be non-empty, got {inside.size} and {shifted.size}")
    truth = np.r_[np.zeros(inside.size), np.ones(shifted.size)]
    return {"n": int(shifted.size), "auroc": float(roc_auc_score(truth, np.r_[inside, shifted])),
            "flag_rate": float(np.mean(shifted > threshold)), "in_distribution_flag_rate": float(np.mean(inside > threshold))}


def check_from_arrays(arrays: dict[str, np.ndarray], origin: str) -> FeatureCheck:
    """A :class:`FeatureCheck` from :meth:`FeatureCheck.arrays`, or ValueError naming the bad key."""
    missing = [k for k in ("layer", "means", "precision", "threshold", "flag_share", "val_flag_rate") if k not in arrays]
    if missing:
        raise ValueError(f"{origin}: missing arrays {missing}")
    means, precision = np.asarray(arrays["means"], np.float64), np.asarray(arrays["precision"], np.float64)
    if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
        raise ValueError(f"{origin}: means must be (k, d) and precision (d, d), got {means.shape} and {precision.shape}")
    layer = arrays["layer"]
    if layer.shape != () or layer.dtype.kind != "U" or not str(layer):
        raise ValueError(f"{origin}: layer must be a layer name, got {layer!r}")
    scalars = {}
    for key in ("threshold", "flag_share", "val_flag_rate"):
        value = arrays[key]
        if value.shape != () or value.dtype.kind != "f" or not math.isfinite(float(value)):
            raise ValueError(f"{origin}: {key} must be a finite number, got {value!r}")
        scalars[key] = float(value)
    return FeatureCheck(str(layer), means, precision, scalars["threshold"], scalars["flag_share"], scalars["val_flag_rate"])


def save_feature_checks(path: Path, checks: dict[str, FeatureCheck]) -> None:
    """``models/ood.npz``: each model's arrays under ``<model>/<name>``, written atomically."""
    from braintumor.core import atomic

    arrays = {f"{model}/{key}": value for model, check in checks.items() for key, value in check.arrays().items()}
    with atomic.atomic_path(Path(path), suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_feature_checks(path: str | Path) -> dict[str, FeatureCheck]:
    """``models/ood.npz``: model name -> its check. FileNotFoundError / ValueError say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature check at {path}: run `dvc repro evaluate` first")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from None
    models: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        model, _, name = key.partition("/")
        models.setdefault(model, {})[name] = value
    if not models:
        raise ValueError(f"{path}: no model in it")
    return {model: check_from_arrays(entry, f"{path}: {model}") for model, entry in models.items()}
