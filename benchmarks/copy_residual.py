"""The keypoint copy residual of planted phantom pairs, each pair matched on its own.

For each seed, a phantom source with ``--copies`` augmented copies, annotated copies and neighbouring
slices (``adjacent_slice``); every planted pair is matched as the merge's keypoint search matches a
shortlisted pair (ORB keypoints, ratio test, RANSAC similarity, as it is or mirrored: the one with more
inliers), and its copy residual measured (``braintumor.data.keypoints.copy_residual``). Prints one
JSON line: per kind, the pairs, those never matched (fewer than 15 inliers), the residual's quantiles,
and per threshold the share at or below it (copies: found; neighbouring slices: removed as copies).
Real pairs of known identity: ``neighbour_slices.py``.

    .venv/bin/python benchmarks/copy_residual.py [--seeds 1,2] [--copies 60,150]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from braintumor.core.config import PhantomDuplicates, PhantomSource, load_params
from braintumor.core.imageio import to_grayscale
from braintumor.data.keypoints import copy_residual, keypoint_image, match_keypoints, orb_keypoints
from braintumor.data.phantom.source import generate_phantom_source

REPO = Path(__file__).resolve().parents[1]
KINDS = ("augmented", "annotated", "adjacent_slice")
THRESHOLDS = (0.025, 0.03, 0.033, 0.036, 0.04)


def planted_residuals(root: Path, features: int, min_inliers: int) -> dict[str, list[float]]:
    """Kind -> the copy residual of each planted pair under root (inf: never matched)."""
    def keypoints_of(relative: str):
        return orb_keypoints(keypoint_image(to_grayscale(cv2.imread(str(root / "images" / relative), cv2.IMREAD_UNCHANGED))),
                             features)

    found: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for record in json.loads((root / "planted.json").read_text()):
        if record["kind"] not in found:
            continue
        original, copy = keypoints_of(record["original"]), keypoints_of(record["copy"])
        best, flipped = max(((match_keypoints(original, copy, min_inliers, mirrored=flip), flip) for flip in (False, True)),
                            key=lambda found_flip: (found_flip[0].inliers, found_flip[0].correlation))
        if best.inliers < min_inliers:
            found[record["kind"]].append(float("inf"))
            continue
        moving = np.ascontiguousarray(copy.image[:, ::-1]) if flipped else copy.image
        found[record["kind"]].append(copy_residual(original.image, moving, best.matrix))
    return found


def summary(values: list[float]) -> dict:
    v = np.asarray(values)
    finite = v[np.isfinite(v)]
    return {"pairs": int(len(v)), "never_matched": int((~np.isfinite(v)).sum()),
            "quantiles": {q: round(float(np.quantile(finite, float(q))), 4) for q in ("0", "0.03", "0.5", "0.97", "1")},
            "at_or_below": {str(t): round(float((v <= t).mean()), 3) for t in THRESHOLDS}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--copies", default="60,150", help="planted pairs per kind, one number per seed")
    parser.add_argument("--per-class", type=int, default=150)
    args = parser.parse_args()
    keypoints = load_params(REPO / "params.yaml").merge.near_duplicates.keypoints
    residuals: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for seed, copies in zip((int(s) for s in args.seeds.split(",")), (int(c) for c in args.copies.split(","))):
        with tempfile.TemporaryDirectory() as tmp:
            planted = {k: copies if k in KINDS else 0 for k in PhantomDuplicates.model_fields}
            generate_phantom_source(Path(tmp), PhantomSource(kind="phantom", images_per_class=args.per_class, image_size=256,
                                                             seed=seed, duplicates=PhantomDuplicates(**planted)))
            for kind, values in planted_residuals(Path(tmp), keypoints.features, keypoints.min_inliers).items():
                residuals[kind] += values
    print(json.dumps({"copy_residual": keypoints.copy_residual, **{kind: summary(v) for kind, v in residuals.items()}}))


if __name__ == "__main__":
    main()
