"""Stratified group split: whole groups, fractions per class, determinism, leakage accounting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from braintumor.split.partition import (
    groups_spanning_splits,
    leak_free_split,
    one_per_group,
    source_folders_clean_split,
    source_folders_split,
    split_report,
    stratified_group_split,
)


def _toy(n_groups: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 1, 2, 3], n_groups)
    group_labels = rng.choice(["glioma", "meningioma", "no_tumor", "pituitary"], n_groups, p=[0.4, 0.3, 0.2, 0.1])
    groups = np.repeat(np.arange(n_groups), sizes)
    return np.repeat(group_labels, sizes), groups


def test_groups_never_span_splits_and_fractions_hold_per_class():
    labels, groups = _toy()
    codes = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=3)
    assert set(np.unique(codes)) == {0, 1, 2}
    assert groups_spanning_splits(groups, codes) == 0
    for label in np.unique(labels):
        share = np.bincount(codes[labels == label], minlength=3) / (labels == label).sum()
        np.testing.assert_allclose(share, [0.7, 0.15, 0.15], atol=0.04)


def test_deterministic_for_seed_and_changes_with_seed():
    labels, groups = _toy()
    a = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=1)
    b = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=1)
    c = stratified_group_split(labels, groups, (0.7, 0.15, 0.15), seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_group_with_two_labels_stays_whole():
    labels = np.array(["glioma", "glioma", "pituitary"] + ["pituitary"] * 20)
    groups = np.array([0, 0, 0] + list(range(1, 21)))
    codes = stratified_group_split(labels, groups, (0.5, 0.25, 0.25), 0)
    assert len(set(codes[:3])) == 1


def test_leakage_counter_on_hand_built_case():
    assert groups_spanning_splits(np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 2, 1])) == 1


def _manifest() -> pd.DataFrame:
    # Two sources; src "a" has a duplicate group (ids a/1, a/2) across its Training/Testing folders.
    rows = [
        ("a/1", "a", "Training", "glioma", 0, True),
        ("a/2", "a", "Testing", "glioma", 0, False),
        *[(f"a/t{i}", "a", "Training", ["glioma", "pituitary"][i % 2], 10 + i, True) for i in range(40)],
        *[(f"a/s{i}", "a", "Testing", ["glioma", "pituitary"][i % 2], 100 + i, True) for i in range(10)],
        *[(f"b/{i}", "b", "", "pituitary", 200 + i, True) for i in range(10)],
    ]
    frame = pd.DataFrame(rows, columns=["id", "source", "source_split", "label", "group", "kept"])
    frame["split_group"] = frame["group"]
    frame["status"] = "ok"
    frame["drop_reason"] = ""
    return frame


def test_leak_free_split_uses_kept_rows_only():
    rows = leak_free_split(_manifest(), (0.6, 0.2, 0.2), seed=0)
    assert "a/2" not in set(rows["id"])
    assert split_report(rows, "leak_free")["leakage"]["duplicate_groups_spanning_splits"] == 0


def test_source_folders_split_reproduces_folders_and_counts_the_leak():
    rows = source_folders_split(_manifest(), "a", "Testing", val_fraction=0.2, seed=0)
    assert set(rows["source"]) == {"a"}
    assert (rows.loc[rows["source_split"] == "Testing", "split"] == "test").all()
    assert set(rows.loc[rows["source_split"] == "Training", "split"]) == {"train", "val"}
    report = split_report(rows, "source_folders")
    assert report["leakage"]["duplicate_groups_spanning_splits"] == 1  # the planted a/1 ~ a/2 pair
    assert report["per_split"]["test"] == 11


def test_source_folders_split_names_missing_folder():
    with pytest.raises(ValueError, match="no folder 'Test'.*Testing"):
        source_folders_split(_manifest(), "a", "Test", 0.2, 0)


def _clean_case() -> pd.DataFrame:
    """Source "a": 40 distinct Training slices, and a Testing folder of 12 files: a copy of a
    Training slice (a/2), a look-alike of one (a/3, same related group as a/t0), two copies of one
    new slice (a/n1, a/n2), a label-conflicting pair (a/c1, a/c2) and 6 new distinct slices."""
    frame = _manifest()
    frame = frame[~frame["id"].str.startswith("a/s")].copy()  # drop the 10 plain Testing slices
    extra = [
        ("a/3", "a", "Testing", "glioma", 300, True),
        ("a/n1", "a", "Testing", "pituitary", 301, True), ("a/n2", "a", "Testing", "pituitary", 301, False),
        ("a/c1", "a", "Testing", "glioma", 302, False), ("a/c2", "a", "Testing", "pituitary", 302, False),
        *[(f"a/u{i}", "a", "Testing", ["glioma", "pituitary"][i % 2], 400 + i, True) for i in range(6)],
    ]
    added = pd.DataFrame(extra, columns=["id", "source", "source_split", "label", "group", "kept"])
    added["split_group"] = added["group"]
    added.loc[added["id"] == "a/3", "split_group"] = 10  # related to a/t0's group (an adjacent slice)
    added["status"], added["drop_reason"] = "ok", ""
    added.loc[added["group"] == 302, "drop_reason"] = "label_conflict"
    return pd.concat([frame, added], ignore_index=True)


def test_one_per_group_prefers_the_kept_copy():
    rows = pd.DataFrame({"id": ["x2", "x1", "y1"], "group": [1, 1, 2], "kept": [True, False, False]})
    assert one_per_group(rows)["id"].tolist() == ["x2", "y1"]
    rows["kept"] = False
    assert one_per_group(rows)["id"].tolist() == ["x1", "y1"]  # none kept: the first id


def test_source_folders_clean_removes_every_testing_image_related_to_training():
    rows, accounting = source_folders_clean_split(_clean_case(), "a", "Testing", val_fraction=0.2, seed=0)
    test = rows[rows["split"] == "test"]
    # a/2 (copy of a/1) and a/3 (look-alike of a/t0) go; a/n1 stays for its pair; a/c1, a/c2 conflict.
    assert sorted(test["id"]) == ["a/n1", *[f"a/u{i}" for i in range(6)]]
    assert accounting == {"testing_folder": 12, "overlapping_training": 2, "label_conflicts": 2,
                          "duplicates_within_testing": 1, "test": 7}
    assert set(rows.loc[rows["source_split"] == "Training", "split"]) == {"train", "val"}
    assert len(rows[rows["source_split"] == "Training"]) == 41  # a/1 and the 40 distinct slices
    report = split_report(rows, "source_folders_clean")
    assert report["leakage"] == {"duplicate_groups_spanning_splits": 0, "related_groups_spanning_splits": 0}
    # The leaky strategy on the same data keeps all 12 and leaks the copy and the look-alike.
    leaky = split_report(source_folders_split(_clean_case(), "a", "Testing", 0.2, 0), "source_folders")
    assert leaky["per_split"]["test"] == 12 and leaky["leakage"]["related_groups_spanning_splits"] == 2
