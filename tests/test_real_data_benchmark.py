"""benchmarks/real_data.py's own logic: which sources it merges, and how it reads a run's metrics.
(The runs themselves take an hour on 2 cores: they are the benchmark, not a test.)"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _real_data():
    return _benchmark("real_data")


def test_source_overrides_merge_the_named_datasets_and_test_on_nickparvar(tmp_path):
    real_data = _real_data()
    (tmp_path / "nickparvar-224").mkdir()
    (tmp_path / "sartaj").mkdir()
    overrides = real_data.source_overrides(["nickparvar", "sartaj"], tmp_path)
    assert overrides == {
        "download.use": ["local_nickparvar", "local_sartaj"], "split.test_source": "local_nickparvar",
        "download.sources.local_nickparvar.path": str(tmp_path / "nickparvar-224"),
        "download.sources.local_sartaj.path": str(tmp_path / "sartaj")}
    with pytest.raises(ValueError, match="must start with nickparvar"):
        real_data.source_overrides(["sartaj"], tmp_path)
    with pytest.raises(ValueError, match="name only"):
        real_data.source_overrides(["nickparvar", "br35h"], tmp_path)
    (tmp_path / "sartaj").rmdir()
    with pytest.raises(FileNotFoundError, match="sartaj is missing"):
        real_data.source_overrides(["nickparvar", "sartaj"], tmp_path)


def test_scores_read_from_a_metrics_entry():
    entry = {"accuracy": 0.9, "accuracy_ci95": {"low": 0.87, "high": 0.93},
             "macro_f1": 0.88, "macro_f1_ci95": {"low": 0.85, "high": 0.91}, "ece": 0.02,
             "validation": {"accuracy": 0.92, "macro_f1": 0.91}}
    assert _real_data().scores_of(entry) == {"accuracy": 0.9, "accuracy_ci": [0.87, 0.93],
                                             "macro_f1": 0.88, "macro_f1_ci": [0.85, 0.91],
                                             "validation": {"accuracy": 0.92, "macro_f1": 0.91}}


def test_every_image_set_is_scored_from_one_prediction_per_file(tmp_path):
    import pandas as pd

    peers = _benchmark("peers")
    rows = pd.DataFrame({"path": ["a.png", "b.png", "c.png", "d.png"],
                         "label": ["glioma", "glioma", "pituitary", "no_tumor"]})
    sets = {"testing": rows, "clean": rows.iloc[[0, 2]]}
    paths = [str(tmp_path / p) for p in rows["path"]]
    predicted = {"peer": ["glioma", "pituitary", "pituitary", "no_tumor"], "ours": ["glioma"] * 4}
    scored = peers.score_image_sets(tmp_path, sets, paths, predicted)
    assert scored["testing"]["n"] == 4 and scored["clean"]["n"] == 2
    assert scored["testing"]["peer"]["accuracy"] == 0.75 and scored["testing"]["ours"]["accuracy"] == 0.5
    assert scored["clean"]["peer"]["accuracy"] == 1.0 and scored["clean"]["ours"]["accuracy"] == 0.5
    # Macro-F1 over the classes the set holds (glioma, pituitary), as the evaluate stage and the intervals
    # count it: a class with no image must not add an F1 of 0 (the clean Testing folder has no no-tumor slice).
    assert scored["clean"]["peer"]["macro_f1"] == 1.0 and scored["clean"]["ours"]["macro_f1"] == pytest.approx(1 / 3, abs=1e-4)
    for entry in (scored["clean"]["peer"], scored["clean"]["ours"], scored["testing"]["peer"]):
        assert entry["macro_f1_ci"][0] <= entry["macro_f1"] <= entry["macro_f1_ci"][1]


def test_dedup_recall_real_mode_plants_copies_among_a_folder_and_scores_them(tmp_path):
    from pathlib import Path

    from braintumor.core.config import PhantomDuplicates, PhantomSource, load_params
    from braintumor.data.phantom.source import generate_phantom_source

    dedup_recall = _benchmark("dedup_recall")
    generate_phantom_source(tmp_path, PhantomSource(kind="phantom", images_per_class=8, image_size=128, seed=4,
                                                    duplicates=PhantomDuplicates(**dict.fromkeys(PhantomDuplicates.model_fields, 0))))
    params = load_params(REPO / "params.yaml")
    planted = tmp_path / "planted"
    records = dedup_recall.plant_real_copies(tmp_path / "images", planted, ["rotated", "exact"], 3, seed=0)
    assert len(records) == 6 and len({r["original"] for r in records}) == 6  # distinct originals
    assert all((planted / r["copy"].removeprefix("synthetic/")).is_file() for r in records)
    exact = [r for r in records if r["kind"] == "exact"]
    assert all((planted / r["copy"].removeprefix("synthetic/")).read_bytes()
               == (tmp_path / "images" / r["original"].removeprefix("real/")).read_bytes() for r in exact)
    scores = dedup_recall.real_data_recall(Path(tmp_path / "images"), ["rotated", "resized"], 3, 0, params,
                                           params.merge.near_duplicates)
    assert scores["images"] == 32 + 6 and scores["planted"] == {"resized": 3, "rotated": 3}
    assert scores["recall"] == scores["split_recall"] == {"resized": 1.0, "rotated": 1.0}
    # another dataset merged along (here the same 32 files again): its copies are counted, none planted among them
    shutil.copytree(tmp_path / "images", tmp_path / "again")
    scores = dedup_recall.real_data_recall(Path(tmp_path / "images"), ["rotated"], 3, 0, params,
                                           params.merge.near_duplicates, [tmp_path / "again"])
    assert scores["images"] == 2 * 32 + 3 and scores["split_recall"] == {"rotated": 1.0}
    across = scores["duplicates"]["exact_across_sources"]["groups"] + scores["duplicates"]["near_across_sources"]["groups"]
    assert across == 32  # every file's group spans both folders (near: the 3 that also hold a rotated copy)


def test_dedup_recall_settings_reach_into_the_keypoint_section_and_are_validated():
    from pydantic import ValidationError

    from braintumor.core.config import NearDuplicateParams

    dedup_recall = _benchmark("dedup_recall")
    near = dedup_recall.with_settings(NearDuplicateParams(), ["keypoints.words=1024", "detail_similarity=0.97"])
    assert near.keypoints.words == 1024 and near.detail_similarity == 0.97
    assert near.keypoints.features == NearDuplicateParams().keypoints.features
    with pytest.raises(KeyError, match="wrods"):
        dedup_recall.with_settings(NearDuplicateParams(), ["keypoints.wrods=1024"])
    with pytest.raises(ValidationError, match="words"):
        dedup_recall.with_settings(NearDuplicateParams(), ["keypoints.words=many"])


def test_skip_leak_free_refuses_what_needs_the_leak_free_run():
    for extra in (["--skip-clean"], ["--external", "sartaj_testing"], ["--boxes", "figshare"]):
        result = subprocess.run([sys.executable, str(REPO / "benchmarks/real_data.py"), "--skip-leak-free", *extra],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "--skip-leak-free leaves only the clean-Testing run" in result.stderr, extra


def test_a_run_that_would_fill_the_disk_stops_before_it_starts(tmp_path, monkeypatch):
    real_data = _real_data()
    free = {"bytes": 14 * 10**9}
    monkeypatch.setattr(real_data.shutil, "disk_usage", lambda folder: SimpleNamespace(free=free["bytes"]))
    workdir = tmp_path / "work"
    real_data.check_free_space(workdir, ["nickparvar"], experiments=1)
    with pytest.raises(OSError, match=r"14\.0 GB free, this run needs about 26\.0 GB more \(2 experiment"):
        real_data.check_free_space(workdir, ["nickparvar"], experiments=2)
    free["bytes"] = 3 * 10**9
    with pytest.raises(OSError, match=r"3\.0 GB free, this run needs about 19\.0 GB more.*remove earlier work folders"):
        real_data.check_free_space(workdir, ["nickparvar", "sartaj"], experiments=1)
    # A rerun in the same folder needs only what it does not hold yet.
    workdir.mkdir()
    (workdir / "cache.npy").write_bytes(b"x" * 1000)
    free["bytes"] = 10**9
    with pytest.raises(OSError, match=r"about 13\.0 GB more"):
        real_data.check_free_space(workdir, ["nickparvar"], experiments=1)
    free["bytes"] = 13 * 10**9 - 500  # enough only because the folder's 1,000 bytes count as held
    real_data.check_free_space(workdir, ["nickparvar"], experiments=1)


def test_neighbour_slices_numbers_images_by_their_best_figshare_match_and_labels_pairs():
    import numpy as np

    bench = _benchmark("neighbour_slices")
    numbers = np.array([-1, -1, -1, -1, 10, 11])  # images 0-3 unnumbered (Nickparvar), 4 and 5 slices 10 and 11
    pairs = np.array([[0, 4], [0, 5], [1, 4], [2, 5], [2, 4], [3, 5], [0, 1], [0, 3], [1, 2], [4, 5]])
    scores = np.array([0.995, 0.96, 0.993, 0.991, 0.985, 0.99, 0.999, 0.95, 0.97, 0.94])
    found = bench.best_partner_numbers(pairs, scores, numbers, min_score=0.97, margin=0.01)
    assert found == {0: 10, 1: 10, 3: 11}  # image 2's two partners are too close to call
    kinds = bench.labelled_pairs(pairs, numbers, found)
    assert kinds["copies"].tolist() == [6] and kinds["distinct_mapped"].tolist() == [7]
    assert kinds["distinct_numbered"].tolist() == [9]  # two figshare slices; pairs with one numbered image are the matches
    assert bench.summary(np.array([0.985, 0.999]), copies=True)["kept_apart_below"] == {"0.95": 0, "0.97": 0, "0.98": 0, "0.99": 1}
    assert bench.summary(np.array([0.94, 0.975]), copies=False)["removed_at"] == {"0.95": 1, "0.97": 1, "0.98": 0, "0.99": 0}
    # keypoint links: any two images with a number (their own or their match's), figshare's and Nickparvar's alike
    links = bench.labelled_links(pairs, numbers, found)
    assert links["copies"].tolist() == [0, 2, 5, 6] and links["distinct"].tolist() == [1, 7, 9]
    residual = bench.residual_summary(np.array([0.02, 0.031, 0.05]), copies=True)
    assert residual["kept_apart_above"] == {"0.025": 2, "0.03": 2, "0.033": 1, "0.036": 1, "0.04": 1}
    assert bench.residual_summary(np.array([0.035]), copies=False)["removed_at"]["0.036"] == 1


def test_keypoint_shortlist_counts_planted_pairs_of_the_three_kinds_whichever_way_round():
    bench = _benchmark("keypoint_shortlist")
    files = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    planted = [{"kind": "augmented", "original": "c.jpg", "copy": "a.jpg"},
               {"kind": "adjacent_slice", "original": "b.jpg", "copy": "d.jpg"},
               {"kind": "exact", "original": "a.jpg", "copy": "d.jpg"}]  # found by hashing, not by keypoints
    pairs = bench.planted_pairs(files, planted)
    assert pairs == {"augmented": {(0, 2)}, "annotated": set(), "adjacent_slice": {(1, 3)}}
    assert bench.shortlisted(pairs, np.array([[0, 2], [0, 3], [2, 3]])) == {"augmented": 1, "annotated": 0, "adjacent_slice": 0}
