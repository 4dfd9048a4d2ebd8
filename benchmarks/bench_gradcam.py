"""Benchmark of Grad-CAM (src/braintumor/explain/gradcam.py) for one 224 px image with ResNet50.

The classifier is ``build_model`` with ResNet50 and ``weights: none`` (the ImageNet file cannot be
downloaded offline; the weights' values do not change the cost). ``make_gradcam_model`` once, then
``grad_cam`` on one (1, 224, 224) uint8 slice: the first call traces the TensorFlow function
(reported as ``first_call_s``), ``--warmup`` more calls warm it up, then ``--repeats`` timed calls.
Target: under 0.5 s per image after warm-up.

    .venv/bin/python benchmarks/bench_gradcam.py [--repeats 20] [--warmup 3] [--backbone resnet50]

Prints one JSON line: median, p90, best and worst seconds per image, and ``other_cpu_s``, the CPU
time other programs took during the timed calls (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from braintumor.core.quiet import rerun_script_filtered  # noqa: E402

if __name__ == "__main__":  # before TensorFlow is imported: its start-up chatter filtered out of stderr
    rerun_script_filtered(__file__)

import numpy as np  # noqa: E402

from machine import cpu_seconds, machine  # noqa: E402  (benchmarks/machine.py)
from braintumor.core.config import ModelParams  # noqa: E402
from braintumor.explain.gradcam import grad_cam, gradcam_layer_name, make_gradcam_model  # noqa: E402
from braintumor.model.backbones import build_model  # noqa: E402

SIZE = 224
TARGET_S = 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    model = build_model(ModelParams(backbone=args.backbone, weights="none"), SIZE)
    layer = gradcam_layer_name(model)
    cam = make_gradcam_model(model, layer)
    image = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE), dtype=np.uint8)

    start = time.perf_counter()
    grad_cam(cam, image)
    first_call = time.perf_counter() - start
    for _ in range(args.warmup):
        grad_cam(cam, image)
    seconds = []
    busy0, mine0 = cpu_seconds()
    for _ in range(args.repeats):
        start = time.perf_counter()
        heatmaps, _ = grad_cam(cam, image)
        seconds.append(time.perf_counter() - start)
    busy1, mine1 = cpu_seconds()
    assert heatmaps.shape == (1, SIZE, SIZE)
    median = float(np.median(seconds))
    print(json.dumps({
        "benchmark": "gradcam_single_image", "backbone": args.backbone, "layer": layer, "image_size": SIZE,
        "repeats": args.repeats, "first_call_s": round(first_call, 3), "median_s": round(median, 4),
        "p90_s": round(float(np.percentile(seconds, 90)), 4), "best_s": round(min(seconds), 4),
        "worst_s": round(max(seconds), 4), "target_s": TARGET_S, "meets_target": median < TARGET_S,
        "other_cpu_s": round(max(0.0, (busy1 - busy0) - (mine1 - mine0)), 2), "machine": machine(),
    }))
    return 0 if median < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
