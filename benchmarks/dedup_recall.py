"""Recall and false merges of the duplicate search on planted phantom duplicates.

Generates a phantom source with many planted copies of every kind, runs the merge (exact + near
duplicate search with the thresholds in params.yaml) and prints recall per kind and false merges
as one JSON line.

    .venv/bin/python benchmarks/dedup_recall.py [--per-class 500] [--copies 60] [--kinds augmented,annotated] [--keypoints]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from braintumor.core.config import PhantomDuplicates, PhantomSource, load_params
from braintumor.data.merge import merge_sources, planted_duplicate_recall
from braintumor.data.phantom.source import generate_phantom_source

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--copies", type=int, default=60, help="planted copies per kind")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(PhantomDuplicates.model_fields),
                        help="planted kinds, comma-separated (default: every kind)")
    parser.add_argument("--keypoints", action="store_true", help="with the keypoint search (merge.near_duplicates.keypoints)")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    near = params.merge.near_duplicates
    if args.keypoints:
        near = near.model_copy(update={"keypoints": near.keypoints.model_copy(update={"enabled": True})})
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(PhantomDuplicates.model_fields))
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {list(PhantomDuplicates.model_fields)}")
    cfg = PhantomSource(kind="phantom", images_per_class=args.per_class, image_size=args.image_size, seed=args.seed,
                        duplicates=PhantomDuplicates(**{k: args.copies if k in kinds else 0 for k in PhantomDuplicates.model_fields}))
    with tempfile.TemporaryDirectory() as tmp:
        generate_phantom_source(Path(tmp), cfg)
        start = time.perf_counter()
        manifest, search, _, _ = merge_sources(
            [("phantom", Path(tmp) / "images")], params.merge.folder_to_label(), root=Path(tmp),
            head_threshold=params.preprocess.head_threshold, max_colour_share=params.merge.max_colour_share,
            keep=params.merge.keep, near=near, workers=params.merge.workers,
        )
        seconds = time.perf_counter() - start
        scores = planted_duplicate_recall(manifest, "phantom", json.loads((Path(tmp) / "planted.json").read_text()))
    related_extra = int((manifest.groupby("split_group")["group"].nunique() > 1).sum())
    print(json.dumps({
        "images": int(len(manifest)), "merge_seconds": round(seconds, 1), **scores,
        "related_groups_joining_distinct_slices": related_extra,
        "verify_similarity": params.merge.near_duplicates.verify_similarity,
        "related_similarity": params.merge.near_duplicates.related_similarity,
        "keypoints": near.keypoints.model_dump() if near.keypoints.enabled else False,
        "keypoint_pairs_checked": int(len(search.keypoint_candidates)),
    }))


if __name__ == "__main__":
    main()
