"""Stage export: the fine-tuned model as TFLite float16, TFLite int8 (calibrated on training slices) and ONNX.

Params: export, mlflow
Inputs: models/finetuned.keras, data/processed/images.npy, data/split/split.csv (the calibration sample)
Outputs: models/exports/ with finetuned_float16.tflite, finetuned_int8.tflite, finetuned.onnx (those in
    export.formats) and exports.json (each file's format, size and sha256, and the layers int8 keeps float:
    the exports' card)
"""

from __future__ import annotations

import json

import mlflow
import numpy as np

from braintumor.core import atomic
from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.core.tracking import flatten_params, log_summary, stage_run
from braintumor.model.export import EXPORTS_CARD, calibration_rows, export_model, file_record
from braintumor.split.load import load_training_data

MODEL = "finetuned"


def main() -> dict:
    log = setup_logging("export")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    cfg = params.export
    with stage_run("export", params.mlflow, paths.root, logged_params=flatten_params(cfg, "export")):
        data = load_training_data(paths)
        keras_file = paths.models / f"{MODEL}.keras"
        calibration = np.asarray(data.images[calibration_rows(data.split["train"].rows, cfg.calibration_images, cfg.seed)])
        exports = export_model(keras_file, MODEL, cfg.formats, calibration, cfg.onnx_opset, cfg.int8_float_above)
        files = exports.files
        card = {"model": keras_file.name, "keras_bytes": keras_file.stat().st_size,
                "input": "preprocessed slice, float32 (N, S, S, 1) in 0..255, as for the Keras model (see its card)",
                "output": "class probabilities (N, K), softmax, uncalibrated (the temperature is in models/calibration.json)",
                "calibration_images": int(len(calibration)),
                # each with its int8 error in quantization steps, the reason it stayed float
                "int8_float_layers": exports.int8_float_layers,
                "exports": [file_record(name, data_bytes, fmt) for fmt, (name, data_bytes) in zip(cfg.formats, files.items())]}
        # one folder, replaced whole: a failed conversion leaves the previous exports, never a mix
        atomic.write_folder(paths.exports, {**files, EXPORTS_CARD: (json.dumps(card, indent=2) + "\n").encode()})
        log_summary({f"{r['format']}.megabytes": r["bytes"] / 1e6 for r in card["exports"]}
                    | {f"{r['format']}.size_share": r["bytes"] / card["keras_bytes"] for r in card["exports"]}
                    | ({"tflite_int8.float_layers": len(exports.int8_float_layers)} if "tflite_int8" in cfg.formats else {}))
        mlflow.log_artifacts(str(paths.exports), "exports")
        if not card["exports"]:
            log.info("export.formats is []: nothing exported")
            return card
        if exports.int8_float_layers:
            log.info("int8: %d layer(s) kept float, off by more than %g steps as int8: %s", len(exports.int8_float_layers),
                     cfg.int8_float_above, ", ".join(f"{layer['op']} ({layer['error_steps']:.1f})" for layer in exports.int8_float_layers))
        log.info("exported %s: %s", keras_file.name, ", ".join(f"{r['file']} {r['bytes'] / 1e6:.1f} MB "
                                                               f"({100 * r['bytes'] / card['keras_bytes']:.0f}% of the .keras file)"
                                                               for r in card["exports"]))
    return card


if __name__ == "__main__":
    main()
