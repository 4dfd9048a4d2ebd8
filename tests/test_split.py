"""Stratified group split: whole groups, fractions per class, determinism, leakage accounting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from braintumor.core.config import SplitParams
from braintumor.split.partition import (
    external_report,
    groups_spanning_splits,
    separate_external,
    leak_free_split,
    one_per_group,
    source_folders_clean_split,
    source_folders_split,
    split_by_strategy,
    split_report,
    stratified_group_split,
)


def _toy(n_groups: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, group ids and item keys (file-like names) of groups of 1-3 items."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 1, 2, 3], n_groups)
    group_labels = rng.choice(["glioma", "meningioma", "no_tumor", "pituitary"], n_groups, p=[0.4, 0.3, 0.2, 0.1])
    groups = np.repeat(np.arange(n_groups), sizes)
    keys = np.array([f"src/Training/{label}/{i:05d}.jpg" for i, label in enumerate(np.repeat(group_labels, sizes))])
    return np.repeat(group_labels, sizes), groups, keys


def test_groups_never_span_splits_and_fractions_hold_per_class():
    labels, groups, keys = _toy()
    codes = stratified_group_split(labels, groups, keys, (0.7, 0.15, 0.15), seed=3)
    assert set(np.unique(codes)) == {0, 1, 2}
    assert groups_spanning_splits(groups, codes) == 0
    for label in np.unique(labels):
        share = np.bincount(codes[labels == label], minlength=3) / (labels == label).sum()
        np.testing.assert_allclose(share, [0.7, 0.15, 0.15], atol=0.04)


def test_deterministic_for_seed_and_changes_with_seed():
    labels, groups, keys = _toy()
    a = stratified_group_split(labels, groups, keys, (0.7, 0.15, 0.15), seed=1)
    b = stratified_group_split(labels, groups, keys, (0.7, 0.15, 0.15), seed=1)
    c = stratified_group_split(labels, groups, keys, (0.7, 0.15, 0.15), seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_the_assignment_follows_the_items_not_the_group_numbers():
    labels, groups, keys = _toy()
    codes = stratified_group_split(labels, groups, keys, (0.7, 0.15, 0.15), seed=1)
    shuffled = np.random.default_rng(5).permutation(groups.max() + 1)[groups]  # the same groups, renumbered
    order = np.random.default_rng(6).permutation(len(labels))  # and the rows in another order
    again = stratified_group_split(labels[order], shuffled[order], keys[order], (0.7, 0.15, 0.15), seed=1)
    np.testing.assert_array_equal(again, codes[order])


def test_one_more_link_moves_only_the_linked_groups_and_a_few_at_the_boundaries():
    # Another CPU can round one borderline duplicate match the other way: the grouping then differs by
    # one link. Under a seeded permutation of the group numbers that reshuffled most of the split.
    labels, groups, keys = _toy(n_groups=2000)
    codes = stratified_group_split(labels, groups, keys, (0.7, 0.15, 0.15), seed=1)
    glioma_groups = np.unique(groups[labels == "glioma"])
    for a, b in zip(glioma_groups[:20:2], glioma_groups[1:20:2]):
        linked = np.where(groups == b, a, groups)
        moved = stratified_group_split(labels, linked, keys, (0.7, 0.15, 0.15), seed=1) != codes
        touched = np.isin(groups, [a, b])
        # the linked pair, plus at most a group or two (three items each at most) per boundary
        assert moved[~touched].sum() <= 12, (a, b, moved[~touched].sum())


def test_group_with_two_labels_stays_whole():
    labels = np.array(["glioma", "glioma", "pituitary"] + ["pituitary"] * 20)
    groups = np.array([0, 0, 0] + list(range(1, 21)))
    keys = np.array([f"k{i:02d}" for i in range(len(labels))])
    codes = stratified_group_split(labels, groups, keys, (0.5, 0.25, 0.25), 0)
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
    frame = _clean_case()
    # Source b: 10 slices of its own, and b/x, a look-alike of the Testing slice a/u0 (group 400).
    related = frame[frame["id"] == "b/0"].assign(id="b/x", group=500, split_group=400)
    frame = pd.concat([frame, related], ignore_index=True)
    rows, accounting = source_folders_clean_split(frame, "a", "Testing", val_fraction=0.2, seed=0)
    test = rows[rows["split"] == "test"]
    # a/2 (copy of a/1) and a/3 (look-alike of a/t0) go; a/n1 stays for its pair; a/c1, a/c2 conflict.
    assert sorted(test["id"]) == ["a/n1", *[f"a/u{i}" for i in range(6)]]
    assert accounting == {"testing_folder": 12, "overlapping_training": 2, "label_conflicts": 2,
                          "duplicates_within_testing": 1, "test": 7, "other_sources_excluded": 1}
    assert set(rows.loc[rows["source_split"] == "Training", "split"]) == {"train", "val"}
    assert len(rows[rows["source_split"] == "Training"]) == 41  # a/1 and the 40 distinct slices
    # The other source trains, except b/x: the test set is the same as with source a alone.
    assert set(rows.loc[rows["source"] == "b", "id"]) == {f"b/{i}" for i in range(10)}
    assert set(rows.loc[rows["source"] == "b", "split"]) <= {"train", "val"}
    alone, _ = source_folders_clean_split(_clean_case()[lambda f: f["source"] == "a"], "a", "Testing", 0.2, 0)
    assert sorted(alone.loc[alone["split"] == "test", "id"]) == sorted(test["id"])
    report = split_report(rows, "source_folders_clean")
    assert report["leakage"] == {"duplicate_groups_spanning_splits": 0, "related_groups_spanning_splits": 0}
    # The leaky strategy on the same data keeps all 12 and leaks the copy and the look-alike.
    leaky = split_report(source_folders_split(_clean_case(), "a", "Testing", 0.2, 0), "source_folders")
    assert leaky["per_split"]["test"] == 12 and leaky["leakage"]["related_groups_spanning_splits"] == 2


def _copies_case() -> pd.DataFrame:
    """60 single-image groups plus group 900 with 4 members (kept g/0, copies g/1-g/3, g/3 filed
    under another class than its group) and group 901, a label conflict (both dropped)."""
    frame = pd.DataFrame({
        "id": [f"s/{i}" for i in range(60)], "source": "s", "source_split": "", "group": range(60),
        "label": [["glioma", "pituitary"][i % 2] for i in range(60)], "kept": True, "status": "ok", "drop_reason": ""})
    extra = pd.DataFrame({
        "id": ["g/0", "g/1", "g/2", "g/3", "g/4", "c/1", "c/2"], "source": "s", "source_split": "",
        "group": [900, 900, 900, 900, 900, 901, 901],
        "label": ["glioma", "glioma", "glioma", "pituitary", "glioma", "glioma", "pituitary"],
        "kept": [True, False, False, False, False, False, False],
        "status": ["ok", "ok", "ok", "ok", "unreadable", "ok", "ok"],
        "drop_reason": ["", "duplicate_of:g/0", "duplicate_of:g/0", "duplicate_of:g/0", "", "label_conflict", "label_conflict"]})
    frame = pd.concat([frame, extra], ignore_index=True)
    frame["split_group"] = frame["group"]
    return frame


def _split_params(**overrides) -> SplitParams:
    return SplitParams(**{"train": 0.6, "val": 0.2, "test": 0.2, "seed": 1, **overrides})


def _train_copies_case(copies: str) -> pd.DataFrame:
    """The split with group 900 in training (the seed is searched, so the case never depends on luck)."""
    for seed in range(50):
        rows, _ = split_by_strategy(_copies_case(), _split_params(seed=seed, train_copies=copies))
        if rows.loc[rows["id"] == "g/0", "split"].item() == "train":
            return rows
    raise AssertionError("group 900 never landed in training")


def test_train_copies_all_adds_the_groups_members_weighted_to_sum_to_one():
    one, every = _train_copies_case("one"), _train_copies_case("all")
    assert (one["weight"] == 1.0).all() and "g/1" not in set(one["id"])
    members = every[every["group"] == 900]
    # g/3 carries another label than its group, g/4 is unreadable: neither trains.
    assert sorted(members["id"]) == ["g/0", "g/1", "g/2"]
    assert (members["split"] == "train").all()
    assert np.allclose(members["weight"], 1 / 3)
    assert every.groupby("group")["weight"].sum().round(9).eq(1.0).all()
    assert not set(every["id"]) & {"c/1", "c/2"}  # label conflicts stay out
    # Evaluation is untouched: the same validation and test rows, one per group, weight 1.
    for split in ("val", "test"):
        assert sorted(every.loc[every["split"] == split, "id"]) == sorted(one.loc[one["split"] == split, "id"])
        assert (every.loc[every["split"] == split, "weight"] == 1.0).all()
    report = split_report(every, "leak_free")
    assert report["train_images"] == report["train_groups"] + 2
    assert report["leakage"]["duplicate_groups_spanning_splits"] == 0


def test_train_copies_all_on_clean_folders_takes_copies_from_training_folders_only():
    frame = _clean_case()
    # a/1 (Training) gets a second Training copy; a/2, its Testing copy, must not join training.
    extra = frame[frame["id"] == "a/1"].assign(id="a/1b", kept=False, drop_reason="duplicate_of:a/1")
    frame = pd.concat([frame, extra], ignore_index=True)
    for seed in range(50):
        params = _split_params(strategy="source_folders_clean", test_source="a", train_copies="all", seed=seed)
        rows, accounting = split_by_strategy(frame, params)
        if rows.loc[rows["id"] == "a/1", "split"].item() == "train":
            break
    group0 = rows[rows["group"] == 0]
    assert sorted(group0["id"]) == ["a/1", "a/1b"] and (group0["split"] == "train").all()
    assert np.allclose(group0["weight"], 0.5)
    assert accounting["test"] == 7 and "a/2" not in set(rows["id"])
    assert not set(rows.loc[rows["split"] == "train", "split_group"]) & set(rows.loc[rows["split"] == "test", "split_group"])


def _external_case() -> pd.DataFrame:
    """Internal source "a" (20 distinct slices, groups 0-19) and external source "x" (10 files):
    x/copy (same group as a/0; the merge kept x's larger copy), x/adj (a look-alike of a/1: same related
    group), x/n1 + x/n2 (two copies of a new slice), x/c1 + x/c2 (a new slice filed under two labels),
    x/m (labelled pituitary, a copy of a/2 labelled glioma: the merge saw a conflict that only x
    caused), and 3 new distinct slices; plus one quarantined external file."""
    rows = [(f"a/{i}", "a", ["glioma", "meningioma", "no_tumor", "pituitary"][i % 4], i, i, True, "", "ok")
            for i in range(20)]
    rows += [
        ("x/copy", "x", "glioma", 0, 0, True, "", "ok"),
        ("x/adj", "x", "meningioma", 100, 1, True, "", "ok"),
        ("x/n1", "x", "no_tumor", 101, 101, True, "", "ok"), ("x/n2", "x", "no_tumor", 101, 101, False, "duplicate_of:x/n1", "ok"),
        ("x/c1", "x", "glioma", 102, 102, False, "label_conflict", "ok"),
        ("x/c2", "x", "pituitary", 102, 102, False, "label_conflict", "ok"),
        ("x/m", "x", "pituitary", 2, 2, False, "label_conflict", "ok"),
        *[(f"x/u{i}", "x", "pituitary", 200 + i, 200 + i, True, "", "ok") for i in range(3)],
        ("x/bad", "x", "", -1, -1, False, "quarantined", "quarantined"),
    ]
    frame = pd.DataFrame(rows, columns=["id", "source", "label", "group", "split_group", "kept", "drop_reason", "status"])
    frame.loc[frame["id"] == "a/0", ["kept", "drop_reason"]] = [False, "duplicate_of:x/copy"]
    frame.loc[frame["id"] == "a/2", ["kept", "drop_reason"]] = [False, "label_conflict"]
    return frame


def test_external_images_with_a_copy_or_lookalike_inside_are_removed_with_their_reason():
    internal, external, removed = separate_external(_external_case(), ["x"])
    assert set(internal["source"]) == {"a"} and len(internal) == 20
    # The merge kept x's copy of a/0 and saw a/2's conflict only through x: inside, both are kept again.
    assert internal["kept"].all() and (internal["drop_reason"] == "").all()
    assert sorted(external["id"]) == ["x/n1", "x/u0", "x/u1", "x/u2"]
    reasons = dict(zip(removed["id"], removed["reason"]))
    assert reasons == {"x/copy": "copy_of_internal", "x/m": "copy_of_internal", "x/adj": "lookalike_of_internal",
                       "x/n2": "duplicate_within_external", "x/c1": "label_conflict", "x/c2": "label_conflict"}
    matches = dict(zip(removed["id"], removed["matches"]))
    assert matches["x/copy"] == "a/0" and matches["x/adj"] == "a/1" and matches["x/n2"] == ""
    report = external_report(external, removed, ["x"])["x"]
    assert report == {"readable": 10, "n": 4, "per_class": {"no_tumor": 1, "pituitary": 3},
                      "removed": {"copy_of_internal": 2, "lookalike_of_internal": 1, "label_conflict": 2,
                                  "duplicate_within_external": 1}}
    # What trains never contains an external image, and a copy's internal twin trains as usual.
    rows, _ = split_by_strategy(internal, _split_params(train_copies="all"))
    assert not rows["id"].str.startswith("x/").any() and "a/0" in set(rows["id"])


def test_no_external_source_changes_nothing():
    frame = _external_case()
    internal, external, removed = separate_external(frame, [])
    pd.testing.assert_frame_equal(internal, frame)
    assert external.empty and removed.empty


def test_a_source_labelled_only_tumor_or_not_must_be_external():
    frame = _external_case()
    frame.loc[frame["id"].str.startswith("x/u"), "label"] = "tumor"
    with pytest.raises(ValueError, match=r"sources \['x'\] have images labelled 'tumor'.*split.external"):
        separate_external(frame, [])
    _, external, _ = separate_external(frame, ["x"])
    assert set(external["label"]) == {"tumor", "no_tumor"}


def test_tumor_agrees_with_every_tumor_class_but_not_with_no_tumor():
    from braintumor.core.config import labels_disagree
    assert not labels_disagree(["tumor", "glioma"]) and not labels_disagree(["tumor", "tumor"])
    assert labels_disagree(["tumor", "no_tumor"]) and labels_disagree(["glioma", "pituitary", "tumor"])


def test_tumor_vs_no_tumor_scores_by_the_summed_tumor_probability():
    from braintumor.evaluate.metrics import tumor_vs_no_tumor
    is_tumor = np.array([True, True, True, False, False])
    tumor_probability = np.array([0.9, 0.6, 0.4, 0.2, 0.5])  # one tumor missed, one healthy slice called tumor (0.5)
    entry = tumor_vs_no_tumor(is_tumor, tumor_probability, resamples=300, seed=0)
    assert entry["sensitivity"] == pytest.approx(2 / 3, abs=1e-6) and entry["specificity"] == 0.5
    assert entry["accuracy"] == 0.6 and entry["roc_auc"] == pytest.approx(5 / 6, abs=1e-6)
    assert entry["counts"] == {"tumor_called_tumor": 2, "tumor_called_no_tumor": 1, "no_tumor_called_tumor": 1,
                               "no_tumor_called_no_tumor": 1}
    assert entry["sensitivity_ci95"]["low"] <= entry["sensitivity"] <= entry["sensitivity_ci95"]["high"]
    only_tumors = tumor_vs_no_tumor(is_tumor[:3], tumor_probability[:3], resamples=10, seed=0)
    assert only_tumors["specificity"] is None and only_tumors["roc_auc"] is None
