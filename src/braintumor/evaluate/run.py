"""Both models on the test split: metrics with bootstrap intervals, temperature fitted on validation,
per-image predictions, ROC points, figures and the Markdown report. What the evaluate stage calls.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
from braintumor.core import atomic
from braintumor.core.config import CLASS_NAMES, EvaluateParams
from braintumor.evaluate.calibration import apply_temperature, calibration_entry, fit_temperature, reliability_bins
from braintumor.evaluate.figures import confusion_figure, reliability_figure, roc_figure, save_png, training_curves_figure
from braintumor.evaluate.metrics import (MODEL_TITLES, confusion_counts, evaluation_report, misclassified, model_metrics,
                                         prediction_table, roc_curves, training_curves)
from braintumor.model.inputs import predict_split
from braintumor.split.load import SplitRows, TrainingData

log = logging.getLogger("braintumor.evaluate")

MODELS = ("base", "finetuned")  # models/<name>.keras
FIGURES = {"confusion": "confusion matrix", "roc": "ROC curves", "reliability": "reliability diagram"}  # <prefix>_<model>.png

# What the report lists under "Data files" (paths relative to reports/).
DATA_FILES = {
    "test metrics of both models (DVC metrics)": "metrics.json",
    "every test image with its probabilities (per model)": "evaluate/predictions_<model>.csv",
    "the misclassified test images, most confident first": "evaluate/misclassified_<model>.csv",
    "one-vs-rest ROC points per class": "evaluate/roc/<model>_<class>.csv",
    "loss and accuracy per epoch of both training phases": "evaluate/training_curves.csv",
    "temperature and validation confidence quantiles (read by the app)": "../models/calibration.json",
}


@dataclass(frozen=True)
class Evaluation:
    metrics: dict  # reports/metrics.json: per model
    calibration: dict  # models/calibration.json: per model
    report: str  # reports/evaluation.md


def evaluate_models(model_files: dict[str, Path], data: TrainingData, files: list[str], histories: dict[str, dict],
                    params: EvaluateParams, out: Path) -> Evaluation:
    """Evaluate each model, write its plots data and figures into ``out``, and build the report.

    Args:
        model_files: ``.keras`` file per model name (``MODELS``), in report order.
        files: the source file of each test row, for the per-image tables.
        histories: per-epoch history of each training phase, in training order.
        out: ``reports/evaluate/``.
    """
    test = data.split["test"]
    metrics, calibration, confusions, errors = {}, {}, {}, {}
    for name, model_file in model_files.items():
        metrics[name], calibration[name], probabilities = evaluate_model(model_file, data, params)
        confusions[name], errors[name] = write_model_outputs(name, metrics[name], test, probabilities, files, out,
                                                             params.calibration_bins)
        m = metrics[name]
        log.info("%s: test accuracy %.4f %s, macro-F1 %.4f, ECE %.4f -> %.4f at T = %.3f", name, m["accuracy"],
                 m["accuracy_ci95"], m["macro_f1"], m["ece"], m["ece_calibrated"], m["temperature"])
    curves = training_curves(histories)
    atomic.write_csv(out / "training_curves.csv", curves)
    save_png(training_curves_figure(curves), out / "training_curves.png")
    figures = {f"{MODEL_TITLES[m]}: {caption}": f"evaluate/{prefix}_{m}.png" for prefix, caption in FIGURES.items()
               for m in model_files}
    figures["training curves"] = "evaluate/training_curves.png"
    report = evaluation_report(metrics, confusions, errors, CLASS_NAMES, bootstrap_resamples=params.bootstrap_resamples,
                               errors_listed=params.errors_listed, figures=figures, files=DATA_FILES)
    return Evaluation(metrics, calibration, report)


def registry_tags(evaluation: Evaluation, run_id: str) -> dict[str, str]:
    """Tags for the registered fine-tuned model version: its calibration and test scores, so that a model
    loaded by registry URI (the app accepts one) brings its temperature along."""
    calibration, metrics = evaluation.calibration["finetuned"], evaluation.metrics["finetuned"]
    return {"temperature": repr(calibration["temperature"]), "calibration": json.dumps(calibration),
            "test_accuracy": repr(metrics["accuracy"]), "test_macro_f1": repr(metrics["macro_f1"]),
            "evaluate_run_id": run_id}


def evaluate_model(model_file: Path, data: TrainingData, params: EvaluateParams) -> tuple[dict, dict, np.ndarray]:
    """Predict the validation and test splits; fit the temperature on validation.

    Returns:
        The metrics.json entry, the calibration.json entry, and the test probabilities (n, k).
    """
    model = keras.saving.load_model(model_file, safe_mode=True)
    val = predict_split(model, data.images, data.split["val"], params.batch_size)
    test = predict_split(model, data.images, data.split["test"], params.batch_size)
    keras.backend.clear_session()  # one model in memory at a time
    temperature = fit_temperature(val, data.split["val"].labels)
    entry = model_metrics(data.split["test"].labels, test, CLASS_NAMES, temperature=temperature,
                          bootstrap_resamples=params.bootstrap_resamples, bootstrap_seed=params.bootstrap_seed,
                          calibration_bins=params.calibration_bins)
    return entry, calibration_entry(temperature, val), test


def write_model_outputs(name: str, entry: dict, test: SplitRows, probabilities: np.ndarray, files: list[str],
                        out: Path, bins: int) -> tuple[np.ndarray, pd.DataFrame]:
    """One model's per-image predictions, misclassified list, ROC points and figures.

    Returns:
        The confusion counts (rows actual) and the misclassified table, for the report.
    """
    title = MODEL_TITLES[name]
    predictions = prediction_table(test.rows, files, test.labels, probabilities, CLASS_NAMES)
    errors = misclassified(predictions)
    atomic.write_csv(out / f"predictions_{name}.csv", predictions)
    atomic.write_csv(out / f"misclassified_{name}.csv", errors)
    curves = roc_curves(test.labels, probabilities, CLASS_NAMES)
    for class_name, curve in curves.items():
        atomic.write_csv(out / "roc" / f"{name}_{class_name}.csv", curve)
    counts = confusion_counts(test.labels, probabilities.argmax(axis=1), len(CLASS_NAMES))
    save_png(confusion_figure(counts, CLASS_NAMES, f"{title} model: test confusion matrix"), out / f"confusion_{name}.png")
    aucs = {c: entry["per_class"][c]["roc_auc"] for c in curves}
    save_png(roc_figure(curves, aucs, f"{title} model: one-vs-rest ROC on the test split"), out / f"roc_{name}.png")
    calibrated = apply_temperature(probabilities, entry["temperature"])
    save_png(reliability_figure(reliability_bins(probabilities, test.labels, bins),
                                reliability_bins(calibrated, test.labels, bins), entry["ece"], entry["ece_calibrated"],
                                f"{title} model: reliability on the test split (T = {entry['temperature']:.2f})"),
             out / f"reliability_{name}.png")
    return counts, errors
