"""The fine-tuned model for phones and small CPU boxes: TFLite float16 and full-integer int8, and ONNX.

Every route starts from one TensorFlow SavedModel that Keras 3 writes (``model.export``): the
converters read that, not the ``.keras`` file. The graph takes what the Keras model takes, the
preprocessed (S, S) grey slice as float32 (N, S, S, 1) in 0..255, and returns the softmax (N, K):
preprocessing stays outside every export, as the model card says, so the app, batch prediction and
any client share one definition of it (:func:`braintumor.preprocess.slices.preprocess_slice`).

- ``tflite_float16``: weights stored as float16, computed in float32 (TensorFlow's TFLite converter);
- ``tflite_int8``: weights and activations int8, calibrated on a seeded sample of training slices;
  input and output stay float32, so a client feeds the same array as to Keras;
- ``onnx``: ``tf2onnx`` on the SavedModel, run with ``onnxruntime``.

A converter that fails raises :class:`ExportError` naming the model and the format.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXPORT_FORMATS: tuple[str, ...] = ("tflite_float16", "tflite_int8", "onnx")
SUFFIXES = {"tflite_float16": "_float16.tflite", "tflite_int8": "_int8.tflite", "onnx": ".onnx"}
EXPORTS_CARD = "exports.json"  # beside the exported files: each one's format, size and sha256


class ExportError(RuntimeError):
    """A converter failed on a model; the message names the model, the format and the converter's error."""


def export_file_name(model_name: str, fmt: str) -> str:
    """``finetuned`` + ``tflite_int8`` -> ``finetuned_int8.tflite``."""
    return model_name + SUFFIXES[fmt]


def write_saved_model(model, folder: Path) -> Path:
    """The Keras model as a TensorFlow SavedModel (the converters' input), serving its ``__call__``."""
    model.export(str(folder), format="tf_saved_model", verbose=False)
    return folder


