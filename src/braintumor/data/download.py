"""Fetch one raw source into ``data/raw/<name>/`` atomically, with a record of what was fetched.

Layout of a fetched source::

    data/raw/<name>/images/...     the dataset exactly as published (split folders, class folders)
    data/raw/<name>/source.json    what was fetched: kind, origin, date, file count, file-list checksum
    data/raw/<name>/masks/...      phantom only: tumor masks, same relative paths as the images
    data/raw/<name>/planted.json   phantom only: the planted duplicates (ground truth for dedup)

Everything is written to a hidden staging folder beside the target and renamed into place only after
it is complete and verified, so an interrupted or failed fetch never leaves a folder that looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from braintumor.core import atomic
from braintumor.core.config import KaggleSource, LocalSource, PhantomSource, Source


def file_list_checksum(folder: Path) -> tuple[int, str]:
    """(file count, sha256 over the sorted ``relative-path<TAB>size`` lines) of a folder tree."""
    lines = sorted(
        f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}" for p in folder.rglob("*") if p.is_file()
    )
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def copy_local_folder(origin: Path, dest: Path, mode: str) -> None:
    """Copy (or hard-link, which costs no space) every file of an existing dataset folder to ``dest``.

    Contents only, not permissions: a read-only origin (a shared, write-protected copy) must not
    give a read-only ``data/raw`` that DVC and the user then cannot replace.
    """
    if not origin.is_dir():
        raise FileNotFoundError(f"local source folder not found: {origin}")
    for path in sorted(origin.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "hardlink":
                os.link(path, target)
            else:
                shutil.copyfile(path, target)


def _fetch_into(staging: Path, source: Source, project_root: Path) -> dict:
    """Kind-specific part: fill ``staging/images`` (and extras) and return the origin record."""
    images = staging / "images"
    if isinstance(source, LocalSource):
        origin = (project_root / source.path).resolve()
        copy_local_folder(origin, images, source.mode)
        return {"path": source.path, "resolved_path": str(origin), "mode": source.mode}
    if isinstance(source, PhantomSource):
        from braintumor.data.phantom.source import generate_phantom_source

        summary = generate_phantom_source(staging, source)
        return {"seed": source.seed, "generator": "braintumor.phantom", "summary": summary}
    if isinstance(source, KaggleSource):
        from braintumor.data.kaggle import download_kaggle_dataset

        images.mkdir()
        return download_kaggle_dataset(source.slug, source.version, images)
    raise TypeError(f"unknown source kind: {type(source).__name__}")


def fetch_source(name: str, source: Source, dest: Path, project_root: Path) -> dict:
    """Fetch ``source`` into ``dest`` (replacing it only on success) and return its record.

    Args:
        name: the source's name in ``download.sources``.
        source: its validated params.
        dest: ``data/raw/<name>``.
        project_root: relative local paths are resolved against it.
    """
    with atomic.atomic_folder(dest) as staging:
        origin = _fetch_into(staging, source, project_root)
        count, checksum = file_list_checksum(staging / "images")
        if count == 0:
            raise RuntimeError(f"source {name!r} ({source.kind}) produced no files")
        class_root = check_class_root(staging, source.subdir)
        record = {
            "name": name,
            "kind": source.kind,
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "file_count": count,
            "file_list_sha256": checksum,
            "class_root": class_root,
            **origin,
        }
        (staging / "source.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def check_class_root(staging: Path, subdir: str) -> str:
    """The folder (relative to the source folder) whose subfolders are splits and classes."""
    class_root = Path("images") / subdir
    if not (staging / class_root).is_dir():
        top = sorted(p.name for p in (staging / "images").iterdir())
        raise FileNotFoundError(f"subdir {subdir!r} is not in the download; its top-level entries are {top}")
    return class_root.as_posix()
