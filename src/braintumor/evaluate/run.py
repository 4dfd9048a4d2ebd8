"""Both models on the test split: metrics with bootstrap intervals, temperature fitted on validation,
per-image predictions, ROC points, figures and the Markdown report. What the evaluate stage calls.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import keras
import numpy as np
import pandas as pd

import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
from braintumor.core import atomic
from braintumor.core.config import CLASS_NAMES, EvaluateParams, PreprocessParams
from braintumor.evaluate.calibration import apply_temperature, calibration_entry, fit_temperature, reliability_bins
from braintumor.evaluate.feature_check import FeatureCheck, detection_summary, fit_feature_check
from braintumor.evaluate.figures import confusion_figure, reliability_figure, roc_figure, save_png, training_curves_figure
from braintumor.evaluate.metrics import (MODEL_TITLES, confusion_counts, evaluation_report, misclassified, model_metrics,
                                         export_comparison, image_paths, prediction_table, roc_curves, training_curves,
                                         tumor_vs_no_tumor, validation_scores)
from braintumor.model.activations import ActivationCache, cached_layer_input_means
from braintumor.model.export import EXPORTS_CARD, load_exported, predict_with_tta
from braintumor.model.inputs import features_and_probabilities_model, predict_features
from braintumor.split.load import TUMOR_ID, SplitRows, TrainingData

log = logging.getLogger("braintumor.evaluate")

MODELS = ("base", "finetuned")  # models/<name>.keras
EXPORTED_MODEL = "finetuned"  # the model the export stage converts
FIGURES = {"confusion": "confusion matrix", "roc": "ROC curves", "reliability": "reliability diagram"}  # <prefix>_<model>.png

# What the report lists under "Data files" (paths relative to reports/).
DATA_FILES = {
    "test metrics of both models (DVC metrics)": "metrics.json",
    "every test image with its probabilities (per model)": "evaluate/predictions_<model>.csv",
    "the misclassified test images, most confident first": "evaluate/misclassified_<model>.csv",
    "one-vs-rest ROC points per class": "evaluate/roc/<model>_<class>.csv",
    "loss and accuracy per epoch of both training phases": "evaluate/training_curves.csv",
    "temperature and validation confidence quantiles (read by the app)": "../models/calibration.json",
    "the feature-space out-of-distribution check of each model (read by the app)": "../models/ood.npz",
    "every image of each external set with its probabilities (split.external)": "evaluate/external/predictions_<source>_<model>.csv",
    "the external images left out, with the reason and the image each matches": "../data/split/external_removed.csv",
}


@dataclass(frozen=True)
class Evaluation:
    metrics: dict  # reports/metrics.json: per model
    calibration: dict  # models/calibration.json: per model
    feature_checks: dict  # models/ood.npz: model name -> FeatureCheck
    report: str  # reports/evaluation.md


def evaluate_models(model_files: dict[str, Path], data: TrainingData, files: list[str], histories: dict[str, dict],
                    params: EvaluateParams, out: Path, feature_layer: str,
                    shifted: dict[str, "ImageFolder"] | None = None,
                    external_files: dict[str, list[str]] | None = None,
                    exports: Path | None = None, activations: ActivationCache | None = None) -> Evaluation:
    """Evaluate each model, write its plots data and figures into ``out``, and build the report.

    Args:
        model_files: ``.keras`` file per model name (``MODELS``), in report order.
        files: the source file of each test row, for the per-image tables.
        histories: per-epoch history of each training phase, in training order.
        out: ``reports/evaluate/``.
        feature_layer: the out-of-distribution check's layer (``feature_check_layer_name``).
        shifted: name -> images unlike the training data (:func:`load_image_folder`), to score the check on.
        external_files: the source file of each row of each external set (``data.external``).
        exports: the export stage's folder (``models/exports``): its models are scored beside the fine-tuned one.
        activations: the activations stage's cache (:func:`evaluate_model` reads the check's training features from it).
    """
    external_files = external_files or {}
    test = data.split["test"]
    metrics, calibration, checks, confusions, errors, external_confusions = {}, {}, {}, {}, {}, {}
    for name, model_file in model_files.items():
        metrics[name], calibration[name], probabilities, check, external = evaluate_model(
            model_file, data, params, feature_layer, shifted or {}, activations)
        checks[name] = check
        for source, source_probabilities in external.items():
            rows = data.external[source]
            atomic.write_csv(out / "external" / f"predictions_{source}_{name}.csv",
                             prediction_table(rows.rows, external_files[source], rows.labels, source_probabilities, CLASS_NAMES))
            e = metrics[name]["external"][source]
            if e.get("task") == "tumor_vs_no_tumor":
                log.info("%s on external %s (%d images, %d overlaps removed), tumor vs no tumor: accuracy %.4f %s, "
                         "sensitivity %s, specificity %s, ROC-AUC %s", name, source, e["n"], e["removed_overlaps"],
                         e["accuracy"], e["accuracy_ci95"], e["sensitivity"], e["specificity"], e["roc_auc"])
                continue
            external_confusions.setdefault(source, {})[name] = confusion_counts(
                rows.labels, source_probabilities.argmax(axis=1), len(CLASS_NAMES))
            log.info("%s on external %s (%d images, %d overlaps removed): accuracy %.4f %s, macro-F1 %.4f", name, source,
                     e["n"], e["removed_overlaps"], e["accuracy"], e["accuracy_ci95"], e["macro_f1"])
        confusions[name], errors[name] = write_model_outputs(name, metrics[name], test, probabilities, files, out,
                                                             params.calibration_bins)
        if name == EXPORTED_MODEL and exports is not None:
            metrics[name]["exports"] = evaluate_exports(exports, data, probabilities, params)
        m = metrics[name]
        log.info("%s: validation accuracy %.4f, macro-F1 %.4f (as the pipeline predicts: what choices are made on)",
                 name, m["validation"]["accuracy"], m["validation"]["macro_f1"])
        log.info("%s: test accuracy %.4f %s, macro-F1 %.4f, ECE %.4f -> %.4f at T = %.3f", name, m["accuracy"],
                 m["accuracy_ci95"], m["macro_f1"], m["ece"], m["ece_calibrated"], m["temperature"])
        log.info("%s: out-of-distribution check flags %.1f%% of validation, %.1f%% of test%s", name,
                 100 * m["ood"]["val_flag_rate"], 100 * m["ood"]["test_flag_rate"],
                 "".join(f"; {s}: AUROC {v['auroc']:.3f}, {100 * v['flag_rate']:.1f}% flagged of {v['n']}"
                         for s, v in m["ood"]["shifted"].items()))
    curves = training_curves(histories)
    atomic.write_csv(out / "training_curves.csv", curves)
    save_png(training_curves_figure(curves), out / "training_curves.png")
    figures = {f"{MODEL_TITLES[m]}: {caption}": f"evaluate/{prefix}_{m}.png" for prefix, caption in FIGURES.items()
               for m in model_files}
    figures["training curves"] = "evaluate/training_curves.png"
    report = evaluation_report(metrics, confusions, errors, CLASS_NAMES, bootstrap_resamples=params.bootstrap_resamples,
                               errors_listed=params.errors_listed, figures=figures, files=DATA_FILES,
                               external_confusions=external_confusions)
    return Evaluation(metrics, calibration, checks, report)


def registry_tags(evaluation: Evaluation, run_id: str) -> dict[str, str]:
    """Tags for the registered fine-tuned model version: its calibration and test scores, so that a model
    loaded by registry URI (the app accepts one) brings its temperature along."""
    calibration, metrics = evaluation.calibration["finetuned"], evaluation.metrics["finetuned"]
    return {"temperature": repr(calibration["temperature"]), "calibration": json.dumps(calibration),
            "test_accuracy": repr(metrics["accuracy"]), "test_macro_f1": repr(metrics["macro_f1"]),
            "evaluate_run_id": run_id}


def evaluate_exports(folder: Path, data: TrainingData, keras_probabilities: np.ndarray, params: EvaluateParams) -> dict:
    """Each export listed in ``folder``'s card, on the test split (with ``params.tta``), against the Keras model."""
    card = json.loads((folder / EXPORTS_CARD).read_text())
    test = data.split["test"]
    images = np.asarray(data.images[test.rows])
    scored = {}
    for record in card["exports"]:
        probabilities = predict_with_tta(load_exported(folder / record["file"]), images, params.tta, params.batch_size)
        scored[record["format"]] = {"file": record["file"], "megabytes": round(record["bytes"] / 1e6, 3),
                                    "size_share_of_keras": round(record["bytes"] / card["keras_bytes"], 4),
                                    **export_comparison(test.labels, keras_probabilities, probabilities,
                                                        resamples=params.bootstrap_resamples, seed=params.bootstrap_seed)}
        e = scored[record["format"]]
        log.info("export %s: accuracy %.4f (Keras %+.4f %s), agreement %.4f", record["file"], e["accuracy"],
                 e["accuracy_difference"], e["accuracy_difference_ci95"], e["agreement_with_keras"])
    return scored


