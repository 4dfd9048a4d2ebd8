"""The phantom source: layout, masks, determinism, planted duplicates, tumor locations, no trivial cues.

Two generated datasets are shared by the module: a small one with every duplicate kind, and a medium
one (40 originals per class, only rotated/rescaled copies) for the statistical checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from braintumor.core.config import CLASS_NAMES, PhantomDuplicates, PhantomSource
from braintumor.data.head import head_bbox
from braintumor.data.phantom import source as phantom
from braintumor.data.phantom.copies import DUPLICATE_KINDS, make_copy
from braintumor.data.phantom.source import CLASS_FOLDERS, SPLITS, generate_phantom_source

SMALL = PhantomSource(kind="phantom", images_per_class=12, image_size=128, seed=3,
                      duplicates=PhantomDuplicates(**{kind: 2 for kind in DUPLICATE_KINDS}))
ONLY_ROTATED_AND_RESCALED = {kind: 0 for kind in DUPLICATE_KINDS} | {"rotated": 4, "rescaled": 4}
MEDIUM = PhantomSource(kind="phantom", images_per_class=40, image_size=128, seed=5,
                       duplicates=PhantomDuplicates(**ONLY_ROTATED_AND_RESCALED))
LABEL_OF_FOLDER = {folder: label for label, folder in CLASS_FOLDERS.items()}
NAME = re.compile(r"^(Tr|Te)-(gl|me|no|pi)_(\d{4})\.(jpg|png)$")


def generate(root: Path, cfg: PhantomSource) -> tuple[Path, dict]:
    root.mkdir(parents=True)
    return root, generate_phantom_source(root, cfg)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    return generate(tmp_path_factory.mktemp("phantom") / "small", SMALL)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> tuple[Path, dict]:
    return generate(tmp_path_factory.mktemp("phantom") / "medium", MEDIUM)


def image_files(root: Path) -> list[str]:
    """Image paths relative to ``root/images``, with forward slashes, sorted."""
    return sorted(p.relative_to(root / "images").as_posix() for p in (root / "images").rglob("*") if p.is_file())


def read_mask(root: Path, rel: str) -> np.ndarray:
    return cv2.imread(str((root / "masks" / rel).with_suffix(".png")), cv2.IMREAD_UNCHANGED)


def read_gray(root: Path, rel: str) -> np.ndarray:
    return cv2.imread(str(root / "images" / rel), cv2.IMREAD_GRAYSCALE)


def planted(root: Path) -> list[dict]:
    return json.loads((root / "planted.json").read_text())


def originals(root: Path) -> list[str]:
    copies = {record["copy"] for record in planted(root)}
    return [rel for rel in image_files(root) if rel not in copies]


def head_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the head, the way the preprocessing finds it."""
    return head_bbox(gray, 12)


def head_region(gray: np.ndarray) -> np.ndarray:
    """Filled outline of the largest bright component: the head including dark structures inside it."""
    head = (cv2.GaussianBlur(gray, (5, 5), 0) > 12).astype(np.uint8)
    contours, _ = cv2.findContours(head, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(head)
    cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, thickness=-1)
    return filled.astype(bool)


