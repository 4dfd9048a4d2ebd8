"""The gradcam stage end to end with real DVC and a real MLflow store, on the tiny training configuration:
the report opens from disk with every image present, sanity.json and its DVC metrics, the MLflow run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import pandas as pd
import pytest

from conftest import copy_built_pipeline, dvc, ran_stages, set_params
from test_gradcam import assert_self_contained

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def gradcam_repo(built_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline (conftest.TINY_PIPELINE), every stage run once by `dvc repro`."""
    return copy_built_pipeline(built_pipeline, tmp_path_factory.mktemp("gradcam"))


def test_report_shows_chosen_test_images_with_every_file_present(gradcam_repo):
    report = gradcam_repo / "reports/gradcam/index.html"
    sources = assert_self_contained(report)
    test = pd.read_csv(gradcam_repo / "data/split/split.csv").query("split == 'test'")
    rows = {int(Path(src).name.split("_")[0]) for src in sources}
    assert rows <= set(test["row"]) and len(rows) >= 4  # test images only; at least one per class
    assert len(sources) == 3 * len(rows)  # the slice and both models' overlays
    written = {p.name for p in (gradcam_repo / "reports/gradcam/overlays").iterdir()}
    assert {Path(src).name for src in sources} == written
    first_overlay = next(src for src in sources if src.endswith("_finetuned.png"))
    overlay = cv2.imread(str(report.parent / first_overlay), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == (48, 48, 3)
    page = report.read_text()
    for text in ("Model randomisation test", "Pointing game", "finetuned", "base", "true: <b>"):
        assert text in page


def test_sanity_json_holds_both_checks_and_is_a_dvc_metric(gradcam_repo, venv_env):
    sanity = json.loads((gradcam_repo / "reports/gradcam/sanity.json").read_text())
    test = pd.read_csv(gradcam_repo / "data/split/split.csv").query("split == 'test'")
    tumors = min(12, int((test["label"] != "no_tumor").sum()))  # the phantom's masks: tumor images only
    randomisation = sanity["randomisation"]
    assert randomisation["images"] == tumors and set(randomisation["models"]) == {"finetuned", "base"}
    for scores in randomisation["models"].values():
        assert scores["randomised_layers"] == 38  # the value itself: test_sanity_scores_are_a_direct_computation...
        assert scores["passed"] == (scores["rank_correlation"] < 0.5)
    localisation = sanity["localisation"]
    assert localisation["applicable"] and localisation["sources"] == ["phantom"] and localisation["tolerance_px"] == 3
    for groups in localisation["models"].values():
        assert groups["all"]["images"] == tumors
        assert set(groups) - {"all"} <= {"glioma", "meningioma", "pituitary"}  # tumors only: no_tumor has no mask
        assert 0.0 < groups["all"]["chance"] < groups["all"]["chance_tolerant"] < 1.0
        assert groups["all"]["pointing_game"] <= groups["all"]["pointing_game_tolerant"]  # a tolerance only adds hits
    assert "reports/gradcam/sanity.json" in dvc(gradcam_repo, venv_env, "metrics", "show")


def test_sanity_scores_are_a_direct_computation_on_the_saved_models(gradcam_repo):
    """sanity.json's rank correlations and pointing games are what randomisation_test and pointing_game
    return when called here on the saved models, the same test images and masks, and the same params."""
    import keras
    import numpy as np

    import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
    from braintumor.core.config import load_params
    from braintumor.core.paths import ProjectPaths
    from braintumor.explain.gradcam import grad_cam, gradcam_layer_name, make_gradcam_model, randomisation_test
    from braintumor.explain.localisation import pointing_game
    from braintumor.explain.report import sample_positions
    from braintumor.explain.run import load_test_masks, mask_sources
    from braintumor.split.load import load_training_data

    sanity = json.loads((gradcam_repo / "reports/gradcam/sanity.json").read_text())
    paths = ProjectPaths(gradcam_repo)
    params = load_params(paths.params)
    cfg = params.gradcam
    data = load_training_data(paths)
    test = data.split["test"]
    images = np.asarray(data.images[test.rows])
    masks = load_test_masks(test.rows, pd.read_csv(paths.images_index, keep_default_na=False),
                            pd.read_csv(paths.manifest, keep_default_na=False), paths.root,
                            mask_sources(params.download, paths.raw_source), params.preprocess)
    picked = sample_positions(masks.reshape(len(masks), -1).any(axis=1), cfg.sanity_images, cfg.seed)
    for name in ("finetuned", "base"):
        model = keras.saving.load_model(paths.models / f"{name}.keras", safe_mode=True)
        layer = gradcam_layer_name(model, cfg.layer)
        maps, _ = grad_cam(make_gradcam_model(model, layer), images[picked], test.labels[picked])
        direct = randomisation_test(model, layer, images[picked], test.labels[picked], maps, cfg.randomise_top,
                                    cfg.seed, cfg.max_rank_correlation)
        recorded = sanity["randomisation"]["models"][name]
        assert recorded["rank_correlation"] == pytest.approx(direct["rank_correlation"], abs=2e-4), name
        assert recorded["passed"] == direct["passed"] and recorded["randomised_layers"] == direct["randomised_layers"]
        scores = sanity["localisation"]["models"][name]["all"]
        assert scores["pointing_game"] == round(pointing_game(maps, masks[picked]), 4), name
        assert scores["pointing_game_tolerant"] == round(pointing_game(maps, masks[picked], cfg.pointing_tolerance_px), 4)


def test_second_repro_does_nothing_and_a_gradcam_param_reruns_only_gradcam(gradcam_repo, venv_env):
    assert ran_stages(dvc(gradcam_repo, venv_env, "repro", "gradcam")) == set()
    set_params(gradcam_repo, {"gradcam.overlay_alpha": 0.6})
    assert ran_stages(dvc(gradcam_repo, venv_env, "repro", "gradcam")) == {"gradcam"}


def test_mlflow_run_has_params_metrics_and_the_report(gradcam_repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{gradcam_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("braintumor")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("stage") == "gradcam"]
    run = runs[-1]  # the first gradcam run (search_runs lists the newest first)
    assert run.info.status == "FINISHED"
    assert run.data.params["gradcam.sanity_images"] == "12" and "data_fingerprint" in run.data.tags
    expected = {"finetuned.randomisation_rank_correlation", "base.pointing_game", "finetuned.chance"}
    assert expected <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "gradcam")}
    assert {"gradcam/index.html", "gradcam/sanity.json", "gradcam/overlays"} <= artifacts



