"""Stratified group split: whole groups, fractions per class, determinism, leakage accounting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from braintumor.split.partition import (
    groups_spanning_splits,
    leak_free_split,
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
