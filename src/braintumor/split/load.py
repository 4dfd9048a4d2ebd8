"""Reading the split back: what the training, evaluate and gradcam stages load, with clear errors
when an earlier stage has not run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from braintumor.core.config import CLASS_NAMES, TUMOR_LABEL

TUMOR_ID = -1  # the class id of TUMOR_LABEL in an external set: not one of the model's classes


@dataclass(frozen=True)
class SplitRows:
    rows: np.ndarray  # (R,) rows of images.npy
    labels: np.ndarray  # (R,) class ids, indices into CLASS_NAMES
    # (R,) training weights: 1, or 1 / group size for the copies of split.train_copies: all
    weights: np.ndarray | None = None


def load_cached_images(images_npy: Path) -> np.ndarray:
    """The preprocessed (N, S, S) uint8 array, memory-mapped; a clear error if it is missing."""
    if not Path(images_npy).is_file():
        raise FileNotFoundError(f"no preprocessed images at {images_npy}: run `dvc repro preprocess` first")
    return np.load(images_npy, mmap_mode="r")


def load_split(split_csv, class_names: tuple[str, ...]) -> dict[str, SplitRows]:
    """Rows and class ids of each split from ``data/split/split.csv``; a clear error if it is missing."""
    try:
        table = pd.read_csv(split_csv, keep_default_na=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no split at {split_csv}: run `dvc repro split` first") from None
    if "weight" not in table.columns:
        raise ValueError(f"{split_csv} has no weight column (written by an older split stage): rerun `dvc repro split`")
    ids = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(table["label"]) - set(ids))
    if unknown:
        raise ValueError(f"{split_csv} has labels {unknown} outside {list(class_names)}")
    result = {}
    for split in ("train", "val", "test"):
        part = table[table["split"] == split]
        if part.empty:
            raise ValueError(f"{split_csv} has no {split!r} rows")
        result[split] = SplitRows(part["row"].to_numpy(np.int64), part["label"].map(ids).to_numpy(np.int32),
                                  part["weight"].to_numpy(np.float64))
    return result


def load_external(external_csv: Path, class_names: tuple[str, ...]) -> dict[str, SplitRows]:
    """Each external source's rows and class ids (``data/split/external.csv``, ``split.external``), in row order;
    empty when no source is external (or the file predates external sets). A tumor of unknown class
    (``TUMOR_LABEL``, binary sources) has the id :data:`TUMOR_ID`."""
    if not Path(external_csv).is_file():
        return {}
    table = pd.read_csv(external_csv, keep_default_na=False)
    ids = {**{name: i for i, name in enumerate(class_names)}, TUMOR_LABEL: TUMOR_ID}
    unknown = sorted(set(table["label"]) - set(ids))
    if unknown:
        raise ValueError(f"{external_csv} has labels {unknown} outside {list(class_names)}")
    return {source: SplitRows(part["row"].to_numpy(np.int64), part["label"].map(ids).to_numpy(np.int32))
            for source, part in table.groupby("source", sort=True)}


@dataclass(frozen=True)
class TrainingData:
    images: np.ndarray  # (N, S, S) uint8, memory-mapped
    split: dict[str, SplitRows]
    fingerprint: str  # of the split, from reports/data/split.json: tags the MLflow runs
    report: dict  # reports/data/split.json: strategy, images per split and class (the model card's provenance)
    external: dict[str, SplitRows] | None = None  # external source -> its images (split.external), never trained on


def load_training_data(paths) -> TrainingData:
    """What the training, evaluate and gradcam stages read, with clear errors when an earlier stage has not run."""
    split = load_split(paths.split_csv, CLASS_NAMES)
    images = load_cached_images(paths.images_npy)
    report = json.loads((paths.data_reports / "split.json").read_text())
    return TrainingData(images, split, report["fingerprint"], report, load_external(paths.external_csv, CLASS_NAMES))