def thumbnail(gray: np.ndarray, size: int = 32) -> np.ndarray:
    """Head box squeezed to ``size`` x ``size``, zero mean, unit norm, flattened."""
    y0, y1, x0, x1 = head_box(gray)
    thumb = cv2.resize(gray[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)
    return standardised(thumb)


def standardised(image: np.ndarray) -> np.ndarray:
    flat = image.ravel() - image.mean()
    return flat / np.linalg.norm(flat)


# --------------------------------------------------------------------------- layout


def test_layout_has_kaggle_folders_names_and_counts(small):
    root, summary = small
    files = image_files(root)
    folders = {rel.rsplit("/", 1)[0] for rel in files}
    assert folders == {f"{split}/{folder}" for split in SPLITS for folder in CLASS_FOLDERS.values()}
    for rel in files:
        split, folder, name = rel.split("/")
        match = NAME.match(name)
        assert match, f"{rel} is not named like Nickparvar's files"
        assert match[1] == phantom.SPLIT_CODES[split] and match[2] == phantom.CLASS_CODES[LABEL_OF_FOLDER[folder]]
    for split in SPLITS:
        for folder in CLASS_FOLDERS.values():
            names = [rel.rsplit("/", 1)[1] for rel in files if rel.startswith(f"{split}/{folder}/")]
            numbers = sorted(int(NAME.match(name)[3]) for name in names)
            assert numbers == list(range(1, len(numbers) + 1)), f"{split}/{folder} is not numbered 1..n"
            assert summary["files"][split][folder] == len(numbers)
    n_copies = sum(SMALL.duplicates.model_dump().values())
    assert len(files) == 4 * SMALL.images_per_class + n_copies == summary["originals"] + summary["planted_total"]


def test_originals_are_split_by_test_fraction(small):
    root, _ = small
    for folder in CLASS_FOLDERS.values():
        testing = [rel for rel in originals(root) if rel.startswith(f"Testing/{folder}/")]
        assert len(testing) == round(SMALL.images_per_class * SMALL.test_fraction)


def test_originals_are_square_jpegs_mixing_grey_and_rgb(small):
    root, _ = small
    channels = set()
    for rel in originals(root):
        data = (root / "images" / rel).read_bytes()
        assert data[:3] == b"\xff\xd8\xff", f"{rel} is not a JPEG"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.shape[:2] == (SMALL.image_size, SMALL.image_size)
        channels.add(1 if image.ndim == 2 else image.shape[2])
    assert channels == {1, 3}


def test_every_image_has_a_binary_mask_of_its_size(small):
    root, _ = small
    for rel in image_files(root):
        mask = read_mask(root, rel)
        assert mask is not None, f"no mask for {rel}"
        assert mask.dtype == np.uint8 and mask.ndim == 2
        assert mask.shape == read_gray(root, rel).shape
        assert set(np.unique(mask)) <= {0, 255}


def test_tumor_masks_are_inside_the_head_and_no_tumor_masks_are_empty(small):
    root, _ = small
    for rel in originals(root):
        mask = read_mask(root, rel) > 0
        if rel.split("/")[1] == "notumor":
            assert not mask.any(), f"{rel}: a no-tumor slice has a tumor mask"
            continue
        assert mask.sum() >= 10, f"{rel}: empty tumor mask"
        inside = head_region(read_gray(root, rel))[mask].mean()
        assert inside > 0.99, f"{rel}: only {inside:.0%} of the tumor mask is inside the head"


# --------------------------------------------------------------------------- determinism


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_config_gives_byte_identical_files(small, tmp_path):
    again, _ = generate(tmp_path / "again", SMALL)
    assert file_bytes(again) == file_bytes(small[0])


def test_worker_threads_do_not_change_the_files(small, tmp_path, monkeypatch):
    monkeypatch.setattr(phantom, "_worker_count", lambda jobs: 2)
    parallel, _ = generate(tmp_path / "parallel", SMALL)
    assert file_bytes(parallel) == file_bytes(small[0])


def test_another_seed_gives_other_files(small, tmp_path):
    other, _ = generate(tmp_path / "other", SMALL.model_copy(update={"seed": SMALL.seed + 1}))
    mine, theirs = file_bytes(small[0]), file_bytes(other)
    same = [rel for rel in mine if rel.startswith("images/") and mine[rel] == theirs.get(rel)]
    assert not same, f"files identical across seeds: {same[:3]}"


def test_destination_must_be_an_empty_folder(tmp_path):
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_phantom_source(tmp_path, SMALL)
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        generate_phantom_source(tmp_path / "missing", SMALL)


def test_a_subdir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="subdir must be ''"):
        generate_phantom_source(tmp_path, SMALL.model_copy(update={"subdir": "Data"}))


def test_too_many_copies_for_the_originals_is_an_error(tmp_path):
    cfg = PhantomSource(kind="phantom", images_per_class=2, image_size=64)  # 76 copies, 8 originals
    with pytest.raises(ValueError, match="76 planted copies need as many distinct originals"):
        generate_phantom_source(tmp_path, cfg)


