"""The keypoint search finds the phantom's augmented and annotated re-uploads that the head-box search
misses, and joins no distinct slices; its pieces on hand-made transforms."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from braintumor.core.config import KeypointParams, NearDuplicateParams, PhantomDuplicates, PhantomSource, load_params
from braintumor.data.dedup import fingerprint_image
from braintumor.data.head import head_bbox
from braintumor.data.keypoints import (DETAIL_SIZE, correlation, keypoint_image, keypoint_shortlist, likelier_mirrored,
                                       match_keypoints,
                                       verify_keypoint_pairs,
                                      orb_keypoints, ratio_test_matches)
from braintumor.data.merge import merge_sources, planted_duplicate_recall
from braintumor.data.phantom.source import generate_phantom_source

from conftest import REPO

THRESHOLD = 12


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A phantom source with 6 augmented and 6 annotated copies among 80 slices."""
    root = tmp_path_factory.mktemp("phantom")
    kinds = {kind: 0 for kind in PhantomDuplicates.model_fields} | {"augmented": 6, "annotated": 6}
    generate_phantom_source(root, PhantomSource(kind="phantom", images_per_class=20, image_size=256, seed=3,
                                                duplicates=PhantomDuplicates(**kinds)))
    return root


def merged(root, keypoints: bool, **settings) -> tuple[dict, dict]:
    params = load_params(REPO / "params.yaml")
    near = params.merge.near_duplicates
    near = near.model_copy(update={"keypoints": near.keypoints.model_copy(update={"enabled": keypoints, **settings})})
    manifest, search, _, _ = merge_sources([("phantom", root / "images")], params.merge.folder_to_label(), root=root,
                                           head_threshold=THRESHOLD, max_colour_share=params.merge.max_colour_share,
                                           keep="largest", near=near, workers=1)
    return planted_duplicate_recall(manifest, "phantom", json.loads((root / "planted.json").read_text())), search


def test_the_keypoint_search_finds_what_the_head_box_search_misses(phantom):
    without, _ = merged(phantom, keypoints=False)
    with_keypoints, search = merged(phantom, keypoints=True, copy_correlation=0.75)  # its matches make copies too
    assert with_keypoints["planted"] == {"annotated": 6, "augmented": 6}
    assert without["recall"]["augmented"] < 1.0  # the gap this search closes
    assert with_keypoints["recall"] == {"annotated": 1.0, "augmented": 1.0}
    assert with_keypoints["false_merges"] == 0
    assert len(search.keypoint_candidates) > 0 and len(search.keypoint_inliers) == len(search.keypoint_candidates)
    # where the time went, part by part, the decoding first (the merge stage logs it)
    assert list(search.seconds) == ["inspect", "head_box_shortlist", "head_box_verification", "detail_check",
                                    "keypoint_shortlist", "keypoint_verification"]
    assert all(seconds >= 0 for seconds in search.seconds.values())


def test_by_default_its_matches_keep_both_images_in_one_split_group(phantom):
    scores, _ = merged(phantom, keypoints=True)  # params.yaml: copy_correlation 1.0
    assert scores["split_recall"] == {"annotated": 1.0, "augmented": 1.0}
    without, _ = merged(phantom, keypoints=False)
    assert scores["recall"] == without["recall"]  # no copy group beyond the head-box search's


def test_verification_in_two_threads_gives_what_one_gives(phantom):
    files = sorted((phantom / "images").rglob("*.jpg"))
    found = [keypoints_of(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)) for f in files]
    pairs, mirrored = keypoint_shortlist(found, words=64, neighbours=10)
    assert len(pairs) > 2 * 256  # several chunks, handed out to both threads
    one = verify_keypoint_pairs(found, pairs, min_inliers=15, mirrored=mirrored, workers=1)
    two = verify_keypoint_pairs(found, pairs, min_inliers=15, mirrored=mirrored, workers=2)
    assert (one[0] >= 15).sum() >= 6  # the planted copies verify: the comparison is not of empty results
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    empty = verify_keypoint_pairs(found, pairs[:0], min_inliers=15, mirrored=mirrored[:0], workers=2)
    assert [len(a) for a in empty] == [0, 0]


