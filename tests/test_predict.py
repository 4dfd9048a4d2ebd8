"""Batch prediction (`python -m braintumor.predict`): a tiny trained model run over real files and folders.

Every row is checked against the app's own `predict_upload` on the same file (same decoding, preprocessing,
calibration and out-of-distribution rule); a corrupt file gets an error row and the run goes on; the CLI runs
as a subprocess, exits 0 and keeps TensorFlow's start-up chatter off the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from braintumor.core.config import CLASS_NAMES, load_params
from conftest import REPO
from test_app import PREPROCESS, RUN_ID, copy_model, phantom_files
from test_uploads import make_dicom

P_COLUMNS = [f"p_{name}" for name in CLASS_NAMES]
# Relative to the scans folder: what the runs must read, in order, and what they must skip.
READ = ["a/corrupt.png", "a/slice.png", "b/deeper/slice.jpg", "b/slice.png", "blank.png", "dicom/IM0001", "notes.txt"]
SKIPPED = [".ipynb_checkpoints/slice-checkpoint.png", "a/.DS_Store"]
ERRORS = {"a/corrupt.png": ("truncated", "truncated"), "notes.txt": ("not_an_image", "not an image file")}


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """A folder tree of real files: phantom slices (PNG, JPEG, a suffix-less DICOM), two files of the same name in
    different folders, a blank image (flagged), a truncated PNG, a text file and hidden entries."""
    root = tmp_path_factory.mktemp("scans")
    a, b, c, d = phantom_files(root / "phantoms", 4, seed=7)
    for source, target in ((a, "a/slice.png"), (b, "b/slice.png"), (a, ".ipynb_checkpoints/slice-checkpoint.png")):
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_bytes(source.read_bytes())
    (root / "b/deeper").mkdir()
    cv2.imwrite(str(root / "b/deeper/slice.jpg"), cv2.imread(str(c), cv2.IMREAD_GRAYSCALE))
    (root / "dicom").mkdir()
    (root / "dicom/IM0001").write_bytes(make_dicom(cv2.imread(str(d), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16))
    (root / "a/corrupt.png").write_bytes(c.read_bytes()[:1500])
    (root / "a/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "notes.txt").write_text("not an image\n" * 20)
    cv2.imwrite(str(root / "blank.png"), np.zeros((96, 96), np.uint8))
    for phantom in (a, b, c, d):
        phantom.unlink()
    (root / "phantoms").rmdir()
    return root


@pytest.fixture(scope="module")
def settings():
    from braintumor.serve.bundle import ServingSettings

    return ServingSettings.from_params(load_params(REPO / "params.yaml"))


def expected_paths(scans: Path, upload: Path) -> list[str]:
    return sorted([str(scans / rel) for rel in READ] + [str(upload)])


# --------------------------------------------------------------------------- inputs and names (no model)


def test_folders_are_walked_in_sorted_order_skipping_hidden_entries(scans, tmp_path):
    from braintumor.predict import list_input_files

    loose = tmp_path / ".hidden.png"  # named on the command line: read, hidden or not
    loose.write_bytes(b"x")
    files, skipped = list_input_files([scans, scans / "a" / "slice.png", loose])  # a/slice.png listed twice
    assert [str(f) for f in files] == sorted([str(scans / rel) for rel in READ] + [str(loose)])
    assert skipped == len(SKIPPED)
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*nothing.png, .*nowhere"):
        list_input_files([scans, tmp_path / "nothing.png", tmp_path / "nowhere"])


def test_gradcam_names_mirror_the_input_folders(tmp_path, monkeypatch):
    from braintumor.predict import gradcam_png_path

    monkeypatch.chdir(tmp_path)
    out = Path("cams")
    assert gradcam_png_path(out, Path("a/slice.png")) == out / "a/slice.png.gradcam.png"
    assert gradcam_png_path(out, Path("b/slice.png")) != gradcam_png_path(out, Path("a/slice.png"))
    assert gradcam_png_path(out, Path("a/../../x.png")) == out / tmp_path.parent.relative_to("/") / "x.png.gradcam.png"


def test_missing_path_or_model_stops_with_a_clear_message(scans, tmp_path, monkeypatch):
    from braintumor.predict import run

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("BRAINTUMOR_ROOT", raising=False)
    out = tmp_path / "predictions.csv"
    with pytest.raises(SystemExit) as stopped:
        run([str(tmp_path / "nothing"), "--model", "models/whatever.keras", "--out", str(out)])
    assert str(stopped.value) == f"error: no such file or folder: {tmp_path / 'nothing'}"
    with pytest.raises(SystemExit) as stopped:
        run([str(scans), "--model", str(tmp_path / "none.keras"), "--out", str(out)])
    assert str(stopped.value).startswith(f"error: No trained model at {tmp_path / 'none.keras'}")
    assert "make demo" in str(stopped.value)
    assert not out.exists()


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module", params=["none", "flip"])
def bundle(request, trained, tmp_path_factory):
    """The tiny model as the app loads it; "flip": its calibration says the evaluate stage used flip TTA."""
    from braintumor.serve.bundle import load_bundle

    folder = tmp_path_factory.mktemp(f"model-{request.param}")
    model_file = copy_model(trained, folder / "models", card=True, calibration=True)
    (folder / "models" / "ood.npz").write_bytes((trained["root"] / "models" / "ood.npz").read_bytes())
    calibration = json.loads((folder / "models" / "calibration.json").read_text())
    calibration["finetuned"]["tta"] = request.param
    (folder / "models" / "calibration.json").write_text(json.dumps(calibration))
    return load_bundle(model_file, folder, PREPROCESS)


@pytest.mark.slow
def test_rows_equal_the_apps_prediction_for_each_file(bundle, settings, scans, trained, tmp_path):
    from braintumor.predict import list_input_files, predict_files, summarise, write_predictions
    from braintumor.serve.bundle import predict_upload

    files, skipped = list_input_files([scans, trained["upload"]])
    done = []
    rows = predict_files(bundle, settings, files, workers=2, gradcam_dir=tmp_path / "cams", progress=done.append)
    write_predictions(tmp_path / "predictions.csv", rows, bundle.class_names)
    table = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False, na_values=[""])

    assert table["path"].tolist() == expected_paths(scans, trained["upload"]) and sum(done) == len(table)
    assert (table["model_id"] == f"finetuned.keras (MLflow run {RUN_ID})").all()
    for row in table.itertuples(index=False):
        rel = Path(row.path).relative_to(scans).as_posix() if row.path.startswith(str(scans)) else "upload"
        if rel in ERRORS:
            reason, message = ERRORS[rel]
            assert row.status == "error" and row.error_reason == reason and message in row.error, row
            assert np.isnan([getattr(row, c) for c in P_COLUMNS]).all() and pd.isna(row.gradcam)
            continue
        expected = predict_upload(bundle, row.path, settings)  # the app, one file at a time
        assert row.status == "ok" and pd.isna(row.error), row
        np.testing.assert_allclose([getattr(row, c) for c in P_COLUMNS],
                                   [expected.probabilities[c] for c in CLASS_NAMES], atol=1e-5, err_msg=rel)
        assert (row.predicted_class if isinstance(row.predicted_class, str) else None) == expected.label, rel
        assert row.top_class == max(expected.probabilities, key=expected.probabilities.get)
        assert row.ood == (not expected.verdict.in_distribution) and row.calibrated
        assert (row.ood_reasons if isinstance(row.ood_reasons, str) else "") == ";".join(
            f.check for f in expected.verdict.flags)
        if expected.overlay is None:
            assert pd.isna(row.gradcam), rel
        else:  # the app's overlay, as a PNG named after the input's path
            written = cv2.cvtColor(cv2.imread(row.gradcam, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            assert row.gradcam.startswith(str(tmp_path / "cams")) and row.gradcam.endswith(f"{Path(row.path).name}.gradcam.png")
            assert np.abs(written.astype(int) - expected.overlay).max() <= 2, rel

    by_path = table.set_index("path")
    assert by_path.loc[str(scans / "blank.png"), "ood_reasons"].startswith("near_constant")
    assert pd.isna(by_path.loc[str(scans / "blank.png"), "predicted_class"])
    assert by_path.loc[str(trained["upload"]), "predicted_class"] in CLASS_NAMES  # a slice the model is sure of
    assert by_path.loc[str(scans / "dicom/IM0001"), "status"] == "ok"
    same_name = [by_path.loc[str(scans / f"{folder}/slice.png"), "gradcam"] for folder in "ab"]
    assert len(set(same_name)) == 2 and all(Path(p).is_file() for p in same_name)
    summary = summarise(rows, skipped, 1.0)
    assert (summary.files, summary.ok, summary.errors, summary.skipped) == (8, 6, 2, 2)
    assert summary.errors_by_reason == {"not_an_image": 1, "truncated": 1}
    assert summary.ood_flagged == int((table["ood"] == True).sum()) >= 1  # noqa: E712  True, False or empty
    assert sum(summary.per_class.values()) == summary.ok - summary.ood_flagged


@pytest.mark.slow
def test_cli_writes_the_csv_and_exits_0_without_tensorflow_noise(trained, scans, tmp_path):
    env = {**os.environ}
    env.pop("BRAINTUMOR_ROOT", None)
    out, cams = tmp_path / "out" / "predictions.csv", tmp_path / "cams"
    result = subprocess.run([sys.executable, "-m", "braintumor.predict", str(scans), str(trained["upload"]),
                             "--model", str(trained["model_file"]), "--out", str(out), "--gradcam-dir", str(cams),
                             "--workers", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert table["path"].tolist() == expected_paths(scans, trained["upload"])
    assert table["status"].value_counts().to_dict() == {"ok": 6, "error": 2}
    assert np.allclose(table.loc[table["status"] == "ok", P_COLUMNS].sum(axis=1), 1.0, atol=1e-4)
    written = sorted(str(p) for p in cams.rglob("*.png"))
    assert written == sorted(table["gradcam"].dropna()) and len(written) >= 4  # a, b, deeper, dicom, upload
    assert "8 files: 6 ok, 2 errors (not_an_image 1, truncated 1)" in result.stdout
    assert "2 hidden/system entries skipped" in result.stdout and "images/s" in result.stdout
    assert f"MLflow run {RUN_ID}" in result.stdout
    for noise in ("oneDNN", "cuda", "absl", "cpu_feature_guard", "Traceback"):
        assert noise not in result.stderr, result.stderr
    assert "synthetic phantom slices" in result.stderr  # the one note this model earns