def test_render_slice_returns_a_uint8_image_and_a_bool_mask_from_its_generator_only():
    for label in CLASS_NAMES:
        image, mask = phantom.render_slice(np.random.default_rng(7), label, 96)
        again, _ = phantom.render_slice(np.random.default_rng(7), label, 96)
        assert image.dtype == np.uint8 and image.shape == (96, 96) and np.array_equal(image, again)
        assert mask.dtype == bool and mask.shape == (96, 96) and mask.any() == (label != "no_tumor")


def test_make_copy_rejects_an_unknown_kind_and_mismatched_sizes():
    image, mask = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="unknown duplicate kind 'sheared'"):
        make_copy("sheared", image, mask, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"image \(8, 8\) and mask \(4, 4\) differ"):
        make_copy("flipped", image, mask[:4, :4], np.random.default_rng(0))


def test_render_slice_rejects_an_unknown_label():
    with pytest.raises(ValueError, match="unknown label 'astrocytoma'"):
        phantom.render_slice(np.random.default_rng(0), "astrocytoma", 64)


# --------------------------------------------------------------------------- planted duplicates


def test_planted_counts_and_references(small):
    root, summary = small
    records = planted(root)
    expected = SMALL.duplicates.model_dump()
    assert {kind: sum(r["kind"] == kind for r in records) for kind in DUPLICATE_KINDS} == expected
    assert summary["planted"] == expected
    files = set(image_files(root))
    for record in records:
        assert record["original"] in files and record["copy"] in files
        assert record["original_label"] == LABEL_OF_FOLDER[record["original"].split("/")[1]]
        assert record["copy_label"] == LABEL_OF_FOLDER[record["copy"].split("/")[1]]
    assert len({r["original"] for r in records}) == len(records), "an original was copied twice"
    assert not {r["original"] for r in records} & {r["copy"] for r in records}


def test_conflicting_copies_change_class_and_the_others_keep_it(small):
    for record in planted(small[0]):
        changed = record["copy_label"] != record["original_label"]
        assert changed == (record["kind"] == "conflicting_label"), record


def test_about_half_of_each_kind_leaks_into_the_other_split(small):
    for kind in DUPLICATE_KINDS:
        records = [r for r in planted(small[0]) if r["kind"] == kind]
        moved = sum(r["copy"].split("/")[0] != r["original"].split("/")[0] for r in records)
        assert moved == (len(records) + 1) // 2, kind


def copies_of(root: Path, kind: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]]:
    """(original image, original mask, copy image, copy mask, record) of each copy of ``kind``."""
    def load(rel: str) -> tuple[np.ndarray, np.ndarray]:
        return cv2.imread(str(root / "images" / rel), cv2.IMREAD_UNCHANGED), read_mask(root, rel)

    return [(*load(r["original"]), *load(r["copy"]), r) for r in planted(root) if r["kind"] == kind]


def same_bytes(root: Path, record: dict) -> bool:
    return (root / "images" / record["copy"]).read_bytes() == (root / "images" / record["original"]).read_bytes()


def test_exact_copies_are_byte_identical(small):
    root, _ = small
    for record in planted(root):
        if record["kind"] == "exact":
            assert same_bytes(root, record), record


def to_gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def test_pixel_copies_keep_size_and_mask(small):
    for kind in ("reencoded", "grayscale_rgb", "conflicting_label"):
        for image, mask, copy, copy_mask, record in copies_of(small[0], kind):
            assert copy.shape[:2] == image.shape[:2] and np.array_equal(copy_mask, mask), record
            # Only encoding losses: JPEG at quality >= 60 moves a grey level by a couple on average.
            assert np.abs(to_gray(copy).astype(int) - to_gray(image)).mean() < 3, record
    for image, _, copy, _, record in copies_of(small[0], "grayscale_rgb"):
        assert (image.ndim == 2) != (copy.ndim == 2), f"{record}: channel count did not change"


