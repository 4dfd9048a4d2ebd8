"""The web app, for real: a tiny trained model, `python -m braintumor.serve.app` serving it on a free loopback port,
driven through gradio_client and a headless Chromium; the loader's handling of missing or broken files.

The results the server returns are checked against the library run in this process on the same file:
the pipeline's decoder and preprocess_slice, the model's prediction with the temperature, Grad-CAM.
"""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from braintumor.core.config import CLASS_NAMES, ModelParams, PreprocessParams, load_params
from conftest import REPO
from test_uploads import STORED, make_dicom, png_with_header_size

pytestmark = pytest.mark.slow

SIZE = 64
PREPROCESS = PreprocessParams(image_size=SIZE, sharpen_amount=0.6)
RUN_ID = "0123456789abcdef0123456789abcdef"
TEMPERATURE = 1.7
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# --------------------------------------------------------------------------- a tiny trained model


def phantom_files(folder: Path, count: int, seed: int) -> list[Path]:
    from braintumor.data.phantom.source import render_slice

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        label = CLASS_NAMES[i % len(CLASS_NAMES)]
        image, _ = render_slice(np.random.default_rng([seed, i]), label, 128)
        paths.append(folder / f"{i:03d}_{label}.png")
        cv2.imwrite(str(paths[-1]), image)
    return paths


def pipeline_arrays(paths: list[Path]) -> np.ndarray:
    """(N, S, S) uint8 as the preprocess stage makes them: its decoder, then preprocess_slice."""
    from braintumor.core.imageio import read_grayscale
    from braintumor.preprocess.slices import preprocess_slice

    return np.stack([preprocess_slice(read_grayscale(p), PREPROCESS) for p in paths])


def train_tiny_model(train: np.ndarray, labels: np.ndarray):
    import keras

    from braintumor.model.backbones import build_model

    keras.utils.set_random_seed(0)
    model = build_model(ModelParams(backbone="mobilenetv3small", weights="none", dense_units=(16, 8)), SIZE)
    for layer in model.layers:  # a few steps only: let BatchNorm's moving statistics follow them
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(train[..., None].astype("float32"), labels, epochs=3, batch_size=16, verbose=0)
    return model


def make_trained(root: Path) -> dict:
    """models/finetuned.keras under ``root`` with its card and calibration.json, as the training and evaluate
    stages write them (conftest's session fixture ``trained``: the app and batch-prediction tests share it)."""
    from braintumor.evaluate.calibration import apply_temperature, calibration_entry
    from braintumor.evaluate.feature_check import fit_feature_check, save_feature_checks
    from braintumor.model.backbones import BACKBONES
    from braintumor.model.inputs import features_and_probabilities_model

    train_paths = phantom_files(root / "train", 48, seed=1)
    val_paths = phantom_files(root / "val", 16, seed=2)
    model = train_tiny_model(pipeline_arrays(train_paths), np.arange(48) % 4)
    models = root / "models"
    models.mkdir()
    model.save(models / "finetuned.keras")
    card = {"model_file": "finetuned.keras", "mlflow_run_id": RUN_ID, "trained_at": "2026-11-28T01:02:03+00:00",
            "git_commit": "abc1234", "dvc_experiment": None, "backbone": "mobilenetv3small", "image_size": SIZE,
            "class_names": list(CLASS_NAMES), "preprocess": PREPROCESS.model_dump(exclude={"workers"}),
            "training_data": {"sources": [{"name": "phantom", "kind": "phantom"}], "synthetic_only": True,
                              "split_strategy": "leak_free", "images_per_split": {"train": 48, "val": 16, "test": 0},
                              "train_images_per_class": {name: 12 for name in CLASS_NAMES}}}
    (models / "finetuned.json").write_text(json.dumps(card))
    val_raw = model.predict(pipeline_arrays(val_paths)[..., None].astype("float32"), verbose=0)
    (models / "calibration.json").write_text(json.dumps({"finetuned": calibration_entry(TEMPERATURE, val_raw)}))
    # The feature check as the evaluate stage fits it: Gaussians on the training features, threshold on validation.
    layer = BACKBONES["mobilenetv3small"].feature_check_layer
    features = features_and_probabilities_model(model, layer)
    train_features = features.predict(pipeline_arrays(train_paths)[..., None].astype("float32"), verbose=0)[0]
    val_features = features.predict(pipeline_arrays(val_paths)[..., None].astype("float32"), verbose=0)[0]
    check = fit_feature_check(layer, train_features, np.arange(48) % 4, val_features, len(CLASS_NAMES), 0.05)
    save_feature_checks(models / "ood.npz", {"finetuned": check})
    confidence = apply_temperature(val_raw, TEMPERATURE).max(axis=1)
    # The validation slice the model is surest of is above the 1% quantile by construction: a labelled upload.
    return {"root": root, "model": model, "model_file": models / "finetuned.keras", "card": card,
            "upload": val_paths[int(confidence.argmax())], "check": check}


