"""Does Grad-CAM point at real tumors? Scores against the tumor boxes some sources carry.

A box (``data/interim/boxes.csv``, raw pixels) is carried into the preprocessed slice by the same
geometry as the pixels (:func:`~braintumor.preprocess.slices.slice_geometry`) and rasterised
(:func:`~braintumor.explain.localisation.box_mask`). The images scored are, per set, the test images
with a box and every image with a box of each external source (``split.external``), also those left
out of its classification set for having a copy in the training data: where a map points does not
depend on whether the label was seen, but the count of such images is reported beside the scores.

For each image: the pointing game (the map's peak inside the box, and within a tolerance), the share
of the map's mass inside the box; and three baselines that do not look at the image's content: a
uniformly random pixel (the box's share of the slice), the slice's centre, and the centre of the head's
box (where the crop put the head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from braintumor.core.config import PreprocessParams
from braintumor.core.imageio import read_grayscale
from braintumor.explain.localisation import box_mask, energy_inside_per_image, near_mask, pointing_hits
from braintumor.preprocess.slices import box_to_slice, slice_geometry

MODEL_SCORES = ("pointing_game", "pointing_game_tolerant", "energy_inside")
BASELINES = ("area", "area_tolerant", "centre", "centre_tolerant", "head_centre", "head_centre_tolerant")


@dataclass(frozen=True)
class BoxedImages:
    """One set of images with tumor boxes, in the preprocessed frame."""

    rows: np.ndarray  # (N,) rows of data/processed/images.npy
    labels: np.ndarray  # (N,) class ids
    boxes: list[list[tuple[float, float, float, float]]]  # per image, in slice pixels
    masks: np.ndarray  # (N, S, S) bool, the union of the image's boxes
    head_centres: np.ndarray  # (N, 2) (x, y) in slice pixels
    seen: np.ndarray  # (N,) bool: a copy or look-alike of the image is in the training data


def load_boxed_images(rows: np.ndarray, labels: np.ndarray, ids: list[str], raw_paths: list[Path],
                      boxes: pd.DataFrame, seen: np.ndarray, preprocess: PreprocessParams) -> BoxedImages:
    """Boxes, masks and head centres of the given images in the preprocessed frame.

    Args:
        rows, labels: each image's row in images.npy and class id.
        ids, raw_paths: each image's manifest id and raw file (the geometry is computed from the raw slice).
        boxes: ``data/interim/boxes.csv``; every id must have at least one box.
        seen: (N,) bool, see :class:`BoxedImages`.
    """
    by_id = {key: group[["x0", "y0", "x1", "y1"]].to_numpy(float) for key, group in boxes.groupby("id")}
    size = preprocess.image_size
    mapped, masks, centres = [], np.zeros((len(ids), size, size), bool), np.zeros((len(ids), 2))
    for i, (key, path) in enumerate(zip(ids, raw_paths)):
        geometry = slice_geometry(read_grayscale(path), preprocess)
        mapped.append([box_to_slice(box, geometry) for box in by_id[key]])
        masks[i] = box_mask(mapped[-1], size)
        x0, y0, x1, y1 = box_to_slice(geometry.head_box, geometry)
        centres[i] = (x0 + x1) / 2, (y0 + y1) / 2
    return BoxedImages(np.asarray(rows, np.int64), np.asarray(labels, np.int64), mapped, masks, centres,
                       np.asarray(seen, bool))


def point_hits(points: np.ndarray, masks: np.ndarray, tolerance: float) -> np.ndarray:
    """(N,) bool: the pixel under each fixed point (x, y) lies inside its mask, or within ``tolerance`` px."""
    masks = np.asarray(masks, bool)
    size = masks.shape[1]
    cols = np.clip(np.floor(points[:, 0]).astype(int), 0, size - 1)
    rows = np.clip(np.floor(points[:, 1]).astype(int), 0, size - 1)
    return near_mask(masks, tolerance)[np.arange(len(masks)), rows, cols]


def baseline_scores(images: BoxedImages, tolerance: float) -> dict[str, np.ndarray]:
    """Per image, what a map that does not look at the image scores (:data:`BASELINES`)."""
    size = images.masks.shape[1]
    centre = np.full((len(images.rows), 2), size / 2)
    return {
        "area": images.masks.mean(axis=(1, 2)),
        "area_tolerant": near_mask(images.masks, tolerance).mean(axis=(1, 2)),
        "centre": point_hits(centre, images.masks, 0), "centre_tolerant": point_hits(centre, images.masks, tolerance),
        "head_centre": point_hits(images.head_centres, images.masks, 0),
        "head_centre_tolerant": point_hits(images.head_centres, images.masks, tolerance),
    }


def model_scores(heatmaps: np.ndarray, masks: np.ndarray, tolerance: float) -> dict[str, np.ndarray]:
    """Per image, the map's scores (:data:`MODEL_SCORES`)."""
    return {"pointing_game": pointing_hits(heatmaps, masks), "pointing_game_tolerant": pointing_hits(heatmaps, masks, tolerance),
            "energy_inside": energy_inside_per_image(heatmaps, masks)}


