"""Train / validation / test splits that never separate a duplicate group.

``leak_free`` (the default) takes the kept images, stratifies by label and assigns whole duplicate
groups to splits. ``source_folders`` reproduces a source's own Training/Testing folders, duplicates
and all, as the published numbers were obtained; its leakage is measured and reported, not removed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from braintumor.core.config import TUMOR_LABEL

SPLITS = ("train", "val", "test")


def group_order_keys(groups: np.ndarray, keys: np.ndarray, seed: int) -> pd.Series:
    """A seeded, machine-independent sort key per group: a hash of the seed and the group's smallest
    item key (a file's id, which is its source and path).

    A group's place in the order depends only on its own members, so a grouping that differs by one
    link (another CPU rounds a borderline match the other way) moves only the groups it touches and a
    few at the split boundaries. A seeded permutation of the group numbers, as before, reshuffled
    everything after the first changed group: joining two random glioma groups of nickparvar-224, five
    times, changed 15 to 229 of its 536 test slices (0 to 2 with this order).
    """
    first = pd.Series(np.asarray(keys, dtype=str)).groupby(np.asarray(groups)).min()
    digest = [int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")
              for key in first]
    return pd.Series(np.asarray(digest, dtype=np.uint64), index=first.index)


def stratified_group_split(
    labels: np.ndarray, groups: np.ndarray, keys: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Assign each item to 0 (train), 1 (val) or 2 (test), keeping groups whole.

    Each group counts under its most common label (look-alike slices may carry different labels).
    Within each label, groups are ordered by :func:`group_order_keys` (seeded) and laid end to end; a
    group goes to the split in which its midpoint falls, so every split receives its fraction of each
    label's images to within one group.

    Args:
        labels: (N,) label per item.
        groups: (N,) group id per item.
        keys: (N,) a stable, unique name per item (its id): what orders the groups, not the group ids,
            which renumber when the grouping changes.
        fractions: train, val, test fractions summing to 1.
        seed: ordering seed; the same inputs and seed give the same assignment.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    frame = pd.DataFrame({"label": labels, "group": groups})
    majority = frame.groupby("group")["label"].agg(lambda x: x.value_counts().sort_index().idxmax())
    frame["label"] = frame["group"].map(majority)
    order_keys = group_order_keys(groups, keys, seed)
    bounds = np.cumsum(fractions)[:-1]
    assignment = np.full(len(labels), -1, np.int64)
    for label in sorted(frame["label"].unique()):
        sizes = frame[frame["label"] == label].groupby("group").size()
        order = sizes.index.to_numpy()[np.argsort(order_keys.loc[sizes.index].to_numpy(), kind="stable")]
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
    codes = stratified_group_split(rows["label"].to_numpy(), rows["split_group"].to_numpy(), rows["id"].to_numpy(),
                                   fractions, seed)
    rows["split"] = np.asarray(SPLITS)[codes]
    return rows


def _source_rows(manifest: pd.DataFrame, source: str, test_folder: str) -> tuple[pd.DataFrame, pd.Series]:
    """A source's readable rows and which of them sit in its ``test_folder``; ValueError naming what is missing."""
    rows = manifest[(manifest["source"] == source) & (manifest["status"] == "ok")].copy()
    if rows.empty:
        raise ValueError(f"split.test_source {source!r} has no readable images in the manifest")
    is_test = rows["source_split"].str.split("/").str[0].str.lower() == test_folder.lower()
    if not is_test.any():
        found = sorted(rows["source_split"].unique())
        raise ValueError(f"source {source!r} has no folder {test_folder!r}; its folders are {found}")
    return rows, is_test


def _train_and_val(rows: pd.DataFrame, train: pd.Index, val_fraction: float, seed: int) -> None:
    """Mark ``rows.loc[train]`` as train or val, related groups kept whole, stratified by label."""
    part = rows.loc[train]
    codes = stratified_group_split(part["label"].to_numpy(), part["split_group"].to_numpy(), part["id"].to_numpy(),
                                   (1.0 - val_fraction, val_fraction, 0.0), seed)
    rows.loc[train, "split"] = np.asarray(SPLITS)[codes]


def source_folders_split(
    manifest: pd.DataFrame, source: str, test_folder: str, val_fraction: float, seed: int
) -> pd.DataFrame:
    """A source's own folders as published: its ``test_folder`` is test, the rest train + val.

    Every readable image of that source is used, duplicates and label conflicts included, because
    that is what the published numbers were computed on. Validation is carved from the training
    folder with groups kept whole, so only the published train/test boundary leaks.
    """
    rows, is_test = _source_rows(manifest, source, test_folder)
    rows["split"] = "test"
    _train_and_val(rows, rows.index[~is_test], val_fraction, seed)
    return rows


def one_per_group(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per duplicate group: the merge's kept copy where it is among them, else the first id."""
    ordered = rows.sort_values(["kept", "id"], ascending=[False, True], kind="stable")
    return ordered.drop_duplicates("group").sort_index()


def source_folders_clean_split(
    manifest: pd.DataFrame, source: str, test_folder: str, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """A source's own folders made leak-free: the only fair way to compare with models trained on them.

    Test is the source's ``test_folder`` minus every image whose related group (a copy or a look-alike
    slice) has a member in the source's other folders (its Training folder), one image per duplicate
    group. Train and validation are that Training folder plus every other merged source's images that
    share no related group with the test images. The test set therefore depends on the test source
    alone (the same images whatever else is merged, so numbers stay comparable with models trained
    on that Training folder), while other sources add training data. Each duplicate group counts
    once, and label-conflicting groups are left out, as in ``leak_free``.

    Returns:
        The rows with their split, and the test folder's accounting: ``testing_folder`` (readable
        images), ``overlapping_training`` (removed: a copy or look-alike is in Training),
        ``label_conflicts`` (removed), ``duplicates_within_testing`` (removed: a second copy of a
        remaining slice), ``test`` (what is left), ``other_sources_excluded`` (images of other
        sources left out of training because they are related to a test image).
    """
    rows, is_test = _source_rows(manifest, source, test_folder)
    conflict = rows["drop_reason"] == "label_conflict"
    training_groups = set(rows.loc[~is_test, "split_group"])
    overlapping = is_test & rows["split_group"].isin(training_groups)
    candidates = rows[is_test & ~overlapping & ~conflict]
    test = one_per_group(candidates)
    others = manifest[(manifest["source"] != source) & (manifest["status"] == "ok")
                      & (manifest["drop_reason"] != "label_conflict")]
    related_to_test = others["split_group"].isin(set(test["split_group"]))
    pool = pd.concat([rows[~is_test & ~conflict], others[~related_to_test]])
    train = one_per_group(pool)
    kept = pd.concat([train, test]).sort_index()
    kept["split"] = "test"
    _train_and_val(kept, train.index, val_fraction, seed)
    accounting = {
        "testing_folder": int(is_test.sum()),
        "overlapping_training": int(overlapping.sum()),
        "label_conflicts": int((is_test & ~overlapping & conflict).sum()),
        "duplicates_within_testing": int(len(candidates) - len(test)),
        "test": int(len(test)),
        "other_sources_excluded": int(related_to_test.sum()),
    }
    return kept, accounting


def clean_training_pool(manifest: pd.DataFrame, source: str, test_folder: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Where :func:`with_training_copies` may take copies from under ``source_folders_clean``: readable
    images outside the source's test folder that share no related group with a test image."""
    readable = manifest[manifest["status"] == "ok"]
    in_test_folder = (readable["source"] == source) & (
        readable["source_split"].str.split("/").str[0].str.lower() == test_folder.lower())
    test_groups = set(rows.loc[rows["split"] == "test", "split_group"])
    return readable[~in_test_folder & ~readable["split_group"].isin(test_groups)]


def with_training_copies(rows: pd.DataFrame, pool: pd.DataFrame) -> pd.DataFrame:
    """``rows`` plus every other member of each training duplicate group found in ``pool``, weighted.

    Copies of a training image (re-encodings, other resolutions, re-uploads) are free augmentation;
    only evaluation must count a group once. A member joins only if it carries its group's label and
    is not part of a label conflict. Each training group's weights sum to 1 (``weight`` = 1 / members),
    so a slice uploaded five times counts as much as one uploaded once; validation and test rows keep
    weight 1 and stay one per group.

    Args:
        rows: split rows (a subset of the manifest, same index) with their ``split``.
        pool: manifest rows the copies may come from (readable, and for a source's own folders only
            the folders training may use).
    """
    train = rows[rows["split"] == "train"]
    label_of_group = dict(zip(train["group"], train["label"]))
    extra = pool[pool["group"].isin(label_of_group.keys()) & ~pool.index.isin(rows.index)
                 & (pool["drop_reason"] != "label_conflict")]
    extra = extra[extra["label"].to_numpy() == extra["group"].map(label_of_group).to_numpy()].copy()
    extra["split"] = "train"
    combined = pd.concat([rows, extra]).sort_index()
    is_train = combined["split"] == "train"
    combined["weight"] = 1.0
    combined.loc[is_train, "weight"] = 1.0 / combined.loc[is_train].groupby("group")["id"].transform("size")
    return combined


def split_by_strategy(manifest: pd.DataFrame, params) -> tuple[pd.DataFrame, dict[str, int] | None]:
    """The rows of ``params.strategy`` (the ``split`` params section) with their split and training
    ``weight``, and the clean test folder's accounting for ``source_folders_clean`` (None otherwise).

    ``params.train_copies == "all"`` adds the other members of each training duplicate group
    (:func:`with_training_copies`); ``source_folders`` already uses every image, as published.
    """
    val_fraction = params.val / (params.train + params.val)
    readable = manifest[manifest["status"] == "ok"]
    accounting = None
    if params.strategy == "leak_free":
        rows, pool = leak_free_split(manifest, (params.train, params.val, params.test), params.seed), readable
    elif params.strategy == "source_folders":
        rows = source_folders_split(manifest, params.test_source, params.test_folder, val_fraction, params.seed)
        return rows.assign(weight=1.0), None
    else:
        rows, accounting = source_folders_clean_split(manifest, params.test_source, params.test_folder,
                                                      val_fraction, params.seed)
        pool = clean_training_pool(manifest, params.test_source, params.test_folder, rows)
    if params.train_copies == "all":
        return with_training_copies(rows, pool), accounting
    return rows.assign(weight=1.0), accounting


# Why an external image is left out of its external set (data/split/external_removed.csv).
EXTERNAL_REMOVAL_REASONS = {
    "copy_of_internal": "a copy of an image of the other sources (same duplicate group)",
    "lookalike_of_internal": "a look-alike slice of an image of the other sources (same related group)",
    "label_conflict": "its duplicate group carries more than one label",
    "duplicate_within_external": "a second copy of an external slice (each slice counts once)",
}


def _with_internal_representatives(internal: pd.DataFrame, touched: set) -> pd.DataFrame:
    """Re-choose ``kept`` (and ``drop_reason``) among the internal members of the groups that also had
    external members: the merge may have kept the external copy, or seen a label conflict only with it."""
    internal = internal.copy()
    mine = internal[(internal["status"] == "ok") & internal["group"].isin(touched)]
    for _, members in mine.sort_values(["kept", "id"], ascending=[False, True], kind="stable").groupby("group", sort=False):
        if members["label"].nunique() > 1:
            internal.loc[members.index, ["kept", "drop_reason"]] = [False, "label_conflict"]
            continue
        internal.loc[members.index, "kept"] = False
        internal.loc[members.index[0], ["kept", "drop_reason"]] = [True, ""]
        internal.loc[members.index[1:], "drop_reason"] = f"duplicate_of:{members['id'].iloc[0]}"
    return internal


def separate_external(manifest: pd.DataFrame, external: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The manifest without the external sources, their images that are new to it, and the ones removed.

    An external source (``split.external``) never enters training, validation or test. Each of its
    readable images stays in its external set unless it is a copy or a look-alike of an image of the
    other sources, carries a conflicting label, or is a second copy of an external slice; each removal
    is listed with its reason (:data:`EXTERNAL_REMOVAL_REASONS`) and the internal image it matches.

    Returns:
        (internal manifest, with representatives re-chosen where the merge kept an external copy;
        external rows, one per duplicate group; removed rows with ``reason`` and ``matches``).
    """
    is_external = manifest["source"].isin(list(external))
    readable = manifest["status"] == "ok"
    binary = sorted(set(manifest.loc[~is_external & readable & (manifest["label"] == TUMOR_LABEL), "source"]))
    if binary:
        raise ValueError(f"sources {binary} have images labelled {TUMOR_LABEL!r} (a tumor of unknown class, e.g. a 'yes' "
                         "folder): they cannot train a four-class model; list them in split.external to evaluate them "
                         "as tumor vs no tumor")
    touched = set(manifest.loc[is_external & readable, "group"])
    internal = _with_internal_representatives(manifest[~is_external], touched)
    inside = internal[internal["status"] == "ok"]
    first_of_group = inside.sort_values("id").drop_duplicates("group").set_index("group")["id"]
    first_of_related = inside.sort_values("id").drop_duplicates("split_group").set_index("split_group")["id"]
    candidates = manifest[is_external & readable].copy()
    candidates["matches"] = candidates["group"].map(first_of_group)
    lookalike = candidates["matches"].isna()
    candidates.loc[lookalike, "matches"] = candidates.loc[lookalike, "split_group"].map(first_of_related)
    candidates["reason"] = np.select(
        [candidates["group"].isin(first_of_group.index), candidates["split_group"].isin(first_of_related.index),
         candidates["drop_reason"] == "label_conflict"],
        ["copy_of_internal", "lookalike_of_internal", "label_conflict"], default="")
    remaining = candidates[candidates["reason"] == ""]
    kept = remaining.sort_values("id", kind="stable").drop_duplicates("group")
    candidates.loc[remaining.index.difference(kept.index), "reason"] = "duplicate_within_external"
    candidates["matches"] = candidates["matches"].fillna("")
    removed = candidates[candidates["reason"] != ""]
    return internal, kept.sort_index().drop(columns=["matches", "reason"]), removed


def external_report(external: pd.DataFrame, removed: pd.DataFrame, sources: Sequence[str]) -> dict:
    """Per external source: readable images, those removed by reason, and the external set left per class."""
    report = {}
    for source in sources:
        kept, gone = external[external["source"] == source], removed[removed["source"] == source]
        report[source] = {
            "readable": int(len(kept) + len(gone)),
            "removed": {reason: int((gone["reason"] == reason).sum()) for reason in EXTERNAL_REMOVAL_REASONS},
            "n": int(len(kept)),
            "per_class": {label: int(n) for label, n in kept.groupby("label").size().items()},
        }
    return report


def split_report(rows: pd.DataFrame, strategy: str) -> dict:
    """Counts per class per split and the leakage check for ``reports/data/split.json``."""
    counts = rows.groupby(["split", "label"]).size()
    per_split = {
        split: {label: int(n) for label, n in counts.loc[split].items()} if split in counts.index.get_level_values(0) else {}
        for split in SPLITS
    }
    train = rows[rows["split"] == "train"]
    return {
        "strategy": strategy,
        "images": int(len(rows)),
        # with split.train_copies: all, training holds several members of a group (weights summing to 1)
        "train_images": int(len(train)),
        "train_groups": int(train["group"].nunique()),
        "per_split": {s: int(sum(c.values())) for s, c in per_split.items()},
        "per_split_per_class": per_split,
        "leakage": {
            "duplicate_groups_spanning_splits": groups_spanning_splits(rows["group"].to_numpy(), rows["split"].to_numpy()),
            "related_groups_spanning_splits": groups_spanning_splits(rows["split_group"].to_numpy(), rows["split"].to_numpy()),
        },
    }


def with_cache_rows(rows: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with the ``row`` of each image in the preprocessed array (``data/processed/index.csv``), in row order."""
    rows = rows.merge(index[["id", "row"]], on="id", how="left", validate="one_to_one")
    if rows["row"].isna().any():
        raise RuntimeError("split rows missing from data/processed/index.csv: rerun `dvc repro preprocess`")
    return rows.astype({"row": int}).sort_values("row")


def split_fingerprint(rows: pd.DataFrame) -> str:
    """Short stable hash of (image id, split): tags training runs with the exact data they saw."""
    text = "\n".join(f"{i}\t{s}" for i, s in sorted(zip(rows["id"], rows["split"])))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
