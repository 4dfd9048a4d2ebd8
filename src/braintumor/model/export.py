"""The fine-tuned model for phones and small CPU boxes: TFLite float16 and full-integer int8, and ONNX.

Every route starts from one TensorFlow SavedModel that Keras 3 writes (``model.export``): the
converters read that, not the ``.keras`` file. The graph takes what the Keras model takes, the
preprocessed (S, S) grey slice as float32 (N, S, S, 1) in 0..255, and returns the softmax (N, K):
preprocessing stays outside every export, as the model card says, so the app, batch prediction and
any client share one definition of it (:func:`braintumor.preprocess.slices.preprocess_slice`).

- ``tflite_float16``: weights stored as float16, computed in float32 (TensorFlow's TFLite converter);
- ``tflite_int8``: weights and activations int8, calibrated on a seeded sample of training slices;
  input and output stay float32, so a client feeds the same array as to Keras. The few layers that
  int8 gets badly wrong (``export.int8_float_above``, measured on the same sample) may stay float;
- ``onnx``: ``tf2onnx`` on the SavedModel, run with ``onnxruntime``.

A converter that fails raises :class:`ExportError` naming the model and the format.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
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


def model_inputs(images: np.ndarray) -> Iterator[list[np.ndarray]]:
    """(N, S, S) uint8 slices one at a time, as the converter and the debugger feed them to the model."""
    for image in images:
        yield [image[None, ..., None].astype(np.float32)]


def int8_converter(saved_model: Path, calibration: np.ndarray):
    """TensorFlow's converter set up for int8, calibrated on ``calibration`` (N, S, S) uint8 slices; input
    and output stay float32."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: model_inputs(calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def tflite_int8(saved_model: Path, calibration: np.ndarray) -> bytes:
    """Full-integer int8: every op int8."""
    return int8_converter(saved_model, calibration).convert()


def layer_errors(statistics_csv: str) -> list[dict]:
    """Each quantized layer's int8 output error from the quantization debugger's statistics (its
    ``layer_statistics_dump``), largest first: the RMSE against the float layer on the same int8 input,
    in quantization steps of the output (RMSE / scale)."""
    rows = csv.DictReader(io.StringIO(statistics_csv))
    errors = [{"op": row["op_name"], "tensor": row["tensor_name"],
               "error_steps": round(float(np.sqrt(float(row["mean_squared_error"])) / float(row["scale"])), 4)}
              for row in rows]
    return sorted(errors, key=lambda layer: -layer["error_steps"])


def layers_to_keep_float(errors: Sequence[dict], float_above: float) -> list[dict]:
    """The layers whose int8 error exceeds ``float_above`` quantization steps (0: none)."""
    return [layer for layer in errors if float_above > 0 and layer["error_steps"] > float_above]


def tflite_int8_mixed(saved_model: Path, calibration: np.ndarray, float_above: float) -> tuple[bytes, list[dict]]:
    """int8 with the few layers it quantizes badly kept float, and those layers (with their errors).

    TensorFlow's quantization debugger calibrates once, runs an instrumented int8 model on the
    calibration sample and measures each layer's output error (:func:`layer_errors`); the layers above
    ``float_above`` steps are then left out of quantization (their inputs dequantized, computed in
    float32), all others int8. Why: one layer can hold most of the loss. In this project's head the
    converter folds the BatchNorm that follows a ReLU into the next Dense layer, which then rescales
    its inputs channel by channel, most likely more finely than one int8 range for the whole input can
    follow: 9.9 steps of error on the demo model and 3.5 on a real one, against at most 1 and 0.5 for
    every other layer (BENCHMARKS.md).
    """
    import tensorflow as tf

    converter = int8_converter(saved_model, calibration)
    # the float kernels of the layers left out
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=lambda: model_inputs(calibration))
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    kept_float = layers_to_keep_float(layer_errors(dump.getvalue()), float_above)
    # re-quantizes the calibrated model without the layers kept float; no second calibration
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=[layer["tensor"] for layer in kept_float])
    return debugger.get_nondebug_quantized_model(), kept_float


