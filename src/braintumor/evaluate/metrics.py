"""Test-split metrics of a classifier from its probabilities: small pure functions on arrays.

Conventions: ``labels`` are (n,) class ids (indices into ``class_names``); ``probabilities`` are the
model's (n, k) softmax outputs; a prediction is the arg-max. Confusion matrices have one row per
*actual* class and one column per *predicted* class (scikit-learn's orientation).

The evaluate stage turns one model's outputs into the entry of ``reports/metrics.json`` with
:func:`model_metrics`, and both entries into the comparison table of ``reports/evaluation.md`` with
:func:`comparison_table` (also printed by the demo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score, roc_curve

from braintumor.core.config import TUMOR_LABEL
from braintumor.evaluate.calibration import apply_temperature, expected_calibration_error, negative_log_likelihood

DIGITS = 6  # metrics are rounded to this many decimals: stable, readable `dvc metrics diff`
MODEL_TITLES = {"base": "base", "finetuned": "fine-tuned"}


def _predicted(probabilities: np.ndarray) -> np.ndarray:
    return np.asarray(probabilities).argmax(axis=1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray, class_id: int) -> float | None:
    """ROC-AUC of class ``class_id`` against the rest, or None if the test split lacks positives or negatives."""
    positive = np.asarray(labels) == class_id
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(probabilities)[:, class_id]))


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """The mean F1 over the classes the set holds: a set without no-tumor slices (an external set, the clean
    Testing folder) is not scored on an empty class, as its bootstrap intervals are not."""
    labels = np.asarray(labels)
    return float(f1_score(labels, predicted, labels=sorted(set(labels.tolist())), average="macro", zero_division=0))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, macro and weighted F1, macro ROC-AUC and per-class precision, recall, F1, support, ROC-AUC.

    A class with no predictions has precision 0, one with no test images recall 0 (scikit-learn's
    ``zero_division=0``). Its ROC-AUC is None when the class has no test images (or only those);
    ``roc_auc_macro`` is then None too, rather than a mean over fewer classes.

    Args:
        labels: (n,) true class ids.
        probabilities: (n, k) softmax outputs, k = len(class_names).
        class_names: the name of each class id.
    """
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape != (len(labels), len(class_names)):
        raise ValueError(f"classification_metrics: probabilities must be (n={len(labels)}, k={len(class_names)}), "
                         f"got {probabilities.shape}")
    predicted = _predicted(probabilities)
    ids = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    aucs = [one_vs_rest_auc(labels, probabilities, c) for c in ids]
    per_class = {
        name: {"precision": _round(precision[c]), "recall": _round(recall[c]), "f1": _round(f1[c]),
               "support": int(support[c]), "roc_auc": _round(aucs[c])}
        for c, name in enumerate(class_names)
    }
    return {
        "accuracy": _round(accuracy_score(labels, predicted)),
        "macro_f1": _round(macro_f1(labels, predicted)),
        "weighted_f1": _round(f1_score(labels, predicted, labels=ids, average="weighted", zero_division=0)),
        "roc_auc_macro": None if None in aucs else _round(np.mean(aucs)),
        "per_class": per_class,
    }


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(k, k) int64 counts: entry [a, p] is the number of images of actual class a predicted as p."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if labels.shape != predicted.shape or labels.ndim != 1:
        raise ValueError(f"confusion_counts: labels {labels.shape} and predicted {predicted.shape} must be equal 1-D")
    for name, values in (("labels", labels), ("predicted", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"confusion_counts: {name} must be in [0, {num_classes}), got {values.min()}..{values.max()}")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix divided by its sum (per-class recall on the diagonal); empty rows stay 0."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def roc_curves(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, pd.DataFrame]:
    """One-vs-rest ROC curve of each class that has positives and negatives: columns fpr, tpr, threshold.

    Thresholds are scikit-learn's, except that its first one (infinity: nothing predicted
    positive) is written as 1.0 so that the tables stay valid JSON and CSV for every reader.
    """
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    curves = {}
    for c, name in enumerate(class_names):
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, threshold = roc_curve(positive, probabilities[:, c])
        curves[name] = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(threshold, 1.0)})
    return curves


