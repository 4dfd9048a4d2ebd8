"""Calibration of softmax probabilities: expected calibration error, reliability bins, temperature scaling.

The models end in a softmax and are saved that way, so everything here takes probabilities
(n, k), not logits. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks") divides the logits by one scalar T fitted on the validation split; since
``log(softmax(z)) = z - logsumexp(z)`` differs from the logits only by a per-row constant,
``softmax(log(p) / T)`` equals ``softmax(z / T)``, and the logits are not needed. T > 1 softens an
over-confident model, T < 1 sharpens an under-confident one; the predicted class never changes.

The evaluate stage writes ``models/calibration.json`` (see :func:`calibration_entry`), which the app
reads with :func:`load_calibration`::

    {"base":      {"temperature": 1.73, "val_max_probability_quantiles": {"0.01": 0.41, "0.05": 0.52, "0.10": 0.61},
                   "tta": "flip"},
     "finetuned": {...}}

``tta`` is how the probabilities were made (``evaluate.tta``, :mod:`braintumor.model.tta`): "flip" = the
mean of the slice's and its mirror image's softmax, "flip_shift" = also of both moved left, right, up and
down; the app then predicts the same way. Missing means "none".

The quantiles are of the largest *calibrated* probability over the validation images: an upload
whose top probability falls below, say, the 1% quantile is less confident than 99% of validation
slices.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from braintumor.model.tta import TTA_MODES

log = logging.getLogger(__name__)

# Probabilities are clipped here before taking logs: a float32 softmax rounds tiny values to
# exactly 0, whose log (and NLL) would be infinite.
PROBABILITY_FLOOR = 1e-12
# Search range of the temperature; the optimum of real models lies well inside (about 0.5 to 5).
TEMPERATURE_BOUNDS = (0.05, 20.0)
# The quantiles of the validation max-probability written for the app's out-of-distribution rule.
MAX_PROBABILITY_QUANTILES = (0.01, 0.05, 0.10)


def _check_probabilities(probabilities: np.ndarray, caller: str) -> np.ndarray:
    """``probabilities`` as a float64 (n, k) array, or ValueError naming what is wrong."""
    p = np.asarray(probabilities)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2 or not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{caller}: probabilities must be a non-empty (n, k >= 2) float array, "
                         f"got shape {p.shape} dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0 + 1e-6:
        raise ValueError(f"{caller}: probabilities must be finite and in [0, 1], got min {np.nanmin(p)} "
                         f"max {np.nanmax(p)}")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > 1e-3:
        raise ValueError(f"{caller}: each row must sum to 1 (softmax output), row {worst} sums to {sums[worst]:.6f}")
    return p


def _check_labels(labels: np.ndarray, probabilities: np.ndarray, caller: str) -> np.ndarray:
    """``labels`` as an int64 (n,) array of class ids in [0, k), or ValueError."""
    y = np.asarray(labels)
    n, k = probabilities.shape
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{caller}: labels must be ({n},) integers aligned with the probabilities, "
                         f"got shape {y.shape} dtype {y.dtype}")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"{caller}: labels must be class ids in [0, {k}), got min {y.min()} max {y.max()}")
    return y.astype(np.int64)


def _check_temperature(temperature: float, caller: str) -> float:
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{caller}: temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row: the probabilities a temperature-scaled model would output.

    Args:
        probabilities: (n, k) softmax outputs (rows sum to 1).
        temperature: T > 0; 1 returns the probabilities unchanged (up to the floor on tiny values).

    Returns:
        (n, k) probabilities of the input's float dtype; the arg-max of every row is unchanged.
    """
    dtype = np.asarray(probabilities).dtype
    p = _check_probabilities(probabilities, "apply_temperature")
    t = _check_temperature(temperature, "apply_temperature")
    scaled = np.log(np.maximum(p, PROBABILITY_FLOOR)) / t
    scaled -= scaled.max(axis=1, keepdims=True)  # exp never overflows; the largest term is exp(0) = 1
    out = np.exp(scaled)
    out /= out.sum(axis=1, keepdims=True)
    return out.astype(dtype)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``-log p[i, y_i]`` (the cross-entropy loss), with p floored at :data:`PROBABILITY_FLOOR`.

    Args:
        probabilities: (n, k) softmax outputs.
        labels: (n,) true class ids.
    """
    p = _check_probabilities(probabilities, "negative_log_likelihood")
    y = _check_labels(labels, p, "negative_log_likelihood")
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], PROBABILITY_FLOOR))))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T minimising the NLL of ``apply_temperature(probabilities, T)``: fit on validation.

    A bounded scalar search over log T (so T stays positive and the search is symmetric in
    sharpening and softening). The result is never worse than T = 1 on the data it was fitted on.

    Args:
        probabilities: (n, k) softmax outputs on the validation split.
        labels: (n,) true class ids.
        bounds: the range searched for T.

    Raises:
        ValueError: bad probabilities, labels or bounds.
    """
    p = _check_probabilities(probabilities, "fit_temperature")
    y = _check_labels(labels, p, "fit_temperature")
    low, high = bounds
    if not 0 < low < 1 < high:
        raise ValueError(f"fit_temperature: bounds must satisfy 0 < low < 1 < high, got {bounds}")
    log_p = np.log(np.maximum(p, PROBABILITY_FLOOR))
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        z = log_p / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y]))

    result = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded",
                             options={"xatol": 1e-5})
    temperature = float(math.exp(result.x)) if result.fun < nll(0.0) else 1.0
    if not low * 1.01 < temperature < high / 1.01:
        # e.g. a model that outputs the same probabilities for every image: NLL keeps falling towards T = inf.
        log.warning("fitted temperature %.3g is at the edge of the searched range %s: the model's confidence "
                    "carries little information on this split", temperature, bounds)
    return temperature


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins (lower, upper] over [0, 1], as in a reliability diagram.

    Confidence is a row's largest probability; accuracy is whether that class is the true one.
    ``confidence`` and ``accuracy`` are NaN in empty bins.
    """

    edges: np.ndarray  # (bins + 1,) from 0 to 1
    counts: np.ndarray  # (bins,) int64
    confidence: np.ndarray  # (bins,) mean confidence of the rows in each bin
    accuracy: np.ndarray  # (bins,) share of those rows predicted correctly


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> ReliabilityBins:
    """Per-bin count, mean confidence and accuracy of the top prediction.

    Args:
        probabilities: (n, k) softmax outputs.
        labels: (n,) true class ids.
        bins: number of equal-width bins over [0, 1].
    """
    p = _check_probabilities(probabilities, "reliability_bins")
    y = _check_labels(labels, p, "reliability_bins")
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"reliability_bins: bins must be a positive integer, got {bins!r}")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Right-closed bins (Guo et al.): confidence 1.0 falls in the last bin, 0.5 in (0.4, 0.5] of 10.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), counts, mean_confidence, accuracy)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE: the count-weighted mean gap |accuracy - confidence| over equal-width confidence bins.

    0 for a perfectly calibrated model; at most 1.

    Args:
        probabilities: (n, k) softmax outputs.
        labels: (n,) true class ids.
        bins: number of equal-width bins over [0, 1].
    """
    table = reliability_bins(probabilities, labels, bins)
    filled = table.counts > 0
    gaps = np.abs(table.accuracy[filled] - table.confidence[filled])
    return float(np.sum(table.counts[filled] * gaps) / table.counts.sum())


