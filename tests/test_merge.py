"""Merge: label mapping, quarantine, exact and near duplicates, conflicts, representatives."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from braintumor.core.config import NearDuplicateParams, load_params
from braintumor.data.merge import (
    UnmappedFolderError,
    list_source_files,
    map_labels,
    merge_report,
    merge_sources,
    planted_duplicate_recall,
)

from conftest import REPO

FOLDERS = load_params(REPO / "params.yaml").merge.folder_to_label()
NEAR = NearDuplicateParams(neighbours=10, shortlist_similarity=0.5, verify_similarity=0.95, related_similarity=0.93,
                           max_rotation_deg=8.0, rotation_step_deg=2.0)


def fake_slice(seed: int, size: int = 160) -> np.ndarray:
    """A head-like ellipse with seeded blobs: distinct seeds give clearly distinct slices."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.uint8)
    centre = (size // 2 + int(rng.integers(-8, 8)), size // 2 + int(rng.integers(-8, 8)))
    axes = (int(size * rng.uniform(0.3, 0.42)), int(size * rng.uniform(0.3, 0.42)))
    cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, 200, -1)
    cv2.ellipse(image, centre, (axes[0] - 6, axes[1] - 6), 0, 0, 360, 90, -1)
    for _ in range(8):
        x, y = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
        cv2.circle(image, (x, y), int(rng.integers(4, 14)), int(rng.integers(20, 255)), -1)
    return cv2.GaussianBlur(image, (5, 5), 0)


def write(path: Path, image: np.ndarray, params: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image, params or [])
    return path


def run(root: Path, sources: list[tuple[str, Path]], keep: str = "largest", boxes=None, with_boxes: bool = False):
    result = merge_sources(sources, FOLDERS, root=root, head_threshold=12, max_colour_share=0.06, keep=keep,
                           near=NEAR, workers=1, boxes=boxes)
    return result if with_boxes else result[:3]


def test_label_mapping_is_case_insensitive_and_records_source_split(tmp_path):
    write(tmp_path / "a" / "Training" / "Glioma_Tumor" / "x.png", fake_slice(1))
    write(tmp_path / "a" / "Testing" / "notumor" / "y.png", fake_slice(2))
    files, _ = list_source_files("a", tmp_path / "a")
    assert map_labels(files, FOLDERS) == ["no_tumor", "glioma"]  # sorted: Testing before Training
    assert [f.source_split for f in files] == ["Testing", "Training"]


def test_hidden_and_system_entries_are_skipped_and_counted(tmp_path):
    root = tmp_path / "a"
    write(root / "Training" / "glioma" / "x.png", fake_slice(1))
    # What notebooks, macOS, Windows and archivers leave behind: each would otherwise be an unmapped
    # class folder ('.ipynb_checkpoints', '__MACOSX') or a quarantined non-image.
    write(root / "Training" / "glioma" / ".ipynb_checkpoints" / "x-checkpoint.png", fake_slice(1))
    write(root / "Training" / ".ipynb_checkpoints" / "y.png", fake_slice(2))
    (root / "__MACOSX" / "Training" / "glioma").mkdir(parents=True)
    (root / "__MACOSX" / "Training" / "glioma" / "._x.png").write_bytes(b"AppleDouble")
    (root / "Training" / "glioma" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "Training" / "glioma" / "Thumbs.db").write_bytes(b"thumbs")
    files, skipped = list_source_files("a", root)
    assert [f.relpath for f in files] == ["Training/glioma/x.png"] and skipped == 5
    manifest, _, per_source = run(tmp_path, [("a", root)])
    assert per_source == {"a": 5} and manifest["id"].tolist() == ["a/Training/glioma/x.png"]


def test_unmapped_folders_are_named_with_their_source(tmp_path):
    write(tmp_path / "a" / "Training" / "astrocytoma" / "x.png", fake_slice(1))
    write(tmp_path / "a" / "Training" / "glioma" / "y.png", fake_slice(2))
    write(tmp_path / "a" / "stray.png", fake_slice(3))
    with pytest.raises(UnmappedFolderError) as info:
        map_labels(list_source_files("a", tmp_path / "a")[0], FOLDERS)
    message = str(info.value)
    assert "source 'a': folder 'astrocytoma' (1 images)" in message
    assert "outside any class folder" in message


