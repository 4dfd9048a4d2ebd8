"""The evaluate stage end to end with real DVC and a real MLflow store, on the tiny training configuration:
metrics.json layout, `dvc metrics show`, `dvc plots show`, the calibration file, the per-image
tables, the report, and the MLflow run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from braintumor.evaluate.calibration import load_calibration
from braintumor.core.config import CLASS_NAMES
from braintumor.evaluate.metrics import comparison_table
from conftest import SHIFTED_IMAGES, copy_built_pipeline, dvc, ran_stages

pytestmark = pytest.mark.slow

MODELS = ("base", "finetuned")
SUMMARY_KEYS = {"accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "weighted_f1", "roc_auc_macro", "ece",
                "ece_calibrated", "nll", "nll_calibrated", "temperature", "per_class", "ood", "validation"}


def dvc_json(repo: Path, env: dict, *args: str):
    """The JSON a dvc command prints on stdout (warnings go to stderr and are kept out of it)."""
    result = subprocess.run(["dvc", *args, "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def evaluated_repo(built_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline (conftest.TINY_PIPELINE), every stage run once by `dvc repro`."""
    return copy_built_pipeline(built_pipeline, tmp_path_factory.mktemp("evaluate"))


def test_metrics_json_has_both_models_with_every_metric(evaluated_repo):
    metrics = json.loads((evaluated_repo / "reports/metrics.json").read_text())
    test_rows = pd.read_csv(evaluated_repo / "data/split/split.csv").query("split == 'test'")
    assert list(metrics) == list(MODELS)
    for model, entry in metrics.items():
        # The fine-tuned model's entry also scores its exports (the export stage's files).
        assert set(entry) == SUMMARY_KEYS | ({"exports"} if model == "finetuned" else set())
        assert entry["accuracy_ci95"]["low"] <= entry["accuracy"] <= entry["accuracy_ci95"]["high"]
        assert entry["macro_f1_ci95"]["low"] <= entry["macro_f1"] <= entry["macro_f1_ci95"]["high"]
        assert entry["temperature"] > 0 and entry["nll_calibrated"] <= entry["nll"] + 1e-3
        assert list(entry["per_class"]) == list(CLASS_NAMES)
        assert {c: m["support"] for c, m in entry["per_class"].items()} == test_rows["label"].value_counts().to_dict()


def test_dvc_metrics_show_lists_both_models(evaluated_repo, venv_env):
    shown = dvc_json(evaluated_repo, venv_env, "metrics", "show")
    data = next(iter(shown.values()))["data"]["reports/metrics.json"]["data"]
    written = json.loads((evaluated_repo / "reports/metrics.json").read_text())
    # DVC shows numbers only: the [low, high] intervals are in the file (and in MLflow), not in its tables.
    assert data == {m: {k: v for k, v in entry.items() if not isinstance(v, list)} for m, entry in written.items()}
    table = dvc(evaluated_repo, venv_env, "metrics", "show")
    assert "base.accuracy" in table and "finetuned.macro_f1" in table and "finetuned.ece_calibrated" in table


def test_dvc_plots_show_renders_every_declared_plot(evaluated_repo, venv_env, tmp_path):
    plots = dvc_json(evaluated_repo, venv_env, "plots", "show", "-o", str(tmp_path / "json"))["data"]
    assert set(plots) == {"confusion", "roc_finetuned", "roc_base", "loss", "accuracy",
                          "reports/evaluate/reliability_finetuned.png", "reports/evaluate/reliability_base.png"}
    test_size = int((pd.read_csv(evaluated_repo / "data/split/split.csv")["split"] == "test").sum())
    confusion = plots["confusion"][0]["content"]["data"]["values"]
    assert len(confusion) == 2 * test_size  # both models
    assert {row["actual"] for row in confusion} <= set(CLASS_NAMES)
    epochs = len(pd.read_csv(evaluated_repo / "reports/evaluate/training_curves.csv"))
    assert len(plots["loss"][0]["content"]["data"]["values"]) == 2 * epochs  # loss and val_loss
    assert len(plots["roc_finetuned"][0]["content"]["data"]["values"]) > 0
    dvc(evaluated_repo, venv_env, "plots", "show", "-o", str(tmp_path / "html"))
    html = (tmp_path / "html" / "index.html").read_text()
    assert "Test confusion matrix" in html and "one-vs-rest ROC" in html
    assert len(list((tmp_path / "html" / "static").glob("*reliability_*.png"))) == 2


def test_calibration_file_matches_the_metrics(evaluated_repo):
    calibration = load_calibration(evaluated_repo / "models/calibration.json")
    metrics = json.loads((evaluated_repo / "reports/metrics.json").read_text())
    assert list(calibration) == list(MODELS)
    for name, entry in calibration.items():
        assert entry["tta"] == "flip_shift"  # params.yaml's evaluate.tta, for the app to predict the same way
        assert entry["temperature"] == pytest.approx(metrics[name]["temperature"], abs=1e-6)
        quantiles = entry["val_max_probability_quantiles"]
        assert 1 / len(CLASS_NAMES) - 1e-6 <= quantiles["0.01"] <= quantiles["0.05"] <= quantiles["0.10"] <= 1