def evaluate_model(model_file: Path, data: TrainingData, params: EvaluateParams, feature_layer: str,
                   shifted: dict[str, "ImageFolder"], activations: ActivationCache | None = None
                   ) -> tuple[dict, dict, np.ndarray, FeatureCheck]:
    """Predict the splits (with ``params.tta``); fit the temperature on validation, the feature check on
    training and validation.

    The training split is only needed for the check's features: when the tensor the check reads is the
    activation cache's cut or lies above it, they come from the cached maps (the layers between the cut
    and that tensor run on them: with ``finetune.unfreeze: block12_sepconv1``, block 12), instead of the
    whole model running, with test-time augmentation, over every training image.

    Returns:
        The metrics.json entry (with the check's flag rates and AUROCs under ``ood``), the
        calibration.json entry, the test probabilities (n, k) and the fitted check.
    """
    loaded = keras.saving.load_model(model_file, safe_mode=True)
    cached = (None if activations is None
              else cached_layer_input_means(activations, loaded, feature_layer, data.images, data.split))
    log.info("%s: the feature check's training features %s", Path(model_file).stem,
             "from the activation cache" if cached is not None else "from the model")
    model = features_and_probabilities_model(loaded, feature_layer, params.tta)
    features = {split: predict_features(model, data.images, data.split[split], params.batch_size)
                for split in (("val", "test") if cached is not None else ("train", "val", "test"))}
    train_features = cached if cached is not None else features["train"][0]
    shifted_features = {name: predict_features(model, folder.images, all_rows(len(folder.images)), params.batch_size)[0]
                        for name, folder in shifted.items()}
    # prediction reads no label; a binary source's TUMOR_ID (-1) is not one the input pipeline accepts
    external = {source: predict_features(model, data.images, SplitRows(rows.rows, np.zeros_like(rows.labels)),
                                         params.batch_size)[1]
                for source, rows in (data.external or {}).items()}
    keras.backend.clear_session()  # one model in memory at a time
    (val_features, val), (test_features, test) = features["val"], features["test"]
    temperature = fit_temperature(val, data.split["val"].labels)
    entry = model_metrics(data.split["test"].labels, test, CLASS_NAMES, temperature=temperature,
                          bootstrap_resamples=params.bootstrap_resamples, bootstrap_seed=params.bootstrap_seed,
                          calibration_bins=params.calibration_bins)
    check = fit_feature_check(feature_layer, train_features, data.split["train"].labels, val_features,
                              len(CLASS_NAMES), params.feature_check.flag_share)
    entry["ood"] = feature_check_summary(check, test_features, shifted_features)
    entry["validation"] = validation_scores(data.split["val"].labels, val, CLASS_NAMES)
    for name, folder in shifted.items():
        entry["ood"]["shifted"][name]["unreadable"] = len(folder.unreadable)
    if external:
        entry["external"] = {source: external_entry(data.external[source].labels, probabilities, temperature, params,
                                                    data.report.get("external", {}).get(source, {}))
                             for source, probabilities in external.items()}
    return entry, calibration_entry(temperature, val, params.tta), test, check, external


