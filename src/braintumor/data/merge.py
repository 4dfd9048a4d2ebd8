"""Merge raw sources into one manifest: labels, quarantine, duplicate groups, representatives.

One manifest row per raw file, whatever happened to it, so nothing is ever dropped silently:
``status`` is ``ok`` or ``quarantined`` (with ``reason``), ``group`` ties duplicates together and
``kept`` / ``drop_reason`` say which copy of each group goes on to training and why the others don't.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from braintumor.core.config import NearDuplicateParams, labels_disagree
from braintumor.data.boxes import BOX_COLUMNS, annotation_files, csv_box_table, yolo_box_table
from braintumor.data.dedup import DuplicateSearch, Fingerprint, find_duplicate_groups, fingerprint_image
from braintumor.core.parallel import map_in_workers, resolve_workers
from braintumor.core.imageio import IMAGE_SUFFIXES, UnreadableImageError, colour_pixel_share, decode_image_bytes, is_system_entry


class UnmappedFolderError(ValueError):
    """Image files sit in class folders that ``merge.label_map`` does not name."""


@dataclass(frozen=True)
class RawFile:
    source: str
    relpath: str  # below the source's images root, with forward slashes
    path: Path
    source_split: str  # folders between the root and the class folder, e.g. "Training"
    folder: str  # the class folder as spelled on disk

    @property
    def id(self) -> str:
        return f"{self.source}/{self.relpath}"


def fetched_class_root(source_folder: Path) -> Path:
    """Where a fetched source's class folders live, from the ``source.json`` the download wrote.

    ``source.json`` is written last, just before the folder is renamed into place, so a folder
    without it is not a complete fetch.
    """
    record = source_folder / "source.json"
    if not record.is_file():
        raise FileNotFoundError(
            f"{source_folder} is not a complete fetch (no source.json): run `dvc repro download@{source_folder.name}`"
        )
    return source_folder / json.loads(record.read_text())["class_root"]


def list_source_files(source: str, images_root: Path) -> tuple[list[RawFile], int]:
    """Every regular file below ``images_root`` in a stable order, and how many hidden or system files
    were skipped (:func:`is_system_entry`)."""
    if not images_root.is_dir():
        raise FileNotFoundError(f"source {source!r}: no folder {images_root}")
    files, skipped = [], 0
    for path in sorted(p for p in images_root.rglob("*") if p.is_file()):
        rel = PurePosixPath(path.relative_to(images_root).as_posix())
        if is_system_entry(rel):
            skipped += 1
            continue
        files.append(
            RawFile(
                source=source,
                relpath=str(rel),
                path=path,
                source_split="/".join(rel.parts[:-2]),
                folder=rel.parts[-2] if len(rel.parts) >= 2 else "",
            )
        )
    return files, skipped


def map_labels(files: Sequence[RawFile], folder_to_label: dict[str, str]) -> list[str | None]:
    """Canonical label per file from its class folder (case-insensitive).

    Raises :class:`UnmappedFolderError` naming every (source, folder) that holds image files but is
    not in the mapping. Files without an image suffix get ``None`` when their folder is unmapped:
    they are not images of a class (a README, an OS file) and will be quarantined as such.
    """
    labels: list[str | None] = []
    unmapped: dict[tuple[str, str], int] = {}
    for f in files:
        label = folder_to_label.get(f.folder.lower())
        if label is None and PurePosixPath(f.relpath).suffix.lower() in IMAGE_SUFFIXES:
            unmapped[(f.source, f.folder)] = unmapped.get((f.source, f.folder), 0) + 1
        labels.append(label)
    if unmapped:
        listed = "; ".join(
            f"source {s!r}: folder {d!r} ({n} images)" if d else f"source {s!r}: {n} images outside any class folder"
            for (s, d), n in sorted(unmapped.items())
        )
        known = sorted(folder_to_label)
        raise UnmappedFolderError(
            f"class folders not in merge.label_map: {listed}. Add them to merge.label_map in params.yaml "
            f"(known folders: {known}), or point the source's subdir at the folder that holds the class folders."
        )
    return labels


@dataclass(frozen=True)
class Inspection:
    file_sha256: str
    bytes: int
    fingerprint: Fingerprint | None
    reason: str  # "" when readable


def inspect_file(path: Path, head_threshold: int, max_colour_share: float, keypoint_features: int = 0,
                 detail: bool = False) -> Inspection:
    """Hash, decode and fingerprint one file; an unusable file gets a quarantine reason, not an error.

    Args:
        path: the file.
        head_threshold: grey level separating head from background (for the canonical head crop).
        max_colour_share: a larger share of coloured pixels marks a colour photograph, not an MRI slice.
        keypoint_features: ORB keypoints to find for the keypoint search (0: off).
        detail: keep the head at the detail check's resolution too (``near_duplicates.detail_similarity``).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Inspection("", 0, None, f"unreadable_file: {exc.strerror or exc}")
    sha = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image_bytes(data, path)
    except UnreadableImageError as exc:
        return Inspection(sha, len(data), None, exc.reason)
    share = colour_pixel_share(image)
    if share > max_colour_share:
        return Inspection(sha, len(data), None, f"not_mri_like: {share:.0%} of pixels coloured")
    return Inspection(sha, len(data), fingerprint_image(image, head_threshold, keypoint_features, detail), "")


