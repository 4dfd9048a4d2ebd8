"""Stage evaluate: both models on the test split, with bootstrap intervals and temperature scaling.

Params: evaluate, mlflow
Inputs: models/base.keras, models/finetuned.keras (and its card: the MLflow run that registered it), models/exports/
    (scored beside it), data/processed/images.npy,
    data/split/split.csv, reports/data/split.json (data fingerprint), data/interim/manifest.csv (image paths),
    data/split/external.csv (external sets, split.external),
    reports/train_base/history.json, reports/finetune/history.json,
    data/activations/ (the out-of-distribution check's training features, when they are its maps)
    evaluate.feature_check.shifted_sets (folders of images unlike the training data, optional)
Outputs: reports/metrics.json (DVC metrics, both models side by side), models/calibration.json
    (temperature and validation confidence quantiles per model, read by the app), models/ood.npz
    (the feature-space out-of-distribution check per model, read by the app), reports/evaluation.md,
    reports/evaluate/: DVC plots data (predictions_<model>.csv, roc/<model>_<class>.csv,
    training_curves.csv), misclassified_<model>.csv, PNG figures
"""

from __future__ import annotations

import json

import mlflow

from braintumor.core import atomic
from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.core.tracking import flatten_params, log_summary, stage_run, tag_registered_version
from braintumor.evaluate.feature_check import save_feature_checks
from braintumor.evaluate.metrics import flat_metrics
from braintumor.evaluate.run import MODELS, evaluate_models, evaluated_image_paths, load_shifted_sets, registry_tags
from braintumor.model.activations import read_activation_cache
from braintumor.model.backbones import feature_check_layer_name
from braintumor.split.load import load_training_data

PHASES = ("train_base", "finetune")  # reports/<phase>/history.json, in training order


def main() -> dict:
    log = setup_logging("evaluate")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    with stage_run("evaluate", params.mlflow, paths.root, logged_params=flatten_params(params.evaluate, "evaluate")) as run:
        data = load_training_data(paths)
        mlflow.set_tag("data_fingerprint", data.fingerprint)
        files, external_files = evaluated_image_paths(data, paths.split_csv, paths.external_csv, paths.manifest)
        histories = {phase: json.loads((paths.reports / phase / "history.json").read_text()) for phase in PHASES}
        shifted = load_shifted_sets(params.evaluate.feature_check.shifted_sets, paths.root, params.preprocess)
        feature_layer = feature_check_layer_name(params.evaluate.feature_check.layer, params.model.backbone)
        result = evaluate_models({name: paths.models / f"{name}.keras" for name in MODELS}, data, files, histories,
                                 params.evaluate, paths.evaluate_reports, feature_layer,
                                 shifted, external_files, paths.exports, read_activation_cache(paths.activations))
        atomic.write_json(paths.calibration_json, result.calibration)
        save_feature_checks(paths.ood_file, result.feature_checks)
        atomic.write_json(paths.metrics_json, result.metrics)
        atomic.write_text(paths.evaluation_md, result.report)
        log_summary(flat_metrics(result.metrics))
        # The registered fine-tuned model gets its calibration and test scores, so that a model
        # loaded by registry URI (the app accepts one) brings its temperature along.
        card = json.loads((paths.models / "finetuned.json").read_text())
        version = tag_registered_version(params.mlflow.registered_model, card["mlflow_run_id"],
                                         registry_tags(result, run.info.run_id))
        for path in (paths.metrics_json, paths.calibration_json, paths.ood_file, paths.evaluation_md):
            mlflow.log_artifact(str(path))
        mlflow.log_artifacts(str(paths.evaluate_reports), "evaluate")
        log.info("tagged %s version %s; run %s", params.mlflow.registered_model, version, run.info.run_id)
    return result.metrics


if __name__ == "__main__":
    main()