def external_entry(labels: np.ndarray, probabilities: np.ndarray, temperature: float, params: EvaluateParams,
                   split_record: dict) -> dict:
    """One external source's metrics for one model: those of the test split (intervals, calibration with
    the validation temperature), its size, and how many of its images were removed as overlaps."""
    removed = split_record.get("removed", {})
    overlaps = int(removed.get("copy_of_internal", 0) + removed.get("lookalike_of_internal", 0))
    if (np.asarray(labels) == TUMOR_ID).any():  # a source that only knows tumor / no tumor
        calibrated = apply_temperature(probabilities, temperature)
        no_tumor = CLASS_NAMES.index("no_tumor")
        return {"removed_overlaps": overlaps, **tumor_vs_no_tumor(
            np.asarray(labels) != no_tumor, 1.0 - calibrated[:, no_tumor], resamples=params.bootstrap_resamples,
            seed=params.bootstrap_seed)}
    return {"n": int(len(labels)), "removed_overlaps": overlaps,
            **model_metrics(labels, probabilities, CLASS_NAMES, temperature=temperature,
                            bootstrap_resamples=params.bootstrap_resamples, bootstrap_seed=params.bootstrap_seed,
                            calibration_bins=params.calibration_bins)}


@dataclass(frozen=True)
class ImageFolder:
    """The readable images of a folder, preprocessed as the app does, and what could not be read."""

    images: np.ndarray  # (n, S, S) uint8
    files: list[str]
    unreadable: dict[str, str]  # file -> why


