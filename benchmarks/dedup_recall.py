"""Recall and false merges of the duplicate search on planted phantom duplicates.

Generates a phantom source with many planted copies of every kind, runs the merge (exact + near
duplicate search with the thresholds in params.yaml) and prints as one JSON line, per kind, the
share of copies in their original's duplicate group and split group, for adjacent slices the share
kept and in the original's split group, the false merges and the split groups joining two heads.

    .venv/bin/python benchmarks/dedup_recall.py [--per-class 500] [--copies 60] [--kinds augmented,annotated] [--keypoints]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from braintumor.core.config import NearDuplicateParams, PhantomDuplicates, PhantomSource, load_params
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
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="a merge.near_duplicates param for this run, e.g. -S detail_similarity=0.98")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    near = params.merge.near_duplicates
    if args.keypoints:
        near = near.model_copy(update={"keypoints": near.keypoints.model_copy(update={"enabled": True})})
    overrides = dict(item.split("=", 1) for item in args.set)
    near = NearDuplicateParams.model_validate({**near.model_dump(), **overrides})
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
    print(json.dumps({
        "images": int(len(manifest)), "merge_seconds": round(seconds, 1), **scores,
        "verify_similarity": near.verify_similarity,
        "related_similarity": near.related_similarity,
        "detail_similarity": near.detail_similarity,
        "detail_pairs_checked": int(len(search.detail_pairs)),
        "detail_pairs_kept_apart": int(search.detail_apart.sum()),
        "keypoints": near.keypoints.model_dump() if near.keypoints.enabled else False,
        "keypoint_pairs_checked": int(len(search.keypoint_candidates)),
    }))


if __name__ == "__main__":
    main()
