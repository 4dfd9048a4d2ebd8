"""Stage gradcam: Grad-CAM overlays of test images for both models, and the sanity checks of the maps.

Params: gradcam, download.use (which sources have tumor masks), preprocess (the masks' geometry), mlflow
Inputs: models/finetuned.keras, models/base.keras, models/calibration.json, data/processed/images.npy,
        data/processed/index.csv, data/split/split.csv, reports/data/split.json, data/interim/manifest.csv,
        data/raw/ (the phantom's tumor masks)
Outputs: reports/gradcam/index.html, reports/gradcam/overlays/*.png, reports/gradcam/sanity.json (metrics)
"""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pandas as pd

from braintumor.core import atomic
from braintumor.evaluate.calibration import apply_temperature, load_calibration
from braintumor.core.config import CLASS_NAMES, PhantomSource, load_params
from braintumor.explain.gradcam import (grad_cam, gradcam_layer_name, make_gradcam_model, predict_probabilities,
                                randomisation_test)
from braintumor.explain.report import render_report_html, report_items, sample_positions, select_examples, write_folder
from braintumor.explain.localisation import load_masks, localisation_by_class, mask_files
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.core.tracking import flatten_params, log_summary, stage_run
from braintumor.model.train import load_training_data

MODELS = ("finetuned", "base")  # the first decides which examples count as correctly classified


def main() -> dict:
    log = setup_logging("gradcam")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    cfg = params.gradcam
    data = load_training_data(paths)
    test = data.split["test"]
    images = np.asarray(data.images[test.rows])  # (T, S, S) uint8, in test-split order
    models = {name: keras.saving.load_model(paths.models / f"{name}.keras", safe_mode=True) for name in MODELS}
    temperature = {name: entry["temperature"] for name, entry in load_calibration(paths.calibration_json).items()}
    layers = {name: gradcam_layer_name(model, cfg.layer) for name, model in models.items()}
    cams = {name: make_gradcam_model(model, layers[name]) for name, model in models.items()}
    masks = load_test_masks(paths, params, test.rows)
    logged = {**flatten_params(cfg, "gradcam"), "download.use": ",".join(params.download.use)}
    with stage_run("gradcam", params.mlflow, paths.root, logged_params=logged,
                   tags={"data_fingerprint": data.fingerprint}) as run:
        predicted = {name: predict_probabilities(model, images).argmax(axis=1) for name, model in models.items()}
        examples = select_examples(test.labels, predicted[MODELS[0]], test.rows, cfg.images_per_class, cfg.seed)
        position = {int(row): i for i, row in enumerate(test.rows)}
        shown = np.array([position[example.row] for example in examples], np.int64)
        explanations = {}
        for name, cam in cams.items():  # each model's map of its own prediction
            heatmaps, probabilities = grad_cam(cam, images[shown], predicted[name][shown])
            explanations[name] = heatmaps, predicted[name][shown], apply_temperature(probabilities, temperature[name])
        items, pngs = report_items(examples, images[shown], explanations, cfg.overlay_alpha)
        sanity = sanity_checks(models, cams, layers, images, test.labels, masks, params)
        write_folder(paths.reports / "gradcam" / "overlays", pngs)
        atomic.write_json(paths.reports / "gradcam" / "sanity.json", sanity)
        atomic.write_text(paths.reports / "gradcam" / "index.html", render_report_html(
            items, sanity, CLASS_NAMES, "Grad-CAM report", page_notes(layers, temperature, len(test.rows), cfg)))
        log_summary(flat_metrics(sanity))
        mlflow.log_artifacts(str(paths.reports / "gradcam"), "gradcam")
        log.info("%d report images; randomisation (rank correlation): %s; pointing game (all tumor classes): %s; "
                 "run %s",
                 len(items), {m: s["rank_correlation"] for m, s in sanity["randomisation"]["models"].items()},
                 {m: s["all"]["pointing_game"] for m, s in sanity["localisation"].get("models", {}).items()},
                 run.info.run_id)
    return sanity


def page_notes(layers: dict, temperature: dict, test_images: int, cfg) -> list[str]:
    return [f"Grad-CAM layer: {', '.join(f'{m} {layers[m]}' for m in MODELS)}. Overlays show each model's predicted "
            f"class; probabilities are calibrated by temperature scaling "
            f"({', '.join(f'{m} T = {temperature[m]:.3f}' for m in MODELS)}).",
            f"{test_images} test images; per class up to {cfg.images_per_class} correctly and {cfg.images_per_class} "
            f"wrongly classified by the fine-tuned model, drawn with seed {cfg.seed}."]


def load_test_masks(paths: ProjectPaths, params, rows: np.ndarray) -> np.ndarray | None:
    """(T, S, S) bool tumor masks of the test rows (empty for no tumor and for sources without masks),
    or None when no test image comes from a source with masks (real data: localisation not applicable)."""
    sources = {name: paths.raw_source(name) for name in params.download.use
               if isinstance(params.download.sources[name], PhantomSource)}
    files = mask_files(rows, pd.read_csv(paths.images_index, keep_default_na=False),
                       pd.read_csv(paths.manifest, keep_default_na=False), paths.root, sources)
    if not files:
        return None
    masks = np.zeros((len(rows), params.preprocess.image_size, params.preprocess.image_size), bool)
    with_files = [i for i, row in enumerate(rows.tolist()) if row in files]
    masks[with_files] = load_masks([files[int(rows[i])] for i in with_files], params.preprocess)
    return masks


def sanity_checks(models, cams, layers, images, labels, masks, params) -> dict:
    """The randomisation test and, with masks, the localisation scores, on Grad-CAM of the true class."""
    cfg = params.gradcam
    eligible = np.ones(len(images), bool) if masks is None else masks.reshape(len(masks), -1).any(axis=1)
    picked = sample_positions(eligible, cfg.sanity_images, cfg.seed)
    maps = {name: grad_cam(cam, images[picked], labels[picked])[0] for name, cam in cams.items()}
    randomisation = {"images": int(len(picked)), "max_rank_correlation": cfg.max_rank_correlation, "models": {
        name: randomisation_test(model, layers[name], images[picked], labels[picked], maps[name], cfg.randomise_top,
                                 cfg.seed, cfg.max_rank_correlation)
        for name, model in models.items()}}
    randomisation["passed"] = all(scores["passed"] for scores in randomisation["models"].values())
    if masks is None:
        localisation = {"applicable": False,
                        "reason": "no source in download.use has tumor masks (only the phantom has)"}
    else:
        localisation = {"applicable": True, "images": int(len(picked)), "tolerance_px": cfg.pointing_tolerance_px,
                        "sources": [name for name in params.download.use
                                    if isinstance(params.download.sources[name], PhantomSource)],
                        "models": {name: localisation_by_class(maps[name], masks[picked], labels[picked], CLASS_NAMES,
                                                               cfg.pointing_tolerance_px) for name in models}}
    return {"randomisation": randomisation, "localisation": localisation}


def flat_metrics(sanity: dict) -> dict[str, float]:
    """The headline numbers as MLflow metrics: ``<model>.<score>``."""
    metrics = {}
    for name, scores in sanity["randomisation"]["models"].items():
        metrics[f"{name}.randomisation_rank_correlation"] = scores["rank_correlation"]
        metrics[f"{name}.randomisation_ssim"] = scores["ssim"]
    for name, groups in sanity["localisation"].get("models", {}).items():
        for key in ("pointing_game", "pointing_game_tolerant", "energy_inside", "chance", "chance_tolerant"):
            metrics[f"{name}.{key}"] = groups["all"][key]
    return metrics


if __name__ == "__main__":
    main()