def test_geometric_copies_transform_the_mask_like_the_image(small):
    root, _ = small
    size = SMALL.image_size
    for image, mask, copy, copy_mask, record in copies_of(root, "flipped"):
        assert np.array_equal(copy_mask, mask[:, ::-1]), record
    for image, mask, copy, copy_mask, record in copies_of(root, "resized"):
        assert copy.shape[0] == copy.shape[1] != size and copy_mask.shape == copy.shape[:2], record
    for kind in ("padded", "rotated", "rescaled"):
        for image, mask, copy, copy_mask, record in copies_of(root, kind):
            assert copy.shape[:2] == (size, size), record
            assert (copy_mask > 0).sum() == pytest.approx((mask > 0).sum(), rel=0.6, abs=20), record
    for image, mask, copy, copy_mask, record in copies_of(root, "cropped"):
        y0, y1, x0, x1 = head_box(read_gray(root, record["original"]))
        assert copy.shape[:2] in {(size, size), (y1 - y0, x1 - x0)}, record
    for kind in ("cropped", "padded", "rotated", "rescaled", "resized"):
        for image, mask, copy, copy_mask, record in copies_of(root, kind):
            if mask.any():  # the tumor moved with the image: its mask still covers the copy's tumor
                assert copy_mask.any(), record


def test_reencoded_copies_are_other_files(small):
    root, _ = small
    for record in planted(root):
        if record["kind"] == "reencoded":
            assert not same_bytes(root, record), record


# --------------------------------------------------------------------------- tumor locations


def mask_geometry(root: Path, rel: str) -> tuple[float, float, float]:
    """(largest elliptical radius of the mask, centroid x, centroid y), in units of the head box's half-sizes."""
    y0, y1, x0, x1 = head_box(read_gray(root, rel))
    cy, cx, half_h, half_w = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    ys, xs = np.nonzero(read_mask(root, rel))
    radius = np.sqrt(((xs - cx) / half_w) ** 2 + ((ys - cy) / half_h) ** 2)
    return float(radius.max()), float((xs.mean() - cx) / half_w), float((ys.mean() - cy) / half_h)


def originals_of(root: Path, folder: str) -> list[str]:
    return [rel for rel in originals(root) if rel.split("/")[1] == folder]


def test_meningiomas_reach_the_inner_skull(medium):
    for rel in originals_of(medium[0], "meningioma"):
        reach, _, _ = mask_geometry(medium[0], rel)
        assert reach > 0.6, f"{rel}: meningioma reaches only {reach:.2f} of the head radius"


def test_gliomas_stay_inside_the_brain(medium):
    for rel in originals_of(medium[0], "glioma"):
        reach, _, _ = mask_geometry(medium[0], rel)
        assert reach < 0.6, f"{rel}: glioma reaches {reach:.2f} of the head radius (near the edge)"


def test_pituitary_tumors_sit_low_on_the_midline(medium):
    for rel in originals_of(medium[0], "pituitary"):
        _, x, y = mask_geometry(medium[0], rel)
        assert abs(x) < 0.25 and 0.1 < y < 0.6, f"{rel}: pituitary centroid at ({x:.2f}, {y:.2f})"


# --------------------------------------------------------------------------- no shortcuts, no accidental duplicates


def test_brightness_contrast_and_file_size_do_not_reveal_the_class(medium):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    root, _ = medium
    rels = originals(root)
    grays = [read_gray(root, r) for r in rels]
    features = np.array([[g.mean(), g.std(), (root / "images" / r).stat().st_size] for g, r in zip(grays, rels)])
    labels = [r.split("/")[1] for r in rels]
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    models = (make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
              DecisionTreeClassifier(max_depth=3, random_state=0))
    for model in models:
        accuracy = cross_val_score(model, features, labels, cv=folds).mean()
        print(f"trivial-cue accuracy {type(model).__name__}: {accuracy:.3f}")
        assert accuracy < 0.45, f"{model} guesses the class from mean/std/size with accuracy {accuracy:.2f}"


