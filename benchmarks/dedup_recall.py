"""Recall and false merges of the duplicate search on planted phantom duplicates.

Generates a phantom source with many planted copies of every kind, runs the merge (exact + near
duplicate search with the thresholds in params.yaml) and prints as one JSON line, per kind, the
share of copies in their original's duplicate group and split group, for adjacent slices the share
kept and in the original's split group, the false merges and the split groups joining two heads.

    .venv/bin/python benchmarks/dedup_recall.py [--per-class 500] [--copies 60] [--kinds augmented,annotated] [--keypoints]

With ``--real DIR`` the copies (any kind but ``adjacent_slice``, made by the phantom's own copy makers)
are planted among a real dataset's images instead, e.g. ``--real ../shared/datasets/nickparvar-224
--kinds augmented,annotated --copies 100``: per kind, the share in the original's duplicate and split group.
``--with DIR`` merges more real datasets along (no copies planted among them), e.g. ``--with
../shared/datasets/sartaj`` for the merge of Nickparvar + SARTAJ, timed, with its duplicate counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from braintumor.core.config import NearDuplicateParams, PhantomDuplicates, PhantomSource, load_params
from braintumor.core.imageio import encode_image
from braintumor.data.merge import list_source_files, merge_report, merge_sources, planted_duplicate_recall
from braintumor.data.phantom.copies import copy_file_format, make_copy
from braintumor.data.phantom.source import generate_phantom_source
from braintumor.demo import apply_overrides

REPO = Path(__file__).resolve().parents[1]


def plant_real_copies(images_root: Path, dest: Path, kinds: list[str], copies: int, seed: int) -> list[dict]:
    """Write ``copies`` copies of each kind of distinct, seeded originals from ``images_root`` into ``dest``
    (same class folders), made by the phantom's own copy makers; the records name manifest ids."""
    files = [f.relpath for f in list_source_files("real", images_root)[0]]
    rng = np.random.default_rng(seed)
    chosen = iter(rng.permutation(len(files))[: copies * len(kinds)].tolist())
    records = []
    for kind in kinds:
        for j in range(copies):
            rel = files[next(chosen)]
            image = cv2.imread(str(images_root / rel), cv2.IMREAD_UNCHANGED)
            copy_rng = np.random.default_rng([seed, kinds.index(kind), j])
            pixels, _ = make_copy(kind, image, np.zeros(image.shape[:2], np.uint8), copy_rng)
            file_format, quality = copy_file_format(kind, copy_rng)
            suffix = Path(rel).suffix if file_format == "same" else f".{file_format}"
            copy_rel = (Path(rel).parent / f"{kind}_{j:04d}{suffix}").as_posix()
            (dest / copy_rel).parent.mkdir(parents=True, exist_ok=True)
            data = (images_root / rel).read_bytes() if file_format == "same" else encode_image(pixels, suffix, quality)
            (dest / copy_rel).write_bytes(data)
            records.append({"original": f"real/{rel}", "copy": f"synthetic/{copy_rel}", "kind": kind})
    return records


def real_data_recall(images_root: Path, kinds: list[str], copies: int, seed: int, params, near,
                     also: Sequence[Path] = ()) -> dict:
    """The copies of :func:`plant_real_copies` merged with the real set (and the datasets in ``also``):
    the share of each kind in its original's duplicate group and split group (false merges are
    unknowable here: the sets have their own), and the merge's duplicate counts."""
    with tempfile.TemporaryDirectory() as tmp:
        records = plant_real_copies(images_root, Path(tmp), kinds, copies, seed)
        sources = [("real", images_root), *((f"also{i}", Path(d)) for i, d in enumerate(also)), ("synthetic", Path(tmp))]
        start = time.perf_counter()
        manifest, search, _, _ = merge_sources(
            sources, params.merge.folder_to_label(), root=Path("/"),
            head_threshold=params.preprocess.head_threshold, max_colour_share=params.merge.max_colour_share,
            keep=params.merge.keep, near=near, workers=params.merge.workers,
        )
        seconds = time.perf_counter() - start
    scores = planted_duplicate_recall(manifest, None, records)
    return {"real": str(images_root), "images": int(len(manifest)), "merge_seconds": round(seconds, 1),
            "seconds_by_part": search.seconds,
            "recall": scores["recall"], "split_recall": scores["split_recall"], "planted": scores["planted"],
            "keypoints": near.keypoints.model_dump() if near.keypoints.enabled else False,
            "keypoint_pairs_checked": int(len(search.keypoint_candidates)),
            "duplicates": merge_report(manifest)["duplicates"]}


def with_settings(near: NearDuplicateParams, items: list[str]) -> NearDuplicateParams:
    """``near`` with each ``key=value`` of ``items`` set and validated; a dotted key reaches into a
    sub-section (``keypoints.words=1024``)."""
    return NearDuplicateParams.model_validate(apply_overrides(near.model_dump(), dict(item.split("=", 1) for item in items)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--copies", type=int, default=60, help="planted copies per kind")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(PhantomDuplicates.model_fields),
                        help="planted kinds, comma-separated (default: every kind)")
    parser.add_argument("--keypoints", action="store_true", help="with the keypoint search (merge.near_duplicates.keypoints)")
    parser.add_argument("--real", metavar="DIR", help="plant the copies among a real dataset's images instead "
                        "(class folders below DIR, e.g. ../shared/datasets/nickparvar-224)")
    parser.add_argument("--with", dest="also", action="append", default=[], metavar="DIR",
                        help="with --real: another real dataset merged along, no copies planted (repeatable)")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                        help="a merge.near_duplicates param for this run, e.g. -S detail_similarity=0.98 "
                        "or -S keypoints.words=1024")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    near = params.merge.near_duplicates
    if args.keypoints:
        near = near.model_copy(update={"keypoints": near.keypoints.model_copy(update={"enabled": True})})
    near = with_settings(near, args.set)
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(PhantomDuplicates.model_fields))
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {list(PhantomDuplicates.model_fields)}")
    if args.also and not args.real:
        parser.error("--with needs --real")
    if args.real:
        if {"adjacent_slice", "conflicting_label"} & set(kinds):
            parser.error("adjacent_slice (it needs a phantom head) and conflicting_label are not planted in --real mode")
        print(json.dumps(real_data_recall(Path(args.real), kinds, args.copies, args.seed, params, near,
                                          [Path(d) for d in args.also])))
        return
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
        "images": int(len(manifest)), "merge_seconds": round(seconds, 1), "seconds_by_part": search.seconds, **scores,
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
