"""How many of the phantom's planted look-alike pairs the keypoint shortlist holds, and its time.

A phantom source with ``--copies`` of every planted kind (as ``dedup_recall.py --per-class 200
--copies 40`` makes it); the keypoints of every file as the merge finds them; then the shortlist
(``braintumor.data.keypoints.keypoint_shortlist``: vocabulary, word histograms, nearest neighbours) once
per vocabulary seed. Prints one JSON line: per kind (augmented, annotated, neighbouring slices), the
planted pairs among the shortlisted ones, summed over the seeds, and the shortlist's seconds. A pair
not shortlisted is never verified, so this bounds what the keypoint search can find; the vocabulary's
seed moves single pairs in and out, hence several seeds.

    .venv/bin/python benchmarks/keypoint_shortlist.py [--seeds 6] [--words 4096] [--neighbours 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from braintumor.core.config import PhantomDuplicates, PhantomSource, load_params
from braintumor.core.imageio import to_grayscale
from braintumor.data.keypoints import keypoint_image, keypoint_shortlist, orb_keypoints
from braintumor.data.phantom.source import generate_phantom_source

REPO = Path(__file__).resolve().parents[1]
KINDS = ("augmented", "annotated", "adjacent_slice")


def planted_pairs(files: list[str], planted: list[dict]) -> dict[str, set[tuple[int, int]]]:
    """Kind -> the planted (original, copy) pairs as (i, j) positions in ``files``, i < j."""
    position = {name: k for k, name in enumerate(files)}
    pairs: dict[str, set[tuple[int, int]]] = {kind: set() for kind in KINDS}
    for record in planted:
        if record["kind"] in pairs:
            i, j = sorted((position[record["original"]], position[record["copy"]]))
            pairs[record["kind"]].add((i, j))
    return pairs


def shortlisted(pairs: dict[str, set[tuple[int, int]]], shortlist: np.ndarray) -> dict[str, int]:
    """Kind -> how many of its pairs are in ``shortlist`` (M, 2)."""
    listed = set(map(tuple, shortlist.tolist()))
    return {kind: len(wanted & listed) for kind, wanted in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--copies", type=int, default=40, help="planted copies per kind")
    parser.add_argument("--seed", type=int, default=1, help="the phantom's seed")
    parser.add_argument("--seeds", type=int, default=6, help="vocabulary seeds 0 .. N-1")
    keypoints = load_params(REPO / "params.yaml").merge.near_duplicates.keypoints
    parser.add_argument("--words", type=int, default=keypoints.words)
    parser.add_argument("--neighbours", type=int, default=keypoints.neighbours)
    args = parser.parse_args()
    cfg = PhantomSource(kind="phantom", images_per_class=args.per_class, image_size=256, seed=args.seed,
                        duplicates=PhantomDuplicates(**{k: args.copies for k in PhantomDuplicates.model_fields}))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_phantom_source(root, cfg)
        files = sorted(str(p.relative_to(root / "images")) for p in (root / "images").rglob("*") if p.is_file())
        found = [orb_keypoints(keypoint_image(to_grayscale(cv2.imread(str(root / "images" / name), cv2.IMREAD_UNCHANGED))),
                               keypoints.features) for name in files]
        pairs = planted_pairs(files, json.loads((root / "planted.json").read_text()))
    totals = dict.fromkeys(KINDS, 0)
    seconds = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        shortlist, _ = keypoint_shortlist(found, args.words, args.neighbours, seed=seed)
        seconds.append(time.perf_counter() - start)
        for kind, count in shortlisted(pairs, shortlist).items():
            totals[kind] += count
    print(json.dumps({
        "files": len(files), "words": args.words, "neighbours": args.neighbours, "vocabulary_seeds": args.seeds,
        "shortlisted": {kind: f"{totals[kind]} of {len(pairs[kind]) * args.seeds}" for kind in KINDS},
        "all": f"{sum(totals.values())} of {sum(len(p) for p in pairs.values()) * args.seeds}",
        "shortlist_seconds": round(float(np.median(seconds)), 2),
    }))


if __name__ == "__main__":
    main()