def slice_image(phantom) -> np.ndarray:
    return cv2.imread(str(sorted((phantom / "images" / "Training" / "glioma").glob("*.jpg"))[0]), cv2.IMREAD_GRAYSCALE)


def keypoints_of(image: np.ndarray):
    return fingerprint_image(image, THRESHOLD, keypoint_features=300).keypoints


def test_a_turned_zoomed_cut_flipped_darker_copy_matches_and_another_slice_does_not(phantom):
    image = slice_image(phantom)
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D((w / 2 + 10, h / 2 - 8), 17.0, 1.2)  # zoomed in: part of the head is cut off
    copy = cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)[:, ::-1]
    copy = np.clip(255 * (copy / 255.0) ** 1.3 * 0.85, 0, 255).astype(np.uint8)
    copy = cv2.imdecode(cv2.imencode(".jpg", copy, [cv2.IMWRITE_JPEG_QUALITY, 40])[1], cv2.IMREAD_GRAYSCALE)
    other = cv2.imread(str(sorted((phantom / "images" / "Training" / "meningioma").glob("*.jpg"))[3]), cv2.IMREAD_GRAYSCALE)
    original, turned, different = keypoints_of(image), keypoints_of(copy), keypoints_of(other)
    inliers, score = match_keypoints(original, turned, min_matches=15)
    assert inliers >= 15 and score >= 0.75
    assert match_keypoints(original, turned, min_matches=15, mirrored=True) == (inliers, score)  # it is flipped
    assert match_keypoints(original, turned, min_matches=15, mirrored=False)[0] < 15
    inliers, score = match_keypoints(original, different, min_matches=15)
    assert inliers < 15 or score < 0.5
    # among the phantom's 92 slices, the shortlist puts the copy among the original's neighbours, and
    # its word histograms say which way to match it: flipped
    files = sorted((phantom / "images").rglob("*.jpg"))
    found = [keypoints_of(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)) for f in files] + [turned]
    pairs, mirrored = keypoint_shortlist(found, words=64, neighbours=10)
    pair = [files.index(sorted((phantom / "images" / "Training" / "glioma").glob("*.jpg"))[0]), len(files)]
    assert pair in pairs.tolist() and mirrored[pairs.tolist().index(pair)]


def test_a_copy_saved_much_darker_matches_although_its_head_box_shrinks(phantom):
    image = cv2.imread(str(sorted((phantom / "images" / "Training" / "glioma").glob("*.jpg"))[10]), cv2.IMREAD_GRAYSCALE)
    dark = np.clip(255 * (image / 255.0) ** 2.0 * 0.5, 0, 255).astype(np.uint8)
    y0, y1, x0, x1 = head_bbox(dark, THRESHOLD)
    h0, h1, w0, w1 = head_bbox(image, THRESHOLD)
    assert (y1 - y0) * (x1 - x0) < 0.6 * (h1 - h0) * (w1 - w0)  # most of the darker head is below the threshold
    # on that shrunken box the pair scored 0.63 (a look-alike); the whole slice keeps it a copy
    assert keypoint_image(dark).shape == (DETAIL_SIZE, DETAIL_SIZE) == keypoint_image(image).shape
    inliers, score = match_keypoints(keypoints_of(image), keypoints_of(dark), min_matches=15)
    assert inliers >= 15 and score >= 0.75


def test_keypoints_are_found_on_the_whole_slice_its_longer_side_fixed():
    wide = np.zeros((100, 300), np.uint8)
    assert keypoint_image(wide).shape == (64, DETAIL_SIZE)
    assert keypoint_image(wide.T).shape == (DETAIL_SIZE, 64)
    small = np.zeros((96, 80), np.uint8)
    small[40:56, 30:50] = 200
    enlarged = keypoint_image(small)
    assert enlarged.shape == (DETAIL_SIZE, 160)
    assert len(np.unique(enlarged)) > 2  # enlarged smoothly, not into blocks of two grey levels


