"""Evaluation and calibration math on tiny hand-built arrays: agreement with scikit-learn, confusion
orientation, ECE on known cases, temperature scaling, bootstrap intervals, the report and figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import classification_report, confusion_matrix, f1_score, roc_auc_score

from braintumor.evaluate.calibration import (apply_temperature, calibration_entry, expected_calibration_error,
                                    fit_temperature, load_calibration, max_probability_quantiles, negative_log_likelihood,
                                    reliability_bins)
from braintumor.evaluate.metrics import (_macro_f1_from_counts, bootstrap_intervals, classification_metrics,
                                   comparison_table, confusion_counts, evaluation_report, flat_metrics, image_paths,
                                   misclassified, model_metrics, prediction_table, roc_curves, row_normalised,
                                   training_curves)

CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")

# 10 images, 4 classes; hand-built so that every class has hits, misses and false alarms.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
PROBS = np.array([
    [0.70, 0.10, 0.10, 0.10],  # 0 -> 0
    [0.40, 0.50, 0.05, 0.05],  # 0 -> 1
    [0.60, 0.20, 0.10, 0.10],  # 0 -> 0
    [0.20, 0.60, 0.10, 0.10],  # 1 -> 1
    [0.10, 0.30, 0.20, 0.40],  # 1 -> 3
    [0.05, 0.05, 0.85, 0.05],  # 2 -> 2
    [0.10, 0.10, 0.70, 0.10],  # 2 -> 2
    [0.50, 0.10, 0.30, 0.10],  # 2 -> 0
    [0.10, 0.10, 0.10, 0.70],  # 3 -> 3
    [0.25, 0.25, 0.20, 0.30],  # 3 -> 3
], np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- classification metrics


def test_classification_metrics_agree_with_scikit_learn():
    metrics = classification_metrics(LABELS, PROBS, CLASSES)
    predicted = PROBS.argmax(axis=1)
    report = classification_report(LABELS, predicted, labels=range(4), target_names=CLASSES, output_dict=True,
                                   zero_division=0)
    assert metrics["accuracy"] == pytest.approx(0.7)  # 7 of 10 on the diagonal, counted by hand
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-6)
    assert metrics["weighted_f1"] == pytest.approx(report["weighted avg"]["f1-score"], abs=1e-6)
    assert metrics["roc_auc_macro"] == pytest.approx(roc_auc_score(LABELS, PROBS, multi_class="ovr", average="macro"),
                                                     abs=1e-6)
    for c, name in enumerate(CLASSES):
        got, want = metrics["per_class"][name], report[name]
        assert got["precision"] == pytest.approx(want["precision"], abs=1e-6)
        assert got["recall"] == pytest.approx(want["recall"], abs=1e-6)
        assert got["f1"] == pytest.approx(want["f1-score"], abs=1e-6)
        assert got["support"] == want["support"] and isinstance(got["support"], int)
        assert got["roc_auc"] == pytest.approx(roc_auc_score(LABELS == c, PROBS[:, c]), abs=1e-6)
    # glioma by hand: predicted 3 times (images 0, 2, 7), right twice; 3 actual, 2 found.
    assert metrics["per_class"]["glioma"]["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["per_class"]["glioma"]["recall"] == pytest.approx(2 / 3, abs=1e-6)


def test_class_absent_from_test_split_has_no_auc_and_no_macro_auc():
    labels = np.array([0, 0, 1, 1])
    metrics = classification_metrics(labels, PROBS[[0, 2, 3, 4]], CLASSES)
    assert metrics["per_class"]["no_tumor"]["roc_auc"] is None
    assert metrics["per_class"]["no_tumor"]["support"] == 0 and metrics["per_class"]["no_tumor"]["recall"] == 0.0
    assert metrics["roc_auc_macro"] is None
    assert set(roc_curves(labels, PROBS[[0, 2, 3, 4]], CLASSES)) == {"glioma", "meningioma"}


def test_probabilities_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"probabilities must be \(n=10, k=4\)"):
        classification_metrics(LABELS, PROBS[:, :3], CLASSES)


def test_confusion_matrix_rows_are_actual_and_columns_predicted():
    # Two glioma images both called meningioma, one meningioma image called meningioma.
    counts = confusion_counts(np.array([0, 0, 1]), np.array([1, 1, 1]), 4)
    assert counts[0, 1] == 2 and counts[1, 1] == 1 and counts.sum() == 3
    assert counts[1, 0] == 0
    predicted = PROBS.argmax(axis=1)
    np.testing.assert_array_equal(confusion_counts(LABELS, predicted, 4), confusion_matrix(LABELS, predicted, labels=range(4)))


def test_row_normalised_rows_sum_to_one_and_an_empty_row_stays_zero():
    shares = row_normalised(np.array([[2, 2], [0, 0]]))
    np.testing.assert_allclose(shares, [[0.5, 0.5], [0.0, 0.0]])


def test_confusion_counts_refuses_out_of_range_ids():
    with pytest.raises(ValueError, match="predicted must be in"):
        confusion_counts(np.array([0, 1]), np.array([0, 4]), 4)


def test_roc_curves_start_at_origin_end_at_one_and_have_finite_thresholds():
    curves = roc_curves(LABELS, PROBS, CLASSES)
    assert set(curves) == set(CLASSES)
    for curve in curves.values():
        assert list(curve.columns) == ["fpr", "tpr", "threshold"]
        assert (curve["fpr"].iloc[0], curve["tpr"].iloc[0]) == (0.0, 0.0)
        assert (curve["fpr"].iloc[-1], curve["tpr"].iloc[-1]) == (1.0, 1.0)
        assert np.isfinite(curve["threshold"]).all() and curve["threshold"].max() <= 1.0


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_deterministic_for_a_seed_and_brackets_the_point_estimate():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    predicted = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 4, 200))
    first = bootstrap_intervals(labels, predicted, 4, resamples=500, seed=3)
    assert first == bootstrap_intervals(labels, predicted, 4, resamples=500, seed=3)
    assert first != bootstrap_intervals(labels, predicted, 4, resamples=500, seed=4)
    accuracy = float(np.mean(labels == predicted))
    macro_f1 = f1_score(labels, predicted, average="macro")
    assert first["accuracy"][0] < accuracy < first["accuracy"][1]
    assert first["macro_f1"][0] < macro_f1 < first["macro_f1"][1]
    # About +-1.96 standard errors of a proportion.
    half_width = (first["accuracy"][1] - first["accuracy"][0]) / 2
    assert half_width == pytest.approx(1.96 * math.sqrt(accuracy * (1 - accuracy) / 200), rel=0.2)


def test_vectorised_macro_f1_equals_scikit_learn_including_a_class_never_seen():
    labels, predicted = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 2, 2])  # class 3 absent
    counts = confusion_counts(labels, predicted, 4)[None]
    assert _macro_f1_from_counts(counts)[0] == pytest.approx(
        f1_score(labels, predicted, labels=range(4), average="macro", zero_division=0))


def test_bootstrap_refuses_a_bad_level():
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(LABELS, LABELS, 4, resamples=10, seed=0, level=95)


# --------------------------------------------------------------------------- calibration


def test_ece_is_zero_for_a_perfectly_calibrated_model():
    # Every image at confidence 0.8 and 8 of 10 right: confidence equals accuracy in the only bin.
    probs = np.tile([0.8, 0.1, 0.05, 0.05], (10, 1))
    labels = np.array([0] * 8 + [1, 2])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_model_is_the_gap():
    # Confidence 0.9, half right: gap 0.4.
    probs = np.tile([0.9, 0.05, 0.03, 0.02], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(0.4)


def test_ece_weights_each_bin_by_its_share_of_images():
    # 4 images at 0.95 confidence, all right (gap 0.05); 6 at 0.55, 3 right (gap 0.05 below);
    # by hand: 0.4 * 0.05 + 0.6 * |0.5 - 0.55| = 0.05.
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 6)
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.05)
    bins = reliability_bins(probs, labels, bins=10)
    assert bins.counts.tolist() == [0, 0, 0, 0, 0, 6, 0, 0, 0, 4]
    assert bins.accuracy[5] == pytest.approx(0.5) and bins.confidence[9] == pytest.approx(0.95)
    assert np.isnan(bins.accuracy[0]) and bins.edges[0] == 0.0 and bins.edges[-1] == 1.0


def test_reliability_bins_are_right_closed():
    # 0.5 belongs to (0.4, 0.5]; 1.0 to the last bin.
    bins = reliability_bins(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0]), bins=10)
    assert bins.counts[4] == 1 and bins.counts[9] == 1


def test_negative_log_likelihood_known_values_and_a_zero_probability_stays_finite():
    assert negative_log_likelihood(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 1])) == pytest.approx(math.log(2))
    nll = negative_log_likelihood(np.array([[1.0, 0.0]], np.float32), np.array([1]))
    assert nll == pytest.approx(-math.log(1e-12))


def test_apply_temperature_equals_scaling_the_logits():
    logits = np.random.default_rng(0).normal(size=(20, 4)) * 3
    probs = softmax(logits)
    np.testing.assert_allclose(apply_temperature(probs, 2.5), softmax(logits / 2.5), rtol=1e-9)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, rtol=1e-9)
    assert (apply_temperature(probs, 0.3).argmax(axis=1) == probs.argmax(axis=1)).all()


def test_apply_temperature_keeps_float32_and_survives_exact_zeros():
    out = apply_temperature(np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), 0.05)
    assert out.dtype == np.float32 and np.isfinite(out).all() and out.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf")])
def test_apply_temperature_refuses_a_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        apply_temperature(PROBS, temperature)


def test_probabilities_that_are_not_a_softmax_are_refused():
    with pytest.raises(ValueError, match="row 1 sums to 0.5"):
        negative_log_likelihood(np.array([[0.5, 0.5], [0.25, 0.25]]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\)"):
        negative_log_likelihood(np.array([[0.5, 0.5]]), np.array([2]))


def _overconfident_toy(n: int, seed: int, sharpen: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from calibrated probabilities softmax(z), returned sharpened to softmax(z * sharpen)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4)) * 1.5
    calibrated = softmax(logits)
    labels = np.array([rng.choice(4, p=p) for p in calibrated])
    return softmax(logits * sharpen).astype(np.float32), labels


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    val_probs, val_labels = _overconfident_toy(3000, seed=0, sharpen=3.0)
    test_probs, test_labels = _overconfident_toy(3000, seed=1, sharpen=3.0)
    temperature = fit_temperature(val_probs, val_labels)
    assert temperature > 1 and temperature == pytest.approx(3.0, rel=0.1)  # undoes the sharpening
    calibrated = apply_temperature(test_probs, temperature)
    assert negative_log_likelihood(calibrated, test_labels) < negative_log_likelihood(test_probs, test_labels) - 0.1
    assert expected_calibration_error(calibrated, test_labels, 15) < expected_calibration_error(test_probs, test_labels, 15) / 2


def test_an_underconfident_model_gets_a_temperature_below_one():
    probs, labels = _overconfident_toy(3000, seed=2, sharpen=0.5)
    assert fit_temperature(probs, labels) == pytest.approx(0.5, rel=0.1)


def test_calibration_file_round_trip_and_quantiles(tmp_path):
    probs, _ = _overconfident_toy(500, seed=3, sharpen=2.0)
    entry = calibration_entry(2.0, probs)
    calibrated_max = apply_temperature(probs, 2.0).max(axis=1)
    assert entry["temperature"] == 2.0
    assert list(entry["val_max_probability_quantiles"]) == ["0.01", "0.05", "0.10"]
    assert entry["val_max_probability_quantiles"]["0.05"] == pytest.approx(np.quantile(calibrated_max, 0.05), rel=1e-6)
    assert (calibrated_max < entry["val_max_probability_quantiles"]["0.10"]).mean() == pytest.approx(0.10, abs=0.01)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"base": entry, "finetuned": entry}))
    assert load_calibration(path)["finetuned"] == entry


def test_load_calibration_names_the_missing_file_and_the_bad_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro evaluate"):
        load_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": {"temperature": -1, "val_max_probability_quantiles": {}}}))
    with pytest.raises(ValueError, match=r"base.temperature: .*temperature must be a finite number > 0"):
        load_calibration(bad)
    bad.write_text(json.dumps({"base": {"temperature": 1.5}}))
    with pytest.raises(ValueError, match="base: missing key 'val_max_probability_quantiles'"):
        load_calibration(bad)
    bad.write_text(json.dumps({"base": {**calibration_entry(1.5, PROBS), "tta": "rotate"}}))
    with pytest.raises(ValueError, match=r"base.tta must be one of \['none', 'flip', 'flip_shift'\], got 'rotate'"):
        load_calibration(bad)


def test_calibration_entry_records_how_the_probabilities_were_made():
    assert calibration_entry(1.5, PROBS)["tta"] == "none" and calibration_entry(1.5, PROBS, "flip")["tta"] == "flip"
    with pytest.raises(ValueError, match="tta must be one of"):
        calibration_entry(1.5, PROBS, "mirror")


def test_max_probability_quantiles_refuses_levels_outside_zero_one():
    with pytest.raises(ValueError, match="levels must be in"):
        max_probability_quantiles(PROBS, (0.0, 0.5))


# --------------------------------------------------------------------------- tables and report


def _entry(seed: int = 0) -> dict:
    return model_metrics(LABELS, PROBS, CLASSES, temperature=1.5, bootstrap_resamples=200, bootstrap_seed=seed,
                         calibration_bins=5)


def test_model_metrics_has_the_metrics_json_layout():
    entry = _entry()
    assert list(entry) == ["accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "weighted_f1", "roc_auc_macro",
                           "ece", "ece_calibrated", "nll", "nll_calibrated", "temperature", "per_class"]
    assert set(entry["per_class"]) == set(CLASSES)
    assert entry["nll"] == pytest.approx(negative_log_likelihood(PROBS, LABELS), abs=1e-6)
    json.dumps(entry, allow_nan=False)  # plain JSON: DVC reads it


def test_flat_metrics_are_dotted_with_interval_bounds_and_skip_none():
    flat = flat_metrics({"finetuned": {"accuracy": 0.7, "accuracy_ci95": {"low": 0.6, "high": 0.8}, "roc_auc_macro": None,
                                       "per_class": {"glioma": {"f1": 0.5}}}})
    assert flat == {"finetuned.accuracy": 0.7, "finetuned.accuracy_ci95.low": 0.6, "finetuned.accuracy_ci95.high": 0.8,
                    "finetuned.per_class.glioma.f1": 0.5}


def test_comparison_table_puts_models_side_by_side_with_the_change():
    base, finetuned = _entry(), _entry()
    finetuned["accuracy"], finetuned["roc_auc_macro"] = 0.9, None
    table = comparison_table({"base": base, "finetuned": finetuned})
    lines = table.splitlines()
    assert lines[0] == "| metric (test split) | base | fine-tuned | change |"
    accuracy = next(line for line in lines if line.startswith("| accuracy |"))
    lo, hi = base["accuracy_ci95"]["low"], base["accuracy_ci95"]["high"]
    assert accuracy == f"| accuracy | 0.700 [{lo:.3f}, {hi:.3f}] | 0.900 [{lo:.3f}, {hi:.3f}] | +0.200 |"
    assert next(line for line in lines if line.startswith("| ROC-AUC")).endswith("| n/a |  |")
    assert any(line.startswith("| F1 pituitary |") for line in lines)
    # One model alone: no change column.
    assert comparison_table({"finetuned": base}).splitlines()[0] == "| metric (test split) | fine-tuned |"


def test_prediction_table_and_misclassified_most_confident_first():
    table = prediction_table(np.arange(10) + 100, [f"img{i}.png" for i in range(10)], LABELS, PROBS, CLASSES)
    assert list(table.columns) == ["row", "path", "actual", "predicted", "confidence", "p_glioma", "p_meningioma",
                                   "p_no_tumor", "p_pituitary"]
    assert table.loc[4, "actual"] == "meningioma" and table.loc[4, "predicted"] == "pituitary"
    errors = misclassified(table)
    assert errors["row"].tolist() == [101, 107, 104]  # confidence 0.5, 0.5 (lower row first), 0.4
    assert (errors["actual"] != errors["predicted"]).all()


def test_image_paths_follow_row_to_id_to_path():
    split = pd.DataFrame({"row": [5, 7], "id": ["s/a.png", "s/b.png"]})
    manifest = pd.DataFrame({"id": ["s/b.png", "s/a.png"], "path": ["data/raw/s/images/b.png", "data/raw/s/images/a.png"]})
    assert image_paths(np.array([7, 5]), split, manifest) == ["data/raw/s/images/b.png", "data/raw/s/images/a.png"]
    with pytest.raises(ValueError, match=r"rows \[9\] have no file"):
        image_paths(np.array([9]), split, manifest)


def test_training_curves_count_epochs_on_across_phases():
    base = {"loss": [1.0, 0.8], "val_loss": [1.1, 0.9], "accuracy": [0.3, 0.5], "val_accuracy": [0.2, 0.4],
            "learning_rate": [1e-3, 1e-3]}
    finetune = {"loss": [0.6], "val_loss": [0.7], "accuracy": [0.7], "val_accuracy": [0.6]}
    curves = training_curves({"train_base": base, "finetune": finetune})
    assert curves["epoch"].tolist() == [1, 2, 3]
    assert curves["phase"].tolist() == ["train_base", "train_base", "finetune"]
    assert curves["phase_epoch"].tolist() == [1, 2, 1]
    assert curves["val_loss"].tolist() == [1.1, 0.9, 0.7]
    with pytest.raises(ValueError, match="history of 'finetune' lacks \\['val_accuracy'\\]"):
        training_curves({"finetune": {k: v for k, v in finetune.items() if k != "val_accuracy"}})


def test_evaluation_report_holds_the_table_confusion_errors_and_figure_links():
    entry = _entry()
    predictions = prediction_table(np.arange(10), [f"img{i}.png" for i in range(10)], LABELS, PROBS, CLASSES)
    counts = confusion_counts(LABELS, PROBS.argmax(axis=1), 4)
    text = evaluation_report({"base": entry, "finetuned": entry}, {"base": counts, "finetuned": counts},
                             {"base": misclassified(predictions), "finetuned": misclassified(predictions)}, CLASSES,
                             bootstrap_resamples=200, errors_listed=2, figures={"ROC": "evaluate/roc_base.png"},
                             files={"metrics": "metrics.json"})
    assert text.startswith("# Evaluation on the test split\n")
    assert "10 test images" in text and comparison_table({"base": entry, "finetuned": entry}) in text
    assert "| **glioma** | 2 (67%) | 1 (33%) | 0 (0%) | 0 (0%) |" in text  # row = actual glioma
    assert "Most confident errors (2 of 3)" in text and "`img1.png`" in text and "`img4.png`" not in text
    assert "![ROC](evaluate/roc_base.png)" in text and "- `metrics.json`: metrics" in text


# --------------------------------------------------------------------------- figures


def test_figures_are_written_as_png(tmp_path):
    from PIL import Image

    from braintumor.evaluate.figures import confusion_figure, reliability_figure, roc_figure, save_png, training_curves_figure

    bins = reliability_bins(PROBS, LABELS, 10)
    curves = roc_curves(LABELS, PROBS, CLASSES)
    figures = {
        "confusion": confusion_figure(confusion_counts(LABELS, PROBS.argmax(axis=1), 4), CLASSES, "confusion"),
        "roc": roc_figure(curves, {name: 0.8 for name in curves}, "roc"),
        "reliability": reliability_figure(bins, bins, 0.1, 0.05, "reliability"),
        "curves": training_curves_figure(training_curves({"train_base": {
            "loss": [1.0, 0.8], "val_loss": [1.1, 0.9], "accuracy": [0.3, 0.5], "val_accuracy": [0.2, 0.4]}})),
    }
    for name, figure in figures.items():
        save_png(figure, tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in figures)  # no temporary files left
