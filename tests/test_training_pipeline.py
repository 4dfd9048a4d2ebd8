"""Training stages end to end with real DVC and a real MLflow store, on a tiny phantom configuration:
loadable models, metrics, MLflow records, determinism, and clear errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest

import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
from braintumor.core.config import load_params
from braintumor.evaluate.feature_check import load_feature_checks
from braintumor.serve.bundle import load_bundle
from conftest import REPO, copy_built_pipeline, copy_repo, dvc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_repo(built_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline (conftest.TINY_PIPELINE: MobileNetV3Small, 48 px), run once by `dvc repro`."""
    return copy_built_pipeline(built_pipeline, tmp_path_factory.mktemp("train"))


def test_training_writes_loadable_models_and_metrics(trained_repo, venv_env):
    repo = trained_repo
    for name in ("base", "finetuned"):
        model = keras.saving.load_model(repo / f"models/{name}.keras", safe_mode=True)
        probabilities = model.predict(np.zeros((2, 48, 48, 1), "float32"), verbose=0)
        assert probabilities.shape == (2, 4)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    for stage in ("train_base", "finetune"):
        metrics = json.loads((repo / f"reports/{stage}/metrics.json").read_text())
        history = json.loads((repo / f"reports/{stage}/history.json").read_text())
        # The summary is the restored best epoch (lowest validation loss) of the written history.
        best = int(np.argmin(history["val_loss"]))
        assert metrics["best_epoch"] == best + 1 and metrics["epochs_run"] == len(history["loss"])
        assert metrics["best_val_loss"] == round(history["val_loss"][best], 6)
        assert metrics["best_val_accuracy"] == round(history["val_accuracy"][best], 6)
        assert metrics["train_images_per_second"] > 0
    base_card = json.loads((repo / "models/base.json").read_text())
    card = json.loads((repo / "models/finetuned.json").read_text())
    assert card["model_file"] == "finetuned.keras" and base_card["model_file"] == "base.keras"
    assert card["mlflow_run_id"] != base_card["mlflow_run_id"]
    assert card["backbone"] == "mobilenetv3small" and card["image_size"] == 48
    assert card["preprocess"] == base_card["preprocess"] and card["preprocess"]["image_size"] == 48
    assert card["class_names"] == ["glioma", "meningioma", "no_tumor", "pituitary"]
    assert card["weights"] == base_card["weights"] == {"setting": "none", "source": "none", "file": None}
    # Provenance: the phantom source alone, so the app will warn that real scans are out of its reach.
    split = json.loads((repo / "reports/data/split.json").read_text())
    assert card["training_data"] == base_card["training_data"] == {
        "sources": [{"name": "phantom", "kind": "phantom"}], "synthetic_only": True, "split_strategy": "leak_free",
        "images_per_split": split["per_split"], "train_images_per_class": split["per_split_per_class"]["train"]}
    # The last 10 backbone layers, less the BatchNorm layers among them, which stay frozen.
    assert 0 < json.loads((repo / "reports/finetune/metrics.json").read_text())["layers_unfrozen"] < 10
    assert "train_base" in dvc(repo, venv_env, "metrics", "show")


