"""Stage finetune: unfreeze the top of the base model's backbone (BatchNorm stays frozen) and train on.

Params: model, augment, runtime, finetune, mlflow
Inputs: models/base.keras (and its card models/base.json), data/processed/images.npy, data/split/split.csv, reports/data/split.json,
        data/activations/ (the frozen bottom's maps the epochs train on)
Outputs: models/finetuned.keras, models/finetuned.json (model card), reports/finetune/history.json, reports/finetune/metrics.json (metrics)
"""

from __future__ import annotations

import json

import mlflow

import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.core.tracking import dvc_experiment_name, flatten_sections, git_commit, log_phase, stage_run
from braintumor.model.activations import read_activation_cache
from braintumor.split.load import load_training_data
from braintumor.model.train import (configure_runtime, finetune_card, finetune_model, save_phase, saved_weights,
                                    summary_metrics, test_scores)


def main() -> dict:
    log = setup_logging("finetune")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    logged = flatten_sections(params, "model", "augment", "runtime", "finetune")
    runtime = configure_runtime(params.runtime)  # first: a multi-worker strategy starts before other TensorFlow work
    data = load_training_data(paths)
    activations = read_activation_cache(paths.activations)
    if not runtime.is_chief:  # another worker of a cluster: trains in step with the chief, writes nothing
        finetune_model(params, paths.models / "base.keras", data.images, data.split, runtime, activations)
        return {}
    with stage_run("finetune", params.mlflow, paths.root, logged_params=logged) as run:
        mlflow.set_tag("data_fingerprint", data.fingerprint)
        model, result = finetune_model(params, paths.models / "base.keras", data.images, data.split, runtime, activations)
        metrics = summary_metrics(result, {
            "layers_unfrozen": result["unfrozen"]["unfrozen_layers"],
            **test_scores(model, data.images, data.split["test"], params.finetune.batch_size),
        })
        card = finetune_card(json.loads((paths.models / "base.json").read_text()), run.info.run_id,
                             git_commit=git_commit(paths.root), dvc_experiment=dvc_experiment_name())
        save_phase(model, result, metrics, paths.models / "finetuned.keras", paths.reports / "finetune", card)
        version = log_phase(result["history"], metrics, paths.models / "finetuned.keras", card,
                            registered_model=params.mlflow.registered_model, model=model)
        log.info("fine-tuned model: %s after %d epochs; run %s; registered as %s v%s", saved_weights(metrics),
                 metrics["epochs_run"], run.info.run_id, params.mlflow.registered_model, version)
    return metrics


if __name__ == "__main__":
    main()
