"""Recall and false merges of the duplicate search on planted phantom duplicates.

Generates a phantom source with many planted copies of every kind, runs the merge (exact + near
duplicate search with the thresholds in params.yaml) and prints recall per kind and false merges
as one JSON line.

    .venv/bin/python benchmarks/dedup_recall.py [--per-class 500] [--copies 60]
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
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    kinds = PhantomDuplicates.model_fields
    cfg = PhantomSource(kind="phantom", images_per_class=args.per_class, image_size=args.image_size, seed=args.seed,
                        duplicates=PhantomDuplicates(**{k: args.copies for k in kinds}))
    with tempfile.TemporaryDirectory() as tmp:
        generate_phantom_source(Path(tmp), cfg)
        start = time.perf_counter()
        manifest, search, _, _ = merge_sources(
            [("phantom", Path(tmp) / "images")], params.merge.folder_to_label(), root=Path(tmp),
            head_threshold=params.preprocess.head_threshold, max_colour_share=params.merge.max_colour_share,
            keep=params.merge.keep, near=params.merge.near_duplicates, workers=params.merge.workers,
        )
        seconds = time.perf_counter() - start
        scores = planted_duplicate_recall(manifest, "phantom", json.loads((Path(tmp) / "planted.json").read_text()))
    related_extra = int((manifest.groupby("split_group")["group"].nunique() > 1).sum())
    print(json.dumps({
        "images": int(len(manifest)), "merge_seconds": round(seconds, 1), **scores,
        "related_groups_joining_distinct_slices": related_extra,
        "verify_similarity": params.merge.near_duplicates.verify_similarity,
        "related_similarity": params.merge.near_duplicates.related_similarity,
    }))


if __name__ == "__main__":
    main()