def test_mlflow_store_holds_both_runs_with_params_metrics_artifacts(trained_repo, venv_env, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("braintumor")
    found = client.search_runs([experiment.experiment_id])
    runs = {r.data.tags["stage"]: r for r in found if "is_group" not in r.data.tags}
    assert set(runs) == {"train_base", "finetune", "export", "evaluate", "gradcam"}
    (group,) = [r for r in found if "is_group" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {group.info.run_id}
    assert group.data.metrics["finetune.test_accuracy"] == runs["finetune"].data.metrics["test_accuracy"]
    base = runs["train_base"]
    assert base.info.status == "FINISHED"
    assert base.data.params["model.backbone"] == "mobilenetv3small"
    assert base.data.params["train_base.epochs"] == "2"
    assert "data_fingerprint" in base.data.tags and "git_commit" in base.data.tags
    assert base.data.tags["weights_source"] == runs["finetune"].data.tags["weights_source"] == "none"
    assert len(client.get_metric_history(base.info.run_id, "val_loss")) == base.data.metrics["epochs_run"]
    artifacts = {a.path for a in client.list_artifacts(runs["finetune"].info.run_id)}
    assert {"model_card.json", "history.json"} <= artifacts
    card = json.loads((trained_repo / "models/finetuned.json").read_text())
    assert card["mlflow_run_id"] == runs["finetune"].info.run_id
    # The fine-tuned model is registered, and loads back by registry URI.
    (version,) = client.search_model_versions("name = 'braintumor-classifier'")
    assert version.run_id == runs["finetune"].info.run_id
    bundle = load_bundle(f"models:/braintumor-classifier/{version.version}", None,
                         load_params(trained_repo / "params.yaml").preprocess,
                         tracking_uri=f"sqlite:///{trained_repo / 'mlflow.db'}")
    assert bundle.identity.mlflow_run_id == version.run_id and bundle.image_size == 48
    # the registry tells a client what goes in and out, as the model card does
    import mlflow.artifacts
    from mlflow.models import Model
    logged = client.get_model_version_download_uri("braintumor-classifier", version.version)
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=logged, dst_path=str(tmp_path),
                                                     tracking_uri=f"sqlite:///{trained_repo / 'mlflow.db'}")
    signature = Model.load(downloaded).signature.to_dict()
    assert json.loads(signature["inputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 48, 48, 1]}, "name": "slices"}]
    assert json.loads(signature["outputs"])[0]["tensor-spec"]["shape"] == [-1, 4]
    temperature = json.loads((trained_repo / "models/calibration.json").read_text())["finetuned"]["temperature"]
    assert bundle.calibration.source == "calibration.json" and bundle.calibration.temperature == pytest.approx(temperature)
    # The feature check comes along from the evaluate run that tagged the version.
    local = load_feature_checks(trained_repo / "models/ood.npz")["finetuned"]
    assert bundle.feature_check is not None and bundle.feature_check.threshold == local.threshold
    assert bundle.model.predict(np.zeros((1, 48, 48, 1), "float32"), verbose=0).shape == (1, 4)

def test_deterministic_training_repeats_metrics_exactly(trained_repo, venv_env):
    before = {s: (trained_repo / f"reports/{s}/metrics.json").read_text() for s in ("train_base", "finetune")}
    dvc(trained_repo, venv_env, "repro", "-f", "train_base", "finetune")
    for stage, text in before.items():
        again = json.loads((trained_repo / f"reports/{stage}/metrics.json").read_text())
        first = json.loads(text)
        for key in ("best_val_loss", "best_val_accuracy", "epochs_run"):
            assert again[key] == first[key], (stage, key)


def test_missing_split_is_a_clear_error(tmp_path, venv_env):
    repo = copy_repo(tmp_path / "repo")
    result = subprocess.run(["python", "stages/train_base.py"], cwd=repo, env=venv_env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "run `dvc repro" in result.stderr


def test_training_data_record_names_every_source_and_its_kind():
    from braintumor.demo import overridden_params
    from braintumor.model.train import training_data_record

    report = {"strategy": "source_folders_clean", "per_split": {"train": 3, "val": 1, "test": 1},
              "per_split_per_class": {"train": {"glioma": 2, "pituitary": 1}}}
    mixed = training_data_record(overridden_params(REPO, {"download.use": ["phantom", "local_nickparvar"]}), report)
    assert mixed == {"sources": [{"name": "phantom", "kind": "phantom"}, {"name": "local_nickparvar", "kind": "local"}],
                     "synthetic_only": False, "split_strategy": "source_folders_clean",
                     "images_per_split": {"train": 3, "val": 1, "test": 1},
                     "train_images_per_class": {"glioma": 2, "pituitary": 1}}
    kaggle = training_data_record(overridden_params(REPO, {}), report)  # params.yaml: the two Kaggle sets
    assert [s["kind"] for s in kaggle["sources"]] == ["kaggle", "kaggle"] and not kaggle["synthetic_only"]
