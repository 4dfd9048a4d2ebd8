"""External validation end to end with real DVC: a source marked `split.external` never trains, its copies of
the other sources' images are removed with their reason, and evaluate reports it on its own.

One pipeline serves every test here: two external sources, a hospital's class folders with YOLO tumor boxes
and a clinic's Br35H-style yes / no folders, added to the built pipeline and run through `dvc repro` once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from braintumor.core.config import PhantomDuplicates, PhantomSource, read_yaml, write_yaml
from braintumor.data.phantom.source import generate_phantom_source
from conftest import copy_built_pipeline, dvc, ran_stages, set_params

pytestmark = pytest.mark.slow


def write_external_source(folder: Path, internal_images: Path | None, seed: int) -> tuple[set[str], str]:
    """An external folder (Testing/<class>/): new phantom slices (their own seed), 3 byte copies of the built
    pipeline's own slices when `internal_images` is given, and one slice uploaded twice. Returns the copies'
    and the twin's ids."""
    generated = folder.parent / f"generated_{folder.name}"
    generated.mkdir()
    generate_phantom_source(generated, PhantomSource(kind="phantom", images_per_class=3, image_size=96, seed=seed,
                                                     test_fraction=0.0, duplicates=PhantomDuplicates(**{
                                                         k: 0 for k in PhantomDuplicates.model_fields})))
    for path in (p for p in (generated / "images").rglob("*") if p.is_file()):
        target = folder / "Testing" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    copies = set()
    for path in sorted((internal_images / "Training" / "glioma").glob("*.*"))[:3] if internal_images else []:
        shutil.copy2(path, folder / "Testing" / "glioma" / f"copy_{path.name}")
        copies.add(f"{folder.name}/Testing/glioma/copy_{path.name}")
    first = sorted((folder / "Testing" / "pituitary").glob("*.*"))[0]
    shutil.copy2(first, first.with_name("again_" + first.name))
    return copies, f"{folder.name}/Testing/pituitary/again_{first.name}"


def yolo_line_from_mask(mask_file: Path) -> str:
    """The YOLO line of a phantom mask's bounding box, as a detection dataset would export it."""
    import cv2
    mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
    x, y, w, h = cv2.boundingRect((mask > 0).astype("uint8"))
    height, width = mask.shape
    return f"0 {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}\n"


def write_yolo_boxes(testing: Path, masks: dict[Path, Path]) -> int:
    """YOLO label files beside the tumor images of `testing`, from the phantom masks (mask root -> image
    root) of the slice each image is or copies. Returns how many were written."""
    labelled = 0
    for image in sorted(testing.rglob("*.*")):
        if image.parent.name in ("no_tumor", "notumor") or image.name.startswith("again_"):
            continue
        name = image.name.removeprefix("copy_")
        for mask_root, image_root in masks.items():
            found = list(image_root.rglob(name))
            if found:
                mask_file = mask_root / found[0].relative_to(image_root).with_suffix(".png")
                image.with_suffix(".txt").write_text(yolo_line_from_mask(mask_file))
                labelled += 1
                break
    return labelled


def as_yes_no_folders(testing: Path) -> None:
    """Br35H's layout: the tumor classes in one "yes" folder, no tumor in "no"."""
    for folder in [p for p in testing.iterdir() if p.is_dir()]:
        target = testing / ("no" if folder.name in ("notumor", "no_tumor") else "yes")
        target.mkdir(exist_ok=True)
        for path in folder.iterdir():
            shutil.move(path, target / f"{folder.name}_{path.name}")
        folder.rmdir()


@pytest.fixture(scope="module")
def external(built_pipeline, tmp_path_factory, venv_env) -> dict:
    tmp = tmp_path_factory.mktemp("external")
    repo = copy_built_pipeline(built_pipeline, tmp / "repo")
    internal = repo / "data/raw/phantom"
    copies, twin = write_external_source(tmp / "hospital", internal / "images", seed=11)
    labelled = write_yolo_boxes(tmp / "hospital" / "Testing", {tmp / "generated_hospital" / "masks": tmp / "generated_hospital" / "images",
                                                             internal / "masks": internal / "images"})
    assert labelled >= 9
    write_external_source(tmp / "clinic", None, seed=12)
    as_yes_no_folders(tmp / "clinic" / "Testing")
    params = read_yaml((repo / "params.yaml").read_text())
    params["download"]["sources"]["hospital"] = {"kind": "local", "path": str(tmp / "hospital"), "boxes": "yolo"}
    params["download"]["sources"]["clinic"] = {"kind": "local", "path": str(tmp / "clinic")}
    write_yaml(repo / "params.yaml", params)
    # No exports: they are not what this tests (test_export does), and their converters take half a minute.
    set_params(repo, {"download.use": ["phantom", "hospital", "clinic"], "split.external": ["hospital", "clinic"],
                      "gradcam.box_examples": 5, "export.formats": []})
    output = dvc(repo, venv_env, "repro", "evaluate", "gradcam")
    assert {"download@hospital", "download@clinic", "merge", "split", "evaluate", "gradcam"} <= ran_stages(output)
    return {"repo": repo, "copies": copies, "twin": twin, "labelled": labelled}


