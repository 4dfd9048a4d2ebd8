"""Benchmark of one fine-tuning epoch with and without the activation cache (src/braintumor/model/train.py).

Xception (the real-data backbone) with ``weights: none`` (the values do not change the cost),
unfrozen from ``--unfreeze`` (default ``block13_sepconv1``: the exit flow, as on the real data),
BatchNorm frozen, the seed's head. Both variants train on the same ``--images`` random slices through
the project's input pipeline (``make_dataset``), batch 32, Adam: uncached runs the whole model every
step; cached runs the frozen part once (``cache_outputs``, float16, memory-mapped; timed separately)
and then only the unfrozen top. One warm-up epoch each (tracing), then ``--epochs`` timed epochs.

    .venv/bin/python benchmarks/bench_finetune_cache.py [--sizes 160 224] [--images 256] [--epochs 2]

Prints one JSON line per image size: images/s per epoch of both, the speed-up, the one-off cache
cost, and ``other_cpu_s`` (CPU time other programs took meanwhile: the machine may be shared).
Target: the cached epoch at least 5x faster than the uncached one, same unfreeze point.
"""

from __future__ import annotations

import argparse
import json
import os
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

import keras  # noqa: E402
import numpy as np  # noqa: E402

from machine import cpu_seconds, machine  # noqa: E402  (benchmarks/machine.py)
from braintumor.core.config import FinetuneParams, ModelParams  # noqa: E402
from braintumor.model.backbones import build_model, unfreeze_top  # noqa: E402
from braintumor.model.inputs import make_dataset  # noqa: E402
from braintumor.model.activations import cache_outputs, split_at_frozen  # noqa: E402
from braintumor.model.train import compile_for  # noqa: E402

BATCH = 32


def epoch_seconds(model: keras.Model, data: np.ndarray, labels: np.ndarray, epochs: int) -> list[float]:
    """Wall seconds of each timed epoch of ``model.fit`` on ``data`` (after one warm-up epoch)."""
    compile_for(model, FinetuneParams(learning_rate=1e-4, batch_size=BATCH), len(data), jit_compile=False)
    dataset = make_dataset(data, np.arange(len(data)), labels, batch_size=BATCH, training=True, augment=None, seed=0)
    model.fit(dataset, epochs=1, verbose=0)  # traces the step function
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0)
        seconds.append(time.perf_counter() - start)
    return seconds


def measure(size: int, images: int, epochs: int, unfreeze: str) -> dict:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (images, size, size), dtype=np.uint8)
    labels = np.tile(np.arange(4, dtype=np.int32), images // 4 + 1)[:images]
    busy0, mine0 = cpu_seconds()

    uncached = build_model(ModelParams(backbone="xception", weights="none"), size)
    unfreeze_top(uncached, unfreeze)
    plain = epoch_seconds(uncached, pixels, labels, epochs)

    model = build_model(ModelParams(backbone="xception", weights="none"), size)
    unfreeze_top(model, unfreeze)
    bottom, top = split_at_frozen(model)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        activations, _ = cache_outputs(bottom, pixels, np.arange(images), batch_size=BATCH, augment=None, copies=0,
                                       seed=0, dtype="float16", path=Path(folder) / "outputs.npy")
        cache_s = time.perf_counter() - start
        cached = epoch_seconds(top, activations, labels, epochs)
        del activations
    busy1, mine1 = cpu_seconds()
    best_plain, best_cached = min(plain), min(cached)
    return {
        "image_size": size, "images": images, "unfreeze": unfreeze, "cut": bottom.layers[-1].name,
        "activation_shape": list(bottom.output.shape[1:]),
        "uncached_images_per_s": round(images / best_plain, 1), "cached_images_per_s": round(images / best_cached, 1),
        "speedup": round(best_plain / best_cached, 2),
        "cache_images_per_s": round(images / cache_s, 1),
        "epoch_seconds": {"uncached": [round(s, 2) for s in plain], "cached": [round(s, 2) for s in cached]},
        "other_cpu_s": round((busy1 - busy0) - (mine1 - mine0), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--unfreeze", default="block13_sepconv1")
    args = parser.parse_args()
    info = machine()
    for size in args.sizes:
        print(json.dumps({**measure(size, args.images, args.epochs, args.unfreeze), "machine": info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