def tflite_float16(saved_model: Path) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def tflite_int8(saved_model: Path, calibration: np.ndarray) -> bytes:
    """Full-integer int8 ops, float32 input and output, calibrated on ``calibration`` (N, S, S) uint8 slices."""
    import tensorflow as tf

    def representative() -> Iterator[list[np.ndarray]]:
        for image in calibration:
            yield [image[None, ..., None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def onnx_bytes(saved_model: Path, opset: int) -> bytes:
    """ONNX through tf2onnx's command line (its supported entry point for SavedModels)."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "model.onnx"
        result = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
                                 "--output", str(output), "--opset", str(opset)], capture_output=True, text=True)
        if result.returncode != 0 or not output.is_file():
            raise RuntimeError(result.stderr.strip()[-2000:] or f"tf2onnx exited with {result.returncode}")
        return output.read_bytes()


def convert(saved_model: Path, fmt: str, calibration: np.ndarray, opset: int) -> bytes:
    if fmt == "tflite_float16":
        return tflite_float16(saved_model)
    if fmt == "tflite_int8":
        return tflite_int8(saved_model, calibration)
    if fmt == "onnx":
        return onnx_bytes(saved_model, opset)
    raise ValueError(f"unknown export format {fmt!r}; allowed: {list(EXPORT_FORMATS)}")


def convert_file(model_file: Path, fmt: str, calibration_npy: Path, opset: int, out: Path) -> None:
    """One conversion, from the ``.keras`` file to ``out``: what the child process of :func:`export_model` runs."""
    import keras

    import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading

    model = keras.saving.load_model(model_file, safe_mode=True)
    with tempfile.TemporaryDirectory(prefix="savedmodel-") as folder:
        saved_model = write_saved_model(model, Path(folder) / "saved_model")
        out.write_bytes(convert(saved_model, fmt, np.load(calibration_npy), opset))


def export_model(model_file: Path, model_name: str, formats: Sequence[str], calibration: np.ndarray, opset: int) -> dict[str, bytes]:
    """File name -> bytes of each export of the ``.keras`` file.

    Each conversion runs in a child process: the converters print pages of C++ logging that cannot be
    silenced in-process (the terminal shows it only when a conversion fails), and their memory is returned.

    Raises:
        ExportError: a converter failed; nothing is returned, so nothing half-converted is written.
    """
    unknown = [fmt for fmt in formats if fmt not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; allowed: {list(EXPORT_FORMATS)}")
    files = {}
    with tempfile.TemporaryDirectory(prefix="exports-") as folder:
        calibration_npy = Path(folder) / "calibration.npy"
        np.save(calibration_npy, np.asarray(calibration, np.uint8))
        for fmt in formats:
            out = Path(folder) / export_file_name(model_name, fmt)
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            result = subprocess.run([sys.executable, "-m", "braintumor.model.export", str(model_file), fmt,
                                     str(calibration_npy), str(opset), str(out)], capture_output=True, text=True, env=env)
            if result.returncode != 0 or not out.is_file():
                detail = result.stderr.strip().splitlines()[-12:] or [f"exit status {result.returncode}"]
                raise ExportError(f"exporting {model_name} ({Path(model_file).name}) as {fmt} failed: " + "\n".join(detail))
            files[out.name] = out.read_bytes()
    return files


def file_record(name: str, data: bytes, fmt: str) -> dict:
    return {"file": name, "format": fmt, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def calibration_rows(train_rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded sample of up to ``count`` training rows, sorted (int8 calibration)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.asarray(train_rows), size=min(count, len(train_rows)), replace=False))


# --------------------------------------------------------------------------- running an export


@dataclass
class ExportedModel:
    """An exported model that predicts like the Keras one: (N, S, S) uint8 slices -> (N, K) probabilities."""

    path: Path
    runner: object
    kind: str  # "tflite" | "onnx"

    @property
    def image_size(self) -> int:
        if self.kind == "tflite":
            return int(self.runner.get_input_details()[0]["shape"][1])
        return int(self.runner.get_inputs()[0].shape[1])

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{self.path.name}: images must be (N, S, S) uint8, got {images.shape} {images.dtype}")
        batches = [self._run(images[start:start + batch_size, ..., None].astype(np.float32))
                   for start in range(0, len(images), batch_size)]
        if not batches:
            return np.zeros((0, 0), np.float32)
        probabilities = np.concatenate(batches).astype(np.float32)
        # int8's softmax comes back in steps of 1/256: rows sum to 1 only within a few steps, and
        # calibration (and any client) expects a distribution
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.kind == "onnx":
            return self.runner.run(None, {self.runner.get_inputs()[0].name: batch})[0]
        interpreter = self.runner
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        if tuple(inp["shape"]) != batch.shape:
            interpreter.resize_tensor_input(inp["index"], batch.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()


def load_exported(path: Path, threads: int | None = None) -> ExportedModel:
    """An exported model by its file suffix (``.tflite`` with LiteRT, ``.onnx`` with onnxruntime), on
    ``threads`` threads (default: one per core; LiteRT alone would take one)."""
    path = Path(path)
    threads = threads or os.cpu_count() or 1
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} not found: run `dvc repro export`")
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
        return ExportedModel(path, interpreter, "tflite")
    if path.suffix == ".onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not for the terminal
        return ExportedModel(path, onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), "onnx")
    raise ValueError(f"{path}: not an exported model (expected .tflite or .onnx)")


def predict_with_flip(model: ExportedModel, images: np.ndarray, tta: str, batch_size: int = 32) -> np.ndarray:
    """Probabilities as the evaluate stage computes them for Keras: with ``tta == "flip"`` the mean of the
    slice's and its mirror image's."""
    probabilities = model.predict(images, batch_size)
    if tta == "flip":
        probabilities = (probabilities + model.predict(np.ascontiguousarray(images[:, :, ::-1]), batch_size)) / 2
    return probabilities


if __name__ == "__main__":  # the child process of export_model: model file, format, calibration .npy, opset, output
    convert_file(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