def best_rotated_match(original: np.ndarray, copy: np.ndarray) -> float:
    """Best correlation of the copy's thumbnail with the original's, rotated by -8..8 degrees."""
    y0, y1, x0, x1 = head_box(original)
    thumb = cv2.resize(original[y0:y1, x0:x1], (32, 32), interpolation=cv2.INTER_AREA)
    target = thumbnail(copy)
    scores = []
    for angle in range(-8, 9):
        matrix = cv2.getRotationMatrix2D((15.5, 15.5), angle, 1.0)
        scores.append(float(standardised(cv2.warpAffine(thumb, matrix, (32, 32)).astype(np.float64)) @ target))
    return max(scores)


def test_distinct_slices_are_not_near_duplicates_but_planted_copies_are(medium):
    root, _ = medium
    rels = originals(root)
    thumbs = np.stack([thumbnail(read_gray(root, r)) for r in rels])
    mirrored = np.stack([thumbnail(read_gray(root, r)[:, ::-1]) for r in rels])
    similarity = np.maximum(thumbs @ thumbs.T, thumbs @ mirrored.T)
    np.fill_diagonal(similarity, -1.0)
    distinct_max = float(similarity.max())
    records = planted(root)
    rescaled = min(float(thumbnail(read_gray(root, r["original"])) @ thumbnail(read_gray(root, r["copy"])))
                   for r in records if r["kind"] == "rescaled")
    rotated = min(best_rotated_match(read_gray(root, r["original"]), read_gray(root, r["copy"]))
                  for r in records if r["kind"] == "rotated")
    print(f"distinct max {distinct_max:.3f}, rescaled min {rescaled:.3f}, rotated (aligned) min {rotated:.3f}")
    assert distinct_max < 0.9
    assert distinct_max < min(rescaled, rotated) - 0.05


def test_augmented_copies_move_image_and_mask_together():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = np.zeros((96, 96), np.uint8)
        mask[30:60, 40:70] = 255
        image, copy_mask = make_copy("augmented", mask.copy(), mask, rng)
        bright = image > 127
        union = (bright | (copy_mask > 0)).sum()
        # the square follows the same affine in both (brightness, contrast and gamma only move grey levels)
        assert union and (bright & (copy_mask > 0)).sum() / union > 0.8
        assert set(np.unique(copy_mask)) <= {0, 255}


def test_annotated_copies_mark_at_most_about_a_tenth_of_the_slice_in_grey(small):
    root, _ = small
    assert copies_of(root, "annotated")
    for original, original_mask, copy, copy_mask, record in copies_of(root, "annotated"):
        changed = np.abs(to_gray(copy).astype(int) - to_gray(original).astype(int)) > 24
        assert 0 < changed.mean() <= 0.12, record
        assert np.array_equal(copy_mask, original_mask)
        if copy.ndim == 3:  # grey marks: no colour for the merge to quarantine
            assert np.abs(copy.astype(int) - copy[..., :1].astype(int)).max() <= 2


def test_an_adjacent_slice_is_the_same_head_with_new_detail_not_a_copy():
    def pair(label: str, index: int):
        slice_rng = lambda: np.random.default_rng([0, 3, 1, index])  # noqa: E731  the original's generator state
        return (phantom.render_slice(slice_rng(), label, 128),
                phantom.render_adjacent_slice(slice_rng(), np.random.default_rng([7, index]), label, 128))

    for index, label in enumerate(CLASS_NAMES):
        (image, mask), (adjacent, adjacent_mask) = pair(label, index)
        again, _ = pair(label, index)[1]
        np.testing.assert_array_equal(adjacent, again)  # reproducible from its seeds
        box, adjacent_box = np.array(head_bbox(image, 12)), np.array(head_bbox(adjacent, 12))
        assert np.abs(box - adjacent_box).max() <= 6, (label, box, adjacent_box)  # the same head, where it was
        correlation = np.corrcoef(image.ravel().astype(float), adjacent.ravel().astype(float))[0, 1]
        assert 0.8 < correlation < 0.99, (label, correlation)  # alike, but new sulci, texture and noise
        if label == "no_tumor":
            assert not mask.any() and not adjacent_mask.any()
        else:  # the tumor continues into the neighbouring slice
            overlap = (mask & adjacent_mask).sum() / (mask | adjacent_mask).sum()
            assert overlap > 0.5, (label, overlap)