def test_external_source_is_held_out_and_reported_apart(external):
    repo, copies, twin = external["repo"], external["copies"], external["twin"]
    split = pd.read_csv(repo / "data/split/split.csv", keep_default_na=False)
    all_external = pd.read_csv(repo / "data/split/external.csv", keep_default_na=False)
    all_removed = pd.read_csv(repo / "data/split/external_removed.csv", keep_default_na=False)
    assert not split["source"].isin(["hospital", "clinic"]).any(), "an external image entered train, validation or test"
    assert set(all_external["source"]) == {"hospital", "clinic"}
    external_rows = all_external[all_external["source"] == "hospital"]
    removed = all_removed[all_removed["source"] == "hospital"]
    reasons = dict(zip(removed["id"], removed["reason"]))
    assert {reasons[c] for c in copies} == {"copy_of_internal"}
    assert all(m.startswith("phantom/") for m in removed.loc[removed["id"].isin(copies), "matches"])
    # The second upload never counts: removed as a second copy, or with its original as a look-alike.
    assert reasons[twin] in ("duplicate_within_external", "lookalike_of_internal")
    assert not set(all_external["id"]) & set(all_removed["id"])

    report = json.loads((repo / "reports/data/split.json").read_text())["external"]["hospital"]
    assert report["n"] == len(external_rows) and report["readable"] == len(external_rows) + len(removed)
    assert report["removed"]["copy_of_internal"] >= 3
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for model in ("base", "finetuned"):
        entry = metrics[model]["external"]["hospital"]
        assert entry["n"] == len(external_rows)
        assert entry["removed_overlaps"] == report["removed"]["copy_of_internal"] + report["removed"]["lookalike_of_internal"]
        assert 0 <= entry["accuracy_ci95"]["low"] <= entry["accuracy"] <= entry["accuracy_ci95"]["high"] <= 1
        predictions = pd.read_csv(repo / f"reports/evaluate/external/predictions_hospital_{model}.csv")
        assert len(predictions) == len(external_rows)
    # The test split's numbers are the test split's alone.
    assert sum(c["support"] for c in metrics["finetuned"]["per_class"].values()) == (split["split"] == "test").sum()
    markdown = (repo / "reports/evaluation.md").read_text()
    assert "## External validation" in markdown and f"### hospital: {len(external_rows)} images" in markdown
    card = json.loads((repo / "models/finetuned.json").read_text())["training_data"]
    assert [s["name"] for s in card["sources"]] == ["phantom"]
    assert card["external_sets"] == all_external["source"].value_counts().to_dict()


def test_external_source_with_tumor_boxes_is_scored_by_the_gradcam_stage(external):
    repo, copies, labelled = external["repo"], external["copies"], external["labelled"]
    manifest = pd.read_csv(repo / "data/interim/manifest.csv", keep_default_na=False)
    assert not manifest["id"].str.endswith(".txt").any(), "a YOLO label file was taken for an image"
    boxes = pd.read_csv(repo / "data/interim/boxes.csv")
    assert boxes["id"].nunique() == labelled and boxes["id"].str.startswith("hospital/").all()
    merge = json.loads((repo / "reports/data/merge.json").read_text())
    assert merge["per_source"]["hospital"]["images_with_boxes"] == labelled

    sanity = json.loads((repo / "reports/gradcam/sanity.json").read_text())["boxes"]
    # the clinic has no boxes: only the hospital is scored
    assert sanity["applicable"] and set(sanity["sets"]) == {"hospital"}
    hospital = sanity["sets"]["hospital"]
    # every boxed image is scored, also the copies left out of the classification set (counted as seen)
    assert hospital["images"] == labelled and hospital["images_seen_in_training"] == len(copies)
    chance = hospital["chance"]["all"]
    assert 0 < chance["area"] < chance["area_tolerant"] < 1
    for model in ("base", "finetuned"):
        scores = hospital["models"][model]["all"]
        assert scores["images"] == labelled
        assert 0 <= scores["pointing_game"] <= scores["pointing_game_tolerant"] <= 1 and 0 <= scores["energy_inside"] <= 1
        assert set(scores["targets"]) == {"pointing_game_over_3x_area", "pointing_game_over_fixed_points"}
    overlays = sorted((repo / "reports/gradcam/overlays").glob("box_hospital_*.png"))
    assert len(overlays) == 5
    html = (repo / "reports/gradcam/index.html").read_text()
    assert "Localisation on real tumor boxes" in html and all(p.name in html for p in overlays)


def test_a_yes_no_source_is_scored_as_tumor_vs_no_tumor(external):
    repo = external["repo"]
    all_external = pd.read_csv(repo / "data/split/external.csv", keep_default_na=False)
    clinic = all_external[all_external["source"] == "clinic"]
    assert set(clinic["label"]) == {"tumor", "no_tumor"}
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for model in ("base", "finetuned"):
        assert metrics[model]["external"]["hospital"].get("task") != "tumor_vs_no_tumor"
        entry = metrics[model]["external"]["clinic"]
        assert entry["task"] == "tumor_vs_no_tumor" and entry["n"] == len(clinic)
        counts = entry["counts"]
        assert counts["tumor_called_tumor"] + counts["tumor_called_no_tumor"] == (clinic["label"] == "tumor").sum()
        assert entry["sensitivity"] == pytest.approx(counts["tumor_called_tumor"] / (clinic["label"] == "tumor").sum(), abs=1e-6)
        assert 0 <= entry["specificity_ci95"]["low"] <= entry["specificity"] <= entry["specificity_ci95"]["high"] <= 1
        predictions = pd.read_csv(repo / f"reports/evaluate/external/predictions_clinic_{model}.csv")
        assert set(predictions["actual"]) == {"tumor", "no_tumor"}
    markdown = (repo / "reports/evaluation.md").read_text()
    assert "### clinic:" in markdown and "tumor vs no tumor" in markdown