def test_a_model_that_fails_to_load_leaves_a_failed_run(built_pipeline, tmp_path, venv_env):
    """The models load inside the stage's MLflow run, so a broken model file is recorded as FAILED."""
    import subprocess

    from mlflow.tracking import MlflowClient

    repo = copy_built_pipeline(built_pipeline, tmp_path / "repo")
    (repo / "models/base.keras").unlink()  # a DVC link into the cache: replace it, never write through it
    (repo / "models/base.keras").write_bytes(b"not a keras file")
    result = subprocess.run(["python", "stages/gradcam.py"], cwd=repo, env=venv_env, capture_output=True, text=True)
    assert result.returncode != 0 and "base.keras" in result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("braintumor")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("stage") == "gradcam"]
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]  # newest first: this one, then the build's

def test_report_opens_from_disk_in_a_headless_browser(gradcam_repo, tmp_path):
    if not Path(CHROMIUM).is_file():
        message = f"{CHROMIUM} not found (Debian package chromium; `make browser` installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": CI must have it")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    report = gradcam_repo / "reports/gradcam/index.html"
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(report.as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate(
                "() => Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
            assert "Model randomisation test" in page.locator("body").inner_text()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert images and all(width == 48 for _, width in images), images  # every PNG decoded at its 48 px
    assert all(url.startswith("file://") for url in requests), [u for u in requests if not u.startswith("file://")]
    assert (tmp_path / "report.png").stat().st_size > 10_000