def _macro_f1_from_counts(counts: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 of a stack of confusion matrices (r, k, k) over ``classes`` (default all); F1 of a class
    with no TP, FP or FN is 0."""
    tp = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
    denominator = counts.sum(axis=1) + counts.sum(axis=2)  # 2TP + FP + FN: column sums plus row sums
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return (f1 if classes is None else f1[:, classes]).mean(axis=1)


def bootstrap_intervals(labels: np.ndarray, predicted: np.ndarray, num_classes: int, *, resamples: int, seed: int,
                        level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and macro-F1 over test images drawn with replacement.

    Deterministic for a seed (one ``numpy.random.Generator``). Every resample's confusion matrix is
    counted at once with one ``bincount``, so 1,000 resamples of a few thousand images take
    milliseconds.

    Args:
        labels: (n,) true class ids.
        predicted: (n,) predicted class ids.
        num_classes: k.
        resamples: number of bootstrap resamples.
        seed: seeds the resampling.
        level: coverage of the interval.

    Returns:
        ``{"accuracy": [low, high], "macro_f1": [low, high]}``.
    """
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if not 0 < level < 1 or resamples < 1 or labels.size == 0:
        raise ValueError(f"bootstrap_intervals: need 0 < level < 1, resamples >= 1 and images; got level {level}, "
                         f"resamples {resamples}, {labels.size} images")
    n, k = labels.size, num_classes
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (r, n) image indices
    cells = np.arange(resamples)[:, None] * k * k + labels[draws] * k + predicted[draws]
    counts = np.bincount(cells.ravel(), minlength=resamples * k * k).reshape(resamples, k, k)
    accuracy = np.trace(counts, axis1=1, axis2=2) / n
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {
        "accuracy": [_round(v) for v in np.percentile(accuracy, tails)],
        "macro_f1": [_round(v) for v in np.percentile(_macro_f1_from_counts(counts, np.unique(labels)), tails)],
    }


def calibration_metrics(test_labels: np.ndarray, test_probabilities: np.ndarray, temperature: float,
                        bins: int) -> dict:
    """ECE and NLL on the test split before and after temperature scaling with ``temperature``."""
    calibrated = apply_temperature(test_probabilities, temperature)
    return {
        "ece": _round(expected_calibration_error(test_probabilities, test_labels, bins)),
        "ece_calibrated": _round(expected_calibration_error(calibrated, test_labels, bins)),
        "nll": _round(negative_log_likelihood(test_probabilities, test_labels)),
        "nll_calibrated": _round(negative_log_likelihood(calibrated, test_labels)),
        "temperature": _round(temperature),
    }


def model_metrics(test_labels: np.ndarray, test_probabilities: np.ndarray, class_names: Sequence[str], *,
                  temperature: float, bootstrap_resamples: int, bootstrap_seed: int, calibration_bins: int) -> dict:
    """One model's entry of ``reports/metrics.json``: test metrics, their bootstrap intervals, calibration.

    Args:
        test_labels: (n,) true class ids of the test split.
        test_probabilities: (n, k) the model's softmax outputs on it.
        class_names: the name of each class id.
        temperature: fitted on the validation split (:func:`braintumor.evaluate.calibration.fit_temperature`),
            judged here on the test split.
        bootstrap_resamples, bootstrap_seed: see :func:`bootstrap_intervals`.
        calibration_bins: bins of the expected calibration error.
    """
    metrics = classification_metrics(test_labels, test_probabilities, class_names)
    intervals = bootstrap_intervals(test_labels, _predicted(test_probabilities), len(class_names),
                                    resamples=bootstrap_resamples, seed=bootstrap_seed)
    per_class = metrics.pop("per_class")
    return {
        # Intervals as {low, high}: DVC's metrics tables drop list values, and these must show.
        "accuracy": metrics.pop("accuracy"), "accuracy_ci95": _low_high(intervals["accuracy"]),
        "macro_f1": metrics.pop("macro_f1"), "macro_f1_ci95": _low_high(intervals["macro_f1"]),
        **metrics,
        **calibration_metrics(test_labels, test_probabilities, temperature, calibration_bins),
        "per_class": per_class,
    }


def validation_scores(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 on the validation split, from the probabilities the pipeline predicts with
    (``evaluate.tta``): what hyperparameters are chosen on, since the test split is read once."""
    metrics = classification_metrics(labels, probabilities, class_names)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def _low_high(interval) -> dict[str, float]:
    low, high = interval
    return {"low": float(low), "high": float(high)}


def tumor_vs_no_tumor(is_tumor: np.ndarray, tumor_probability: np.ndarray, *, resamples: int, seed: int,
                      level: float = 0.95) -> dict:
    """Binary scores of a set that only knows tumor / no tumor: called tumor when the tumor probability
    (the sum of the tumor classes') is at least 0.5. Accuracy, sensitivity and specificity with percentile
    bootstrap intervals (None where the set has no images of that kind), ROC-AUC, and the four counts."""
    truth, p = np.asarray(is_tumor, bool), np.asarray(tumor_probability, np.float64)
    if truth.size == 0 or truth.shape != p.shape:
        raise ValueError(f"tumor_vs_no_tumor: need one probability per image, got {truth.shape} and {p.shape}")
    called = p >= 0.5
    draws = np.random.default_rng(seed).integers(0, truth.size, size=(resamples, truth.size))
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def rate(hit: np.ndarray, among: np.ndarray) -> tuple[float | None, dict | None]:
        if not among.any():
            return None, None
        counts = among[draws].sum(axis=1)
        rates = np.divide((hit & among)[draws].sum(axis=1), counts, out=np.full(resamples, np.nan), where=counts > 0)
        return _round(hit[among].mean()), _low_high([_round(v) for v in np.nanpercentile(rates, tails)])

    correct = called == truth
    entry = {"task": "tumor_vs_no_tumor", "n": int(truth.size)}
    for key, (hit, among) in {"accuracy": (correct, np.ones_like(truth)), "sensitivity": (called, truth),
                              "specificity": (~called, ~truth)}.items():
        entry[key], entry[f"{key}_ci95"] = rate(hit, among)
    entry["roc_auc"] = _round(roc_auc_score(truth, p)) if 0 < truth.sum() < truth.size else None
    entry["counts"] = {"tumor_called_tumor": int((truth & called).sum()), "tumor_called_no_tumor": int((truth & ~called).sum()),
                       "no_tumor_called_tumor": int((~truth & called).sum()), "no_tumor_called_no_tumor": int((~truth & ~called).sum())}
    return entry


def flat_metrics(metrics: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """``reports/metrics.json`` as MLflow metrics: dotted keys (``finetuned.per_class.glioma.f1``,
    ``finetuned.accuracy_ci95.low``). Values that are None (an undefined ROC-AUC) or text (a layer
    name) are left out.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flat_metrics(value, name))
        elif value is not None and not isinstance(value, str):
            flat[name] = float(value)
    return flat


def image_paths(rows: np.ndarray, split_table: pd.DataFrame, manifest: pd.DataFrame) -> list[str]:
    """The source file of each cached image row: ``split.csv`` maps row -> id, the manifest id -> path."""
    path_of_id = dict(zip(manifest["id"], manifest["path"]))
    id_of_row = dict(zip(split_table["row"], split_table["id"]))
    missing = [int(r) for r in rows if id_of_row.get(int(r)) not in path_of_id]
    if missing:
        raise ValueError(f"image_paths: rows {missing[:10]} have no file in the manifest: rerun `dvc repro`")
    return [path_of_id[id_of_row[int(r)]] for r in rows]


def prediction_table(rows: np.ndarray, paths: Sequence[str], labels: np.ndarray, probabilities: np.ndarray,
                     class_names: Sequence[str]) -> pd.DataFrame:
    """One line per image: row, path, actual, predicted (class names), confidence, p_<class> per class."""
    probabilities = np.asarray(probabilities, np.float64)
    names = np.asarray(class_names)
    table = pd.DataFrame({
        "row": np.asarray(rows, np.int64),
        "path": list(paths),
        # a binary source's tumor of unknown class (TUMOR_ID, -1) is named as such
        "actual": [TUMOR_LABEL if label < 0 else names[label] for label in np.asarray(labels).tolist()],
        "predicted": names[_predicted(probabilities)],
        "confidence": probabilities.max(axis=1).round(DIGITS),
    })
    for c, name in enumerate(class_names):
        table[f"p_{name}"] = probabilities[:, c].round(DIGITS)
    return table


def misclassified(predictions: pd.DataFrame) -> pd.DataFrame:
    """The wrongly predicted lines of a :func:`prediction_table`, most confident first."""
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    return wrong.sort_values(["confidence", "row"], ascending=[False, True], kind="stable").reset_index(drop=True)


def training_curves(histories: Mapping[str, Mapping[str, Sequence[float]]]) -> pd.DataFrame:
    """Keras histories of consecutive phases as one table: epoch (counted on across phases), phase,
    phase_epoch, loss, val_loss, accuracy, val_accuracy.

    Args:
        histories: phase name -> Keras history (metric -> one value per epoch), in training order.
    """
    columns = ("loss", "val_loss", "accuracy", "val_accuracy")
    frames, start = [], 0
    for phase, history in histories.items():
        missing = [c for c in columns if c not in history]
        if missing:
            raise ValueError(f"training_curves: history of {phase!r} lacks {missing} (has {sorted(history)})")
        epochs = len(history["loss"])
        frame = pd.DataFrame({"epoch": np.arange(start + 1, start + epochs + 1), "phase": phase,
                              "phase_epoch": np.arange(1, epochs + 1)})
        for column in columns:
            frame[column] = np.round(np.asarray(history[column], np.float64), DIGITS)
        frames.append(frame)
        start += epochs
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- the readable report

_SUMMARY_ROWS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"),
    ("roc_auc_macro", "ROC-AUC (macro, one-vs-rest)"),
    ("ece", "ECE"),
    ("ece_calibrated", "ECE, temperature-scaled"),
    ("nll", "NLL"),
    ("nll_calibrated", "NLL, temperature-scaled"),
    ("temperature", "temperature (fitted on validation)"),
)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_interval(entry: Mapping, key: str) -> str:
    interval = entry.get(f"{key}_ci95")
    text = _number(entry.get(key))
    return f"{text} [{interval['low']:.3f}, {interval['high']:.3f}]" if interval else text


def _change(values: list[float | None]) -> str:
    if len(values) != 2 or None in values:
        return ""
    return f"{round(values[1] - values[0], 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"


def comparison_table(metrics: Mapping[str, Mapping]) -> str:
    """Markdown table of the test metrics side by side: one column per model, and the change from
    the first (base) to the second (fine-tuned) when there are two.

    Accuracy and macro-F1 carry their bootstrap 95% intervals in brackets. ECE and NLL: lower is
    better.

    Args:
        metrics: the content of ``reports/metrics.json``: model name -> :func:`model_metrics` entry.
    """
    models = list(metrics)
    if not models:
        raise ValueError("comparison_table: no models in the metrics")
    two = len(models) == 2
    header = ["metric (test split)", *(MODEL_TITLES.get(m, m) for m in models), *(["change"] if two else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(key, title, lambda e, k=key: e.get(k)) for key, title in _SUMMARY_ROWS]
    class_names = list(next(iter(metrics.values()))["per_class"])
    rows += [(f"f1:{name}", f"F1 {name}", lambda e, n=name: e["per_class"][n]["f1"]) for name in class_names]
    for key, title, value_of in rows:
        values = [value_of(metrics[m]) for m in models]
        cells = [_with_interval(metrics[m], key) if key in ("accuracy", "macro_f1") else _number(v)
                 for m, v in zip(models, values)]
        lines.append("| " + " | ".join([title, *cells, *([_change(values)] if two else [])]) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(entry: Mapping) -> str:
    """Markdown table of one model's per-class precision, recall, F1, support and ROC-AUC."""
    lines = ["| class | precision | recall | F1 | support | ROC-AUC |", "|---|---|---|---|---|---|"]
    for name, m in entry["per_class"].items():
        lines.append(f"| {name} | {_number(m['precision'])} | {_number(m['recall'])} | {_number(m['f1'])} "
                     f"| {m['support']} | {_number(m['roc_auc'])} |")
    return "\n".join(lines) + "\n"


def confusion_table(counts: np.ndarray, class_names: Sequence[str]) -> str:
    """Markdown confusion matrix: rows actual, columns predicted, each cell ``count (row share)``."""
    shares = row_normalised(counts)
    lines = ["| actual \\ predicted | " + " | ".join(class_names) + " |", "|---|" + "---|" * len(class_names)]
    for a, name in enumerate(class_names):
        cells = [f"{counts[a, p]} ({shares[a, p]:.0%})" for p in range(len(class_names))]
        lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def errors_table(errors: pd.DataFrame, limit: int) -> str:
    """Markdown list of the ``limit`` most confident misclassifications of a :func:`misclassified` table."""
    if errors.empty:
        return "No misclassified test images.\n"
    lines = ["| path | actual | predicted | confidence |", "|---|---|---|---|"]
    for line in errors.head(limit).itertuples():
        lines.append(f"| `{line.path}` | {line.actual} | {line.predicted} | {line.confidence:.3f} |")
    return "\n".join(lines) + "\n"


def ood_table(metrics: Mapping[str, Mapping]) -> str:
    """Markdown: the feature-space check of each model (its layer, threshold and flag rates), and per
    shifted set its AUROC against the test split and the share it flags."""
    first = next(iter(metrics.values()))["ood"]
    shifted = sorted({name for entry in metrics.values() for name in entry["ood"]["shifted"]})
    models = list(metrics)
    lines = [
        f"Mahalanobis distance to the nearest class on the features of `{first['layer']}` (averaged over space); "
        f"the threshold flags {first['flag_share']:.0%} of the validation split. An upload above it is shown as "
        "unlike the training data (`models/ood.npz`, read by the app).\n",
        "| | " + " | ".join(MODEL_TITLES.get(m, m) for m in models) + " |",
        "|" + "---|" * (len(models) + 1),
        "| flagged: validation | " + " | ".join(f"{metrics[m]['ood']['val_flag_rate']:.1%}" for m in models) + " |",
        "| flagged: test | " + " | ".join(f"{metrics[m]['ood']['test_flag_rate']:.1%}" for m in models) + " |",
    ]
    for name in shifted:
        cells = [metrics[m]["ood"]["shifted"].get(name) for m in models]
        lines.append(f"| flagged: {name} | " + " | ".join(f"{c['flag_rate']:.1%} of {c['n']}" if c else "-" for c in cells) + " |")
        lines.append(f"| AUROC test vs {name} | " + " | ".join(f"{c['auroc']:.3f}" if c else "-" for c in cells) + " |")
    if not shifted:
        lines.append("\nNo shifted image sets configured (`evaluate.feature_check.shifted_sets`): add folders of "
                     "images unlike the training data to measure the check on them.")
    return "\n".join(lines) + "\n"


def external_section(metrics: Mapping[str, Mapping], confusions: Mapping[str, Mapping[str, np.ndarray]],
                     class_names: Sequence[str]) -> str:
    """Markdown: each external source on its own (never mixed with the test split): its size, the overlaps
    removed, both models' accuracy and macro-F1 with intervals, calibrated ECE, per-class recall, confusion."""
    models = list(metrics)
    parts = ["Sources held out of training, validation and test (`split.external`), minus every image that "
             "has a copy or a look-alike in the other sources (listed in `data/split/external_removed.csv`). "
             "The temperature is the one fitted on the validation split.\n"]
    for source in sorted(metrics[models[0]].get("external", {})):
        first = metrics[models[0]]["external"][source]
        if first.get("task") == "tumor_vs_no_tumor":
            parts.append(binary_external_table(source, [metrics[m]["external"][source] for m in models], models))
            continue
        lines = [f"### {source}: {first['n']} images ({first['removed_overlaps']} removed as copies or look-alikes "
                 "of the other sources)\n",
                 "| | " + " | ".join(MODEL_TITLES.get(m, m) for m in models) + " |", "|" + "---|" * (len(models) + 1)]
        entries = [metrics[m]["external"][source] for m in models]
        lines.append("| accuracy | " + " | ".join(_with_interval(e, "accuracy") for e in entries) + " |")
        lines.append("| macro-F1 | " + " | ".join(_with_interval(e, "macro_f1") for e in entries) + " |")
        lines.append("| ECE (calibrated) | " + " | ".join(_number(e.get("ece_calibrated")) for e in entries) + " |")
        for name in class_names:
            lines.append(f"| recall {name} ({first['per_class'][name]['support']}) | "
                         + " | ".join(_number(e["per_class"][name]["recall"]) for e in entries) + " |")
        parts.append("\n".join(lines) + "\n")
        for model in models:
            parts += [f"{MODEL_TITLES.get(model, model)} model on {source} (rows: actual class):\n",
                      confusion_table(confusions[source][model], class_names)]
    return "\n".join(parts)


def export_comparison(labels: np.ndarray, keras_probabilities: np.ndarray, export_probabilities: np.ndarray, *,
                      resamples: int, seed: int, level: float = 0.95) -> dict:
    """An exported model against the Keras model it came from, on the same test images: its accuracy and
    macro-F1 (with intervals), the share of images where both predict the same class, and the differences
    export - Keras with paired percentile bootstrap intervals (the same resampled images for both)."""
    labels = np.asarray(labels, np.int64)
    ours, theirs = _predicted(np.asarray(export_probabilities)), _predicted(np.asarray(keras_probabilities))
    k = np.asarray(keras_probabilities).shape[1]
    draws = np.random.default_rng(seed).integers(0, labels.size, size=(resamples, labels.size))
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    present = np.unique(labels)

    def scores(predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cells = np.arange(resamples)[:, None] * k * k + labels[draws] * k + predicted[draws]
        counts = np.bincount(cells.ravel(), minlength=resamples * k * k).reshape(resamples, k, k)
        return np.trace(counts, axis1=1, axis2=2) / labels.size, _macro_f1_from_counts(counts, present)

    (acc_export, f1_export), (acc_keras, f1_keras) = scores(ours), scores(theirs)
    accuracy = accuracy_score(labels, ours)
    macro_f1 = f1_score(labels, ours, labels=present.tolist(), average="macro", zero_division=0)
    return {
        "accuracy": _round(accuracy), "accuracy_ci95": _low_high([_round(v) for v in np.percentile(acc_export, tails)]),
        "macro_f1": _round(macro_f1), "macro_f1_ci95": _low_high([_round(v) for v in np.percentile(f1_export, tails)]),
        "agreement_with_keras": _round(np.mean(ours == theirs)),
        "accuracy_difference": _round(accuracy - accuracy_score(labels, theirs)),
        "accuracy_difference_ci95": _low_high([_round(v) for v in np.percentile(acc_export - acc_keras, tails)]),
        "macro_f1_difference": _round(macro_f1 - f1_score(labels, theirs, labels=present.tolist(), average="macro",
                                                          zero_division=0)),
        "macro_f1_difference_ci95": _low_high([_round(v) for v in np.percentile(f1_export - f1_keras, tails)]),
        "max_probability_difference": _round(np.abs(np.asarray(export_probabilities) - np.asarray(keras_probabilities)).max()),
    }


def exports_section(exports: Mapping[str, Mapping]) -> str:
    """Markdown: each exported model beside the Keras model on the test split."""
    lines = ["Each export of the fine-tuned model (`models/exports/`, the `export` stage) on the same test images, "
             "with the same test-time augmentation; differences are export minus Keras, with paired bootstrap intervals.\n",
             "| export | file | accuracy | macro-F1 | agreement with Keras | accuracy difference | macro-F1 difference |",
             "|---|---|---|---|---|---|---|"]
    for fmt, e in exports.items():
        lines.append(f"| {fmt} | `{e['file']}` ({e['megabytes']:.1f} MB) | {_with_interval(e, 'accuracy')} | "
                     f"{_with_interval(e, 'macro_f1')} | {_number(e['agreement_with_keras'])} | "
                     f"{_with_interval(e, 'accuracy_difference')} | {_with_interval(e, 'macro_f1_difference')} |")
    return "\n".join(lines) + "\n"


def binary_external_table(source: str, entries: list[dict], models: list[str]) -> str:
    """Markdown of a tumor / no-tumor external source: both models' binary scores with intervals."""
    first = entries[0]
    counts = first["counts"]
    lines = [f"### {source}: {first['n']} images, tumor vs no tumor ({first['removed_overlaps']} removed as copies or "
             "look-alikes of the other sources)\n",
             f"The source only knows tumor / no tumor ({counts['tumor_called_tumor'] + counts['tumor_called_no_tumor']} "
             "tumor images): an image is called tumor when the calibrated probabilities of the three tumor classes sum "
             "to at least 0.5.\n",
             "| | " + " | ".join(MODEL_TITLES.get(m, m) for m in models) + " |", "|" + "---|" * (len(models) + 1)]
    for key in ("accuracy", "sensitivity", "specificity"):
        lines.append(f"| {key} | " + " | ".join(_with_interval(e, key) if e[key] is not None else "n/a" for e in entries) + " |")
    lines.append("| ROC-AUC | " + " | ".join(_number(e["roc_auc"]) for e in entries) + " |")
    for key in first["counts"]:
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(str(e["counts"][key]) for e in entries) + " |")
    return "\n".join(lines) + "\n"


def evaluation_report(metrics: Mapping[str, Mapping], confusions: Mapping[str, np.ndarray],
                      errors: Mapping[str, pd.DataFrame], class_names: Sequence[str], *, bootstrap_resamples: int,
                      errors_listed: int, figures: Mapping[str, str], files: Mapping[str, str],
                      external_confusions: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> str:
    """``reports/evaluation.md``: comparison table, per-class tables, confusion matrices, calibration,
    the most confident errors, and links to the figures and data files.

    Args:
        metrics: model name -> :func:`model_metrics` entry.
        confusions: model name -> (k, k) counts, rows actual.
        errors: model name -> :func:`misclassified` table.
        class_names: the classes, in id order.
        bootstrap_resamples: shown beside the intervals.
        errors_listed: how many misclassified images to list per model.
        figures: caption -> image path relative to the report.
        files: description -> data file path relative to the report.
        external_confusions: external source -> model -> confusion counts; adds the external validation section.
    """
    first = next(iter(metrics.values()))
    test_images = sum(m["support"] for m in first["per_class"].values())
    parts = [
        "# Evaluation on the test split\n",
        f"{test_images} test images, never seen in training or model selection. In brackets: bootstrap 95% "
        f"intervals ({bootstrap_resamples} resamples of the test images). ECE: expected calibration error "
        "(gap between confidence and accuracy); NLL: mean negative log-likelihood; both lower is better. "
        "The temperature is fitted on the validation split; it changes probabilities, never the predicted class.\n",
        comparison_table(metrics),
    ]
    if all("validation" in entry for entry in metrics.values()):
        parts.append("On the validation split, predicted the same way (what hyperparameters are chosen on): "
                     + "; ".join(f"{MODEL_TITLES.get(m, m)} accuracy {e['validation']['accuracy']:.4f}, "
                                 f"macro-F1 {e['validation']['macro_f1']:.4f}" for m, e in metrics.items()) + ".\n")
    for model, entry in metrics.items():
        title = MODEL_TITLES.get(model, model)
        parts += [f"## {title}: per class\n", per_class_table(entry),
                  "Confusion matrix (rows: actual class, columns: predicted class; share of the row):\n",
                  confusion_table(confusions[model], class_names),
                  f"Most confident errors ({min(errors_listed, len(errors[model]))} of {len(errors[model])}):\n",
                  errors_table(errors[model], errors_listed)]
    exports = next((entry["exports"] for entry in metrics.values() if entry.get("exports")), None)
    if exports:
        parts += ["## Exported models\n", exports_section(exports)]
    if any(entry.get("external") for entry in metrics.values()):
        parts += ["## External validation\n", external_section(metrics, external_confusions or {}, class_names)]
    if all("ood" in entry for entry in metrics.values()):
        parts += ["## Out-of-distribution check\n", ood_table(metrics)]
    parts.append("## Figures\n")
    parts += [f"### {caption}\n\n![{caption}]({path})\n" for caption, path in figures.items()]
    parts.append("## Data files\n")
    parts.append("\n".join(f"- `{path}`: {what}" for what, path in files.items()) + "\n")
    return "\n".join(parts)