def tflite_bytes(saved_model: Path, fmt: str, calibration: np.ndarray, int8_float_above: float = 0.0) -> tuple[bytes, list[dict]]:
    """The format's bytes, and for int8 the layers kept float (empty: every layer int8)."""
    if fmt == "tflite_float16":
        return tflite_float16(saved_model), []
    if fmt == "tflite_int8":
        if int8_float_above > 0:
            return tflite_int8_mixed(saved_model, calibration, int8_float_above)
        return tflite_int8(saved_model, calibration), []
    raise ValueError(f"{fmt!r} is not a TFLite format; allowed: tflite_float16, tflite_int8")


SAVED_MODEL_WRITTEN = "saved model written"  # the first child's one line on stdout
FLOAT_LAYERS_SUFFIX = ".float_layers.json"  # beside the int8 output in the child's folder


def convert_keras_file(model_file: Path, saved_model: Path, calibration_npy: Path, outputs: dict[str, Path],
                       int8_float_above: float = 0.0) -> None:
    """The ``.keras`` file as a SavedModel, then each TFLite format of ``outputs`` from it, in order, int8
    with the list of its layers kept float beside it. Says on stdout when the SavedModel is complete, so
    the ONNX converter can start on it meanwhile."""
    import keras

    import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading

    write_saved_model(keras.saving.load_model(model_file, safe_mode=True), saved_model)
    print(SAVED_MODEL_WRITTEN, flush=True)
    calibration = np.load(calibration_npy)
    for fmt, out in outputs.items():
        data, kept_float = tflite_bytes(saved_model, fmt, calibration, int8_float_above)
        if fmt == "tflite_int8":
            out.with_name(out.name + FLOAT_LAYERS_SUFFIX).write_text(json.dumps(kept_float))
        out.write_bytes(data)


def onnx_command(saved_model: Path, opset: int, out: Path) -> list[str]:
    """tf2onnx's own command line, its supported entry point for SavedModels."""
    return [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--output", str(out),
            "--opset", str(opset)]


def tail(log, status: int) -> str:
    log.seek(0)
    return "\n".join(log.read().strip().splitlines()[-12:] or [f"exit status {status}"])


@dataclass
class Exports:
    files: dict[str, bytes]  # file name -> bytes
    int8_float_layers: list[dict]  # int8's layers kept float, with their errors (empty: every layer int8)


def export_model(model_file: Path, model_name: str, formats: Sequence[str], calibration: np.ndarray, opset: int,
                 int8_float_above: float = 0.0) -> Exports:
    """Each export of the ``.keras`` file, and the layers int8 keeps float (those above
    ``int8_float_above`` quantization steps of error: :func:`tflite_int8_mixed`; 0: none).

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
        return Exports({}, [])
    source = f"exporting {model_name} ({Path(model_file).name})"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory(prefix="exports-") as temp:
        folder = Path(temp)
        calibration_npy, saved_model = folder / "calibration.npy", folder / "saved_model"
        np.save(calibration_npy, np.asarray(calibration, np.uint8))
        outputs = {fmt: folder / export_file_name(model_name, fmt) for fmt in formats}
        tflite = [fmt for fmt in formats if fmt != "onnx"]
        command = [sys.executable, "-m", "braintumor.model.export", str(model_file), str(saved_model),
                   str(calibration_npy), str(int8_float_above), *(f"{fmt}={outputs[fmt]}" for fmt in tflite)]
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
        int8_float_layers = (json.loads(outputs["tflite_int8"].with_name(outputs["tflite_int8"].name + FLOAT_LAYERS_SUFFIX).read_text())
                             if "tflite_int8" in outputs else [])
        return Exports({out.name: out.read_bytes() for out in outputs.values()}, int8_float_layers)


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


def predict_with_tta(model: ExportedModel, images: np.ndarray, tta: str, batch_size: int = 32) -> np.ndarray:
    """Probabilities as the evaluate stage computes them for Keras: the mean over the views of ``tta``
    (:func:`braintumor.model.tta.tta_views`)."""
    from braintumor.model.tta import mean_of_views, tta_views

    return mean_of_views([model.predict(np.ascontiguousarray(view), batch_size) for view in tta_views(images, tta)])


if __name__ == "__main__":  # export_model's child: model file, SavedModel folder, calibration .npy, int8_float_above, FORMAT=OUTPUT...
    convert_keras_file(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                       {fmt: Path(out) for fmt, out in (arg.split("=", 1) for arg in sys.argv[5:])}, float(sys.argv[4]))
