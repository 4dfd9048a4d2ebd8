"""The one way outputs are written, so that a crash never leaves a file or folder that looks complete:
build it beside its destination under a temporary name, then rename it into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Args:
        suffix: of the temporary file, for writers that insist on one (Keras wants ``.keras``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files owner-only; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder``; it replaces ``folder`` only if the block succeeds.

    An interrupted run leaves either the old folder or the new one, never a half-written one.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); outputs are ordinary folders
        old = None
        if folder.exists():  # rename() cannot replace a non-empty folder, so move the old one aside first
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / folder.name)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Replace ``folder`` by one holding exactly ``files`` (plain file name -> bytes)."""
    with atomic_folder(folder) as staging:
        for name, data in files.items():
            if Path(name).name != name:
                raise ValueError(f"write_folder: {name!r} must be a plain file name")
            (staging / name).write_bytes(data)
