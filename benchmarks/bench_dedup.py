"""Near-duplicate candidate search at scale: 100,000 generated fingerprints.

Generates canonical head images (smooth random fields, 64 x 64 uint8) of which a known share are
noisy, slightly shifted copies of others, then times the shortlist (descriptors + exact k-NN) and
reports how many planted copies it shortlisted. Prints one JSON line.

    .venv/bin/python benchmarks/bench_dedup.py [--images 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cv2
import numpy as np

from braintumor.data.dedup import CANONICAL_SIZE, shortlist_descriptors, shortlist_pairs


def generated_canonical(n: int, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64, 64) uint8 images; the last ``copies`` rows are perturbed copies of random earlier rows."""
    rng = np.random.default_rng(seed)
    originals = n - copies
    low = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    images = np.stack([cv2.resize(x, (CANONICAL_SIZE, CANONICAL_SIZE), interpolation=cv2.INTER_CUBIC) for x in low])
    sources = rng.integers(0, originals, copies)
    noise = rng.normal(0, 8, (copies, CANONICAL_SIZE, CANONICAL_SIZE))
    shifted = np.roll(images[sources], rng.integers(-1, 2), axis=2).astype(np.float32)
    images[originals:] = np.clip(shifted + noise, 0, 255).astype(np.uint8)
    return images, np.stack([sources, np.arange(originals, n)], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--copies", type=int, default=5_000)
    parser.add_argument("--neighbours", type=int, default=10)
    args = parser.parse_args()
    canonical, planted = generated_canonical(args.images, args.copies, seed=0)
    start = time.perf_counter()
    descriptors = shortlist_descriptors(canonical)
    described = time.perf_counter()
    pairs = shortlist_pairs(descriptors, args.neighbours, min_similarity=0.5)
    done = time.perf_counter()
    found = set(map(tuple, pairs.tolist()))
    recall = np.mean([tuple(sorted(p)) in found for p in planted.tolist()])
    print(json.dumps({
        "images": args.images,
        "descriptor_seconds": round(described - start, 2),
        "knn_seconds": round(done - described, 2),
        "total_seconds": round(done - start, 2),
        "candidate_pairs": int(len(pairs)),
        "planted_copies_shortlisted": round(float(recall), 4),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
    }))


if __name__ == "__main__":
    main()
