"""Tumor boxes: reading YOLO and CSV annotations in the merge, and carrying a box through preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from braintumor.core.config import PreprocessParams, load_params
from braintumor.data.boxes import BoxFileError, annotation_files, parse_yolo_boxes
from braintumor.explain.localisation import box_mask, preprocess_mask
from braintumor.preprocess.slices import box_to_slice, preprocess_slice, slice_geometry

from conftest import REPO
from test_merge import fake_slice, run, write


def test_yolo_lines_become_pixel_boxes_and_bad_lines_are_named():
    assert parse_yolo_boxes("2 0.5 0.25 0.5 0.1\n\n0 0.1 0.1 0.2 0.2\n", 200, 100, "a.txt") == [
        (50.0, 20.0, 150.0, 30.0), (0.0, 0.0, 40.0, 20.0)]
    assert parse_yolo_boxes("", 10, 10, "empty.txt") == []
    # an exporter's rounding just past the edge is clipped
    np.testing.assert_allclose(parse_yolo_boxes("1 0.9 0.5 0.2004 0.2", 100, 100, "edge.txt"), [(79.98, 40.0, 100.0, 60.0)])
    with pytest.raises(BoxFileError, match=r"b.txt line 2: expected"):
        parse_yolo_boxes("0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n", 10, 10, "b.txt")
    with pytest.raises(BoxFileError, match=r"c.txt line 1: box .* outside the image"):
        parse_yolo_boxes("0 0.9 0.5 0.4 0.1", 10, 10, "c.txt")
    with pytest.raises(BoxFileError, match="empty"):
        parse_yolo_boxes("0 0.5 0.5 0 0.1", 10, 10, "d.txt")


def test_annotation_files_are_label_files_beside_images_or_the_csv():
    files = ["glioma/1.jpg", "glioma/1.txt", "glioma/readme.txt", "boxes.csv"]
    assert annotation_files(files, "yolo", "") == {"glioma/1.txt"}
    assert annotation_files(files, "csv", "boxes.csv") == {"boxes.csv"}
    assert annotation_files(files, "none", "") == set()


def test_merge_reads_yolo_boxes_and_does_not_take_label_files_for_images(tmp_path):
    root = tmp_path / "figshare"
    write(root / "glioma" / "1.jpg", fake_slice(1, size=200))
    (root / "glioma" / "1.txt").write_text("2 0.5 0.5 0.2 0.1\n")
    write(root / "meningioma" / "2.jpg", fake_slice(2, size=100))
    (root / "meningioma" / "2.txt").write_text("1 0.25 0.25 0.5 0.5\n1 0.75 0.75 0.1 0.1\n")
    write(root / "meningioma" / "3.jpg", fake_slice(3))  # no label file: no box
    manifest, _, _, boxes = run(tmp_path, [("figshare", root)], boxes={"figshare": ("yolo", "")}, with_boxes=True)
    assert sorted(manifest["id"]) == ["figshare/glioma/1.jpg", "figshare/meningioma/2.jpg", "figshare/meningioma/3.jpg"]
    assert (manifest["status"] == "ok").all()
    assert boxes.values.tolist() == [["figshare/glioma/1.jpg", 80.0, 90.0, 120.0, 110.0],
                                     ["figshare/meningioma/2.jpg", 0.0, 0.0, 50.0, 50.0],
                                     ["figshare/meningioma/2.jpg", 70.0, 70.0, 80.0, 80.0]]
    # without boxes: configured the label files are quarantined as what they are, not silently read
    manifest, _, _ = run(tmp_path, [("figshare", root)])
    assert (manifest.loc[manifest["id"].str.endswith(".txt"), "status"] == "quarantined").all()


def test_merge_reads_csv_boxes_and_names_what_is_wrong(tmp_path):
    root = tmp_path / "hospital"
    write(root / "Testing" / "glioma" / "a b (1).png", fake_slice(1, size=120))
    (root / "boxes.csv").write_text("path,x0,y0,x1,y1\nTesting/glioma/a b (1).png,10,20,30,40\n")
    _, _, _, boxes = run(tmp_path, [("hospital", root)], boxes={"hospital": ("csv", "boxes.csv")}, with_boxes=True)
    assert boxes.values.tolist() == [["hospital/Testing/glioma/a b (1).png", 10.0, 20.0, 30.0, 40.0]]
    (root / "boxes.csv").write_text("path,x0,y0,x1,y1\nTesting/glioma/missing.png,10,20,30,40\n")
    with pytest.raises(BoxFileError, match="not readable images of the source.*missing.png"):
        run(tmp_path, [("hospital", root)], boxes={"hospital": ("csv", "boxes.csv")})
    (root / "boxes.csv").write_text("path,x0,y0,x1,y1\nTesting/glioma/a b (1).png,10,20,130,40\n")
    with pytest.raises(BoxFileError, match=r"rows \[2\].*outside"):
        run(tmp_path, [("hospital", root)], boxes={"hospital": ("csv", "boxes.csv")})


def test_boxes_config_is_checked_at_load():
    from braintumor.core.config import LocalSource
    with pytest.raises(ValueError, match="boxes: csv needs boxes_csv"):
        LocalSource(kind="local", path="x", boxes="csv")
    with pytest.raises(ValueError, match="only read with boxes: csv"):
        LocalSource(kind="local", path="x", boxes="yolo", boxes_csv="b.csv")


# --------------------------------------------------------------------------- geometry, on hand-made cases


def params(size: int, crop: bool = True, threshold: int = 12) -> PreprocessParams:
    return PreprocessParams(image_size=size, crop_to_head=crop, head_threshold=threshold)


def test_a_box_follows_the_crop_the_padding_and_the_resize():
    # A 100 x 60 (H x W) black image with the head filling rows 10..89 and columns 5..44: the crop keeps
    # 80 x 40, padding adds 20 columns each side (80 x 80), the resize halves it (40 x 40). Threshold 60:
    # the head finder's 3x3 blur lifts the pixels just outside the head to 50, below it.
    raw = np.zeros((100, 60), np.uint8)
    raw[10:90, 5:45] = 200
    geometry = slice_geometry(raw, params(40, threshold=60))
    assert (geometry.crop, geometry.side, geometry.pad_top, geometry.pad_left) == ((10, 90, 5, 45), 80, 0, 20)
    # a box in raw pixels (x0, y0, x1, y1): columns 15..25, rows 30..50
    assert box_to_slice((15, 30, 25, 50), geometry) == (15.0, 10.0, 20.0, 20.0)
    # without the crop: 100 x 60 padded to 100 x 100 (20 columns each side), resized to 50
    plain = slice_geometry(raw, params(50, crop=False, threshold=60))
    assert box_to_slice((15, 30, 25, 50), plain) == (17.5, 15.0, 22.5, 25.0)
    # the head's own box lands on the whole cropped area: centred in the square
    assert box_to_slice(geometry.head_box, geometry) == (10.0, 0.0, 30.0, 40.0)


def test_box_and_mask_and_pixels_share_one_geometry():
    rng = np.random.default_rng(0)
    raw = np.zeros((90, 130), np.uint8)
    raw[7:83, 20:111] = rng.integers(60, 250, (76, 91))
    raw[30:50, 60:80] = 255  # the "tumor": a bright square
    p = params(64)
    mask = np.zeros_like(raw)
    mask[30:50, 60:80] = 1
    from_mask = preprocess_mask(mask, raw, p)
    from_box = box_mask([box_to_slice((60, 30, 80, 50), slice_geometry(raw, p))], 64)
    assert from_box.shape == from_mask.shape == preprocess_slice(raw, p).shape
    # both rasterise the same square; they may differ only on its one-pixel rim
    assert (from_box ^ from_mask).sum() <= 4 * 15
    assert (from_box & from_mask).sum() >= 0.8 * from_mask.sum()
    # the tumor is where the processed slice is brightest
    bright = preprocess_slice(raw, p) >= 250
    assert (bright & from_box).sum() >= 0.8 * bright.sum()


def test_box_mask_takes_pixels_whose_centre_is_inside():
    mask = box_mask([(1.0, 2.0, 3.0, 5.0)], 6)
    assert mask.sum() == 2 * 3 and mask[2:5, 1:3].all()
    assert box_mask([(0.0, 0.0, 2.0, 2.0), (4.0, 4.0, 6.0, 6.0)], 6).sum() == 8
    # a box thinner than a pixel still marks the pixel it sits in
    assert box_mask([(2.2, 2.2, 2.4, 2.4)], 6).sum() == 1


def test_params_yaml_declares_the_figshare_boxes_and_the_used_sources_have_none():
    params_ = load_params(REPO / "params.yaml")
    assert params_.download.sources["local_figshare"].boxes == "yolo"
    assert all(getattr(params_.download.sources[name], "boxes", "none") == "none" for name in params_.download.use)


def test_macro_f1_of_a_set_without_a_class_averages_the_classes_it_holds():
    from braintumor.evaluate.metrics import bootstrap_intervals, classification_metrics
    labels = np.array([0, 0, 1, 1, 3, 3])  # figshare-like: no no-tumor slices
    probabilities = np.eye(4)[[0, 0, 1, 2, 3, 3]]  # one meningioma called no tumor
    metrics = classification_metrics(labels, probabilities, ("g", "m", "n", "p"))
    # F1: glioma 1, meningioma 2/3, pituitary 1 -> 0.8889; the empty class is not averaged in as 0
    assert metrics["macro_f1"] == pytest.approx(0.888889, abs=1e-6)
    low, high = bootstrap_intervals(labels, probabilities.argmax(1), 4, resamples=200, seed=0)["macro_f1"]
    assert low <= metrics["macro_f1"] <= high <= 1
