"""Keypoint-link settings on real data: planted-copy recall against links that join two classes.

    .venv/bin/python benchmarks/keypoint_links.py ../shared/datasets/nickparvar-224 [--workspace DIR]

Plants 100 augmented and 100 annotated copies among the dataset's images (as ``dedup_recall.py --real``
does), runs the merge once with loose keypoint settings (10 inliers, correlation 0.3 after warping,
the copy residual measured on every such link) so that every candidate link is scored, then applies
each setting of a grid (minimum inliers, copy residual, look-alike level) to the scored links and prints, per setting, one JSON line: the planted copies' share
in their original's duplicate and split group, the keypoint links joining two class labels (copies and
neighbouring slices share their label, so such a link is false), the split groups mixing classes and
the largest split group. The first line is the head-box search alone.

With ``--workspace`` (a pipeline run's folder whose split was made without the keypoint search, on the
same dataset as the ``local_nickparvar`` source) it also counts the test slices that have a keypoint link
in training or validation at the chosen setting, and each model's test accuracy on them and on the rest
(``reports/evaluate/predictions_*.csv``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from braintumor.core.config import load_params
from braintumor.data.dedup import DuplicateSearch, group_ids
from braintumor.data.merge import merge_sources, planted_duplicate_recall
from dedup_recall import REPO, plant_real_copies, with_settings

KINDS = ["augmented", "annotated"]
LOOSE = ["keypoints.enabled=true", "keypoints.min_inliers=10", "keypoints.copy_residual=0.04",
         "keypoints.related_correlation=0.3"]


def head_box_links(search: DuplicateSearch, keypoints) -> tuple[np.ndarray, np.ndarray]:
    """(copy pairs, look-alike pairs) of the head-box search: the search appends its keypoint pairs last."""
    linked = ((search.keypoint_inliers >= keypoints.min_inliers)
              & (search.keypoint_correlation >= keypoints.related_correlation))
    copies = int((linked & (search.keypoint_residual <= keypoints.copy_residual)).sum())
    related = int(linked.sum()) - copies
    return search.near[: len(search.near) - copies], search.related_pairs[: len(search.related_pairs) - related]


def setting_scores(search, head_copies, head_related, ok: pd.DataFrame, records: list[dict], min_inliers, copy_at,
                   related_at) -> dict:
    """The groups one setting makes from the scored links, scored; ``min_inliers`` None: keypoints off;
    ``copy_at``: the copy residual at or below which a link is a copy (0: none)."""
    labels = ok["label"].to_numpy()
    n, pairs = len(labels), search.keypoint_candidates
    matched = (search.keypoint_inliers >= (min_inliers or 0)) & (min_inliers is not None)
    linked = matched & (search.keypoint_correlation >= related_at)
    copy = linked & (search.keypoint_residual <= copy_at)
    related = linked & ~copy
    groups = group_ids(n, np.concatenate([search.exact, head_copies, pairs[copy]]))
    split_groups = group_ids(n, np.concatenate([search.exact, head_copies, head_related, pairs[copy], pairs[related]]))
    across = labels[pairs[:, 0]] != labels[pairs[:, 1]]
    sizes = np.bincount(split_groups)
    mixed = [g for g in np.flatnonzero(sizes > 1) if len(set(labels[split_groups == g])) > 1]
    scores = {"min_inliers": min_inliers, "copy_residual": copy_at, "related_correlation": related_at,
              "links_across_classes": int((across & (copy | related)).sum())}
    planted = planted_duplicate_recall(ok.assign(group=groups, split_group=split_groups), None, records)
    for kind in KINDS:
        scores[kind] = [planted["recall"][kind], planted["split_recall"][kind]]
    return {**scores, "split_groups_mixing_classes": len(mixed), "slices_in_them": int(sizes[mixed].sum()),
            "largest_split_group": int(sizes.max())}


def leaked_test_slices(workspace: Path, ids: list[str], search, min_inliers: int, at: float) -> set[str]:
    """Test slices of ``workspace``'s split with a keypoint link (>= ``min_inliers``, >= ``at``) to a slice whose
    split group holds training or validation slices."""
    split = pd.read_csv(workspace / "data/split/split.csv")
    manifest = pd.read_csv(workspace / "data/interim/manifest.csv")
    split_of = dict(zip(split["id"], split["split"]))
    group_of = dict(zip(manifest["id"], manifest["split_group"]))
    splits_of_group: dict[int, set[str]] = {}
    for member, group in group_of.items():
        if member in split_of:
            splits_of_group.setdefault(group, set()).add(split_of[member])
    local = [i.replace("real/", "local_nickparvar/", 1) if i.startswith("real/") else "" for i in ids]
    linked = (search.keypoint_inliers >= min_inliers) & (search.keypoint_correlation >= at)
    leaked = set()
    for a, b in search.keypoint_candidates[linked]:
        for x, y in ((local[a], local[b]), (local[b], local[a])):
            if x and y and split_of.get(x) == "test" and {"train", "val"} & splits_of_group.get(group_of.get(y), set()):
                leaked.add(x)
    return leaked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--copies", type=int, default=100, help="planted copies per kind")
    parser.add_argument("--workspace", type=Path, help="a pipeline run on the same dataset, split without keypoints")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    near = with_settings(params.merge.near_duplicates, LOOSE)
    with tempfile.TemporaryDirectory() as tmp:
        records = plant_real_copies(args.dataset, Path(tmp), KINDS, args.copies, 1)
        started = time.perf_counter()
        manifest, search, _, _ = merge_sources(
            [("real", args.dataset), ("synthetic", Path(tmp))], params.merge.folder_to_label(), root=Path("/"),
            head_threshold=params.preprocess.head_threshold, max_colour_share=params.merge.max_colour_share,
            keep=params.merge.keep, near=near, workers=params.merge.workers)
        print(json.dumps({"merge_seconds": round(time.perf_counter() - started, 1), "seconds_by_part": search.seconds}))
    ok = manifest[manifest["status"] == "ok"].reset_index(drop=True)  # the search's rows, in its order
    ids = ok["id"].tolist()
    head_copies, head_related = head_box_links(search, near.keypoints)
    grid = [(None, 0.0, 1.0)] + [(m, c, r) for m in (15, 20, 25, 30, 40) for c in (0.0, 0.025, 0.033, 0.04) for r in (0.5, 0.6, 0.7)]
    for setting in grid:
        print(json.dumps(setting_scores(search, head_copies, head_related, ok, records, *setting)), flush=True)
    if args.workspace:
        for min_inliers, at in ((15, 0.75), (15, 0.7), (15, 0.5), (40, 0.75)):
            leaked = leaked_test_slices(args.workspace, ids, search, min_inliers, at)
            result = {"min_inliers": min_inliers, "correlation": at, "test_slices_linked_to_train_or_val": len(leaked)}
            for model in ("base", "finetuned"):
                predictions = pd.read_csv(args.workspace / f"reports/evaluate/predictions_{model}.csv")
                ids_of = predictions["path"].str.replace("data/raw/local_nickparvar/images/", "local_nickparvar/", regex=False)
                correct, linked = predictions["actual"] == predictions["predicted"], ids_of.isin(leaked)
                result[model] = {"all": round(float(correct.mean()), 3), "linked": round(float(correct[linked].mean()), 3),
                                 "rest": round(float(correct[~linked].mean()), 3), "n_rest": int((~linked).sum())}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
