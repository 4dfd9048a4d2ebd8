"""End to end with real DVC in a temporary copy of the repo: repro, no-op rerun, targeted reruns,
the demo mechanism, and the shared real datasets as `local` sources."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import (SHARED_DATASETS, TINY_PIPELINE, copy_built_pipeline, copy_repo, dvc, ran_stages, set_params,
                      shared_dataset)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantom_repo(built_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline, already run once by `dvc repro` (its data params are TINY's)."""
    return copy_built_pipeline(built_pipeline, tmp_path_factory.mktemp("repo"))


def test_repro_writes_every_output(phantom_repo):
    repo = phantom_repo
    merge = json.loads((repo / "reports/data/merge.json").read_text())
    split = json.loads((repo / "reports/data/split.json").read_text())
    manifest = pd.read_csv(repo / "data/interim/manifest.csv", keep_default_na=False)
    images = np.load(repo / "data/processed/images.npy", mmap_mode="r")
    table = pd.read_csv(repo / "data/split/split.csv")
    assert (repo / "data/raw/phantom/source.json").is_file() and (repo / "data/raw/phantom/masks").is_dir()
    assert merge["files"] == len(manifest) == 4 * 16 + 10 * 2
    assert all(r == 1.0 for r in merge["planted"]["phantom"]["recall"].values()), merge["planted"]
    assert merge["planted"]["phantom"]["false_merges"] == 0
    # Exact counts: each of the 9 same-label kinds planted twice -> 18 copies removed; the 2 copies
    # filed under another class make 2 conflicting groups of 2, excluded whole.
    assert merge["duplicates"]["removed_as_duplicates"] == 18
    assert merge["conflicts"] == {"groups": 2, "images": 4}
    assert merge["kept"] == 4 * 16 - 2
    assert images.shape == ((manifest["status"] == "ok").sum(), 48, 48) and images.dtype == "uint8"
    assert split["leakage"] == {"duplicate_groups_spanning_splits": 0, "related_groups_spanning_splits": 0}
    # split.train_copies: all adds the training groups' other members; each group still counts once.
    assert len(table) == sum(split["per_split"].values()) and set(table["split"]) == {"train", "val", "test"}
    assert split["train_groups"] + split["per_split"]["val"] + split["per_split"]["test"] == merge["kept"]


def test_rerun_is_a_noop_and_one_param_reruns_only_its_stages(phantom_repo, venv_env):
    repo = phantom_repo
    assert ran_stages(dvc(repo, venv_env, "repro", "split")) == set()
    assert "merge.json" in dvc(repo, venv_env, "metrics", "show")
    set_params(repo, {"split.seed": 7})
    assert ran_stages(dvc(repo, venv_env, "repro", "split")) == {"split"}
    # Sharpening changes pixels, not the index: split's inputs are unchanged, so it is skipped.
    set_params(repo, {"preprocess.sharpen_amount": 0.25})
    assert ran_stages(dvc(repo, venv_env, "repro", "split")) == {"preprocess"}
    set_params(repo, {"merge.near_duplicates.verify_similarity": 0.96})
    assert "merge" in ran_stages(dvc(repo, venv_env, "repro", "split"))
    assert "download@phantom" in dvc(repo, venv_env, "dag")



def test_editing_preprocessing_code_leaves_download_and_merge_up_to_date(built_pipeline, tmp_path, venv_env):
    """The head box lives in data/head.py, so a change to CLAHE or sharpening concerns preprocess (and
    gradcam and evaluate, which use it too), never the download or the duplicate search."""
    repo = copy_built_pipeline(built_pipeline, tmp_path / "repo")
    assert json.loads(dvc(repo, venv_env, "status", "--json")) == {}
    with (repo / "src/braintumor/preprocess/slices.py").open("a") as module:
        module.write("\n# an edit to the preprocessing code\n")
    changed = set(json.loads(dvc(repo, venv_env, "status", "--json")))
    # gradcam crops the masks with the same code; evaluate preprocesses the shifted image sets with it
    assert changed == {"preprocess", "evaluate", "gradcam"}, changed

