"""Stage gradcam: Grad-CAM overlays of test images for both models, and the sanity checks of the maps.

Params: gradcam, download.use (which sources have tumor masks), preprocess (the masks' and boxes' geometry),
        split.external (whose boxed images are scored), mlflow
Inputs: models/finetuned.keras, models/base.keras, models/calibration.json, data/processed/images.npy,
        data/processed/index.csv, data/split/split.csv, reports/data/split.json, data/interim/manifest.csv,
        data/raw/ (the phantom's tumor masks), data/interim/boxes.csv, data/split/external_removed.csv
Outputs: reports/gradcam/index.html, reports/gradcam/overlays/*.png, reports/gradcam/sanity.json (metrics)
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from braintumor.core import atomic
from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.core.tracking import flatten_params, log_summary, stage_run
from braintumor.evaluate.calibration import load_calibration
from braintumor.explain.run import MODELS, explain_models, flat_metrics, load_box_sets, load_test_masks, mask_sources
from braintumor.split.load import load_training_data


def main() -> dict:
    log = setup_logging("gradcam")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    logged = {**flatten_params(params.gradcam, "gradcam"), "download.use": ",".join(params.download.use),
              "split.external": ",".join(params.split.external)}
    with stage_run("gradcam", params.mlflow, paths.root, logged_params=logged) as run:
        data = load_training_data(paths)
        mlflow.set_tag("data_fingerprint", data.fingerprint)
        test = data.split["test"]
        sources = mask_sources(params.download, paths.raw_source)
        index = pd.read_csv(paths.images_index, keep_default_na=False)
        manifest = pd.read_csv(paths.manifest, keep_default_na=False)
        masks = load_test_masks(test.rows, index, manifest, paths.root, sources, params.preprocess)
        temperature = {name: entry["temperature"] for name, entry in load_calibration(paths.calibration_json).items()}
        box_sets = load_box_sets(data.images, test, index, manifest, pd.read_csv(paths.boxes_csv, keep_default_na=False),
                                 params.split.external, pd.read_csv(paths.external_removed_csv, keep_default_na=False),
                                 paths.root, params.preprocess)
        log.info("images with tumor boxes: %s", ", ".join(f"{len(boxed.rows)} in {name}" for name, (boxed, _) in box_sets.items())
                 or "none (the pointing game on real boxes needs a source with `boxes`, README)")
        result = explain_models({name: paths.models / f"{name}.keras" for name in MODELS}, temperature,
                                np.asarray(data.images[test.rows]), test, masks, params.gradcam, list(sources), box_sets)
        atomic.write_folder(paths.reports / "gradcam" / "overlays", result.pngs)
        atomic.write_json(paths.reports / "gradcam" / "sanity.json", result.sanity)
        atomic.write_text(paths.reports / "gradcam" / "index.html", result.html)
        log_summary(flat_metrics(result.sanity))
        mlflow.log_artifacts(str(paths.reports / "gradcam"), "gradcam")
        sanity = result.sanity
        log.info("%d report images; randomisation (rank correlation): %s; pointing game (all tumor classes): %s; "
                 "run %s", result.images,
                 {m: s["rank_correlation"] for m, s in sanity["randomisation"]["models"].items()},
                 {m: s["all"]["pointing_game"] for m, s in sanity["localisation"].get("models", {}).items()},
                 run.info.run_id)
    return result.sanity


if __name__ == "__main__":
    main()
