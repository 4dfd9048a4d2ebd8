"""Does a heatmap point at the tumor? Tumor masks brought into the preprocessed frame, and the scores.

Only the phantom source has masks: ``data/raw/<source>/masks/<path below images/>.png`` (uint8 0/255,
the size of the raw image). A mask lives in the raw image's frame; the model sees the preprocessed
slice (crop to the head, pad to a square, resize), so :func:`preprocess_mask` puts the mask through
the same geometry, with the crop box computed from the raw image exactly as
:func:`braintumor.preprocess.slices.preprocess_slice` computes it.

Scores, for heatmaps (N, S, S) in [0, 1] and masks (N, S, S) bool, each mask non-empty:

- pointing game (Zhang et al., 2016): the share of heatmaps whose peak lies inside the mask;
- energy inside: the share of the heatmap's total mass inside the mask, averaged over images;
- chance: a heatmap that knows nothing (uniform, or its peak at a uniformly random pixel) scores the
  mask's share of the image on both: :func:`mask_area_share`;
- a centre prior (a Gaussian at the image centre) is scored the same way: a heatmap that only knows
  "tumors are near the middle" must be beaten too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from braintumor.core.config import PreprocessParams
from braintumor.core.imageio import read_grayscale
from braintumor.preprocess.slices import pad_to_square, slice_geometry

MASKS_FOLDER = "masks"
IMAGES_FOLDER = "images"


def mask_path_for(source_folder: Path, image_path: Path) -> Path:
    """The phantom mask of a raw image: ``<source>/masks/<image path below <source>/images>.png``.

    Raises:
        ValueError: ``image_path`` is not below ``<source_folder>/images``.
    """
    images = Path(source_folder) / IMAGES_FOLDER
    try:
        relative = Path(image_path).relative_to(images)
    except ValueError:
        raise ValueError(f"{image_path} is not below {images}: no mask can be found for it") from None
    return Path(source_folder) / MASKS_FOLDER / relative.with_suffix(".png")


def preprocess_mask(mask: np.ndarray, raw_gray: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """A raw-frame mask in the preprocessed frame: crop to the head of ``raw_gray``, pad, resize (nearest).

    Args:
        mask: (H, W) bool or uint8 (non-zero = tumor), the size of the raw image.
        raw_gray: (H, W) uint8, the raw slice as ``read_grayscale`` decodes it: the crop box comes from it.
        params: the ``preprocess`` section (``crop_to_head``, ``head_threshold``, ``image_size``).

    Returns:
        (S, S) bool.
    """
    if mask.shape != raw_gray.shape:
        raise ValueError(f"mask {mask.shape} and raw image {raw_gray.shape} differ in size")
    binary = (np.asarray(mask) > 0).astype(np.uint8) * 255
    y0, y1, x0, x1 = slice_geometry(raw_gray, params).crop
    square = pad_to_square(np.ascontiguousarray(binary[y0:y1, x0:x1]))
    size = params.image_size
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_NEAREST_EXACT) > 0


def box_mask(boxes: Sequence[Sequence[float]], size: int) -> np.ndarray:
    """(size, size) bool: the pixels whose centre lies inside any of the boxes (x0, y0, x1, y1, in the
    slice's pixels, e.g. from :func:`~braintumor.preprocess.slices.box_to_slice`). A box too thin to hold
    a pixel centre marks the pixel its centre falls in, so that no box scores as empty."""
    mask = np.zeros((size, size), bool)
    centres = np.arange(size) + 0.5
    for x0, y0, x1, y1 in boxes:
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        if rows.any() and cols.any():
            mask[np.ix_(rows, cols)] = True
        else:
            row = min(max(int((y0 + y1) / 2), 0), size - 1)
            col = min(max(int((x0 + x1) / 2), 0), size - 1)
            mask[row, col] = True
    return mask


def load_preprocessed_mask(image_path: Path, mask_path: Path, params: PreprocessParams) -> np.ndarray:
    """The mask file of a raw image, in the preprocessed frame (S, S) bool; a clear error if it is missing."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"tumor mask {mask_path} of {image_path} is missing or unreadable")
    return preprocess_mask(mask, read_grayscale(image_path), params)


def _check(heatmaps: np.ndarray, masks: np.ndarray, caller: str) -> tuple[np.ndarray, np.ndarray]:
    heatmaps, masks = np.asarray(heatmaps, np.float64), np.asarray(masks, bool)
    if heatmaps.ndim != 3 or heatmaps.shape != masks.shape or len(heatmaps) == 0:
        raise ValueError(f"{caller}: expected non-empty heatmaps and masks (N, S, S) of one shape, "
                         f"got {heatmaps.shape} and {masks.shape}")
    empty = np.flatnonzero(~masks.reshape(len(masks), -1).any(axis=1))
    if empty.size:
        raise ValueError(f"{caller}: masks {empty[:10].tolist()} are empty; score only images with a tumor")
    return heatmaps, masks


def near_mask(masks: np.ndarray, tolerance: float) -> np.ndarray:
    """(N, S, S) bool: pixels within ``tolerance`` pixels (Euclidean) of the mask; the mask itself for 0."""
    masks = np.asarray(masks, bool)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance == 0:
        return masks
    # distanceTransform measures the distance to the nearest zero pixel: make the mask the zeros.
    distances = [cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) for mask in masks]
    return np.stack(distances) <= tolerance


