"""Where the pipeline reads and writes, rooted at the project root.

Stages build a :class:`ProjectPaths` from the DVC root (the folder holding ``dvc.yaml``); tests build
one on ``tmp_path``. Library functions never compute paths themselves: they are handed them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping

# Variables DVC sets for stage commands (see braintumor.core.tracking's module docstring for measurements).
ENV_DVC_ROOT = "DVC_ROOT"
ENV_EXP_NAME = "DVC_EXP_NAME"
ENV_EXP_BASELINE_REV = "DVC_EXP_BASELINE_REV"
EXPS_TMP_PARTS = (".dvc", "tmp", "exps")


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


def _temp_workspace_origin(workspace: Path) -> Path | None:
    """The repository a DVC experiment copy was made from, or None if ``workspace`` is no such copy.

    Args:
        workspace: an absolute, resolved folder.
    """
    parts = workspace.parts
    n = len(EXPS_TMP_PARTS)
    # The last match wins: a project that itself lives in another project's experiment copy.
    for start in range(len(parts) - n - 1, -1, -1):
        if parts[start:start + n] == EXPS_TMP_PARTS:
            return Path(*parts[:start])
    return None


def main_project_root(workspace_root: Path, *, environ: Mapping[str, str] | None = None) -> Path:
    """The project's main root: ``workspace_root`` itself, or the repo a DVC experiment copy came from.

    The path is checked first: a folder under ``<root>/.dvc/tmp/exps/`` is a copy of ``<root>``
    whatever the environment says. Otherwise, during a DVC experiment (``DVC_EXP_BASELINE_REV`` set),
    ``DVC_ROOT`` names the main root, which covers executor folders elsewhere. Outside experiments
    ``DVC_ROOT`` is ignored: ``dvc repro`` keeps an inherited value, which may belong to another repo.

    Args:
        workspace_root: the folder holding ``dvc.yaml`` that the stage runs in.
        environ: the environment to read (default: ``os.environ``).

    Raises:
        FileNotFoundError: DVC_ROOT is set during an experiment but is not a folder.
    """
    environ = os.environ if environ is None else environ
    workspace = Path(workspace_root).resolve()
    if (origin := _temp_workspace_origin(workspace)) is not None:
        return origin
    dvc_root = environ.get(ENV_DVC_ROOT)
    if environ.get(ENV_EXP_BASELINE_REV) and dvc_root:
        if not Path(dvc_root).is_dir():
            raise FileNotFoundError(f"{ENV_DVC_ROOT}={dvc_root!r} (set by DVC for this experiment) is not a folder")
        return Path(dvc_root).resolve()
    return workspace


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @classmethod
    def discover(cls) -> "ProjectPaths":
        return cls(find_project_root())

    @property
    def main_root(self) -> Path:
        """The repository this workspace belongs to: relative paths to things beside the project
        (``../shared/...``) resolve against it, also inside a DVC experiment's temporary copy."""
        return main_project_root(self.root)

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
    def boxes_csv(self) -> Path:
        """Tumor boxes of the sources that carry them, raw pixels (braintumor.data.boxes)."""
        return self.interim / "boxes.csv"

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
    def activations(self) -> Path:
        """The activations stage's cache of the backbone's frozen bottom (braintumor.model.activations)."""
        return self.root / "data" / "activations"

    @property
    def external_csv(self) -> Path:
        """The external sources' images new to the others (``split.external``), evaluated on their own."""
        return self.root / "data" / "split" / "external.csv"

    @property
    def external_removed_csv(self) -> Path:
        """The external images left out of their set, with the reason and the image each matches."""
        return self.root / "data" / "split" / "external_removed.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def data_reports(self) -> Path:
        return self.reports / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def exports(self) -> Path:
        """The exported fine-tuned models and their card (the export stage)."""
        return self.models / "exports"

    @property
    def calibration_json(self) -> Path:
        """Temperature and validation confidence quantiles of each model (written by evaluate, read by the app)."""
        return self.models / "calibration.json"

    @property
    def ood_file(self) -> Path:
        """The feature-space out-of-distribution check of each model (written by evaluate, read by the app)."""
        return self.models / "ood.npz"

    @property
    def metrics_json(self) -> Path:
        """Test metrics of both models side by side (DVC metrics of the evaluate stage)."""
        return self.reports / "metrics.json"

    @property
    def evaluation_md(self) -> Path:
        return self.reports / "evaluation.md"

    @property
    def evaluate_reports(self) -> Path:
        """The evaluate stage's figures, per-image predictions, ROC points and training curves."""
        return self.reports / "evaluate"