def _inspect_worker(args: tuple[Path, int, float, int, bool]) -> Inspection:
    return inspect_file(*args)


def inspect_files(paths: Sequence[Path], head_threshold: int, max_colour_share: float, workers: int,
                  keypoint_features: int = 0, detail: bool = False) -> list[Inspection]:
    """:func:`inspect_file` over many files, in ``workers`` processes (0 = one per core)."""
    jobs = [(p, head_threshold, max_colour_share, keypoint_features, detail) for p in paths]
    workers = 1 if len(jobs) < 64 else resolve_workers(workers, len(jobs))  # a pool pays off from ~64 files
    return map_in_workers(_inspect_worker, jobs, workers, chunksize=64)


def build_manifest(files: Sequence[RawFile], labels: Sequence[str | None], inspections: Sequence[Inspection], root: Path) -> pd.DataFrame:
    """One row per raw file with everything known about it before deduplication."""
    rows = []
    for f, label, ins in zip(files, labels, inspections):
        fp = ins.fingerprint
        rows.append(
            {
                "id": f.id,
                "source": f.source,
                "path": f.path.relative_to(root).as_posix() if f.path.is_relative_to(root) else str(f.path),
                "source_split": f.source_split,
                "folder": f.folder,
                "label": label or "",
                "bytes": ins.bytes,
                "file_sha256": ins.file_sha256,
                "pixel_hash": fp.pixel_hash if fp else "",
                "height": fp.height if fp else 0,
                "width": fp.width if fp else 0,
                "channels": fp.channels if fp else 0,
                "status": "ok" if fp else "quarantined",
                "reason": ins.reason,
            }
        )
    return pd.DataFrame(rows)


def attach_groups(manifest: pd.DataFrame, search: DuplicateSearch, ok_rows: np.ndarray) -> pd.DataFrame:
    """Add ``group``, ``group_size``, ``duplicate_kind`` (none / exact / near) and ``split_group``."""
    groups = search.groups
    sizes = np.bincount(groups)[groups] if len(groups) else np.empty(0, np.int64)
    has_near = np.zeros(groups.max() + 1 if len(groups) else 0, bool)
    has_near[groups[search.near.ravel()]] = True
    manifest = manifest.copy()
    manifest["group"] = -1
    manifest["group_size"] = 0
    manifest["duplicate_kind"] = "none"
    manifest["split_group"] = -1
    manifest.loc[ok_rows, "split_group"] = search.related
    manifest.loc[ok_rows, "group"] = groups
    manifest.loc[ok_rows, "group_size"] = sizes
    manifest.loc[ok_rows, "duplicate_kind"] = np.where(sizes == 1, "none", np.where(has_near[groups], "near", "exact"))
    return manifest


