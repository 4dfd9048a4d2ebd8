"""Benchmark of the exported models (src/braintumor/model/export.py) against the Keras model they came from.

For a pipeline folder whose export stage has run (``models/finetuned.keras`` and ``models/exports/``),
or for the Keras file alone (exported here, int8 calibrated on ``--calibration`` training slices of
``data/processed/images.npy`` when the folder has one, else on random slices):

- file size of each format, and its share of the ``.keras`` file;
- single-image CPU latency (p50, p90 over ``--repeats`` calls after ``--warmup``), one (1, S, S) slice;
- batch throughput (images/s) at ``--batch`` images per call;
- peak memory (maximum RSS) of a child process that imports the runtime, loads the model and predicts one slice.

    .venv/bin/python benchmarks/bench_export.py --root ~/.cache/braintumor/real-data/nickparvar [--repeats 50]

Prints progress, then one JSON line. Targets (issue): int8 <= 30% of the float32 file, single-image
latency <= 0.5x Keras; see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from braintumor.core.quiet import rerun_script_filtered  # noqa: E402

if __name__ == "__main__":  # before TensorFlow is imported: its start-up chatter filtered out of stderr
    rerun_script_filtered(__file__)

import numpy as np  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from machine import cpu_seconds, machine  # noqa: E402  (benchmarks/machine.py)

KERAS = "keras"


def load_runner(kind: str, path: Path):
    """A callable (N, S, S) uint8 -> probabilities, for Keras or an export."""
    if kind == KERAS:
        import keras

        import braintumor.model.backbones  # noqa: F401  registers the custom layers

        import tensorflow as tf

        model = keras.saving.load_model(path, safe_mode=True)
        # a traced call, as the app's Grad-CAM function runs it: predict_on_batch's per-call overhead would
        # flatter the exports
        call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return lambda images: call(tf.convert_to_tensor(images[..., None], tf.float32)).numpy()
    from braintumor.model.export import load_exported

    exported = load_exported(path)
    return lambda images: exported.predict(images, batch_size=len(images))


def latency(run, image: np.ndarray, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        run(image)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(image)
        seconds.append(time.perf_counter() - start)
    return {"p50_ms": round(1000 * float(np.percentile(seconds, 50)), 2),
            "p90_ms": round(1000 * float(np.percentile(seconds, 90)), 2)}


def throughput(run, images: np.ndarray, rounds: int) -> float:
    run(images)
    start = time.perf_counter()
    for _ in range(rounds):
        run(images)
    return round(rounds * len(images) / (time.perf_counter() - start), 1)


def peak_memory_mb(kind: str, path: Path, size: int, batch: int) -> float:
    """Maximum RSS of a fresh process that imports the runtime, loads ``path`` and predicts ``batch`` slices (MB)."""
    code = (
        "import resource, sys, numpy as np; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "from bench_export import load_runner;"
        "run = load_runner(sys.argv[3], sys.argv[4]);"
        "run(np.zeros((int(sys.argv[6]), int(sys.argv[5]), int(sys.argv[5])), np.uint8));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "src"), str(REPO / "benchmarks"), kind, str(path),
                             str(size), str(batch)], capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if result.returncode != 0:
        raise RuntimeError(f"memory probe of {path} failed: {result.stderr[-800:]}")
    return round(float(result.stdout.strip().splitlines()[-1]), 1)


def ensure_exports(root: Path, calibration: int, workdir: Path) -> Path:
    """``root/models/exports`` if the export stage wrote it, else the exports made here into ``workdir``."""
    folder = root / "models" / "exports"
    if (folder / "exports.json").is_file():
        return folder
    from braintumor.core.config import ExportParams
    from braintumor.model.export import EXPORT_FORMATS, EXPORTS_CARD, export_model, file_record

    size = _input_size(root / "models" / "finetuned.keras")
    images_npy = root / "data" / "processed" / "images.npy"
    if images_npy.is_file():
        cached = np.load(images_npy, mmap_mode="r")
        rows = np.sort(np.random.default_rng(0).choice(len(cached), size=min(calibration, len(cached)), replace=False))
        sample = np.asarray(cached[rows])
    else:
        sample = np.random.default_rng(0).integers(0, 256, (calibration, size, size), dtype=np.uint8)
    print(f"exporting {root / 'models/finetuned.keras'} (int8 calibrated on {len(sample)} slices)...", flush=True)
    files = export_model(root / "models" / "finetuned.keras", "finetuned", EXPORT_FORMATS, sample, opset=17,
                         int8_float_above=ExportParams().int8_float_above).files
    workdir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (workdir / name).write_bytes(data)
    card = {"keras_bytes": (root / "models" / "finetuned.keras").stat().st_size,
            "exports": [file_record(name, data, fmt) for fmt, (name, data) in zip(EXPORT_FORMATS, files.items())]}
    (workdir / EXPORTS_CARD).write_text(json.dumps(card))
    return workdir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a pipeline folder with models/finetuned.keras")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed batches for the throughput")
    parser.add_argument("--calibration", type=int, default=200)
    args = parser.parse_args()
    keras_file = args.root / "models" / "finetuned.keras"
    with tempfile.TemporaryDirectory() as tmp:
        folder = ensure_exports(args.root, args.calibration, Path(tmp))
        card = json.loads((folder / "exports.json").read_text())
        candidates = [(KERAS, keras_file, keras_file.stat().st_size)] + [
            (r["format"], folder / r["file"], r["bytes"]) for r in card["exports"]]
        busy0, mine0 = cpu_seconds()
        results = {kind: {"file": path.name, "megabytes": round(nbytes / 1e6, 2)} for kind, path, nbytes in candidates}
        size = _input_size(keras_file)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (1, size, size), dtype=np.uint8)
        batch = rng.integers(0, 256, (args.batch, size, size), dtype=np.uint8)
        for kind, path, nbytes in candidates:
            run = load_runner(kind, path)
            results[kind].update(latency(run, image, args.warmup, args.repeats))
            results[kind]["batch_images_per_second"] = throughput(run, batch, args.rounds)
            # one slice, as a phone or a small server answering one upload sees it
            results[kind]["peak_memory_mb"] = peak_memory_mb(kind, path, size, 1)
            results[kind]["size_share_of_keras"] = round(nbytes / keras_file.stat().st_size, 4)
            print(f"{kind:15s} {results[kind]}", flush=True)
        accuracy = test_split_accuracy(args.root, candidates)
        busy1, mine1 = cpu_seconds()
    base = results[KERAS]
    for kind, entry in results.items():
        entry["latency_share_of_keras"] = round(entry["p50_ms"] / base["p50_ms"], 3)
        entry["throughput_vs_keras"] = round(entry["batch_images_per_second"] / base["batch_images_per_second"], 2)
    print(json.dumps({"root": str(args.root), "image_size": size, "batch": args.batch, "results": results,
                      "test_split": accuracy,
                      "other_cpu_s": round((busy1 - busy0) - (mine1 - mine0), 1), "machine": machine()}))
    return 0


def test_split_accuracy(root: Path, candidates: list[tuple[str, Path, int]]) -> dict | None:
    """Accuracy of Keras and each export on the folder's test split (averaged over the views params.yaml's
    evaluate.tta names), and each export's agreement with Keras; None without a split."""
    split_csv, images_npy = root / "data" / "split" / "split.csv", root / "data" / "processed" / "images.npy"
    if not (split_csv.is_file() and images_npy.is_file()):
        return None
    import pandas as pd

    from braintumor.core.config import CLASS_NAMES, load_params
    from braintumor.model.export import load_exported, predict_with_tta
    from braintumor.model.tta import mean_of_views, tta_views

    tta = load_params(root / "params.yaml").evaluate.tta
    test = pd.read_csv(split_csv).query("split == 'test'").sort_values("row")
    images = np.asarray(np.load(images_npy, mmap_mode="r")[test["row"].to_numpy()])
    labels = test["label"].map({name: i for i, name in enumerate(CLASS_NAMES)}).to_numpy()
    predicted = {}
    for kind, path, _ in candidates:
        if kind == KERAS:
            run = load_runner(kind, path)
            probabilities = mean_of_views([np.concatenate([run(np.ascontiguousarray(view[i:i + 32]))
                                                           for i in range(0, len(view), 32)])
                                           for view in tta_views(images, tta)])
        else:
            probabilities = predict_with_tta(load_exported(path), images, tta)
        predicted[kind] = probabilities.argmax(axis=1)
    result = {"n": int(len(labels)), "tta": tta}
    for kind, guess in predicted.items():
        result[kind] = {"accuracy": round(float(np.mean(guess == labels)), 4),
                        "agreement_with_keras": round(float(np.mean(guess == predicted[KERAS])), 4)}
        print(f"test split ({len(labels)}): {kind:15s} {result[kind]}", flush=True)
    return result


def _input_size(keras_file: Path) -> int:
    import zipfile

    config = json.loads(zipfile.ZipFile(keras_file).read("config.json"))
    shape = config["config"]["layers"][0]["config"]["batch_shape"]
    return int(shape[1])


if __name__ == "__main__":
    sys.exit(main())
