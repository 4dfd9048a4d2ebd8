"""Does the detail check tell real neighbouring slices from real copies? Ground truth from figshare's numbers.

figshare's brain-tumor release numbers its slices, and consecutive numbers are usually neighbouring
slices of one patient; Nickparvar's set took its tumor images from that release. Merging the two
(``../shared/datasets/figshare-boxes``, ``N.jpg`` = slice N, and ``nickparvar-224``) therefore labels
the head-box search's copy-level pairs:

- each Nickparvar image whose best figshare partner (by detail score) reaches ``--match`` with a
  margin of ``--margin`` over its next-best one gets that slice's number;
- a copy-level pair of two numbered Nickparvar images is a copy (one number) or two distinct slices
  (two numbers); figshare's own copy-level pairs are distinct slices.

Every copy-level pair is scored in full (the check's threshold set to 1.0, so no pair stops early),
and the script prints one JSON line: per kind of pair, its count, score range, how many a threshold
would remove (distinct slices) or keep apart (copies), and the distinct images Nickparvar keeps.

The keypoint search's look-alike links (and its matches down to ``residual_correlation``) are labelled by the same numbers (``keypoints``; a pair of
two numbered images, figshare's or Nickparvar's, is a copy or two distinct slices): with the check's
threshold at 1.0 no head-box pair is a copy, so the keypoint search meets the copies too. Per kind, the
copy residual's range and how many ``copy_residual`` thresholds would remove (distinct slices) or keep
apart (copies).

    .venv/bin/python benchmarks/neighbour_slices.py [--figshare DIR] [--nickparvar DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from braintumor.core.config import load_params
from braintumor.data.dedup import find_duplicate_groups, group_ids
from braintumor.data.keypoints import could_be_copies
from braintumor.data.merge import inspect_files, list_source_files

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
THRESHOLDS = (0.95, 0.97, 0.98, 0.99)
RESIDUAL_THRESHOLDS = (0.025, 0.03, 0.033, 0.036, 0.04)


def best_partner_numbers(pairs: np.ndarray, scores: np.ndarray, numbers: np.ndarray, min_score: float,
                         margin: float) -> dict[int, int]:
    """Image -> slice number of its best numbered partner, for images without a number of their own
    (``numbers`` -1) whose best partner scores ``min_score`` or more and beats the next one by ``margin``."""
    ranked: dict[int, list[tuple[float, int]]] = {}
    for (i, j), score in zip(pairs.tolist(), scores.tolist()):
        for image, partner in ((i, j), (j, i)):
            if numbers[image] < 0 <= numbers[partner]:
                ranked.setdefault(image, []).append((score, partner))
    found = {}
    for image, partners in ranked.items():
        partners.sort(reverse=True)
        best, runner_up = partners[0][0], partners[1][0] if len(partners) > 1 else -1.0
        if best >= min_score and best - runner_up >= margin:
            found[image] = int(numbers[partners[0][1]])
    return found


def labelled_pairs(pairs: np.ndarray, numbers: np.ndarray, found: dict[int, int]) -> dict[str, np.ndarray]:
    """Row indices of ``pairs`` by what they are: ``copies`` (two images of one number),
    ``distinct_mapped`` (numbered images of two numbers), ``distinct_numbered`` (two numbered slices)."""
    kinds: dict[str, list[int]] = {"copies": [], "distinct_mapped": [], "distinct_numbered": []}
    for row, (i, j) in enumerate(pairs.tolist()):
        if numbers[i] >= 0 and numbers[j] >= 0:
            kinds["distinct_numbered"].append(row)
        elif i in found and j in found:
            kinds["copies" if found[i] == found[j] else "distinct_mapped"].append(row)
    return {kind: np.array(rows, np.int64) for kind, rows in kinds.items()}


def labelled_links(pairs: np.ndarray, numbers: np.ndarray, found: dict[int, int]) -> dict[str, np.ndarray]:
    """Row indices of ``pairs`` whose images both have a number (their own or their match's): ``copies``
    (one number) and ``distinct`` (two), figshare and Nickparvar images alike."""
    number = [int(n) if n >= 0 else found.get(k, -1) for k, n in enumerate(numbers)]
    kinds: dict[str, list[int]] = {"copies": [], "distinct": []}
    for row, (i, j) in enumerate(pairs.tolist()):
        if number[i] >= 0 and number[j] >= 0:
            kinds["copies" if number[i] == number[j] else "distinct"].append(row)
    return {kind: np.array(rows, np.int64) for kind, rows in kinds.items()}


def summary(scores: np.ndarray, copies: bool) -> dict:
    """Count, range and, per threshold, pairs below it (copies kept apart) or at or above it (distinct removed)."""
    if len(scores) == 0:
        return {"n": 0}
    at = {str(t): int((scores < t).sum() if copies else (scores >= t).sum()) for t in THRESHOLDS}
    return {"n": int(len(scores)), "min": round(float(scores.min()), 4), "p01": round(float(np.quantile(scores, 0.01)), 4),
            "max": round(float(scores.max()), 4), "kept_apart_below" if copies else "removed_at": at}


def residual_summary(residuals: np.ndarray, copies: bool) -> dict:
    """Count, range and, per copy-residual threshold, pairs above it (copies kept apart) or at or below it
    (distinct slices removed)."""
    if len(residuals) == 0:
        return {"n": 0}
    at = {str(t): int((residuals > t).sum() if copies else (residuals <= t).sum()) for t in RESIDUAL_THRESHOLDS}
    return {"n": int(len(residuals)), "min": round(float(residuals.min()), 4), "median": round(float(np.median(residuals)), 4),
            "max": round(float(residuals.max()), 4), "kept_apart_above" if copies else "removed_at": at}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--figshare", type=Path, default=SHARED_DATASETS / "figshare-boxes")
    parser.add_argument("--nickparvar", type=Path, default=SHARED_DATASETS / "nickparvar-224")
    parser.add_argument("--match", type=float, default=0.97, help="detail score of a Nickparvar image's figshare match")
    parser.add_argument("--margin", type=float, default=0.01, help="over the image's next-best figshare partner")
    args = parser.parse_args()
    for folder in (args.figshare, args.nickparvar):
        if not folder.is_dir():
            parser.error(f"{folder} is missing: this benchmark needs the shared datasets beside the repository")
    params = load_params(REPO / "params.yaml")
    near = params.merge.near_duplicates
    near = near.model_copy(update={"detail_similarity": 1.0})
    nickparvar = [f.path for f in list_source_files("nickparvar", args.nickparvar)[0]]  # as the merge lists them
    figshare = sorted(args.figshare.glob("*/*.jpg"))  # N.jpg; its N.txt box files are not images
    paths = nickparvar + figshare
    start = time.perf_counter()
    inspections = inspect_files(paths, params.preprocess.head_threshold, params.merge.max_colour_share, params.merge.workers,
                                keypoint_features=near.keypoints.features, detail=True)
    readable = [k for k, found in enumerate(inspections) if found.fingerprint is not None]
    search = find_duplicate_groups([inspections[k].fingerprint for k in readable], params.preprocess.head_threshold, near,
                                   params.merge.workers)
    seconds = time.perf_counter() - start
    numbers = np.array([int(paths[k].stem) if k >= len(nickparvar) else -1 for k in readable])
    pairs, scores = search.detail_pairs, search.detail_scores
    found = best_partner_numbers(pairs, scores, numbers, args.match, args.margin)
    kinds = labelled_pairs(pairs, numbers, found)
    in_nickparvar = numbers < 0
    nick_rows = in_nickparvar[pairs[:, 0]] & in_nickparvar[pairs[:, 1]] if len(pairs) else np.empty(0, bool)
    nick_exact = search.exact[in_nickparvar[search.exact].all(axis=1)] if len(search.exact) else search.exact
    n_nick = int(in_nickparvar.sum())  # the readable Nickparvar files come first, so they are 0 .. n_nick - 1
    kept = {"off": int(len(np.unique(group_ids(n_nick, np.concatenate([nick_exact, pairs[nick_rows]])))))}
    for t in THRESHOLDS:
        copies = pairs[nick_rows & (scores >= t)]
        kept[str(t)] = int(len(np.unique(group_ids(n_nick, np.concatenate([nick_exact, copies])))))
    linked = could_be_copies(search.keypoint_inliers, search.keypoint_correlation, near.keypoints)
    links = labelled_links(search.keypoint_candidates[linked], numbers, found)
    residuals = search.keypoint_residual[linked]
    print(json.dumps({
        "files": len(paths), "readable": len(readable), "seconds": round(seconds, 1), "copy_level_pairs": int(len(pairs)),
        "numbered_nickparvar_images": len(found),
        "copies": summary(scores[kinds["copies"]], copies=True),
        "distinct_nickparvar": summary(scores[kinds["distinct_mapped"]], copies=False),
        "distinct_figshare": summary(scores[kinds["distinct_numbered"]], copies=False),
        "nickparvar_distinct_images": kept,
        "keypoints": {"links": int(linked.sum()), "copy_residual": near.keypoints.copy_residual,
                      "copies": residual_summary(residuals[links["copies"]], copies=True),
                      "distinct": residual_summary(residuals[links["distinct"]], copies=False)},
        "seconds_by_part": search.seconds,
    }))


if __name__ == "__main__":
    main()