def choose_representatives(manifest: pd.DataFrame, keep: str, source_order: Sequence[str]) -> pd.DataFrame:
    """Mark one ``kept`` row per label-consistent group; exclude every member of conflicting groups.

    Args:
        keep: ``largest`` keeps the copy with the most pixels (the least degraded), ``first_source``
            the copy from the earliest source in ``download.use``; ties go to the earlier row.
    """
    manifest = manifest.copy()
    manifest["kept"] = False
    manifest["drop_reason"] = np.where(manifest["status"] == "quarantined", "quarantined", "")
    ok = manifest[manifest["status"] == "ok"]
    rank = {s: i for i, s in enumerate(source_order)}
    order = ok.assign(
        _pixels=-(ok["height"] * ok["width"]) if keep == "largest" else 0,
        _source=ok["source"].map(rank),
        _row=np.arange(len(ok)),
    ).sort_values(["group", "_pixels", "_source", "_row"])
    for _, members in order.groupby("group", sort=False):
        if labels_disagree(members["label"]):
            manifest.loc[members.index, "drop_reason"] = "label_conflict"
            continue
        representative = members.index[0]
        manifest.loc[representative, "kept"] = True
        rep_id = manifest.at[representative, "id"]
        manifest.loc[members.index[1:], "drop_reason"] = f"duplicate_of:{rep_id}"
    return manifest


def merge_sources(
    sources: Iterable[tuple[str, Path]],
    folder_to_label: dict[str, str],
    *,
    root: Path,
    head_threshold: int,
    max_colour_share: float,
    keep: str,
    near: NearDuplicateParams,
    workers: int = 0,
    boxes: dict[str, tuple[str, str]] | None = None,
) -> tuple[pd.DataFrame, DuplicateSearch, dict[str, int], pd.DataFrame]:
    """Walk, label, inspect and deduplicate every source; return the manifest, the raw search, the
    hidden or system files skipped per source, and the tumor boxes (:data:`~braintumor.data.boxes.BOX_COLUMNS`).

    ``boxes`` maps a source to its box format and CSV (``yolo``/``csv``, see :mod:`braintumor.data.boxes`):
    its annotation files are read as boxes, not listed as images.
    """
    sources, boxes = list(sources), boxes or {}
    files, skipped, annotations = [], {}, {}
    for name, images_root in sources:
        listed, skipped[name] = list_source_files(name, images_root)
        fmt, boxes_csv = boxes.get(name, ("none", ""))
        notes = annotation_files([f.relpath for f in listed], fmt, boxes_csv)
        annotations[name] = {f.relpath: f.path for f in listed if f.relpath in notes}
        files += [f for f in listed if f.relpath not in notes]
    labels = map_labels(files, folder_to_label)
    keypoint_features = near.keypoints.features if near.enabled and near.keypoints.enabled else 0
    detail = near.enabled and near.detail_similarity > 0
    started = time.perf_counter()
    inspections = inspect_files([f.path for f in files], head_threshold, max_colour_share, workers, keypoint_features,
                                detail)
    manifest = build_manifest(files, labels, inspections, root)
    # A decodable file in an unmapped folder only happens for non-image suffixes; it has no class.
    unlabelled = (manifest["status"] == "ok") & (manifest["label"] == "")
    manifest.loc[unlabelled, ["status", "reason"]] = ["quarantined", "no_class_folder"]
    ok_rows = np.flatnonzero(manifest["status"].to_numpy() == "ok")
    fingerprints = [inspections[i].fingerprint for i in ok_rows]
    inspected = round(time.perf_counter() - started, 2)
    search = find_duplicate_groups(fingerprints, head_threshold, near, resolve_workers(workers, len(fingerprints)))
    search = replace(search, seconds={"inspect": inspected, **search.seconds})
    manifest = attach_groups(manifest, search, ok_rows)
    manifest = choose_representatives(manifest, keep, [name for name, _ in sources])
    return manifest, search, skipped, source_boxes(manifest, boxes, annotations, dict(sources))