def test_bad_files_are_quarantined_with_reasons_and_counted(tmp_path):
    src = tmp_path / "a" / "Training" / "glioma"
    good = write(src / "good.jpg", fake_slice(1))
    (src / "empty.jpg").write_bytes(b"")
    (src / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (src / "notes.txt").write_text("not an image")
    (src / "fake.jpg").write_bytes(b"GIF89a not really")
    colour = np.dstack([fake_slice(4), np.zeros((160, 160), np.uint8), np.full((160, 160), 255, np.uint8)])
    write(src / "photo.png", colour)
    manifest, _, _ = run(tmp_path, [("a", tmp_path / "a")])
    reasons = dict(zip(manifest["id"].str.split("/").str[-1], manifest["reason"].str.split(":").str[0]))
    assert reasons == {"empty.jpg": "empty_file", "fake.jpg": "not_an_image", "good.jpg": "",
                       "notes.txt": "not_an_image", "photo.png": "not_mri_like", "truncated.jpg": "truncated"}
    report = merge_report(manifest)
    assert report["quarantined"] == 5 and report["kept"] == 1
    assert report["quarantined_by_reason"]["truncated"] == 1


def test_exact_near_and_conflicting_duplicates(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    original = fake_slice(10)
    first = write(a / "Training" / "glioma" / "orig.png", original)
    (a / "Testing" / "glioma").mkdir(parents=True)
    (a / "Testing" / "glioma" / "byte_copy.png").write_bytes(first.read_bytes())
    write(b / "glioma_tumor" / "bigger.jpg", cv2.resize(original, (320, 320)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    write(b / "glioma_tumor" / "mirrored.jpg", original[:, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    write(a / "Training" / "pituitary" / "conflict.png", fake_slice(20))
    write(b / "meningioma_tumor" / "conflict.jpg", fake_slice(20), [cv2.IMWRITE_JPEG_QUALITY, 85])
    for seed in range(30, 60):  # distinct slices: neighbours for the shortlist, none may merge
        write(a / "Training" / "no_tumor" / f"n{seed}.png", fake_slice(seed))
    manifest, search, _ = run(tmp_path, [("a", a), ("b", b)])
    by_name = manifest.set_index(manifest["id"].str.split("/").str[-1])
    family = by_name.loc[["orig.png", "byte_copy.png", "bigger.jpg", "mirrored.jpg"]]
    assert family["group"].nunique() == 1 and (family["duplicate_kind"] == "near").all()
    assert family["kept"].sum() == 1 and by_name.at["bigger.jpg", "kept"]  # largest copy is kept
    assert by_name.at["orig.png", "drop_reason"] == "duplicate_of:b/glioma_tumor/bigger.jpg"
    assert (by_name.loc[["conflict.png", "conflict.jpg"], "drop_reason"] == "label_conflict").all()
    distinct = by_name[by_name.index.str.startswith("n")]
    assert distinct["group"].nunique() == 30 and distinct["kept"].all()
    assert len(search.exact) == 1
    report = merge_report(manifest)
    assert report["duplicates"]["near_across_sources"] == {"groups": 2, "images": 6, "redundant": 4}
    assert report["conflicts"] == {"groups": 1, "images": 2}
    assert report["duplicates"]["groups_spanning_a_sources_own_folders"] == 1


def test_first_source_rule_keeps_the_earlier_source(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "glioma" / "small.png", fake_slice(5))
    write(b / "glioma" / "large.png", cv2.resize(fake_slice(5), (320, 320)))
    manifest, _, _ = run(tmp_path, [("a", a), ("b", b)], keep="first_source")
    assert manifest.set_index("id").at["a/glioma/small.png", "kept"]


def test_duplicates_report_shows_groups_conflicts_pairs_near_thresholds_and_quarantine(tmp_path):
    from braintumor.data.merge_report import candidate_id_pairs, duplicates_html, pairs_near_threshold
    a = tmp_path / "a"
    base = write(a / "Training" / "glioma" / "x.png", fake_slice(1))
    write(a / "Testing" / "glioma" / "x_copy.jpg", cv2.imread(str(base), cv2.IMREAD_GRAYSCALE), [cv2.IMWRITE_JPEG_QUALITY, 80])
    write(a / "Training" / "pituitary" / "x_again.png", fake_slice(1))  # the same slice under another class
    write(a / "Training" / "meningioma" / "y.png", fake_slice(2))
    (a / "Training" / "meningioma" / "broken.jpg").write_bytes(b"not a jpeg")
    manifest, search, _ = run(tmp_path, [("a", a)])
    ids = candidate_id_pairs(manifest, search.candidates)
    assert len(ids) == len(search.candidate_scores)
    html = duplicates_html(manifest, ids, search.candidate_scores, tmp_path, {"copy": 0.95, "look-alike": 0.93})
    assert "a/Training/meningioma/broken.jpg" in html and "not_an_image" in html
    assert html.count("data:image/png;base64,") >= 3 + 3  # the conflict group in both sections
    assert "Label conflicts" in html and "a/Training/pituitary/x_again.png" in html
    assert "detail threshold" not in html  # the detail check was off
    with_detail = duplicates_html(manifest, ids, search.candidate_scores, tmp_path, {"copy": 0.95},
                                  detail=(ids[:1], np.array([0.985]), 0.99))
    assert "Pairs just below the detail threshold (0.990)" in with_detail
    assert "0.9850" in with_detail and "look-alikes (neighbouring slices)" in with_detail
    # pairs are drawn from the band on each side of a threshold, sorted by score
    scores = np.array([0.949, 0.951, 0.955, 0.96, 0.941, 0.5])
    above, below = pairs_near_threshold(scores, 0.95, 5, seed=0)
    assert above.tolist() == [1, 2] and below.tolist() == [4, 0]


def test_planted_recall_scores_copies_by_group_and_adjacent_slices_as_kept_in_the_split_group():
    manifest = pd.DataFrame({
        "id": [f"p/{name}" for name in ("o1", "c1", "o2", "c2", "o3", "a3", "o4", "a4", "o5")],
        "source": "p", "status": "ok",
        "group":       [0, 0, 1, 2, 3, 4, 5, 5, 6],  # c2 missed; a4 removed as a copy of o4
        "split_group": [0, 0, 1, 1, 2, 2, 3, 3, 3],  # c2 still shares o2's split; o5 joined o4's head
    })
    planted = [
        {"original": "o1", "copy": "c1", "kind": "rotated"},
        {"original": "o2", "copy": "c2", "kind": "rotated"},
        {"original": "o3", "copy": "a3", "kind": "adjacent_slice"},
        {"original": "o4", "copy": "a4", "kind": "adjacent_slice"},
    ]
    scores = planted_duplicate_recall(manifest, "p", planted)
    assert scores["recall"] == {"rotated": 0.5} and scores["split_recall"] == {"rotated": 1.0}
    assert scores["adjacent"] == {"kept": 0.5, "same_split_group": 1.0}
    assert scores["planted"] == {"adjacent_slice": 2, "rotated": 2}
    assert scores["false_merges"] == 0  # an adjacent slice is its original's head, not another one
    assert scores["split_groups_joining_heads"] == 1


def test_merge_with_the_detail_check_keeps_a_neighbouring_slice_and_counts_it(tmp_path):
    from braintumor.data.merge import merge_json
    from braintumor.data.phantom.copies import make_copy
    from braintumor.data.phantom.source import render_adjacent_slice, render_slice

    original, mask = render_slice(np.random.default_rng([0, 3]), "meningioma", 256)  # its neighbour: 0.989 at 64 px
    adjacent, _ = render_adjacent_slice(np.random.default_rng([0, 3]), np.random.default_rng([1, 3]), "meningioma", 256)
    copy, _ = make_copy("rescaled", original, mask.astype(np.uint8) * 255, np.random.default_rng([2, 3]))
    a = tmp_path / "a"
    for name, image in (("original.png", original), ("adjacent.png", adjacent), ("copy.png", copy)):
        write(a / "Training" / "meningioma" / name, image)
    near = NEAR.model_copy(update={"detail_similarity": 0.99, "shortlist_similarity": -1.0})
    manifest, search, _, _ = merge_sources([("a", a)], FOLDERS, root=tmp_path, head_threshold=12, max_colour_share=0.06,
                                           keep="largest", near=near, workers=1)
    by_name = manifest.set_index(manifest["id"].str.split("/").str[-1])
    assert by_name.at["adjacent.png", "kept"] and by_name.at["adjacent.png", "drop_reason"] == ""
    assert by_name.loc[["original.png", "copy.png"], "kept"].sum() == 1  # the copy is still a copy
    assert by_name["split_group"].nunique() == 1
    counts = merge_json(manifest, search, {}, {})["near_duplicate_search"]
    assert counts["detail_pairs_checked"] == 3 and counts["detail_pairs_kept_apart"] == 2
