"""Train / validation / test splits that never separate a duplicate group.

``leak_free`` (the default) takes the kept images, stratifies by label and assigns whole duplicate
groups to splits. ``source_folders`` reproduces a source's own Training/Testing folders, duplicates
and all, as the published numbers were obtained; its leakage is measured and reported, not removed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def stratified_group_split(
    labels: np.ndarray, groups: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Assign each item to 0 (train), 1 (val) or 2 (test), keeping groups whole.

    Each group counts under its most common label (look-alike slices may carry different labels).
    Within each label, groups are shuffled (seeded) and laid end to end; a group goes to the split
    in which its midpoint falls, so every split receives its fraction of each label's images to
    within one group.

    Args:
        labels: (N,) label per item.
        groups: (N,) group id per item.
        fractions: train, val, test fractions summing to 1.
        seed: shuffling seed; the same inputs and seed give the same assignment.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    frame = pd.DataFrame({"label": labels, "group": groups})
    majority = frame.groupby("group")["label"].agg(lambda x: x.value_counts().sort_index().idxmax())
    frame["label"] = frame["group"].map(majority)
    bounds = np.cumsum(fractions)[:-1]
    assignment = np.full(len(labels), -1, np.int64)
    rng = np.random.default_rng(seed)
    for label in sorted(frame["label"].unique()):
        sizes = frame[frame["label"] == label].groupby("group").size()
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        counts = sizes.loc[order].to_numpy()
        midpoints = (np.cumsum(counts) - counts / 2.0) / counts.sum()
        group_split = dict(zip(order, np.searchsorted(bounds, midpoints, side="right")))
        members = frame["label"] == label
        assignment[members.to_numpy()] = frame.loc[members, "group"].map(group_split).to_numpy()
    return assignment


def groups_spanning_splits(groups: np.ndarray, splits: np.ndarray) -> int:
    """How many groups have members in more than one split (0 means no leakage)."""
    frame = pd.DataFrame({"group": groups, "split": splits})
    return int((frame.groupby("group")["split"].nunique() > 1).sum())


def leak_free_split(manifest: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> pd.DataFrame:
    """Kept images only, split by :func:`stratified_group_split` on their related (split) groups."""
    rows = manifest[manifest["kept"]].copy()
    codes = stratified_group_split(rows["label"].to_numpy(), rows["split_group"].to_numpy(), fractions, seed)
    rows["split"] = np.asarray(SPLITS)[codes]
    return rows


def source_folders_split(
    manifest: pd.DataFrame, source: str, test_folder: str, val_fraction: float, seed: int
) -> pd.DataFrame:
    """A source's own folders as published: its ``test_folder`` is test, the rest train + val.

    Every readable image of that source is used, duplicates and label conflicts included, because
    that is what the published numbers were computed on. Validation is carved from the training
    folder with groups kept whole, so only the published train/test boundary leaks.
    """
    rows = manifest[(manifest["source"] == source) & (manifest["status"] == "ok")].copy()
    if rows.empty:
        raise ValueError(f"split.test_source {source!r} has no readable images in the manifest")
    is_test = rows["source_split"].str.split("/").str[0].str.lower() == test_folder.lower()
    if not is_test.any():
        found = sorted(rows["source_split"].unique())
        raise ValueError(f"source {source!r} has no folder {test_folder!r}; its folders are {found}")
    rows["split"] = "test"
    train = rows[~is_test]
    fractions = (1.0 - val_fraction, val_fraction, 0.0)
    codes = stratified_group_split(train["label"].to_numpy(), train["split_group"].to_numpy(), fractions, seed)
    rows.loc[train.index, "split"] = np.asarray(SPLITS)[codes]
    return rows


def split_report(rows: pd.DataFrame, strategy: str) -> dict:
    """Counts per class per split and the leakage check for ``reports/data/split.json``."""
    counts = rows.groupby(["split", "label"]).size()
    per_split = {
        split: {label: int(n) for label, n in counts.loc[split].items()} if split in counts.index.get_level_values(0) else {}
        for split in SPLITS
    }
    return {
        "strategy": strategy,
        "images": int(len(rows)),
        "per_split": {s: int(sum(c.values())) for s, c in per_split.items()},
        "per_split_per_class": per_split,
        "leakage": {
            "duplicate_groups_spanning_splits": groups_spanning_splits(rows["group"].to_numpy(), rows["split"].to_numpy()),
            "related_groups_spanning_splits": groups_spanning_splits(rows["split_group"].to_numpy(), rows["split"].to_numpy()),
        },
    }


def split_fingerprint(rows: pd.DataFrame) -> str:
    """Short stable hash of (image id, split): tags training runs with the exact data they saw."""
    text = "\n".join(f"{i}\t{s}" for i, s in sorted(zip(rows["id"], rows["split"])))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