def test_feature_check_is_fitted_on_training_and_scored_on_test_and_shifted_images(evaluated_repo):
    import keras

    import braintumor.model.backbones  # noqa: F401  registers the custom layers
    from braintumor.core.paths import ProjectPaths
    from braintumor.evaluate.feature_check import load_feature_checks
    from braintumor.model.inputs import features_and_probabilities_model, predict_features
    from braintumor.split.load import load_training_data

    checks = load_feature_checks(evaluated_repo / "models/ood.npz")
    metrics = json.loads((evaluated_repo / "reports/metrics.json").read_text())
    data = load_training_data(ProjectPaths(evaluated_repo))
    assert list(checks) == list(MODELS)
    for name, check in checks.items():
        ood = metrics[name]["ood"]
        assert check.layer == ood["layer"] == "expanded_conv_8_expand"  # auto: MobileNetV3Small's stride-16 stage
        assert check.threshold == pytest.approx(ood["threshold"]) and check.flag_share == ood["flag_share"] == 0.01
        # The test flag rate in the metrics is what the saved check gives on the test split's features.
        keras_model = keras.saving.load_model(evaluated_repo / f"models/{name}.keras")
        model = features_and_probabilities_model(keras_model, check.layer)
        test_features, _ = predict_features(model, data.images, data.split["test"], 32)
        # The test probabilities are the mean over the slice's ten views (evaluate.tta: flip_shift).
        _, averaged = predict_features(features_and_probabilities_model(keras_model, check.layer, "flip_shift"), data.images,
                                       data.split["test"], 32)
        predictions = pd.read_csv(evaluated_repo / f"reports/evaluate/predictions_{name}.csv")
        np.testing.assert_allclose(predictions[[f"p_{c}" for c in CLASS_NAMES]].to_numpy(), averaged, atol=1e-4)
        val_features, _ = predict_features(model, data.images, data.split["val"], 32)
        assert ood["test_flag_rate"] == pytest.approx(check.flags(test_features).mean())
        # The threshold is a validation image's own score; recomputed in another graph it may move in the
        # last float digits, so it is compared with a tolerance.
        assert ood["val_flag_rate"] <= 0.01
        assert check.scores(val_features).max() <= check.threshold * (1 + 1e-4)
        # Images of another kind lie far from every class; the unreadable file is counted, the hidden one skipped.
        checkers = ood["shifted"]["checkers"]
        assert checkers["n"] == SHIFTED_IMAGES and checkers["unreadable"] == 1
        # A 48 px MobileNet from random weights, trained for three epochs, is a weak detector; still, the
        # checkerboards mostly score above the test slices and over half of them are flagged.
        assert checkers["auroc"] > 0.8 and checkers["flag_rate"] > 0.5, checkers
    report = (evaluated_repo / "reports/evaluation.md").read_text()
    assert "## Out-of-distribution check" in report and "| flagged: checkers |" in report


def test_validation_scores_are_the_models_view_averaged_predictions(evaluated_repo):
    """What hyperparameters are chosen on: the validation split predicted as the test split is (evaluate.tta:
    flip_shift, the mean over the ten views of each slice)."""
    import keras

    import braintumor.model.backbones  # noqa: F401  registers the custom layers
    from braintumor.core.paths import ProjectPaths
    from braintumor.model.inputs import predict_split
    from braintumor.model.tta import tta_views
    from braintumor.split.load import load_training_data

    metrics = json.loads((evaluated_repo / "reports/metrics.json").read_text())
    data = load_training_data(ProjectPaths(evaluated_repo))
    val = data.split["val"]
    for name in MODELS:
        model = keras.saving.load_model(evaluated_repo / f"models/{name}.keras")
        views = [np.ascontiguousarray(view) for view in tta_views(np.asarray(data.images), "flip_shift")]
        predicted = np.sum([predict_split(model, view, val, 32) for view in views], axis=0).argmax(1)
        assert metrics[name]["validation"]["accuracy"] == pytest.approx((predicted == val.labels).mean(), abs=1e-6)
        assert metrics[name]["validation"]["macro_f1"] == pytest.approx(
            f1_score(val.labels, predicted, average="macro", labels=sorted(set(val.labels)), zero_division=0), abs=1e-6)
    assert "On the validation split, predicted the same way" in (evaluated_repo / "reports/evaluation.md").read_text()