def expected_result(trained: dict, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(preprocessed, calibrated probabilities, Grad-CAM overlay) computed here with the library."""
    from braintumor.evaluate.calibration import apply_temperature
    from braintumor.explain.gradcam import grad_cam, gradcam_layer_name, make_gradcam_model, overlay

    image = pipeline_arrays([path])[0]
    model = trained["model"]
    heatmaps, _ = grad_cam(make_gradcam_model(model, gradcam_layer_name(model)), image[None])
    raw = model.predict(image[None, ..., None].astype("float32"), verbose=0)
    return image, apply_temperature(raw, TEMPERATURE)[0], overlay(image, heatmaps[0], 0.4)


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(log_path: Path, *args: str, scratch: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m braintumor.serve.app ...` on a free loopback port; returns once the page answers.

    ``scratch``: the server's TMPDIR, to see what it leaves there.
    """
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("BRAINTUMOR_ROOT", None)
    if scratch is not None:
        env["TMPDIR"] = str(scratch)
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "braintumor.serve.app", *args, "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"app did not answer within 180 s:\n{log_path.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(trained):
    process, url = start_app(trained["root"] / "server.log", "--model", str(trained["model_file"]))
    yield url
    stop(process)


@pytest.fixture(autouse=True)
def client_downloads_under_tmp_path(tmp_path, monkeypatch):
    """gradio_client streams each result file through a folder of its own under the system temp folder
    and leaves it there; under tmp_path pytest removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def client(server, tmp_path):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=str(tmp_path), analytics_enabled=False)


def classify(client, path: Path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/classify")


def slice_png() -> np.ndarray:
    return cv2.circle(np.zeros((64, 64), np.uint8), (32, 32), 20, 150, -1)


def read_png(path: str, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    image = cv2.imread(path, flags)
    assert image is not None, path
    return image


# --------------------------------------------------------------------------- API


def test_api_classifies_a_slice_like_the_library(client, trained):
    label, verdict, preprocessed, overlay, details = classify(client, trained["upload"])
    image, probabilities, expected_overlay = expected_result(trained, trained["upload"])
    top = CLASS_NAMES[int(probabilities.argmax())]

    assert label["label"] == top and details["label"] == top and details["in_distribution"]
    served = {item["label"]: item["confidence"] for item in label["confidences"]}
    np.testing.assert_allclose([served[c] for c in CLASS_NAMES], probabilities, atol=1e-4)
    assert details["calibrated"] and details["confidence_checked"] and details["flags"] == []
    assert f"{top.replace('_', ' ')}: " in verdict and "calibrated confidence" in verdict
    # The array the model saw is the pipeline's, bit for bit (PNG is lossless).
    np.testing.assert_array_equal(read_png(preprocessed, cv2.IMREAD_GRAYSCALE), image)
    served_overlay = cv2.cvtColor(read_png(overlay), cv2.COLOR_BGR2RGB)
    assert served_overlay.shape == (SIZE, SIZE, 3)
    assert np.abs(served_overlay.astype(int) - expected_overlay).max() <= 2
    assert details["model"]["mlflow_run_id"] == RUN_ID and details["model"]["trained_at"] == trained["card"]["trained_at"]
    assert details["model"]["model_file"] == "finetuned.keras" and details["notes"] == []


def test_api_is_documented(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert "/classify" in api["named_endpoints"]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_api_flags_images_that_are_not_mri_slices(client, tmp_path):
    rng = np.random.default_rng(0)
    text = np.full((300, 500), 255, np.uint8)
    for row, line in enumerate(["MRI report", "no acute findings", "signed"]):
        cv2.putText(text, line, (20, 80 + 80 * row), cv2.FONT_HERSHEY_SIMPLEX, 1.5, 0, 3, cv2.LINE_AA)
    cases = {
        "photo.jpg": (cv2.GaussianBlur(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), (9, 9), 0), "colour_photo"),
        "blank.png": (np.zeros((128, 128), np.uint8), "near_constant"),
        "text.png": (text, "flat_regions"),
    }
    for name, (image, check) in cases.items():
        label, verdict, preprocessed, overlay, details = classify(client, write(tmp_path / name, cv2.imencode(Path(name).suffix, image)[1].tobytes()))
        assert not label or "label" not in label, name  # no label shown
        assert details["label"] is None and not details["in_distribution"], name
        assert check in [flag["check"] for flag in details["flags"]], (name, details["flags"])
        assert "does not look like a brain MRI slice" in verdict and overlay is None and preprocessed


def textured_head_png() -> bytes:
    """A grey, head-shaped image that passes every image check but is nothing like the phantoms: an
    ellipse filled with a checkerboard (what a slice of another modality or scanner is to a model)."""
    rows, cols = np.indices((128, 128))
    checker = (((rows // 8 + cols // 8) % 2) * 180 + 40).astype(np.uint8)
    mask = cv2.ellipse(np.zeros((128, 128), np.uint8), (64, 64), (50, 58), 0, 0, 360, 1, -1)
    return cv2.imencode(".png", checker * mask)[1].tobytes()


def test_api_flags_an_image_unlike_the_training_data(client, trained, tmp_path):
    label, verdict, preprocessed, overlay, details = classify(client, write(tmp_path / "other.png", textured_head_png()))
    checks = [flag["check"] for flag in details["flags"]]
    assert "unlike_training" in checks and not set(checks) & {"colour_photo", "near_constant", "flat_regions", "no_head"}
    assert details["label"] is None and details["features_checked"]
    assert details["feature_score"] > trained["check"].threshold
    assert "unlike the model's training data" in verdict and "do not trust these probabilities" in verdict
    assert overlay is not None  # it looks like a slice: the heatmap still shows what the model looked at
    # A slice like the training data passes the same check.
    _, _, _, _, details = classify(client, trained["upload"])
    assert details["features_checked"] and details["feature_score"] <= trained["check"].threshold


BAD_INPUTS = {
    "empty.png": (lambda: b"", "empty_file", "The file is empty"),
    "notes.txt": (lambda: b"not an image\n" * 50, "not_an_image", "not an image file"),
    "truncated.png": (lambda: cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))[1]
                      .tobytes()[:2000], "truncated", "truncated"),
    "bomb.png": (lambda: png_with_header_size(100_000, 100_000), "too_many_pixels", "decompression bomb"),
    "ct.dcm": (lambda: make_dicom(STORED, modality="CT"), "not_mr", "Unsupported DICOM file: modality is 'CT'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(client, trained, tmp_path, name):
    make, reason, message = BAD_INPUTS[name]
    label, verdict, preprocessed, overlay, details = classify(client, write(tmp_path / name, make()))
    assert details["error"]["reason"] == reason and message in details["error"]["message"], details
    assert "Cannot use this file" in verdict and message in verdict and "Traceback" not in verdict
    assert not label or "label" not in label
    assert preprocessed is None and overlay is None and details["label"] is None
    label, *_ = classify(client, trained["upload"])
    assert label["label"] in CLASS_NAMES


def test_oversize_upload_is_refused_by_client_and_server(client, server, trained, tmp_path):
    big = write(tmp_path / "big.png", b"\x89PNG\r\n\x1a\n" + bytes(20 * 2**20))  # app.max_upload_mb: 20
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        classify(client, big)  # gradio_client reads the limit from the server and does not send the file
    with big.open("rb") as handle:  # a client that sends it anyway: the server refuses it whole
        response = requests.post(server + "gradio_api/upload", files={"files": ("big.png", handle)}, timeout=60)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    label, *_ = classify(client, trained["upload"])
    assert label["label"] in CLASS_NAMES


def test_no_model_says_how_to_get_one_and_a_stopped_server_leaves_no_scratch(tmp_path):
    from gradio_client import Client

    missing = tmp_path / "models" / "finetuned.keras"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    process, url = start_app(tmp_path / "server.log", "--model", str(missing), scratch=scratch)
    try:
        assert len(list(scratch.glob("braintumor-app-examples-*/*.png"))) == len(CLASS_NAMES)
        page_config = requests.get(url + "config", timeout=10).text
        assert "No trained model" in page_config and "make demo" in page_config and "dvc repro" in page_config
        client = Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
        *_, verdict, _, _, details = classify(client, write(tmp_path / "x.png", cv2.imencode(".png", slice_png())[1].tobytes()))
        assert details["error"]["reason"] == "no_model" and "make demo" in details["error"]["message"]
        assert "No trained model" in verdict and "make demo" in verdict
    finally:
        stop(process)
    # SIGTERM (what stop() sends, like docker stop) ends the server through its exit handlers.
    assert process.returncode == 143
    assert not list(scratch.glob("braintumor-*"))
    assert "Traceback" not in (tmp_path / "server.log").read_text()


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).is_file():
        message = f"{CHROMIUM} not found (Debian package chromium; `make browser` installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must have it")
        pytest.skip(message)
    return CHROMIUM


def test_browser_upload_shows_label_overlay_and_model(server, trained, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    _, probabilities, _ = expected_result(trained, trained["upload"])
    top = CLASS_NAMES[int(probabilities.argmax())]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server)
            assert "not a medical device" in page.locator("#notice").inner_text()
            assert RUN_ID in page.locator("#identity").inner_text()
            page.locator("#upload input[type=file]").set_input_files(str(trained["upload"]))
            page.locator("#gradcam img").wait_for(timeout=60_000)
            page.locator("#preprocessed img").wait_for(timeout=60_000)
            page.wait_for_function("t => document.querySelector('#verdict').innerText.includes(t)",
                                   arg=f"{top.replace('_', ' ')}: ", timeout=60_000)
            assert top in page.locator("#prediction").inner_text()
            # What the model knows: its training data beside the result, and the phantom-only warning.
            verdict = page.locator("#verdict").inner_text()
            assert "Trained on: phantom (synthetic phantom); 48 training images" in verdict
            assert "trained only on synthetic phantom slices" in verdict
            assert "mean nothing" in page.locator("#synthetic-banner").inner_text()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            # An image unlike the training data: no label, and the page says why in plain words.
            other = write(tmp_path / "other.png", textured_head_png())
            page.locator("#upload button[aria-label='Clear']").click()
            page.locator("#upload input[type=file]").set_input_files(str(other))
            page.wait_for_function("() => document.querySelector('#verdict').innerText.includes("
                                   "'unlike the model\\'s training data')", timeout=60_000)
            assert "do not trust these probabilities" in page.locator("#verdict").inner_text()
            # A bad file: a message on the page, and the next upload still works.
            notes = write(tmp_path / "notes.txt", b"not an image\n" * 20)
            page.locator("#upload button[aria-label='Clear']").click()
            page.locator("#upload input[type=file]").set_input_files(str(notes))
            page.wait_for_function("() => document.querySelector('#verdict').innerText.includes("
                                   "'This is not an image file this app reads')", timeout=60_000)
            # An example click runs the model too: the verdict then names that upload's size (256 px phantoms).
            page.get_by_text("phantom pituitary").click()
            page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('256 x 256 px')",
                                   timeout=60_000)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
    if target := os.environ.get("BRAINTUMOR_APP_SCREENSHOT"):  # refresh docs/app.png on purpose only
        shutil.copy(tmp_path / "app.png", target)


# --------------------------------------------------------------------------- loader


def copy_model(trained: dict, folder: Path, card: bool, calibration: bool) -> Path:
    folder.mkdir()
    source = trained["model_file"]
    shutil.copy(source, folder / source.name)
    if card:
        shutil.copy(source.with_suffix(".json"), folder / "finetuned.json")
    if calibration:
        shutil.copy(source.parent / "calibration.json", folder / "calibration.json")
    return folder / source.name


def test_loader_says_what_is_missing(trained, tmp_path):
    from braintumor.serve.bundle import load_bundle

    bare = load_bundle(copy_model(trained, tmp_path / "bare", card=False, calibration=False), tmp_path, PREPROCESS)
    notes = " ".join(bare.notes)
    assert "No model card" in notes and "params.yaml" in notes and "uncalibrated" in notes
    assert "No ood.npz beside the model" in notes and bare.feature_check is None
    assert bare.identity.mlflow_run_id is None and bare.identity.card_file is None and bare.calibration.source is None
    full = load_bundle(trained["model_file"], tmp_path, PreprocessParams())  # the card wins over params.yaml
    assert full.notes == () and full.preprocess == PREPROCESS and full.calibration.temperature == TEMPERATURE
    assert full.feature_check is not None and full.feature_check.threshold == trained["check"].threshold
    assert full.identity.mlflow_run_id == RUN_ID and full.gradcam_layer == "conv_1_act"
    # Provenance from the card; without a card the app says it does not know, and warns of nothing it cannot know.
    assert full.identity.synthetic_only and full.identity.provenance().startswith("Trained on: phantom (synthetic phantom)")
    assert "glioma 12, meningioma 12, no tumor 12, pituitary 12" in full.identity.provenance()
    assert not bare.identity.synthetic_only and bare.identity.provenance() == "Trained on: unknown (the model card does not say)"
    real = dataclasses.replace(full.identity, training_data={**trained["card"]["training_data"], "synthetic_only": False,
                                                             "sources": [{"name": "nickparvar", "kind": "kaggle"}]})
    assert not real.synthetic_only and real.provenance().startswith("Trained on: nickparvar (kaggle); 48 training images")


@pytest.mark.parametrize("tta", ["flip", "flip_shift"])
def test_a_tta_model_is_served_as_the_evaluate_stage_predicted(trained, tmp_path, tta):
    from braintumor.evaluate.calibration import apply_temperature
    from braintumor.serve.app import identity_markdown
    from braintumor.serve.bundle import ServingSettings, load_bundle, predict_upload

    model_file = copy_model(trained, tmp_path / tta, card=True, calibration=False)
    entry = {**json.loads((trained["root"] / "models/calibration.json").read_text())["finetuned"], "tta": tta}
    (model_file.parent / "calibration.json").write_text(json.dumps({"finetuned": entry}))
    bundle = load_bundle(model_file, tmp_path, PREPROCESS)
    assert bundle.calibration.tta == tta
    settings = ServingSettings.from_params(load_params(REPO / "params.yaml"))
    result = predict_upload(bundle, trained["upload"], settings)
    image = pipeline_arrays([trained["upload"]])[0][None, ..., None].astype("float32")
    model = trained["model"]
    mirrored = image[:, :, ::-1]
    views = [image, mirrored]
    if tta == "flip_shift":  # each moved right, left, down and up by 10 / 224 of the side, black filling in
        d = round(SIZE * 10 / 224)
        pad = [(0, 0), (d, d), (d, d), (0, 0)]
        views = [np.pad(v, pad)[:, d + dy:d + SIZE + dy, d + dx:d + SIZE + dx] for v in views
                 for dy, dx in [(0, 0), (0, -d), (0, d), (-d, 0), (d, 0)]]
    expected = apply_temperature(np.mean([model.predict(v, verbose=0) for v in views], axis=0), TEMPERATURE)[0]
    np.testing.assert_allclose([result.probabilities[c] for c in CLASS_NAMES], expected, atol=1e-5)
    assert ("10 views" if tta == "flip_shift" else "mirror image's probabilities") in identity_markdown(bundle, settings)


def test_unusable_model_stops_the_app_with_a_message(tmp_path, monkeypatch):
    from braintumor.serve.app import main

    broken = tmp_path / "finetuned.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(broken), "--port", str(free_port())])
    assert str(stopped.value).startswith("error: cannot load") and str(broken) in str(stopped.value)


def test_loader_refuses_files_that_do_not_fit(trained, tmp_path):
    from braintumor.evaluate.feature_check import FeatureCheck, save_feature_checks
    from braintumor.serve.bundle import ModelLoadError, ModelNotFoundError, load_bundle

    # A feature check fitted on another model's features is refused, not silently misapplied.
    model_file = copy_model(trained, tmp_path / "other_check", card=True, calibration=True)
    layer = trained["check"].layer
    save_feature_checks(model_file.parent / "ood.npz", {"finetuned": FeatureCheck(layer, np.zeros((4, 5)), np.eye(5), 1.0, 0.01, 0.01)})
    with pytest.raises(ModelLoadError, match="fitted on 5 features"):
        load_bundle(model_file, tmp_path, PREPROCESS)
    (model_file.parent / "ood.npz").write_bytes(b"not a zip file")
    with pytest.raises(ModelLoadError, match="not a readable .npz file"):
        load_bundle(model_file, tmp_path, PREPROCESS)

    with pytest.raises(ModelNotFoundError, match="make demo"):
        load_bundle("models/nothing.keras", tmp_path, PREPROCESS)
    with pytest.raises(ModelLoadError, match="no MLflow tracking URI"):
        load_bundle("models:/braintumor-classifier/3", tmp_path, PREPROCESS)
    # A registry URI is looked up in the store; a version that is not there says so.
    with pytest.raises(ModelNotFoundError, match="no registered model 'models:/braintumor-classifier/3'"):
        load_bundle("models:/braintumor-classifier/3", tmp_path, PREPROCESS,
                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ModelLoadError, match="expected models:/<name>/<version>"):
        load_bundle("models:/braintumor-classifier/latest", tmp_path, PREPROCESS,
                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    wrong_size = copy_model(trained, tmp_path / "size", card=False, calibration=False)
    with pytest.raises(ModelLoadError, match=r"takes input \(64, 64, 1\)"):
        load_bundle(wrong_size, tmp_path, PreprocessParams(image_size=96))
    broken = tmp_path / "broken" / "finetuned.keras"
    broken.parent.mkdir()
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_bundle(broken, tmp_path, PREPROCESS)
    bad_calibration = copy_model(trained, tmp_path / "calibration", card=True, calibration=False)
    (bad_calibration.parent / "calibration.json").write_text('{"finetuned": {"temperature": -1}}')
    with pytest.raises(ModelLoadError, match="calibration"):
        load_bundle(bad_calibration, tmp_path, PREPROCESS)
