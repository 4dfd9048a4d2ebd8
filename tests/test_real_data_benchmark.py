"""benchmarks/real_data.py's own logic: which sources it merges, and how it reads a run's metrics.
(The runs themselves take an hour on 2 cores: they are the benchmark, not a test.)"""

from __future__ import annotations

import importlib.util

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
             "macro_f1": 0.88, "macro_f1_ci95": {"low": 0.85, "high": 0.91}, "ece": 0.02}
    assert _real_data().scores_of(entry) == {"accuracy": 0.9, "accuracy_ci": [0.87, 0.93],
                                             "macro_f1": 0.88, "macro_f1_ci": [0.85, 0.91]}


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