def test_ratio_test_matches_are_opencvs_brute_force_matches():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (120, 32), dtype=np.uint8)
    # queries near some train descriptors (a few bits flipped), and random ones that mostly fail the test
    near = train[rng.choice(120, 40, replace=False)] ^ (rng.random((40, 32)) < 0.03).astype(np.uint8)
    queries = [near, rng.integers(0, 256, (60, 32), dtype=np.uint8), np.zeros((0, 32), np.uint8)]
    found = ratio_test_matches(train, queries, ratio=0.8)
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    for query, (rows, matched) in zip(queries, found):
        expected = [(m[0].queryIdx, m[0].trainIdx) for m in (matcher.knnMatch(query, train, k=2) if len(query) else [])
                    if m[0].distance < 0.8 * m[1].distance]
        assert list(zip(rows.tolist(), matched.tolist())) == expected
    assert len(found[0][0]) >= 35 and len(found[2][0]) == 0
    assert [len(r) for r, _ in ratio_test_matches(train[:1], queries, 0.8)] == [0, 0, 0]  # one train descriptor: no ratio


def test_a_pair_is_likelier_mirrored_when_the_mirror_histogram_is_nearer():
    plain = np.float32([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]])
    mirrored = np.float32([[0, 1, 0], [0, 0.6, 0.8], [1, 0, 0]])
    pairs = np.array([[0, 1], [0, 2], [1, 2]] * 3000)  # several blocks of 4,096
    # 0-1: 0.8 as it is, 0.0 mirrored; 0-2: 0 against 1; 1-2: 0 against 0.8
    assert likelier_mirrored(plain, mirrored, pairs).tolist() == [False, True, True] * 3000


def test_correlation_is_pearsons_and_flat_pixels_score_minus_one():
    x = np.arange(50, dtype=np.uint8)
    assert correlation(x, 2 * x + 3) == pytest.approx(1.0)
    assert correlation(x, 200 - x) == pytest.approx(-1.0)
    assert correlation(x, np.full(50, 7, np.uint8)) == -1.0


def test_a_blank_image_has_no_keypoints_and_matches_nothing():
    blank = orb_keypoints(np.zeros((192, 192), np.uint8), 300)
    assert blank.descriptors.shape == (0, 32) and blank.mirrored_points.shape == (0, 2)
    assert match_keypoints(blank, blank, min_matches=15) == (0, -1.0)


def test_keypoint_params_are_checked_at_load():
    with pytest.raises(ValidationError, match="related_correlation .* must not exceed copy_correlation"):
        KeypointParams(copy_correlation=0.6, related_correlation=0.7)
    defaults = NearDuplicateParams().keypoints  # on, linking matches into one split without removing either image
    assert defaults.enabled is True and defaults.copy_correlation == 1.0 and defaults.related_correlation == 0.7


def test_a_small_vocabulary_sample_prints_no_faiss_warning(capfd):
    from braintumor.data.keypoints import _kmeans_vocabulary

    descriptors = np.random.default_rng(0).integers(0, 256, (120, 32), dtype=np.uint8)  # under 39 per word
    vocabulary = _kmeans_vocabulary(descriptors, 100, seed=0)
    assert vocabulary.shape == (100, 32) and vocabulary.dtype == np.uint8
    assert capfd.readouterr().err == ""  # FAISS writes "WARNING clustering 120 points to 100 centroids" to fd 2


def test_faiss_threads_sleep_while_they_wait_unless_the_user_says_otherwise():
    import os
    import subprocess
    import sys

    code = ("import os; from braintumor.data.keypoints import load_faiss; load_faiss(); "
            "print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)  # noqa: E731
    assert run(env).stdout.strip() == "PASSIVE"
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"}).stdout.strip() == "ACTIVE"