def by_class(scores: dict[str, np.ndarray], labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, dict]:
    """Means of per-image scores over all images ("all") and per true class present."""
    def mean(chosen: np.ndarray) -> dict:
        return {"images": int(chosen.sum()), **{k: round(float(np.mean(v[chosen])), 4) for k, v in scores.items()}}

    summary = {"all": mean(np.ones(len(labels), bool))}
    for label in np.unique(labels):
        summary[class_names[int(label)]] = mean(labels == label)
    return summary


def score_set(images: BoxedImages, heatmaps_of: Callable[[str, np.ndarray], np.ndarray], models: tuple[str, ...],
              tolerance: float, class_names: tuple[str, ...], chunk: int = 256) -> tuple[dict, dict[str, np.ndarray]]:
    """Scores of one set for each model and the baselines, per class; and each model's per-image scores.

    Args:
        heatmaps_of: (model name, positions in the set) -> (n, S, S) Grad-CAM maps of the true class;
            called a chunk at a time, so the maps of thousands of images never sit in memory together.
    """
    per_model = {}
    for name in models:
        parts = [model_scores(heatmaps_of(name, np.arange(start, min(start + chunk, len(images.rows)))),
                              images.masks[start:start + chunk], tolerance)
                 for start in range(0, len(images.rows), chunk)]
        per_model[name] = {key: np.concatenate([part[key] for part in parts]) for key in MODEL_SCORES}
    chance = by_class(baseline_scores(images, tolerance), images.labels, class_names)
    summary = {"images": int(len(images.rows)), "images_seen_in_training": int(images.seen.sum()),
               "chance": chance, "models": {name: by_class(scores, images.labels, class_names)
                                            for name, scores in per_model.items()}}
    for name, groups in summary["models"].items():
        ours, base = groups["all"], chance["all"]
        groups["all"]["targets"] = {
            "pointing_game_over_3x_area": bool(ours["pointing_game"] >= 3 * base["area"]),
            "pointing_game_over_fixed_points": bool(ours["pointing_game"] > max(base["centre"], base["head_centre"])),
        }
    return summary, per_model


def draw_boxes(rgb: np.ndarray, boxes: list[tuple[float, float, float, float]], heatmap: np.ndarray) -> np.ndarray:
    """A copy of an overlay with the tumor boxes (green) and the map's peak (a white cross) drawn on it."""
    out = rgb.copy()
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (int(round(x0)), int(round(y0))), (max(int(round(x1)) - 1, 0), max(int(round(y1)) - 1, 0)),
                      (40, 220, 60), 1)
    if heatmap.max() > 0:
        y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        cv2.drawMarker(out, (int(x), int(y)), (255, 255, 255), cv2.MARKER_CROSS, max(6, heatmap.shape[0] // 24), 1)
    return out
