"""The out-of-distribution rule on real shifted images, through the app's own prediction code.

    .venv/bin/python benchmarks/bench_ood.py --repo WORKSPACE [--mri-sample 500] [--external sartaj]

``WORKSPACE`` ran the pipeline (``make demo``, or ``benchmarks/real_data.py``'s clone): its
``models/finetuned.keras`` with ``ood.npz``, ``calibration.json`` and card, and its data. Image sets:

- ``test``: the workspace's own test split (the model's in-distribution images, as files);
- ``real_mri``: a seeded sample of ``../shared/datasets/nickparvar-224`` (``--mri-sample``; for a
  phantom model these are real scans it never saw the like of; skipped with ``--no-mri``);
- ``photos``: the 457 food photographs of ``../shared/datasets/sartaj-sample``;
- ``external`` (``--external sartaj``): SARTAJ's Testing folder, for a real-data model.

Per set: the share flagged by the feature check (``unlike_training``) and by the whole rule (any
flag). Then the choice of score, on the test split's and each set's images: AUROC of the feature
check beside the same Mahalanobis distance on the penultimate layer (Lee et al. 2018), the energy
score (Liu et al. 2020) and the top softmax probability. And the time the check adds to one
prediction: ``predict_upload`` with and without it (median of 50), and the distance alone.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from braintumor.core.quiet import rerun_script_filtered  # noqa: E402

if __name__ == "__main__":  # before TensorFlow is imported: its start-up chatter filtered out of stderr
    rerun_script_filtered(__file__)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from braintumor.core.config import CLASS_NAMES, load_params  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def test_split_files(repo: Path) -> list[Path]:
    split = pd.read_csv(repo / "data" / "split" / "split.csv", keep_default_na=False).query("split == 'test'")
    manifest = pd.read_csv(repo / "data" / "interim" / "manifest.csv", keep_default_na=False)
    path_of = dict(zip(manifest["id"], manifest["path"]))
    return [repo / path_of[i] for i in split["id"]]


def run_app(bundle, settings, files: list[Path]) -> dict:
    """The app's verdict on every file: the feature check's flag rate and the whole rule's."""
    from braintumor.serve.bundle import predict_upload

    unlike, flagged = [], []
    for path in files:
        checks = {flag.check for flag in predict_upload(bundle, path, settings).verdict.flags}
        unlike.append("unlike_training" in checks)
        flagged.append(bool(checks))
    return {"n": len(files), "feature_check_flag_rate": float(np.mean(unlike)), "rule_flag_rate": float(np.mean(flagged))}


def preprocessed(files: list[Path], preprocess) -> np.ndarray:
    from braintumor.serve.uploads import preprocess_upload

    return np.stack([preprocess_upload(p.read_bytes(), preprocess, 50 * 2**20, 50_000_000)[1] for p in files])


def compare_scores(repo: Path, bundle, sets: dict[str, list[Path]]) -> dict:
    """AUROC of each candidate score, test split vs every other set (higher score = less like training)."""
    import keras

    from braintumor.core.paths import ProjectPaths
    from braintumor.evaluate.feature_check import detection_summary, energy_scores, fit_class_gaussians, mahalanobis_scores
    from braintumor.model.backbones import feature_check_tensor, final_dense
    from braintumor.split.load import SplitRows, load_training_data

    model, check = bundle.model, bundle.feature_check
    dense = final_dense(model)
    outputs = keras.Model(model.inputs, [feature_check_tensor(model, check.layer), dense.input, model.output])
    data = load_training_data(ProjectPaths(repo))

    def run(images: np.ndarray, rows: SplitRows | None = None):
        rows = rows or SplitRows(np.arange(len(images)), np.zeros(len(images), np.int64))
        chosen, penultimate, probabilities = outputs.predict(images[rows.rows][..., None].astype("float32"), verbose=0,
                                                             batch_size=32)
        kernel, bias = (np.asarray(w) for w in dense.get_weights())
        return chosen, penultimate, penultimate @ kernel + bias, probabilities

    _, train_penultimate, _, _ = run(data.images, data.split["train"])
    means, precision = fit_class_gaussians(train_penultimate, data.split["train"].labels, len(CLASS_NAMES))

    def candidates(images: np.ndarray) -> dict[str, np.ndarray]:
        chosen, penultimate, logits, probabilities = run(images)
        return {"feature_check": check.scores(chosen), "penultimate_mahalanobis": mahalanobis_scores(means, precision, penultimate),
                "energy": energy_scores(logits), "max_softmax": -probabilities.max(axis=1)}

    scored = {name: candidates(preprocessed(files, bundle.preprocess)) for name, files in sets.items()}
    return {name: {score: round(detection_summary(scored["test"][score], values, np.inf)["auroc"], 4)
                   for score, values in scores.items()}
            for name, scores in scored.items() if name != "test"}