def load_image_folder(folder: Path, preprocess: PreprocessParams, max_bytes: int = 50 * 2**20,
                      max_pixels: int = 50_000_000) -> ImageFolder:
    """Every file below ``folder`` (hidden and system entries skipped), decoded and preprocessed with the app's
    own code; a file that is not an accepted image is listed with its reason, never dropped silently.

    Raises:
        FileNotFoundError: no such folder. ValueError: no readable image in it.
    """
    from braintumor.core.imageio import is_system_entry
    from braintumor.serve.uploads import UploadError, preprocess_upload

    if not folder.is_dir():
        raise FileNotFoundError(f"shifted image set {folder} is not a folder (evaluate.feature_check.shifted_sets)")
    images, files, unreadable = [], [], {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if is_system_entry(PurePosixPath(path.relative_to(folder).as_posix())):
            continue
        try:
            images.append(preprocess_upload(path.read_bytes(), preprocess, max_bytes, max_pixels)[1])
            files.append(str(path))
        except UploadError as exc:
            unreadable[str(path)] = str(exc)
    if not images:
        raise ValueError(f"shifted image set {folder}: no readable image among {len(unreadable)} files")
    return ImageFolder(np.stack(images), files, unreadable)


def evaluated_image_paths(data: TrainingData, split_csv: Path, external_csv: Path, manifest_csv: Path
                          ) -> tuple[list[str], dict[str, list[str]]]:
    """The source file of each test image, and of each external set's images (per source)."""
    manifest = pd.read_csv(manifest_csv, keep_default_na=False, usecols=["id", "path"])
    test = image_paths(data.split["test"].rows, pd.read_csv(split_csv, keep_default_na=False), manifest)
    external_table = pd.read_csv(external_csv, keep_default_na=False) if data.external else None
    return test, {source: image_paths(rows.rows, external_table, manifest) for source, rows in data.external.items()}


def load_shifted_sets(folders: dict[str, str], root: Path, preprocess: PreprocessParams) -> dict[str, ImageFolder]:
    """``evaluate.feature_check.shifted_sets``: each folder (relative ones against ``root``) read and logged."""
    shifted = {}
    for name, folder in folders.items():
        shifted[name] = load_image_folder(root / folder, preprocess)
        log.info("shifted set %s: %d images from %s, %d unreadable", name, len(shifted[name].files), folder,
                 len(shifted[name].unreadable))
    return shifted


def all_rows(count: int) -> SplitRows:
    """Every row of an image array, in order (labels unused)."""
    return SplitRows(np.arange(count), np.zeros(count, np.int64))


def feature_check_summary(check: FeatureCheck, test_features: np.ndarray, shifted: dict[str, np.ndarray]) -> dict:
    """The metrics.json ``ood`` entry: the check's flag rates on validation and test, and on each shifted set
    its AUROC against the test split and its flag rate."""
    test_scores = check.scores(test_features)
    return {"layer": check.layer, "threshold": check.threshold, "flag_share": check.flag_share,
            "val_flag_rate": check.val_flag_rate, "test_flag_rate": float(np.mean(test_scores > check.threshold)),
            "shifted": {name: detection_summary(test_scores, check.scores(features), check.threshold)
                        for name, features in shifted.items()}}


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
