"""Stage evaluate: both models on the test split, with bootstrap intervals and temperature scaling.

Params: evaluate, mlflow
Inputs: models/base.keras, models/finetuned.keras (and its card: the MLflow run that registered it), data/processed/images.npy, data/split/split.csv,
    reports/data/split.json (data fingerprint), data/interim/manifest.csv (image paths),
    reports/train_base/history.json, reports/finetune/history.json
Outputs: reports/metrics.json (DVC metrics, both models side by side), models/calibration.json
    (temperature and validation confidence quantiles per model, read by the app), reports/evaluation.md,
    reports/evaluate/: DVC plots data (predictions_<model>.csv, roc/<model>_<class>.csv,
    training_curves.csv), misclassified_<model>.csv, PNG figures
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
from braintumor.core import atomic
from braintumor.evaluate.calibration import apply_temperature, calibration_entry, fit_temperature, reliability_bins
from braintumor.core.config import CLASS_NAMES, EvaluateParams, load_params
from braintumor.evaluate.metrics import (MODEL_TITLES, confusion_counts, evaluation_report, flat_metrics, image_paths,
                                   misclassified, model_metrics, prediction_table, roc_curves, training_curves)
from braintumor.evaluate.figures import confusion_figure, reliability_figure, roc_figure, save_png, training_curves_figure
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.core.tracking import flatten_params, log_summary, stage_run, tag_registered_version
from braintumor.model.train import SplitRows, TrainingData, load_training_data, predict_split

MODELS = ("base", "finetuned")  # models/<name>.keras
PHASES = ("train_base", "finetune")  # reports/<phase>/history.json, in training order
FIGURES = {"confusion": "confusion matrix", "roc": "ROC curves", "reliability": "reliability diagram"}  # <prefix>_<model>.png


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


def evaluate_model(name: str, paths: ProjectPaths, data: TrainingData, params: EvaluateParams) -> tuple[dict, dict, np.ndarray]:
    """Predict the validation and test splits with models/<name>.keras; fit its temperature on validation.

    Returns:
        The metrics.json entry, the calibration.json entry, and the test probabilities (n, k).
    """
    model = keras.saving.load_model(paths.models / f"{name}.keras", safe_mode=True)
    val = predict_split(model, data.images, data.split["val"], params.batch_size)
    test = predict_split(model, data.images, data.split["test"], params.batch_size)
    keras.backend.clear_session()  # one model in memory at a time
    temperature = fit_temperature(val, data.split["val"].labels)
    entry = model_metrics(data.split["test"].labels, test, CLASS_NAMES, temperature=temperature,
                          bootstrap_resamples=params.bootstrap_resamples, bootstrap_seed=params.bootstrap_seed,
                          calibration_bins=params.calibration_bins)
    return entry, calibration_entry(temperature, val), test


def main() -> dict:
    log = setup_logging("evaluate")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    settings = params.evaluate
    data = load_training_data(paths)
    test = data.split["test"]
    files = image_paths(test.rows, pd.read_csv(paths.split_csv, keep_default_na=False),
                        pd.read_csv(paths.manifest, keep_default_na=False, usecols=["id", "path"]))
    out = paths.evaluate_reports
    with stage_run("evaluate", params.mlflow, paths.root, logged_params=flatten_params(settings, "evaluate"),
                   tags={"data_fingerprint": data.fingerprint}) as run:
        metrics, calibration, confusions, errors = {}, {}, {}, {}
        for name in MODELS:
            metrics[name], calibration[name], probabilities = evaluate_model(name, paths, data, settings)
            confusions[name], errors[name] = write_model_outputs(name, metrics[name], test, probabilities, files, out,
                                                                 settings.calibration_bins)
            log.info("%s: test accuracy %.4f %s, macro-F1 %.4f, ECE %.4f -> %.4f at T = %.3f", name,
                     metrics[name]["accuracy"], metrics[name]["accuracy_ci95"], metrics[name]["macro_f1"],
                     metrics[name]["ece"], metrics[name]["ece_calibrated"], metrics[name]["temperature"])
        curves = training_curves({phase: json.loads((paths.reports / phase / "history.json").read_text()) for phase in PHASES})
        atomic.write_csv(out / "training_curves.csv", curves)
        save_png(training_curves_figure(curves), out / "training_curves.png")
        figures = {f"{MODEL_TITLES[m]}: {caption}": f"evaluate/{prefix}_{m}.png" for prefix, caption in FIGURES.items()
                   for m in MODELS}
        figures["training curves"] = "evaluate/training_curves.png"
        report = evaluation_report(metrics, confusions, errors, CLASS_NAMES, bootstrap_resamples=settings.bootstrap_resamples,
                                   errors_listed=settings.errors_listed, figures=figures, files=_data_files())
        atomic.write_json(paths.calibration_json, calibration)
        atomic.write_json(paths.metrics_json, metrics)
        atomic.write_text(paths.evaluation_md, report)
        log_summary(flat_metrics(metrics))
        # The registered fine-tuned model gets its calibration and test scores, so that a model
        # loaded by registry URI (the app accepts one) brings its temperature along.
        card = json.loads((paths.models / "finetuned.json").read_text())
        version = tag_registered_version(params.mlflow.registered_model, card["mlflow_run_id"], {
            "temperature": repr(calibration["finetuned"]["temperature"]),
            "calibration": json.dumps(calibration["finetuned"]),
            "test_accuracy": repr(metrics["finetuned"]["accuracy"]),
            "test_macro_f1": repr(metrics["finetuned"]["macro_f1"]),
            "evaluate_run_id": run.info.run_id,
        })
        log.info("tagged %s version %s with its temperature and test scores", params.mlflow.registered_model, version)
        for path in (paths.metrics_json, paths.calibration_json, paths.evaluation_md):
            mlflow.log_artifact(str(path))
        mlflow.log_artifacts(str(out), "evaluate")
        log.info("wrote %s, %s and %s; run %s", paths.metrics_json, paths.evaluation_md, paths.calibration_json,
                 run.info.run_id)
    return metrics


def _data_files() -> dict[str, str]:
    """What the report lists under "Data files" (paths relative to reports/)."""
    return {
        "test metrics of both models (DVC metrics)": "metrics.json",
        "every test image with its probabilities (per model)": "evaluate/predictions_<model>.csv",
        "the misclassified test images, most confident first": "evaluate/misclassified_<model>.csv",
        "one-vs-rest ROC points per class": "evaluate/roc/<model>_<class>.csv",
        "loss and accuracy per epoch of both training phases": "evaluate/training_curves.csv",
        "temperature and validation confidence quantiles (read by the app)": "../models/calibration.json",
    }


if __name__ == "__main__":
    main()