def source_boxes(manifest: pd.DataFrame, formats: dict[str, tuple[str, str]], annotations: dict[str, dict[str, Path]],
                 roots: dict[str, Path]) -> pd.DataFrame:
    """Every box of the readable images of the sources with boxes, in raw pixels (one row per box)."""
    tables = [pd.DataFrame(columns=BOX_COLUMNS)]
    for name, (fmt, boxes_csv) in formats.items():
        if fmt == "none" or name not in roots:
            continue
        images = manifest[(manifest["source"] == name) & (manifest["status"] == "ok")]
        images = images.assign(relpath=images["id"].str[len(name) + 1:])
        tables.append(yolo_box_table(images, annotations[name]) if fmt == "yolo"
                      else csv_box_table(images, roots[name] / boxes_csv))
    return pd.concat(tables, ignore_index=True).astype({c: float for c in BOX_COLUMNS[1:]})


def _group_scope(members: pd.DataFrame) -> str:
    return "within_source" if members["source"].nunique() == 1 else "across_sources"


def merge_report(manifest: pd.DataFrame) -> dict:
    """Counts for ``reports/data/merge.json``: per source and class, duplicates, conflicts, quarantine."""
    ok = manifest[manifest["status"] == "ok"]
    report: dict = {
        "files": int(len(manifest)),
        "readable": int(len(ok)),
        "kept": int(manifest["kept"].sum()),
        "quarantined": int((manifest["status"] == "quarantined").sum()),
        "quarantined_by_reason": dict(Counter(manifest.loc[manifest["status"] == "quarantined", "reason"].str.split(":").str[0])),
        "per_source": {},
        "duplicates": {},
        "conflicts": {},
    }
    for source, rows in manifest.groupby("source", sort=False):
        ok_rows = rows[rows["status"] == "ok"]
        report["per_source"][source] = {
            "files": int(len(rows)),
            "quarantined": int((rows["status"] == "quarantined").sum()),
            "per_class": {k: int(v) for k, v in ok_rows["label"].value_counts().sort_index().items()},
            "kept_per_class": {k: int(v) for k, v in ok_rows[ok_rows["kept"]]["label"].value_counts().sort_index().items()},
        }
    dup = {f"{kind}_{scope}": {"groups": 0, "images": 0, "redundant": 0} for kind in ("exact", "near") for scope in ("within_source", "across_sources")}
    spanning_folders = 0
    conflict_groups = conflict_images = 0
    for _, members in ok[ok["group_size"] > 1].groupby("group"):
        key = f"{members['duplicate_kind'].iloc[0]}_{_group_scope(members)}"
        dup[key]["groups"] += 1
        dup[key]["images"] += len(members)
        dup[key]["redundant"] += len(members) - 1
        if members.groupby("source")["source_split"].nunique().max() > 1:
            spanning_folders += 1
        if labels_disagree(members["label"]):
            conflict_groups += 1
            conflict_images += len(members)
    report["duplicates"] = dup
    report["duplicates"]["groups_spanning_a_sources_own_folders"] = spanning_folders
    report["duplicates"]["removed_as_duplicates"] = int(manifest["drop_reason"].str.startswith("duplicate_of:").sum())
    report["conflicts"] = {"groups": conflict_groups, "images": conflict_images}
    return report