def test_prediction_tables_figures_and_report(evaluated_repo):
    out = evaluated_repo / "reports/evaluate"
    metrics = json.loads((evaluated_repo / "reports/metrics.json").read_text())
    test_rows = pd.read_csv(evaluated_repo / "data/split/split.csv").query("split == 'test'")
    for name in MODELS:
        predictions = pd.read_csv(out / f"predictions_{name}.csv")
        assert predictions["row"].tolist() == test_rows["row"].tolist()
        assert predictions["actual"].tolist() == test_rows["label"].tolist()
        assert all((evaluated_repo / p).is_file() for p in predictions["path"])
        probabilities = predictions[[f"p_{c}" for c in CLASS_NAMES]].to_numpy()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        assert np.mean(predictions["actual"] == predictions["predicted"]) == pytest.approx(metrics[name]["accuracy"])
        errors = pd.read_csv(out / f"misclassified_{name}.csv")
        assert len(errors) == int((predictions["actual"] != predictions["predicted"]).sum())
        assert errors["confidence"].is_monotonic_decreasing
        for kind in ("confusion", "roc", "reliability"):
            assert (out / f"{kind}_{name}.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "training_curves.png").is_file()
    report = (evaluated_repo / "reports/evaluation.md").read_text()
    assert comparison_table(metrics) in report
    assert all(f"(evaluate/{kind}_{name}.png)" in report for kind in ("confusion", "roc", "reliability") for name in MODELS)


def test_mlflow_run_holds_metrics_params_and_artifacts(evaluated_repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{evaluated_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("braintumor")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("stage") == "evaluate"]
    assert len(runs) == 1
    run = runs[0]
    metrics = json.loads((evaluated_repo / "reports/metrics.json").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.params["evaluate.bootstrap_resamples"] == "200"
    assert "data_fingerprint" in run.data.tags
    assert run.data.metrics["finetuned.accuracy"] == pytest.approx(metrics["finetuned"]["accuracy"])
    assert run.data.metrics["base.accuracy_ci95.high"] == pytest.approx(metrics["base"]["accuracy_ci95"]["high"])
    assert run.data.metrics["finetuned.per_class.glioma.f1"] == pytest.approx(metrics["finetuned"]["per_class"]["glioma"]["f1"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "calibration.json", "ood.npz", "evaluation.md", "evaluate"} <= top
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/confusion_finetuned.png", "evaluate/reliability_base.png", "evaluate/training_curves.png",
            "evaluate/misclassified_finetuned.csv"} <= figures
    # The registered fine-tuned model carries its calibration; the group's parent run the headline numbers.
    calibration = json.loads((evaluated_repo / "models/calibration.json").read_text())
    card = json.loads((evaluated_repo / "models/finetuned.json").read_text())
    (version,) = client.search_model_versions(f"name = 'braintumor-classifier' and run_id = '{card['mlflow_run_id']}'")
    assert float(version.tags["temperature"]) == pytest.approx(calibration["finetuned"]["temperature"])
    assert json.loads(version.tags["calibration"]) == calibration["finetuned"]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["evaluate.finetuned.accuracy"] == pytest.approx(metrics["finetuned"]["accuracy"])


def test_rerun_is_a_no_op(evaluated_repo, venv_env):
    assert ran_stages(dvc(evaluated_repo, venv_env, "repro", "evaluate")) == set()


def test_the_feature_checks_training_features_come_from_the_activation_cache_where_it_was_cut(evaluated_repo,
                                                                                               tmp_path, venv_env):
    """With the check reading the input of the first fine-tuned layer (the cache's cut), evaluate averages
    the cached maps instead of running each model over the training split; the class means are those
    of the model's own features (the cache is float16: to its rounding)."""
    import keras

    import braintumor.model.backbones  # noqa: F401  registers the custom layers
    from braintumor.core.paths import ProjectPaths
    from braintumor.evaluate.feature_check import load_feature_checks
    from braintumor.model.inputs import features_and_probabilities_model, predict_features
    from braintumor.split.load import load_training_data
    from conftest import set_params

    repo = copy_built_pipeline(evaluated_repo, tmp_path / "repo")
    # expanded_conv_10_expand reads expanded_conv_9_add, the cut. A float32 cache: this random MobileNet's
    # activations (about 1e-10) underflow float16, and the check's Gaussians would be singular.
    set_params(repo, {"evaluate.feature_check.layer": "expanded_conv_10_expand", "finetune.cache_dtype": "float32",
                      "export.formats": []})
    output = dvc(repo, venv_env, "repro", "evaluate")
    assert {"activations", "evaluate"} <= ran_stages(output), output[-3000:]
    for name in MODELS:
        assert f"{name}: the feature check's training features from the activation cache" in output, output[-3000:]
    data = load_training_data(ProjectPaths(repo))
    train = data.split["train"]
    for name, check in load_feature_checks(repo / "models/ood.npz").items():
        model = features_and_probabilities_model(keras.saving.load_model(repo / f"models/{name}.keras"), check.layer)
        own, _ = predict_features(model, data.images, train, 32)
        means = np.stack([own[train.labels == k].mean(axis=0) for k in range(len(CLASS_NAMES))])
        np.testing.assert_allclose(check.means, means, rtol=0, atol=2e-3 * np.abs(means).max())
