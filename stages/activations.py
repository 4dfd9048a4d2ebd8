"""Stage activations: the backbone's frozen bottom (below finetune.unfreeze) run once over the training
images, their augmented copies and the validation images; train_base and finetune both read the maps.

Params: model.backbone, model.weights, augment, runtime.seed, runtime.deterministic, preprocess.image_size,
        finetune.unfreeze, finetune.activation_cache, finetune.cache_copies, finetune.cache_dtype
Inputs: data/processed/images.npy, data/split/split.csv
Outputs: data/activations/ (manifest.json; train.npy, train_sources.npy and val.npy when there is a frozen bottom),
         reports/activations/metrics.json (metrics: maps, size, seconds)
"""

from __future__ import annotations

import time

from braintumor.core import atomic
from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.model.activations import build_activation_cache
from braintumor.model.backbones import build_model, freeze_backbone
from braintumor.model.train import configure_runtime
from braintumor.model.weights import resolve_weights
from braintumor.split.load import load_training_data


def main() -> dict:
    log = setup_logging("activations")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    # Not a training stage: one process, whatever runtime.distribution says (each worker of a cluster
    # runs this stage on its own copy of the data).
    configure_runtime(params.runtime.model_copy(update={"distribution": "none"}))
    data = load_training_data(paths)
    weights = resolve_weights(params.model.backbone, params.model.weights, paths.main_root)
    model = build_model(params.model, params.preprocess.image_size, root=paths.main_root, weights=weights)
    freeze_backbone(model)
    started = time.perf_counter()
    manifest = build_activation_cache(model, data.images, data.split, finetune=params.finetune, augment=params.augment,
                                      seed=params.runtime.seed, folder=paths.activations)
    metrics = {**manifest, "seconds": round(time.perf_counter() - started, 2)}
    atomic.write_json(paths.reports / "activations" / "metrics.json", metrics)
    if manifest["cut"] is None:
        log.info("no activation cache: %s (train_base reads the images, finetune trains end to end)", manifest["reason"])
    else:
        log.info("activation cache: %d training maps (%d augmented copies per image) and %d validation maps %s at %s "
                 "in %.1f s (%.0f MB)", manifest["train_maps"], manifest["copies"], manifest["val_maps"],
                 tuple(manifest["shape"]), manifest["layer"], metrics["seconds"], manifest["megabytes"])
    return metrics


if __name__ == "__main__":
    main()