def test_demo_runs_an_experiment_and_leaves_params_untouched(built_pipeline, tmp_path, venv_env):
    repo = copy_built_pipeline(built_pipeline, tmp_path / "repo")
    # One override that differs from the committed tiny params: the experiment reruns gradcam only,
    # the run cache restores the rest, and the summary reads every stage's reports.
    (repo / "tiny-demo.yaml").write_text(yaml.safe_dump({**TINY_PIPELINE, "gradcam.overlay_alpha": 0.5}))
    before = (repo / "params.yaml").read_bytes()
    result = subprocess.run(
        ["python", "-m", "braintumor.demo", "--overrides", "tiny-demo.yaml", "--name", "tiny-demo"],
        cwd=repo, env=venv_env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (repo / "params.yaml").read_bytes() == before
    assert "== demo summary ==" in result.stdout and "false merges 0" in result.stdout
    assert "fine-tuned model, as its training stage scored it (no flip averaging): test accuracy" in result.stdout
    assert "| metric (test split) | base | fine-tuned | change |" in result.stdout
    assert "backbone mobilenetv3small: weights random (none)" in result.stdout
    assert "Grad-CAM report:   reports/gradcam/index.html" in result.stdout
    for where in ("reports/evaluation.md", "make mlflow-ui", "make exp-show", "make app"):
        assert where in result.stdout.split("== where to look ==")[1], where
    assert "Running stage 'gradcam'" in result.stdout + result.stderr
    # The terminal shows progress and results, not TensorFlow's CPU start-up lines (the gradcam stage
    # did start TensorFlow, see above).
    for chatter in ("Could not find cuda drivers", "oneDNN custom operations", "absl::InitializeLog",
                    "The structure of `inputs` doesn't match"):  # Keras, on a model called with the wrong nesting
        assert chatter not in result.stdout + result.stderr, chatter
    experiments = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=venv_env,
                                            capture_output=True, text=True, check=True).stdout)
    names = [e.get("name") for commit in experiments for e in (commit.get("experiments") or [])]
    assert "tiny-demo" in names


@pytest.mark.shared_data
def test_repro_on_the_shared_real_datasets(tmp_path, venv_env):
    shared_dataset("nickparvar-224"), shared_dataset("sartaj-sample")
    repo = copy_repo(tmp_path / "repo")
    set_params(repo, {
        "download.use": ["local_nickparvar", "local_sartaj"],
        "download.sources.local_nickparvar.path": str(SHARED_DATASETS / "nickparvar-224"),
        "download.sources.local_sartaj.path": str(SHARED_DATASETS / "sartaj-sample"),
        "preprocess.image_size": 64,
        "split.train_copies": "one",  # one image per group until the last step below
    })
    dvc(repo, venv_env, "repro", "split")
    merge = json.loads((repo / "reports/data/merge.json").read_text())
    split = json.loads((repo / "reports/data/split.json").read_text())
    assert merge["files"] == 7023 + 457
    # The shared "sartaj-sample" holds colour photographs of food, not MRI: all quarantined.
    assert merge["per_source"]["local_sartaj"]["quarantined"] == 457
    assert merge["quarantined_by_reason"] == {"not_mri_like": 457}
    dups = merge["duplicates"]
    assert dups["exact_within_source"]["groups"] > 100 and dups["near_within_source"]["groups"] > 100
    assert dups["groups_spanning_a_sources_own_folders"] > 100
    assert split["leakage"]["duplicate_groups_spanning_splits"] == 0
    # The dataset's own Training/Testing folders, as published numbers use them: only split reruns,
    # and the leak is measured and warned about instead of failing the stage.
    set_params(repo, {"split.strategy": "source_folders", "split.test_source": "local_nickparvar"})
    output = dvc(repo, venv_env, "repro", "split")
    assert ran_stages(output) == {"split"} and "LEAKY split" in output
    leaky = json.loads((repo / "reports/data/split.json").read_text())
    assert leaky["per_split"]["test"] == 1311 and leaky["images"] == 7023
    assert leaky["leakage"]["duplicate_groups_spanning_splits"] > 500
    # The same folders made clean: 1,107 of the 1,311 Testing files have a copy or look-alike in
    # Training (1,045 by the head-box search alone: the keypoint search links 53 more, and its matches
    # that the head-box score agrees with 9 more); 183 distinct slices remain, and nothing leaks. A link at the edge of its threshold flips with the CPU or the
    # vocabulary (the earlier k-means vocabulary linked 1,099 on an AMD EPYC, 1,098 on an Intel Xeon;
    # most likely FAISS's or OpenCV's float paths rounding differently, not traced). Hence a band.
    set_params(repo, {"split.strategy": "source_folders_clean"})
    assert ran_stages(dvc(repo, venv_env, "repro", "split")) == {"split"}
    clean = json.loads((repo / "reports/data/split.json").read_text())
    counts = clean["clean_test"]
    assert {k: counts[k] for k in ("testing_folder", "label_conflicts", "other_sources_excluded")} == {
        "testing_folder": 1311, "label_conflicts": 0, "other_sources_excluded": 0}
    assert 1102 <= counts["overlapping_training"] <= 1112 and 16 <= counts["duplicates_within_testing"] <= 26
    assert counts["overlapping_training"] + counts["duplicates_within_testing"] + counts["test"] == 1311
    assert clean["per_split"]["test"] == counts["test"] and clean["leakage"] == {
        "duplicate_groups_spanning_splits": 0, "related_groups_spanning_splits": 0}
    # Every member of each training group trains (weighted); validation and test are unchanged.
    set_params(repo, {"split.train_copies": "all"})
    assert ran_stages(dvc(repo, venv_env, "repro", "split")) == {"split"}
    copies = json.loads((repo / "reports/data/split.json").read_text())
    assert copies["train_groups"] == clean["train_groups"] and copies["train_images"] > clean["train_images"] + 500
    assert {s: copies["per_split"][s] for s in ("val", "test")} == {s: clean["per_split"][s] for s in ("val", "test")}
    assert copies["leakage"] == clean["leakage"]
