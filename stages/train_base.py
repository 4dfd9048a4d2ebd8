"""Stage train_base: the head on a frozen ImageNet backbone (inference mode), optionally on cached features.

Params: model, augment, runtime, train_base, preprocess.image_size, mlflow
Inputs: data/processed/images.npy, data/split/split.csv, reports/data/split.json (data fingerprint),
        data/activations/ (the features are derived from it when it holds their augmented copies)
Outputs: models/base.keras, models/base.json (model card), reports/train_base/history.json, reports/train_base/metrics.json (metrics)
"""

from __future__ import annotations


import mlflow

from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.core.tracking import dvc_experiment_name, flatten_sections, git_commit, log_phase, stage_run
from braintumor.model.activations import read_activation_cache
from braintumor.split.load import load_training_data
from braintumor.model.train import (configure_runtime, model_card, save_phase, saved_weights, summary_metrics, test_scores,
                                    train_base_model, training_data_record)
from braintumor.model.weights import resolve_weights


def main() -> dict:
    log = setup_logging("train_base")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    logged = {**flatten_sections(params, "model", "augment", "runtime", "train_base"),
              "preprocess.image_size": str(params.preprocess.image_size)}
    runtime = configure_runtime(params.runtime)  # first: a multi-worker strategy starts before other TensorFlow work
    data = load_training_data(paths)
    weights = resolve_weights(params.model.backbone, params.model.weights, paths.main_root)
    activations = read_activation_cache(paths.activations)
    if not runtime.is_chief:  # another worker of a cluster: trains in step with the chief, writes nothing
        train_base_model(params, data.images, data.split, runtime, weights, paths.main_root, activations)
        return {}
    with stage_run("train_base", params.mlflow, paths.root, logged_params=logged) as run:
        mlflow.set_tag("data_fingerprint", data.fingerprint)
        log.info("backbone %s, weights %s (%s)", params.model.backbone, weights.path or "random", weights.source)
        model, result = train_base_model(params, data.images, data.split, runtime, weights, paths.main_root, activations)
        metrics = summary_metrics(result, {
            "feature_cache_seconds": result.get("feature_cache_seconds", 0.0),
            **test_scores(model, data.images, data.split["test"], params.train_base.batch_size),
        })
        card = model_card("base.keras", run.info.run_id, params, data.fingerprint,
                          git_commit=git_commit(paths.root), dvc_experiment=dvc_experiment_name(), weights=weights,
                          training_data=training_data_record(params, data.report))
        save_phase(model, result, metrics, paths.models / "base.keras", paths.reports / "train_base", card)
        log_phase(result["history"], metrics, paths.models / "base.keras", card)
        log.info("base model: %s after %d epochs; run %s", saved_weights(metrics), metrics["epochs_run"], run.info.run_id)
    return metrics


if __name__ == "__main__":
    main()
