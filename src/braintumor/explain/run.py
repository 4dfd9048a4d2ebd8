"""Grad-CAM of both models on test images: the report's overlays and the sanity checks of the maps
(randomisation test; with tumor masks, localisation). What the gradcam stage calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import pandas as pd

import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
from braintumor.core.config import CLASS_NAMES, DownloadParams, GradcamParams, PhantomSource, PreprocessParams
from braintumor.evaluate.calibration import apply_temperature
from braintumor.explain.gradcam import (grad_cam, gradcam_layer_name, make_gradcam_model, predict_probabilities,
                                        randomisation_test)
from braintumor.explain.localisation import load_masks, localisation_by_class, mask_files
from braintumor.explain.report import render_report_html, report_items, sample_positions, select_examples
from braintumor.split.load import SplitRows

MODELS = ("finetuned", "base")  # the first decides which examples count as correctly classified


@dataclass(frozen=True)
class Explanation:
    pngs: dict[str, bytes]  # overlays/<name>.png
    sanity: dict  # sanity.json
    html: str  # index.html
    images: int  # report images


def explain_models(model_files: dict[str, Path], temperature: dict[str, float], images: np.ndarray, test: SplitRows,
                   masks: np.ndarray | None, cfg: GradcamParams, mask_sources: list[str]) -> Explanation:
    """The report and the sanity checks of both models' Grad-CAM maps.

    Args:
        model_files: ``.keras`` file per model name, ``MODELS`` order.
        temperature: fitted temperature per model (``models/calibration.json``).
        images: (T, S, S) uint8 test images, in test-split order.
        masks: (T, S, S) bool tumor masks, or None when no test image has one (see :func:`load_test_masks`).
        mask_sources: the sources the masks come from, recorded in ``sanity.json``.
    """
    models = {name: keras.saving.load_model(model_files[name], safe_mode=True) for name in MODELS}
    layers = {name: gradcam_layer_name(model, cfg.layer) for name, model in models.items()}
    cams = {name: make_gradcam_model(model, layers[name]) for name, model in models.items()}
    predicted = {name: predict_probabilities(model, images).argmax(axis=1) for name, model in models.items()}
    examples = select_examples(test.labels, predicted[MODELS[0]], test.rows, cfg.images_per_class, cfg.seed)
    position = {int(row): i for i, row in enumerate(test.rows)}
    shown = np.array([position[example.row] for example in examples], np.int64)
    explanations = {}
    for name, cam in cams.items():  # each model's map of its own prediction
        heatmaps, probabilities = grad_cam(cam, images[shown], predicted[name][shown])
        explanations[name] = heatmaps, predicted[name][shown], apply_temperature(probabilities, temperature[name])
    items, pngs = report_items(examples, images[shown], explanations, cfg.overlay_alpha)
    sanity = sanity_checks(models, cams, layers, images, test.labels, masks, cfg, mask_sources)
    html = render_report_html(items, sanity, CLASS_NAMES, "Grad-CAM report",
                              page_notes(layers, temperature, len(test.rows), cfg))
    return Explanation(pngs, sanity, html, len(items))


def page_notes(layers: dict, temperature: dict, test_images: int, cfg: GradcamParams) -> list[str]:
    return [f"Grad-CAM layer: {', '.join(f'{m} {layers[m]}' for m in MODELS)}. Overlays show each model's predicted "
            f"class; probabilities are calibrated by temperature scaling "
            f"({', '.join(f'{m} T = {temperature[m]:.3f}' for m in MODELS)}).",
            f"{test_images} test images; per class up to {cfg.images_per_class} correctly and {cfg.images_per_class} "
            f"wrongly classified by the fine-tuned model, drawn with seed {cfg.seed}."]


def mask_sources(download: DownloadParams, raw_folder: Callable[[str], Path]) -> dict[str, Path]:
    """The used sources that have tumor masks (only the phantom has), each with its raw folder."""
    return {name: raw_folder(name) for name in download.use if isinstance(download.sources[name], PhantomSource)}


def load_test_masks(rows: np.ndarray, index: pd.DataFrame, manifest: pd.DataFrame, root: Path,
                    mask_sources: dict[str, Path], preprocess: PreprocessParams) -> np.ndarray | None:
    """(T, S, S) bool tumor masks of the test rows (empty for no tumor and for sources without masks),
    or None when no test image comes from a source with masks (real data: localisation not applicable).

    Args:
        index, manifest, root, mask_sources: as for :func:`~braintumor.explain.localisation.mask_files`.
    """
    files = mask_files(rows, index, manifest, root, mask_sources)
    if not files:
        return None
    masks = np.zeros((len(rows), preprocess.image_size, preprocess.image_size), bool)
    with_files = [i for i, row in enumerate(rows.tolist()) if row in files]
    masks[with_files] = load_masks([files[int(rows[i])] for i in with_files], preprocess)
    return masks


def sanity_checks(models, cams, layers, images, labels, masks, cfg: GradcamParams, mask_sources: list[str]) -> dict:
    """The randomisation test and, with masks, the localisation scores, on Grad-CAM of the true class."""
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
                        "sources": mask_sources,
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