def merge_json(manifest: pd.DataFrame, search: DuplicateSearch, planted: dict[str, list[dict]],
               skipped: dict[str, int]) -> dict:
    """``reports/data/merge.json``: :func:`merge_report`, the duplicate search's pair counts, the hidden
    or system files skipped per source (``skipped``), and for each source with planted duplicates
    (``planted``: source name -> its ``planted.json`` records) their recall (:func:`planted_duplicate_recall`)."""
    report = merge_report(manifest)
    for name, count in skipped.items():
        report["per_source"].setdefault(name, {})["skipped_system_files"] = count
    report["near_duplicate_search"] = {
        "shortlisted_pairs": search.shortlisted,
        "exact_pairs": int(len(search.exact)),
        "near_duplicate_pairs": int(len(search.near)),
        "related_pairs": int(len(search.related_pairs)),
        "keypoint_pairs_checked": int(len(search.keypoint_candidates)),
        "keypoint_copy_pairs": int(search.keypoint_copy.sum()),
        "keypoint_agreement_links": int(search.keypoint_agreed.sum()),
        "keypoint_residuals_measured": int(np.isfinite(search.keypoint_residual).sum()),
        "detail_pairs_checked": int(len(search.detail_pairs)),
        "detail_pairs_kept_apart": int(search.detail_apart.sum()),
    }
    for name, records in planted.items():
        report.setdefault("planted", {})[name] = planted_duplicate_recall(manifest, name, records)
    return report


MANIFEST_COLUMNS = [
    "id", "source", "path", "source_split", "folder", "label", "bytes", "height", "width", "channels",
    "file_sha256", "pixel_hash", "status", "reason", "group", "group_size", "duplicate_kind", "split_group", "kept", "drop_reason",
]


def planted_duplicate_recall(manifest: pd.DataFrame, source: str | None, planted: list[dict]) -> dict:
    """Score the groups against a phantom source's planted duplicates (paths relative to ``source``'s
    folder), or with ``source`` None against copies planted anywhere (records hold manifest ids).

    Returns, per planted copy kind, the share of copies in their original's duplicate group
    (``recall``) and in its split group (``split_recall``); for ``adjacent_slice`` (a distinct slice
    of the same head, not a copy) the share kept as its own image (``adjacent.kept``: not in the
    original's duplicate group) and in the original's split group (``adjacent.same_split_group``);
    the number of false merges: extra distinct heads pulled into a duplicate group (a group holding
    k distinct originals counts k - 1; an adjacent slice is its original's head); and the number of
    split groups holding more than one head.
    """
    rows = manifest[manifest["status"] == "ok"]
    if source is not None:
        rows = rows[rows["source"] == source]
    names = rows["id"] if source is None else rows["id"].str.removeprefix(f"{source}/")
    group_of = dict(zip(names, rows["group"]))
    split_group_of = dict(zip(names, rows["split_group"]))
    same_group: dict[str, list[bool]] = {}
    same_split: dict[str, list[bool]] = {}
    origin_of = {rel: rel for rel in group_of}
    for record in planted:
        copy, original = record["copy"], record["original"]
        origin_of[copy] = original
        same_group.setdefault(record["kind"], []).append(group_of.get(copy, -2) == group_of.get(original, -3))
        same_split.setdefault(record["kind"], []).append(split_group_of.get(copy, -2) == split_group_of.get(original, -3))
    origins_per_group: dict[int, set[str]] = {}
    for rel, group in group_of.items():
        origins_per_group.setdefault(group, set()).add(origin_of[rel])
    false_merges = sum(len(origins) - 1 for origins in origins_per_group.values())
    heads_per_split_group: dict[int, set[str]] = {}
    for rel, split_group in split_group_of.items():
        heads_per_split_group.setdefault(split_group, set()).add(origin_of[rel])
    copies = sorted(set(same_group) - {"adjacent_slice"})
    scores = {
        "recall": {kind: round(float(np.mean(same_group[kind])), 4) for kind in copies},
        "split_recall": {kind: round(float(np.mean(same_split[kind])), 4) for kind in copies},
        "planted": {kind: len(hits) for kind, hits in sorted(same_group.items())},
        "false_merges": int(false_merges),
        # look-alike joins of different heads: harmless for leakage, but each one is a guess that was wrong
        "split_groups_joining_heads": int(sum(len(heads) > 1 for heads in heads_per_split_group.values())),
    }
    if "adjacent_slice" in same_group:
        scores["adjacent"] = {
            "kept": round(1.0 - float(np.mean(same_group["adjacent_slice"])), 4),
            "same_split_group": round(float(np.mean(same_split["adjacent_slice"])), 4),
        }
    return scores
