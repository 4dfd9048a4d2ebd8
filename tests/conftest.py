"""Shared fixtures: project paths, the shared real datasets, a copy of the repo for DVC runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATASETS = SHARED / "datasets"

# Stage scripts are imported by tests (`import stages.merge`), as DVC runs them from the repo root.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/datasets.

    Missing data fails the test under CI (CI=true) and skips it, with the reason, on a user's machine.
    """
    path = SHARED_DATASETS / name
    if not path.is_dir():
        message = f"real data {path} not found (see ../shared/datasets/README.md)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must have it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def venv_env() -> dict[str, str]:
    """Environment for subprocesses (dvc, stage scripts) that must find this venv's python first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("BRAINTUMOR_ROOT", None)
    return env


def copy_repo(dest: Path) -> Path:
    """A fresh git repository holding the project's tracked files (what a clean clone has)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "copy"],
                   cwd=dest, check=True)
    return dest
