"""Where the pipeline reads and writes, rooted at the project root.

Stages build a :class:`ProjectPaths` from the DVC root (the folder holding ``dvc.yaml``); tests build
one on ``tmp_path``. Library functions never compute paths themselves: they are handed them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) that holds ``dvc.yaml``.

    ``BRAINTUMOR_ROOT`` overrides the search (used by tests and by tools run from elsewhere).
    """
    if env := os.environ.get("BRAINTUMOR_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above {here}: run from inside the project")


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @classmethod
    def discover(cls) -> "ProjectPaths":
        return cls(find_project_root())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    def raw_source(self, name: str) -> Path:
        """One source's download folder: ``images/`` (as published) plus ``source.json``."""
        return self.raw / name

    @property
    def interim(self) -> Path:
        return self.root / "data" / "interim"

    @property
    def manifest(self) -> Path:
        return self.interim / "manifest.csv"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def images_npy(self) -> Path:
        return self.processed / "images.npy"

    @property
    def images_index(self) -> Path:
        return self.processed / "index.csv"

    @property
    def split_csv(self) -> Path:
        return self.root / "data" / "split" / "split.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def data_reports(self) -> Path:
        return self.reports / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"
