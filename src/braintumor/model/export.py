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


def tflite_bytes(saved_model: Path, fmt: str, calibration: np.ndarray) -> bytes:
    if fmt == "tflite_float16":
        return tflite_float16(saved_model)
    if fmt == "tflite_int8":
        return tflite_int8(saved_model, calibration)
    raise ValueError(f"{fmt!r} is not a TFLite format; allowed: tflite_float16, tflite_int8")


SAVED_MODEL_WRITTEN = "saved model written"  # the first child's one line on stdout


def convert_keras_file(model_file: Path, saved_model: Path, calibration_npy: Path, outputs: dict[str, Path]) -> None:
    """The ``.keras`` file as a SavedModel, then each TFLite format of ``outputs`` from it, in order. Says
    on stdout when the SavedModel is complete, so the ONNX converter can start on it meanwhile."""
    import keras

    import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading

    write_saved_model(keras.saving.load_model(model_file, safe_mode=True), saved_model)
    print(SAVED_MODEL_WRITTEN, flush=True)
    calibration = np.load(calibration_npy)
    for fmt, out in outputs.items():
        out.write_bytes(tflite_bytes(saved_model, fmt, calibration))


def onnx_command(saved_model: Path, opset: int, out: Path) -> list[str]:
    """tf2onnx's own command line, its supported entry point for SavedModels."""
    return [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--output", str(out),
            "--opset", str(opset)]


def tail(log, status: int) -> str:
    log.seek(0)
    return "\n".join(log.read().strip().splitlines()[-12:] or [f"exit status {status}"])


def export_model(model_file: Path, model_name: str, formats: Sequence[str], calibration: np.ndarray, opset: int) -> dict[str, bytes]:
    """File name -> bytes of each export of the ``.keras`` file.

    Two child processes: one writes the SavedModel and converts it to each TFLite format, the other runs
    tf2onnx on the SavedModel as soon as it is complete. The converters spend most of their time in
    single-threaded graph passes, so on two cores this takes about the longer chain, not the sum (a
    third process, for float16, made it slower on two cores: measured). Child processes, because the
    converters print pages of C++ logging that cannot be silenced in-process (it goes to log files,
    shown only when a conversion fails), and their memory is returned.

    Raises:
        ExportError: a converter failed; nothing is returned, so nothing half-converted is written.
    """
    unknown = [fmt for fmt in formats if fmt not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; allowed: {list(EXPORT_FORMATS)}")
    if not formats:
        return {}
    source = f"exporting {model_name} ({Path(model_file).name})"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory(prefix="exports-") as temp:
        folder = Path(temp)
        calibration_npy, saved_model = folder / "calibration.npy", folder / "saved_model"
        np.save(calibration_npy, np.asarray(calibration, np.uint8))
        outputs = {fmt: folder / export_file_name(model_name, fmt) for fmt in formats}
        tflite = [fmt for fmt in formats if fmt != "onnx"]
        command = [sys.executable, "-m", "braintumor.model.export", str(model_file), str(saved_model),
                   str(calibration_npy), *(f"{fmt}={outputs[fmt]}" for fmt in tflite)]
        # logs go to files, not pipes: a child that fills a pipe nobody reads would stall
        with open(folder / "tflite.log", "w+") as tflite_log, open(folder / "onnx.log", "w+") as onnx_log:
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=tflite_log, text=True, env=env) as converter:
                written, said = False, []  # said: what it printed before the SavedModel was complete
                for line in converter.stdout:
                    if line.strip() == SAVED_MODEL_WRITTEN:
                        written = True
                        break
                    said.append(line.rstrip())
                onnx = (subprocess.Popen(onnx_command(saved_model, opset, outputs["onnx"]), stdout=onnx_log,
                                         stderr=subprocess.STDOUT, text=True, env=env)
                        if written and "onnx" in formats else None)
                converter.stdout.read()
            onnx_status = onnx.wait() if onnx else 0
            if not written:
                raise ExportError(f"{source} as a SavedModel, the converters' input, failed: "
                                  + "\n".join([*said[-12:], tail(tflite_log, converter.returncode)]))
            failed = {}
            missing = [fmt for fmt in tflite if not outputs[fmt].is_file()]
            if missing:  # converted in order: the first one missing is the one that failed
                failed[missing[0]] = tail(tflite_log, converter.returncode)
            elif converter.returncode != 0:
                failed[", ".join(tflite) or "a SavedModel"] = tail(tflite_log, converter.returncode)
            if onnx and (onnx_status != 0 or not outputs["onnx"].is_file()):
                failed["onnx"] = tail(onnx_log, onnx_status)
        if failed:
            raise ExportError("\n".join(f"{source} as {fmt} failed: {detail}" for fmt, detail in failed.items()))
        return {out.name: out.read_bytes() for out in outputs.values()}


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


if __name__ == "__main__":  # export_model's child: model file, SavedModel folder, calibration .npy, FORMAT=OUTPUT...
    convert_keras_file(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                       {fmt: Path(out) for fmt, out in (arg.split("=", 1) for arg in sys.argv[4:])})