def max_probability_quantiles(probabilities: np.ndarray,
                              quantiles: tuple[float, ...] = MAX_PROBABILITY_QUANTILES) -> dict[str, float]:
    """Quantiles of each row's largest probability, keyed ``"0.01"``, ``"0.05"``, ``"0.10"``.

    Args:
        probabilities: (n, k) (calibrated) probabilities, normally of the validation split.
        quantiles: levels in (0, 1).
    """
    p = _check_probabilities(probabilities, "max_probability_quantiles")
    if not all(0.0 < q < 1.0 for q in quantiles):
        raise ValueError(f"max_probability_quantiles: levels must be in (0, 1), got {quantiles}")
    values = np.quantile(p.max(axis=1), quantiles)
    return {f"{q:.2f}": float(v) for q, v in zip(quantiles, values)}


def calibration_entry(temperature: float, val_probabilities: np.ndarray, tta: str = "none") -> dict:
    """One model's entry of ``models/calibration.json``.

    Args:
        temperature: the fitted temperature.
        val_probabilities: (n, k) the model's *uncalibrated* validation probabilities (averaged over the
            views of ``tta``); the quantiles are taken after applying ``temperature``, as the app sees them.
        tta: how those probabilities were made, and how the app must make them.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"calibration_entry: tta must be one of {TTA_MODES}, got {tta!r}")
    calibrated = apply_temperature(val_probabilities, temperature)
    return {"temperature": float(temperature), "val_max_probability_quantiles": max_probability_quantiles(calibrated),
            "tta": tta}


def check_calibration(data: object, origin: str = "calibration") -> dict[str, dict]:
    """``data`` if it has the layout of ``models/calibration.json``, else ValueError naming the bad key."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{origin}: expected a non-empty mapping of model name -> entry, got {type(data).__name__}")
    for model, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{origin}: {model}: expected a mapping, got {type(entry).__name__}")
        for key in ("temperature", "val_max_probability_quantiles"):
            if key not in entry:
                raise ValueError(f"{origin}: {model}: missing key {key!r}")
        _check_temperature(entry["temperature"], f"{origin}: {model}.temperature")
        if entry.get("tta", "none") not in TTA_MODES:
            raise ValueError(f"{origin}: {model}.tta must be one of {list(TTA_MODES)}, got {entry['tta']!r}")
        quantiles = entry["val_max_probability_quantiles"]
        expected = {f"{q:.2f}" for q in MAX_PROBABILITY_QUANTILES}
        if not isinstance(quantiles, dict) or set(quantiles) != expected:
            raise ValueError(f"{origin}: {model}.val_max_probability_quantiles must have keys {sorted(expected)}, "
                             f"got {quantiles!r}")
        for level, value in quantiles.items():
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{origin}: {model}.val_max_probability_quantiles[{level!r}] must be in [0, 1], "
                                 f"got {value!r}")
    return data


def load_calibration(path: str | Path) -> dict[str, dict]:
    """Read and check ``models/calibration.json``: model name ("base", "finetuned") -> entry.

    Raises:
        FileNotFoundError: with the command that writes the file.
        ValueError: the file is not JSON or has another layout (the message names the key).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no calibration file at {path}: run `dvc repro evaluate` first") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return check_calibration(data, str(path))