def pointing_hits(heatmaps: np.ndarray, masks: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """(N,) bool: the heatmap's peak lies inside the mask, or within ``tolerance`` pixels of it.

    Zhang et al. (2016) allow 15 pixels at 224 px, since a map computed on a coarse grid (7 x 7 for
    ResNet50 at 224) peaks at the centre of a 32-pixel cell. An all-zero heatmap points nowhere and
    counts as a miss; among tied peaks the first in row-major order is taken.
    """
    heatmaps, masks = _check(heatmaps, masks, "pointing_hits")
    flat = heatmaps.reshape(len(heatmaps), -1)
    peaks = flat.argmax(axis=1)
    inside = near_mask(masks, tolerance).reshape(len(masks), -1)[np.arange(len(masks)), peaks]
    return inside & (flat.max(axis=1) > 0)


def pointing_game(heatmaps: np.ndarray, masks: np.ndarray, tolerance: float = 0.0) -> float:
    """Share of heatmaps whose peak lies inside the tumor mask (see :func:`pointing_hits`)."""
    return float(np.mean(pointing_hits(heatmaps, masks, tolerance)))


def energy_inside_per_image(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) share of each heatmap's total mass inside its mask; 0 for an all-zero heatmap."""
    heatmaps, masks = _check(heatmaps, masks, "energy_inside_per_image")
    total = heatmaps.sum(axis=(1, 2))
    inside = (heatmaps * masks).sum(axis=(1, 2))
    return np.divide(inside, total, out=np.zeros_like(total), where=total > 0)


def energy_inside(heatmaps: np.ndarray, masks: np.ndarray) -> float:
    """Mean share of heatmap energy inside the tumor mask (see :func:`energy_inside_per_image`)."""
    return float(np.mean(energy_inside_per_image(heatmaps, masks)))


def mask_area_share(masks: np.ndarray, tolerance: float = 0.0) -> float:
    """Chance level of both scores: the mean share of the image the mask (grown by ``tolerance``) covers.

    A heatmap that knows nothing puts its peak on a uniformly random pixel (a hit with probability
    = that share) and spreads its energy evenly (the mask's share inside, ``tolerance`` 0).
    """
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or len(masks) == 0:
        raise ValueError(f"mask_area_share: expected non-empty masks (N, S, S), got {masks.shape}")
    return float(near_mask(masks, tolerance).mean(axis=(1, 2)).mean())


def centre_prior(size: int, sigma: float = 0.25) -> np.ndarray:
    """A Gaussian heatmap (size, size) in (0, 1] peaked at the image centre; ``sigma`` in image widths.

    The baseline "tumors are near the middle of the head": no look at the image at all.
    """
    coordinates = (np.arange(size) - (size - 1) / 2) / size
    squared = coordinates[:, None] ** 2 + coordinates[None, :] ** 2
    return np.exp(-squared / (2 * sigma**2))


def localisation_scores(heatmaps: np.ndarray, masks: np.ndarray, tolerance: float) -> dict[str, float]:
    """Pointing game (strict and within ``tolerance`` px) and energy inside the mask, beside chance and
    the centre prior, for one set of maps."""
    heatmaps, masks = _check(heatmaps, masks, "localisation_scores")
    centre = np.broadcast_to(centre_prior(heatmaps.shape[1]), heatmaps.shape)
    return {
        "images": int(len(heatmaps)),
        "pointing_game": round(pointing_game(heatmaps, masks), 4),
        "pointing_game_tolerant": round(pointing_game(heatmaps, masks, tolerance), 4),
        "energy_inside": round(energy_inside(heatmaps, masks), 4),
        "chance": round(mask_area_share(masks), 4),
        "chance_tolerant": round(mask_area_share(masks, tolerance), 4),
        "centre_prior_pointing_game": round(pointing_game(centre, masks), 4),
        "centre_prior_pointing_game_tolerant": round(pointing_game(centre, masks, tolerance), 4),
        "centre_prior_energy_inside": round(energy_inside(centre, masks), 4),
    }


def localisation_by_class(heatmaps: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                          class_names: tuple[str, ...], tolerance: float) -> dict[str, dict[str, float]]:
    """:func:`localisation_scores` over all images ("all") and per true class present in ``labels``."""
    labels = np.asarray(labels)
    scores = {"all": localisation_scores(heatmaps, masks, tolerance)}
    for label in np.unique(labels):
        chosen = labels == label
        scores[class_names[int(label)]] = localisation_scores(heatmaps[chosen], masks[chosen], tolerance)
    return scores


# --------------------------------------------------------------------------- finding the masks of processed rows


def mask_files(rows: np.ndarray, index: pd.DataFrame, manifest: pd.DataFrame, root: Path,
               mask_sources: dict[str, Path]) -> dict[int, tuple[Path, Path]]:
    """Raw image and mask file of each cached row that comes from a source with masks.

    Args:
        rows: rows of ``data/processed/images.npy``.
        index: ``data/processed/index.csv`` (row -> manifest id, source).
        manifest: ``data/interim/manifest.csv`` (id -> path, relative to ``root``).
        root: the project root.
        mask_sources: source name -> its raw folder, for the sources that have masks (the phantom).

    Returns:
        row -> (raw image path, mask path); rows from other sources are left out.
    """
    by_row = index.set_index("row")
    path_of = dict(zip(manifest["id"], manifest["path"]))
    files = {}
    for row in np.asarray(rows).tolist():
        record = by_row.loc[row]
        if record["source"] in mask_sources:
            image = Path(root) / path_of[record["id"]]
            files[int(row)] = (image, mask_path_for(mask_sources[record["source"]], image))
    return files


def load_masks(files: list[tuple[Path, Path]], params: PreprocessParams) -> np.ndarray:
    """(N, S, S) bool masks in the preprocessed frame, one per (raw image, mask file) pair."""
    size = params.image_size
    if not files:
        return np.zeros((0, size, size), bool)
    return np.stack([load_preprocessed_mask(image, mask, params) for image, mask in files])
