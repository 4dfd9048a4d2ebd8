"""Export: TFLite float16 and int8 and ONNX files of a real (tiny) model, run with LiteRT and onnxruntime,
and the export stage's files and the evaluate stage's comparison in the tiny pipeline."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from braintumor.core.config import ModelParams, load_params
from braintumor.model.backbones import build_model
from braintumor.model.export import (EXPORT_FORMATS, ExportError, export_file_name, export_model, layer_errors,
                                     layers_to_keep_float, load_exported, predict_with_tta)
from braintumor.model.tta import tta_views

from conftest import copy_built_pipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import keras
    keras.utils.set_random_seed(0)
    model = build_model(ModelParams(backbone="mobilenetv3small", weights="none", dense_units=(16, 8), dropout=(0.2, 0.1)), 48)
    images = np.random.default_rng(0).integers(0, 256, (24, 48, 48), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("model")
    model.save(folder / "finetuned.keras")
    return model, images, folder / "finetuned.keras"


@pytest.fixture(scope="module")
def tiny_exports(tiny_model):
    """Every format of the tiny model, int8 with every layer int8 (``int8_float_above`` 0)."""
    _, images, model_file = tiny_model
    return export_model(model_file, "finetuned", EXPORT_FORMATS, images[:8], opset=17)


def test_every_format_converts_and_predicts_like_keras(tiny_model, tiny_exports, tmp_path):
    model, images, model_file = tiny_model
    files = tiny_exports.files
    assert tiny_exports.int8_float_layers == []
    assert sorted(files) == sorted(export_file_name("finetuned", f) for f in EXPORT_FORMATS)
    reference = model.predict(images[..., None].astype(np.float32), verbose=0)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        exported = load_exported(tmp_path / name, threads=1)
        assert exported.image_size == 48
        probabilities = exported.predict(images, batch_size=5)  # a last batch of another size
        assert probabilities.shape == reference.shape
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
        # float16 weights and ONNX compute in float32; int8 quantises activations too
        tolerance = 0.1 if "int8" in name else 1e-2
        assert np.abs(probabilities - reference).max() < tolerance, name
    flipped = predict_with_tta(load_exported(tmp_path / "finetuned.onnx"), images, "flip")
    mirrored = model.predict(images[:, :, ::-1, None].astype(np.float32), verbose=0)
    np.testing.assert_allclose(flipped, (reference + mirrored) / 2, atol=1e-2)
    moved = predict_with_tta(load_exported(tmp_path / "finetuned.onnx"), images, "flip_shift")
    views = [model.predict(np.ascontiguousarray(view)[..., None].astype(np.float32), verbose=0)
             for view in tta_views(images, "flip_shift")]
    np.testing.assert_allclose(moved, np.mean(views, axis=0), atol=1e-2)


def test_int8_keeps_float_exactly_the_layers_above_the_error_threshold(tiny_model, tiny_exports, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    _, images, model_file = tiny_model
    mixed = export_model(model_file, "finetuned", ["tflite_int8"], images[:8], opset=17, int8_float_above=1e-6)
    kept = mixed.int8_float_layers
    assert kept, "every layer of a quantized model is off by something: a threshold near 0 keeps some float"
    assert all(layer["error_steps"] > 1e-6 for layer in kept)
    assert [layer["error_steps"] for layer in kept] == sorted((layer["error_steps"] for layer in kept), reverse=True)

    def tensor_types(data: bytes, name: str) -> dict:
        (tmp_path / name).write_bytes(data)
        return {t["name"]: t["dtype"] for t in Interpreter(model_path=str(tmp_path / name)).get_tensor_details()}

    name = export_file_name("finetuned", "tflite_int8")
    all_int8, with_float = tensor_types(tiny_exports.files[name], "all_int8.tflite"), tensor_types(mixed.files[name], name)
    for layer in kept:  # the very tensors named are int8 in one file and float32 in the other
        assert all_int8[layer["tensor"]] == np.int8 and with_float[layer["tensor"]] == np.float32, layer
    assert load_exported(tmp_path / name).predict(images).shape == (len(images), 4)


def test_layer_errors_are_in_quantization_steps_and_only_those_above_the_threshold_stay_float():
    dump = ("op_name,tensor_idx,num_elements,stddev,mean_error,max_abs_error,mean_squared_error,scale,zero_point,tensor_name\n"
            "CONV_2D,3,100,0.01,0.0,0.05,0.0004,0.1,0,conv\n"  # RMSE 0.02 = 0.2 steps of 0.1
            "FULLY_CONNECTED,9,8,1.0,0.5,3.0,0.25,0.05,-3,head\n")  # RMSE 0.5 = 10 steps of 0.05
    errors = layer_errors(dump)
    assert errors == [{"op": "FULLY_CONNECTED", "tensor": "head", "error_steps": 10.0},
                      {"op": "CONV_2D", "tensor": "conv", "error_steps": 0.2}]
    assert layers_to_keep_float(errors, 2.0) == errors[:1]
    assert layers_to_keep_float(errors, 0.1) == errors
    assert layers_to_keep_float(errors, 10.0) == []  # strictly above
    assert layers_to_keep_float(errors, 0) == []  # 0 is off, not "everything"


def test_a_failing_converter_names_the_model_and_the_format(tiny_model):
    _, images, model_file = tiny_model
    wrong_size = images[:2, :20, :20]  # calibration slices the model cannot take
    # the conversions run side by side: the one that fails is named, the one that succeeded is not blamed
    with pytest.raises(ExportError, match=r"exporting finetuned \(finetuned.keras\) as tflite_int8 failed") as failure:
        export_model(model_file, "finetuned", ["tflite_float16", "tflite_int8"], wrong_size, opset=17)
    assert "tflite_float16" not in str(failure.value)
    with pytest.raises(ExportError, match=r"as a SavedModel, the converters' input, failed"):
        export_model(model_file.parent / "missing.keras", "finetuned", ["onnx"], images[:2], opset=17)
    with pytest.raises(ValueError, match="unknown export formats"):
        export_model(model_file, "finetuned", ["coreml"], images[:2], opset=17)
    nothing = export_model(model_file, "finetuned", [], images[:2], opset=17, int8_float_above=2.0)
    assert nothing.files == {} and nothing.int8_float_layers == []  # export.formats: [] (tests and quick runs)


def test_load_exported_rejects_what_it_cannot_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro export"):
        load_exported(tmp_path / "missing.tflite")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected .tflite or .onnx"):
        load_exported(tmp_path / "model.pt")


@pytest.mark.slow
def test_the_pipeline_exports_and_evaluate_scores_the_exports(built_pipeline, tmp_path):
    repo = copy_built_pipeline(built_pipeline, tmp_path / "repo")
    card = json.loads((repo / "models/exports/exports.json").read_text())
    assert [r["format"] for r in card["exports"]] == list(EXPORT_FORMATS)
    for record in card["exports"]:
        data = (repo / "models/exports" / record["file"]).read_bytes()
        assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    sizes = {r["format"]: r["bytes"] for r in card["exports"]}
    assert sizes["tflite_int8"] < sizes["tflite_float16"] < card["keras_bytes"]
    threshold = load_params(repo / "params.yaml").export.int8_float_above
    assert all(layer["error_steps"] > threshold for layer in card["int8_float_layers"])
    exports = json.loads((repo / "reports/metrics.json").read_text())["finetuned"]["exports"]
    assert set(exports) == set(EXPORT_FORMATS)
    for fmt, entry in exports.items():
        assert 0 <= entry["agreement_with_keras"] <= 1
        low, high = entry["accuracy_difference_ci95"]["low"], entry["accuracy_difference_ci95"]["high"]
        assert low <= entry["accuracy_difference"] <= high
    assert exports["onnx"]["agreement_with_keras"] >= 0.99 and exports["tflite_float16"]["agreement_with_keras"] >= 0.99
    assert "## Exported models" in (repo / "reports/evaluation.md").read_text()


@pytest.mark.slow
def test_the_app_bundle_serves_an_export_with_or_without_its_keras_model(built_pipeline, tmp_path):
    from braintumor.serve.bundle import ServingSettings, load_bundle, predict_upload
    repo = copy_built_pipeline(built_pipeline, tmp_path / "repo")
    params = load_params(repo / "params.yaml")
    settings = ServingSettings.from_params(params)
    upload = next((repo / "data/raw/phantom/images/Testing/glioma").glob("*.*"))
    keras_result = predict_upload(load_bundle("models/finetuned.keras", repo, params.preprocess), upload, settings)
    bundle = load_bundle("models/exports/finetuned_float16.tflite", repo, params.preprocess)
    assert bundle.exported is not None and bundle.gradcam_model is not None
    assert bundle.identity.model_file == "finetuned_float16.tflite (exported from finetuned.keras)"
    result = predict_upload(bundle, upload, settings)
    # the same calibration, OOD rule and Grad-CAM; probabilities from the float16 export, close to Keras's.
    # The tiny, barely trained model gives about 0.25 to every class, at the confidence threshold itself,
    # where float16's rounding may land either side: every check runs, and they agree apart from that tie.
    assert result.overlay is not None
    for ran in (result.verdict, keras_result.verdict):
        assert ran.confidence_checked and ran.features_checked
    beside_confidence = [{flag.check for flag in r.verdict.flags} - {"low_confidence"} for r in (result, keras_result)]
    assert beside_confidence[0] == beside_confidence[1]
    assert result.feature_score == pytest.approx(keras_result.feature_score, rel=1e-3)
    for name, p in keras_result.probabilities.items():
        assert abs(result.probabilities[name] - p) < 1e-2
    (repo / "models/finetuned.keras").unlink()
    alone = load_bundle("models/exports/finetuned_int8.tflite", repo, params.preprocess)
    assert alone.gradcam_model is None and any("No Grad-CAM" in note for note in alone.notes)
    result = predict_upload(alone, upload, settings)
    assert result.overlay is None and abs(sum(result.probabilities.values()) - 1) < 1e-3


@pytest.mark.slow
def test_batch_prediction_with_an_export_alone(built_pipeline, tmp_path):
    import pandas as pd
    from braintumor.predict import run
    repo = copy_built_pipeline(built_pipeline, tmp_path / "repo")
    folder = repo / "data/raw/phantom/images/Testing/glioma"
    out = tmp_path / "p.csv"
    import os
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert run([str(folder), "--model", "models/exports/finetuned_int8.tflite", "--export-only", "--out", str(out)]) == 0
        with pytest.raises(SystemExit):
            run([str(folder), "--model", "models/finetuned.keras", "--export-only", "--out", str(out)])
    finally:
        os.chdir(cwd)
    rows = pd.read_csv(out, keep_default_na=False)
    assert len(rows) == len(list(folder.iterdir())) and (rows["status"] == "ok").all()
    assert rows["model_id"].str.startswith("finetuned_int8.tflite").all() and (rows["gradcam"] == "").all()
