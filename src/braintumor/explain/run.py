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
from braintumor.explain.boxes import BoxedImages, draw_boxes, load_boxed_images, score_set
from braintumor.explain.gradcam import (grad_cam, gradcam_layer_name, make_gradcam_model, overlay, predict_probabilities,
                                        randomisation_test)
from braintumor.explain.localisation import load_masks, localisation_by_class, mask_files
from braintumor.explain.report import encode_png, render_report_html, report_items, sample_positions, select_examples
from braintumor.split.load import SplitRows

MODELS = ("finetuned", "base")  # the first decides which examples count as correctly classified


@dataclass(frozen=True)
class Explanation:
    pngs: dict[str, bytes]  # overlays/<name>.png
    sanity: dict  # sanity.json
    html: str  # index.html
    images: int  # report images


def explain_models(model_files: dict[str, Path], temperature: dict[str, float], images: np.ndarray, test: SplitRows,
                   masks: np.ndarray | None, cfg: GradcamParams, mask_sources: list[str],
                   box_sets: dict[str, tuple[BoxedImages, np.ndarray]] | None = None) -> Explanation:
    """The report and the sanity checks of both models' Grad-CAM maps.

    Args:
        model_files: ``.keras`` file per model name, ``MODELS`` order.
        temperature: fitted temperature per model (``models/calibration.json``).
        images: (T, S, S) uint8 test images, in test-split order.
        masks: (T, S, S) bool tumor masks, or None when no test image has one (see :func:`load_test_masks`).
        mask_sources: the sources the masks come from, recorded in ``sanity.json``.
        box_sets: set name -> (images with tumor boxes, their (N, S, S) uint8 slices); see :func:`load_box_sets`.
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
    sanity["boxes"], box_figures = box_localisation(cams, box_sets or {}, cfg)
    for figure in box_figures:
        pngs[figure["file"]] = figure.pop("png")
    html = render_report_html(items, sanity, CLASS_NAMES, "Grad-CAM report",
                              page_notes(layers, temperature, len(test.rows), cfg), box_figures)
    return Explanation(pngs, sanity, html, len(items))


def box_localisation(cams: dict, box_sets: dict[str, tuple[BoxedImages, np.ndarray]], cfg: GradcamParams) -> tuple[dict, list[dict]]:
    """Scores of every model on every set with tumor boxes (:mod:`braintumor.explain.boxes`), and the
    report's example overlays: ``cfg.box_examples`` images of the largest set, spread over its classes,
    with the fine-tuned model's map of the true class, the boxes and the map's peak."""
    if not box_sets:
        return {"applicable": False, "reason": "no test or external image has a tumor box (download.sources.<name>.boxes)"}, []
    size = next(iter(box_sets.values()))[1].shape[1]
    tolerance = cfg.box_tolerance * size
    report = {"applicable": True, "tolerance_share": cfg.box_tolerance, "tolerance_px": round(tolerance, 2), "sets": {}}
    per_image = {}
    for set_name, (boxed, slices) in box_sets.items():
        def heatmaps_of(model: str, positions: np.ndarray, boxed=boxed, slices=slices) -> np.ndarray:
            return grad_cam(cams[model], slices[positions], boxed.labels[positions])[0]

        report["sets"][set_name], per_image[set_name] = score_set(boxed, heatmaps_of, tuple(cams), tolerance, CLASS_NAMES)
    shown_set = max(box_sets, key=lambda name: len(box_sets[name][0].rows))
    boxed, slices = box_sets[shown_set]
    picked = spread_over_classes(boxed.labels, cfg.box_examples, cfg.seed)
    maps = grad_cam(cams[MODELS[0]], slices[picked], boxed.labels[picked])[0]
    figures = []
    for position, heatmap in zip(picked.tolist(), maps):
        picture = draw_boxes(overlay(slices[position], heatmap, cfg.overlay_alpha), boxed.boxes[position], heatmap)
        scores = per_image[shown_set][MODELS[0]]
        figures.append({"file": f"box_{shown_set}_{int(boxed.rows[position])}.png", "png": encode_png(picture),
                        "set": shown_set, "row": int(boxed.rows[position]), "label": CLASS_NAMES[int(boxed.labels[position])],
                        "hit": bool(scores["pointing_game"][position]),
                        "energy_inside": round(float(scores["energy_inside"][position]), 3),
                        "seen": bool(boxed.seen[position])})
    return report, figures


def spread_over_classes(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted positions of up to ``count`` images drawn (seeded) as evenly as the classes allow."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {label: list(rng.permutation(np.flatnonzero(labels == label))) for label in classes}
    picked: list[int] = []
    while len(picked) < count and any(pools.values()):
        for label in classes:
            if pools[label] and len(picked) < count:
                picked.append(int(pools[label].pop()))
    return np.sort(np.asarray(picked, np.int64))


def load_box_sets(images: np.ndarray, test: SplitRows, index: pd.DataFrame, manifest: pd.DataFrame, boxes: pd.DataFrame,
                  external: tuple[str, ...], removed: pd.DataFrame, root: Path,
                  preprocess: PreprocessParams) -> dict[str, tuple[BoxedImages, np.ndarray]]:
    """The sets with tumor boxes: ``test`` (its images with a box) and each external source (every readable
    image with a box, also those left out of its classification set; ``seen`` marks the ones with a copy or
    look-alike in the other sources). Sets without boxes are left out.

    Args:
        images: the cached slices (data/processed/images.npy, memory-mapped).
        index, manifest: data/processed/index.csv, data/interim/manifest.csv.
        boxes: data/interim/boxes.csv. removed: data/split/external_removed.csv.
    """
    with_box = set(boxes["id"])
    test_ids = set(index.set_index("row").loc[test.rows, "id"])
    seen_ids = set(removed.loc[removed["reason"].isin(["copy_of_internal", "lookalike_of_internal"]), "id"])
    path_of = dict(zip(manifest["id"], manifest["path"]))
    class_id = {name: i for i, name in enumerate(CLASS_NAMES)}
    candidates = {"test": index[index["id"].isin(test_ids & with_box)]}
    for source in external:
        candidates[source] = index[(index["source"] == source) & index["id"].isin(with_box)]
    sets = {}
    for name, chosen in candidates.items():
        if chosen.empty:
            continue
        chosen = chosen.sort_values("row")
        boxed = load_boxed_images(chosen["row"].to_numpy(), chosen["label"].map(class_id).to_numpy(),
                                  chosen["id"].tolist(), [root / path_of[i] for i in chosen["id"]], boxes,
                                  chosen["id"].isin(seen_ids).to_numpy(), preprocess)
        sets[name] = boxed, np.asarray(images[boxed.rows])
    return sets


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
    for set_name, scores in sanity.get("boxes", {}).get("sets", {}).items():
        for name, groups in scores["models"].items():
            for key in ("pointing_game", "pointing_game_tolerant", "energy_inside"):
                metrics[f"boxes.{set_name}.{name}.{key}"] = groups["all"][key]
        for key in ("area", "centre", "head_centre"):
            metrics[f"boxes.{set_name}.chance.{key}"] = scores["chance"]["all"][key]
    for name, groups in sanity["localisation"].get("models", {}).items():
        for key in ("pointing_game", "pointing_game_tolerant", "energy_inside", "chance", "chance_tolerant"):
            metrics[f"{name}.{key}"] = groups["all"][key]
    return metrics
