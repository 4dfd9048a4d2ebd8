"""Shared fixtures: project paths, the shared real datasets, a copy of the repo for DVC runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATASETS = SHARED / "datasets"

# Stage scripts are imported by tests (`import stages.merge`), as DVC runs them from the repo root.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _require_shared(path: Path, what: str) -> Path:
    """``path`` under ../shared; missing, it fails the test under CI (CI=true) and skips it elsewhere."""
    if not path.exists():
        message = f"{what} {path} not found (see {path.parent}/README.md)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must have it")
        pytest.skip(message)
    return path


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/datasets."""
    return _require_shared(SHARED_DATASETS / name, "real data")


def shared_weights_dir() -> Path:
    """../shared/weights: real ImageNet Xception weights (Keras 3 format), usable offline."""
    return _require_shared(SHARED / "weights" / "xception_imagenet_notop.weights.h5", "real ImageNet weights").parent


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the weights host or Keras's download fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr("braintumor.model.weights.unreachable_reason", refuse)
    monkeypatch.setattr("keras.utils.get_file", refuse)


# Tests own their MLflow stores: a developer's exported MLFLOW_TRACKING_URI (which the pipeline honours,
# see core.tracking.resolve_tracking_uri) must not send test runs to a team server.
os.environ.pop("MLFLOW_TRACKING_URI", None)


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


# --------------------------------------------------------------------------- tiny pipelines run with real DVC

TINY = {
    "download.use": ["phantom"],
    "download.sources.phantom.images_per_class": 16,
    "download.sources.phantom.image_size": 96,
    "download.sources.phantom.duplicates": {k: 2 for k in (
        "exact", "resized", "reencoded", "grayscale_rgb", "cropped", "padded", "rotated", "flipped", "rescaled",
        "conflicting_label")},
    "preprocess.image_size": 48,
    # A tiny offline model, so that the demo (which runs every stage) stays fast here.
    "model.backbone": "mobilenetv3small",
    "model.weights": "none",
    "model.dense_units": [16, 8],
    "train_base.epochs": 1,
    "finetune.epochs": 1,
    "finetune.unfreeze": 10,
}

TINY_PIPELINE = {
    **TINY,
    "train_base.epochs": 2,
    "train_base.batch_size": 16,
    "train_base.feature_cache_copies": 1,
    "finetune.batch_size": 16,
    "evaluate.bootstrap_resamples": 200,
    "gradcam.images_per_class": 2,
    "gradcam.sanity_images": 12,
    "gradcam.pointing_tolerance_px": 3,
}


def set_params(repo: Path, overrides: dict) -> None:
    from braintumor.core.config import read_yaml, write_yaml
    from braintumor.demo import apply_overrides

    params = repo / "params.yaml"
    write_yaml(params, apply_overrides(read_yaml(params.read_text()), overrides))


def dvc(repo: Path, env: dict, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


SHIFTED_FOLDER = "shifted/checkers"  # the built pipeline's shifted image set (evaluate.feature_check.shifted_sets)
SHIFTED_IMAGES = 12


def write_shifted_set(folder: Path) -> None:
    """Grey, head-shaped ellipses filled with checkerboards of different square sizes: images unlike the
    phantoms that pass the app's image checks; plus one file that is not an image (counted as
    unreadable) and a hidden one (skipped)."""
    import cv2

    folder.mkdir(parents=True)
    rows, cols = np.indices((96, 96))
    mask = cv2.ellipse(np.zeros((96, 96), np.uint8), (48, 48), (38, 44), 0, 0, 360, 1, -1)
    for i in range(SHIFTED_IMAGES):
        square = 4 + i % 6
        checker = ((((rows + i) // square + cols // square) % 2) * 180 + 40).astype(np.uint8)
        cv2.imwrite(str(folder / f"checker_{i:02d}.png"), checker * mask)
    (folder / "README.txt").write_text("not an image\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A tiny trained model as the stages leave it (test_app.make_trained), shared by the app and
    batch-prediction tests (they only read it); built once per worker, as it takes seconds."""
    from test_app import make_trained

    return make_trained(tmp_path_factory.mktemp("app"))


def build_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test run, also when `make test` runs it on several workers
    (pytest-xdist): each worker has its own session, so the first to get here builds under a lock in the
    folder the workers share, and the others wait for it and reuse what it built."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.built"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            if folder.exists():  # a build that failed in another worker: start again
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory, venv_env) -> Path:
    """A clean clone with the tiny configuration committed and every stage run once by `dvc repro`.

    Built once per test run (:func:`build_once`); modules that need trained models take their own copy
    (:func:`copy_built_pipeline`), so what one module runs never changes what another sees.
    """
    return build_once(tmp_path_factory, "pipeline", lambda folder: _build_pipeline(folder, venv_env))


def _build_pipeline(folder: Path, venv_env: dict) -> None:
    repo = copy_repo(folder)
    write_shifted_set(repo / SHIFTED_FOLDER)
    set_params(repo, {**TINY_PIPELINE, "evaluate.feature_check.shifted_sets": {"checkers": SHIFTED_FOLDER}})
    subprocess.run(["git", "add", SHIFTED_FOLDER], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qam",
                    "tiny pipeline"], cwd=repo, check=True)
    output = dvc(repo, venv_env, "repro")
    assert {"train_base", "finetune", "evaluate", "gradcam"} <= ran_stages(output), output[-3000:]


def copy_built_pipeline(built: Path, dest: Path) -> Path:
    """A private copy of :func:`built_pipeline`: git, DVC cache and lock, outputs and the MLflow store.

    The store's artifact folder stays the original's (its path is recorded in the database), which
    only adds files there; run ids never collide.
    """
    shutil.copytree(built, dest, symlinks=True, dirs_exist_ok=True)
    return dest
