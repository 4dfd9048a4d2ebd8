"""Which layer should Grad-CAM read? The pointing game on real tumor boxes, one row per layer.

Runs in a pipeline folder whose merge kept tumor boxes (a source with ``boxes: yolo | csv``, e.g. the work
folder of ``benchmarks/real_data.py --boxes figshare``): Grad-CAM of the true class from the fine-tuned
model at each layer given, on a seeded sample of the boxed images spread evenly over the classes, scored
against the boxes exactly as the gradcam stage scores them (:mod:`braintumor.explain.boxes`), beside the
baselines that never look at the image.

    cd ~/.cache/braintumor/real-data/nickparvar-sartaj_testing-figshare
    PYTHONPATH=/path/to/repo/src python /path/to/repo/benchmarks/gradcam_layers.py --set local_figshare \\
        --external local_sartaj_testing,local_figshare --images 450 \\
        block14_sepconv2_act block14_sepconv1_act add_11 block13_sepconv2_bn block13_sepconv2 add_10

Results: README, "External validation and real tumor boxes".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from braintumor.core.quiet import rerun_script_filtered

if __name__ == "__main__":  # before TensorFlow is imported: its start-up chatter filtered out of stderr
    rerun_script_filtered(__file__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import braintumor.model.backbones  # noqa: E402, F401  (registers the model's custom layers for loading)
from braintumor.core.config import CLASS_NAMES, load_params  # noqa: E402
from braintumor.core.paths import ProjectPaths  # noqa: E402
from braintumor.explain.boxes import BoxedImages, baseline_scores, model_scores  # noqa: E402
from braintumor.explain.gradcam import grad_cam, make_gradcam_model  # noqa: E402
from braintumor.explain.run import load_box_sets, spread_over_classes  # noqa: E402
from braintumor.split.load import load_training_data  # noqa: E402


def summarise(scores: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    """Mean of each score over all images and per class (tolerant variants over all images only)."""
    out: dict = {name: round(float(np.mean(values)), 4) for name, values in scores.items()}
    for label in np.unique(labels):
        out[CLASS_NAMES[int(label)]] = {name: round(float(np.mean(values[labels == label])), 3)
                                        for name, values in scores.items() if not name.endswith("tolerant")}
    return out


def sample(boxed: BoxedImages, positions: np.ndarray) -> BoxedImages:
    return dataclasses.replace(boxed, rows=boxed.rows[positions], labels=boxed.labels[positions],
                               boxes=[boxed.boxes[i] for i in positions], masks=boxed.masks[positions],
                               head_centres=boxed.head_centres[positions], seen=boxed.seen[positions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layers", nargs="+", help="layer names of the fine-tuned model")
    parser.add_argument("--set", default="local_figshare", help="the boxed set: test or an external source")
    parser.add_argument("--external", default="", help="the run's split.external, comma-separated (params.yaml's by default)")
    parser.add_argument("--images", type=int, default=450, help="sample size, spread over the classes")
    parser.add_argument("--tolerance", type=float, default=0.03, help="share of the side (gradcam.box_tolerance)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    external = tuple(n for n in args.external.split(",") if n) or params.split.external
    data = load_training_data(paths)
    read = lambda path: pd.read_csv(path, keep_default_na=False)  # noqa: E731
    sets = load_box_sets(data.images, data.split["test"], read(paths.images_index), read(paths.manifest),
                         read(paths.boxes_csv), external, read(paths.external_removed_csv), paths.root, params.preprocess)
    if args.set not in sets:
        raise SystemExit(f"no boxed set {args.set!r} here; boxed sets: {sorted(sets)} (check --external)")
    boxed, slices = sets[args.set]
    positions = spread_over_classes(boxed.labels, args.images, args.seed)
    chosen = sample(boxed, positions)
    tolerance = args.tolerance * slices.shape[1]
    print(json.dumps({"set": args.set, "images": len(positions), "baselines": summarise(baseline_scores(chosen, tolerance), chosen.labels)}), flush=True)
    model = keras.saving.load_model(paths.models / "finetuned.keras", compile=False)
    for layer in args.layers:
        started = time.perf_counter()
        cam = make_gradcam_model(model, layer)
        maps, _ = grad_cam(cam, slices[positions], chosen.labels)
        print(json.dumps({"layer": layer, "map": list(cam.outputs[0].shape[1:3]),
                          **summarise(model_scores(maps, chosen.masks, tolerance), chosen.labels),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