def latency(bundle, settings, path: Path, repeats: int = 50) -> dict:
    """Median ms of one prediction with the feature check, without it, and of the distance alone."""
    import dataclasses

    from braintumor.explain.gradcam import make_gradcam_model
    from braintumor.serve.bundle import predict_upload

    without = dataclasses.replace(bundle, feature_check=None,
                                  gradcam_model=make_gradcam_model(bundle.model, bundle.gradcam_layer))
    timings = {}
    for name, b in (("with_check_ms", bundle), ("without_check_ms", without)):
        predict_upload(b, path, settings)  # warm-up (traces the graph)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            predict_upload(b, path, settings)
            times.append(time.perf_counter() - started)
        timings[name] = round(1000 * statistics.median(times), 1)
    features = np.zeros((1, bundle.feature_check.dimension), np.float32)
    started = time.perf_counter()
    for _ in range(1000):
        bundle.feature_check.scores(features)
    timings["distance_only_ms"] = round((time.perf_counter() - started), 3)  # 1000 calls: seconds = ms per call
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a workspace that ran the pipeline")
    parser.add_argument("--mri-sample", type=int, default=500)
    parser.add_argument("--no-mri", action="store_true", help="skip real_mri (for a model trained on those images)")
    parser.add_argument("--external", choices=["sartaj"], help="add SARTAJ's Testing folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from braintumor.serve.bundle import ServingSettings, load_bundle
    from machine import machine

    params = load_params(args.repo / "params.yaml")
    bundle = load_bundle("models/finetuned.keras", args.repo, params.preprocess, params.gradcam.layer)
    if bundle.feature_check is None:
        raise SystemExit(f"{args.repo}/models has no ood.npz: run `dvc repro evaluate` there first")
    settings = ServingSettings.from_params(params)
    sets = {"test": test_split_files(args.repo)}
    if not args.no_mri:
        sets["real_mri"] = random.Random(args.seed).sample(image_files(SHARED / "nickparvar-224"), args.mri_sample)
    sets["photos"] = image_files(SHARED / "sartaj-sample")
    if args.external == "sartaj":
        sets["external_sartaj_testing"] = image_files(SHARED / "sartaj" / "Testing")
    result: dict = {"repo": str(args.repo), "layer": bundle.feature_check.layer, "flag_share": bundle.feature_check.flag_share,
                    "sets": {}}
    for name, files in sets.items():
        result["sets"][name] = run_app(bundle, settings, files)
        entry = result["sets"][name]
        print(f"{name:24s} n={entry['n']:5d}  feature check flags {entry['feature_check_flag_rate']:.1%}, "
              f"whole rule {entry['rule_flag_rate']:.1%}", flush=True)
    result["auroc_vs_test"] = compare_scores(args.repo, bundle, sets)
    for name, scores in result["auroc_vs_test"].items():
        print(f"AUROC test vs {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    result["latency"] = latency(bundle, settings, sets["test"][0])
    print(f"latency: {result['latency']}", flush=True)
    result["machine"] = machine()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
