"""The keypoint search finds the phantom's augmented and annotated re-uploads that the head-box search
misses, and joins no distinct slices; its pieces on hand-made transforms."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from braintumor.core.config import KeypointParams, NearDuplicateParams, PhantomDuplicates, PhantomSource, load_params
from braintumor.data.dedup import (DuplicateSearch, find_duplicate_groups, fingerprint_image, head_box_similarity,
                                   verify_pairs_posed)
from braintumor.data.head import head_bbox
from braintumor.data.keypoints import (DETAIL_SIZE, KeypointMatch, copy_residual, correlation, could_be_copies,
                                       fit_and_correlate, keypoint_image, keypoint_shortlist, likelier_mirrored,
                                       links_worth_a_residual, match_keypoints, measure_copy_residuals, orb_keypoints,
                                       ratio_test_matches, verify_keypoint_pairs)
from braintumor.data.merge import merge_json, merge_sources, planted_duplicate_recall
from braintumor.data.merge_report import agreement_links, keypoint_links, merge_page
from braintumor.data.phantom.source import generate_phantom_source

from conftest import REPO

THRESHOLD = 12
COPY_RESIDUAL = load_params(REPO / "params.yaml").merge.near_duplicates.keypoints.copy_residual


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A phantom source with 6 augmented and 6 annotated copies among 80 slices."""
    return planted_phantom(tmp_path_factory.mktemp("phantom"), {"augmented": 6, "annotated": 6})


@pytest.fixture(scope="module")
def phantom_with_neighbours(tmp_path_factory):
    """The same kinds of copies and 6 neighbouring slices (distinct slices of one phantom head)."""
    return planted_phantom(tmp_path_factory.mktemp("neighbours"), {"augmented": 6, "annotated": 6, "adjacent_slice": 6})


def planted_phantom(root, planted: dict[str, int]):
    kinds = {kind: 0 for kind in PhantomDuplicates.model_fields} | planted
    generate_phantom_source(root, PhantomSource(kind="phantom", images_per_class=20, image_size=256, seed=3,
                                                duplicates=PhantomDuplicates(**kinds)))
    return root


def merged(root, keypoints: bool, **settings) -> tuple[dict, DuplicateSearch, pd.DataFrame]:
    params = load_params(REPO / "params.yaml")
    near = params.merge.near_duplicates
    near = near.model_copy(update={"keypoints": near.keypoints.model_copy(update={"enabled": keypoints, **settings})})
    manifest, search, _, _ = merge_sources([("phantom", root / "images")], params.merge.folder_to_label(), root=root,
                                           head_threshold=THRESHOLD, max_colour_share=params.merge.max_colour_share,
                                           keep="largest", near=near, workers=1)
    return planted_duplicate_recall(manifest, "phantom", json.loads((root / "planted.json").read_text())), search, manifest


def test_the_keypoint_search_finds_what_the_head_box_search_misses(phantom_with_neighbours):
    without, _, _ = merged(phantom_with_neighbours, keypoints=False)
    with_keypoints, search, manifest = merged(phantom_with_neighbours, keypoints=True)  # params.yaml: its residual test makes copies
    assert with_keypoints["planted"] == {"adjacent_slice": 6, "annotated": 6, "augmented": 6}
    assert without["recall"]["augmented"] < 0.5 and without["recall"]["annotated"] < 0.5  # the gap this search closes
    assert with_keypoints["recall"] == {"annotated": 1.0, "augmented": 1.0}
    assert with_keypoints["split_recall"] == {"annotated": 1.0, "augmented": 1.0}
    # neighbouring slices match too, but their residual keeps them: both kept, in one split group
    assert with_keypoints["adjacent"] == {"kept": 1.0, "same_split_group": 1.0}
    assert with_keypoints["false_merges"] == 0 and with_keypoints["split_groups_joining_heads"] == 0
    assert len(search.keypoint_candidates) > 0
    assert len(search.keypoint_inliers) == len(search.keypoint_residual) == len(search.keypoint_candidates)
    # where the time went, part by part, the decoding first (the merge stage logs it)
    assert list(search.seconds) == ["inspect", "head_box_shortlist", "head_box_verification", "detail_check",
                                    "keypoint_shortlist", "keypoint_verification", "keypoint_agreement",
                                    "keypoint_copy_residual"]
    assert all(seconds >= 0 for seconds in search.seconds.values())
    counts = merge_json(manifest, search, {}, {})["near_duplicate_search"]  # in merge.json
    assert counts["keypoint_residuals_measured"] >= counts["keypoint_copy_pairs"] == int(search.keypoint_copy.sum()) >= 6
    # the merge report samples the links on both sides of the copy residual threshold, for a look by eye
    keypoints = load_params(REPO / "params.yaml").merge.near_duplicates.keypoints
    ids, residuals, threshold = keypoint_links(manifest, search, keypoints)
    assert len(ids) == len(residuals) >= 12 and threshold == COPY_RESIDUAL and set(ids.ravel()) <= set(manifest["id"])
    # and the matches the agreement rule scored, on both sides of its head-box level
    agreement = agreement_links(manifest, search, keypoints)
    assert len(agreement[0]) == len(agreement[1]) == len(search.agreement_pairs) and agreement[2] == 0.9
    assert set(agreement[0].ravel()) <= set(manifest["id"])
    html = merge_page(manifest, search, load_params(REPO / "params.yaml").merge.near_duplicates, phantom_with_neighbours)
    assert f"Pairs just below the keypoint copy residual threshold ({COPY_RESIDUAL:.3f})" in html
    assert "Pairs just above the agreement threshold (0.900)" in html


def test_with_copy_residual_0_its_matches_keep_both_images_in_one_split_group(phantom):
    scores, search, manifest = merged(phantom, keypoints=True, copy_residual=0.0)
    assert scores["split_recall"] == {"annotated": 1.0, "augmented": 1.0}
    without, _, _ = merged(phantom, keypoints=False)
    assert scores["recall"] == without["recall"]  # no copy group beyond the head-box search's
    assert np.isinf(search.keypoint_residual).all()  # and no residual measured
    keypoints = NearDuplicateParams().keypoints
    assert keypoint_links(manifest, search, keypoints) is None  # so the merge report shows no residual band
    assert agreement_links(manifest, search, keypoints) is None  # nor an agreement band (the model's default: off)


def test_verification_in_two_threads_gives_what_one_gives(phantom):
    files = sorted((phantom / "images").rglob("*.jpg"))
    found = [keypoints_of(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)) for f in files]
    pairs, mirrored = keypoint_shortlist(found, words=64, neighbours=10)
    assert len(pairs) > 2 * 256  # several chunks, handed out to both threads
    one = verify_keypoint_pairs(found, pairs, min_inliers=15, mirrored=mirrored, workers=1)
    two = verify_keypoint_pairs(found, pairs, min_inliers=15, mirrored=mirrored, workers=2)
    assert (one[0] >= 15).sum() >= 6  # the planted copies verify: the comparison is not of empty results
    assert np.isnan(one[2][one[0] == 0]).all() and not np.isnan(one[2][one[0] >= 15]).any()
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    empty = verify_keypoint_pairs(found, pairs[:0], min_inliers=15, mirrored=mirrored[:0], workers=2)
    assert [len(a) for a in empty] == [0, 0, 0]
    linked = np.flatnonzero((one[0] >= 15) & (one[1] >= 0.7))
    residuals = [measure_copy_residuals(found, pairs[linked], mirrored[linked], one[2][linked], workers=w) for w in (1, 2)]
    np.testing.assert_array_equal(*residuals)
    assert (residuals[0] <= COPY_RESIDUAL).sum() >= 6  # the planted copies
    unmatched = np.flatnonzero(one[0] == 0)[:3]
    assert np.isinf(measure_copy_residuals(found, pairs[unmatched], mirrored[unmatched], one[2][unmatched])).all()


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
    found = match_keypoints(original, turned, min_matches=15)
    assert found.inliers >= 15 and found.correlation >= 0.75
    assert match_keypoints(original, turned, min_matches=15, mirrored=True) == found  # it is flipped
    assert match_keypoints(original, turned, min_matches=15, mirrored=False).inliers < 15
    assert copy_residual(original.image, np.ascontiguousarray(turned.image[:, ::-1]), found.matrix) <= COPY_RESIDUAL
    other_slice = match_keypoints(original, different, min_matches=15)
    assert other_slice.inliers < 15 or other_slice.correlation < 0.5
    # among the phantom's 92 slices, the shortlist puts the copy among the original's neighbours, and
    # its word histograms say which way to match it: flipped
    files = sorted((phantom / "images").rglob("*.jpg"))
    found = [keypoints_of(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)) for f in files] + [turned]
    pairs, mirrored = keypoint_shortlist(found, words=64, neighbours=10)
    pair = [files.index(sorted((phantom / "images" / "Training" / "glioma").glob("*.jpg"))[0]), len(files)]
    assert pair in pairs.tolist() and mirrored[pairs.tolist().index(pair)]


def test_a_fit_with_too_few_inliers_is_not_warped_or_correlated(phantom):
    image = slice_image(phantom)
    h, w = image.shape
    copy = cv2.warpAffine(image, cv2.getRotationMatrix2D((w / 2, h / 2), 9.0, 1.1), (w, h))
    original, turned = keypoints_of(image), keypoints_of(copy)
    measured = match_keypoints(original, turned, min_matches=15, mirrored=False)
    assert measured.inliers >= 15 and measured.correlation >= 0.75
    # the same matches, a minimum the fit cannot reach: its inliers and transform are kept, the correlation
    # (two warps) is not measured, so the pair cannot become a link
    (query, train), = ratio_test_matches(original.descriptors, [turned.descriptors], 0.8)
    unreached = fit_and_correlate(original, turned.points[query], original.points[train], turned.image,
                                  min_inliers=measured.inliers + 1)
    assert unreached.inliers == measured.inliers and unreached.correlation == -1.0
    np.testing.assert_array_equal(unreached.matrix, measured.matrix)
    assert fit_and_correlate(original, turned.points[query], original.points[train], turned.image,
                             min_inliers=measured.inliers) == measured


def test_a_copy_saved_much_darker_matches_although_its_head_box_shrinks(phantom):
    image = cv2.imread(str(sorted((phantom / "images" / "Training" / "glioma").glob("*.jpg"))[10]), cv2.IMREAD_GRAYSCALE)
    dark = np.clip(255 * (image / 255.0) ** 2.0 * 0.5, 0, 255).astype(np.uint8)
    y0, y1, x0, x1 = head_bbox(dark, THRESHOLD)
    h0, h1, w0, w1 = head_bbox(image, THRESHOLD)
    assert (y1 - y0) * (x1 - x0) < 0.6 * (h1 - h0) * (w1 - w0)  # most of the darker head is below the threshold
    # on that shrunken box the pair scored 0.63 (a look-alike); the whole slice keeps it a copy
    assert keypoint_image(dark).shape == (DETAIL_SIZE, DETAIL_SIZE) == keypoint_image(image).shape
    found = match_keypoints(keypoints_of(image), keypoints_of(dark), min_matches=15)
    assert found.inliers >= 15 and found.correlation >= 0.75
    # the grey-level mapping undoes the gamma and the darkening
    assert copy_residual(keypoint_image(image), keypoint_image(dark), found.matrix) <= COPY_RESIDUAL


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
    assert match_keypoints(blank, blank, min_matches=15) == KeypointMatch(0, -1.0, None)


def test_keypoint_params_are_checked_at_load():
    with pytest.raises(ValidationError, match="copy_residual"):
        KeypointParams(copy_residual=-0.1)
    with pytest.raises(ValidationError, match="residual_correlation"):
        KeypointParams(residual_correlation=1.5)
    with pytest.raises(ValidationError, match="agreement_similarity"):
        KeypointParams(agreement_similarity=1.2)
    defaults = NearDuplicateParams().keypoints  # the model's default: on, links only
    assert defaults.enabled is True and defaults.copy_residual == 0.0 and defaults.related_correlation == 0.7
    assert defaults.agreement_correlation == 0.0  # no look-alikes by agreement unless params.yaml asks
    assert 0 < COPY_RESIDUAL < 0.1  # params.yaml's: matches that are copies remove one image


def test_the_nearest_code_is_the_nearest_by_hamming_distance():
    from braintumor.data.keypoints import _nearest

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 32), dtype=np.uint8)
    descriptors = rng.integers(0, 256, (500, 32), dtype=np.uint8)
    distances = np.unpackbits(descriptors[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)  # the slow plain way
    nearest = _nearest(codes, descriptors)
    assert (distances[np.arange(500), nearest] == distances.min(axis=1)).all()
    assert (_nearest(codes, codes) == np.arange(64)).all()


def test_the_vocabulary_finds_the_words_that_descriptors_are_noisy_copies_of():
    from braintumor.data.keypoints import _kmajority_vocabulary

    rng = np.random.default_rng(0)
    words = rng.integers(0, 256, (16, 32), dtype=np.uint8)
    bits = np.unpackbits(words[rng.integers(0, 16, 3000)], axis=1)
    flipped = rng.random(bits.shape) < 0.1  # about 26 of the 256 bits of each descriptor
    descriptors = np.packbits(bits ^ flipped, axis=1)
    vocabulary = _kmajority_vocabulary(descriptors, 16, seed=0)
    distance = np.unpackbits(words[:, None, :] ^ vocabulary[None, :, :], axis=2).sum(axis=2)
    # a word the iterations settle on is recovered bit for bit by the majority of its ~190 noisy members
    # (the mean of any other bits would sit ~26 bits off); like any k-means from random starting points,
    # a start or two can settle between two words instead (here one, 117 bits off its nearest)
    assert (distance.min(axis=1) == 0).sum() >= 14


def test_a_vocabulary_of_a_small_sample_has_its_words_and_prints_nothing(capfd):
    from braintumor.data.keypoints import _kmajority_vocabulary

    descriptors = np.random.default_rng(0).integers(0, 256, (120, 32), dtype=np.uint8)
    vocabulary = _kmajority_vocabulary(descriptors, 100, seed=0)
    assert vocabulary.shape == (100, 32) and vocabulary.dtype == np.uint8
    assert len(np.unique(vocabulary, axis=0)) == 100
    assert capfd.readouterr().err == ""
    assert _kmajority_vocabulary(descriptors[:30], 100, seed=0).shape == (30, 32)  # never more words than descriptors


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


def test_the_copy_residual_ignores_grey_level_mappings_and_marks_but_not_another_slice(phantom_with_neighbours):
    phantom = phantom_with_neighbours
    planted = json.loads((phantom / "planted.json").read_text())
    original = slice_image(phantom)
    fixed = keypoint_image(original)
    identity = np.float32([[1, 0, 0], [0, 1, 0]])
    assert copy_residual(fixed, fixed, identity) < 1e-3
    darker = np.clip(255 * (fixed / 255.0) ** 1.4 * 0.8, 0, 255).astype(np.uint8)  # a monotone mapping
    assert copy_residual(fixed, darker, identity) < 0.01
    marked = fixed.copy()
    cv2.putText(marked, "SE 4 IM 12", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    cv2.rectangle(marked, (100, 100), (150, 150), 230, 2)
    assert copy_residual(fixed, marked, identity) < 0.01
    # the slice beside it in the same phantom head (the planted neighbours): a look-alike, not a copy
    for record in (r for r in planted if r["kind"] == "adjacent_slice"):
        a, b = (keypoint_image(cv2.imread(str(phantom / "images" / record[k]), cv2.IMREAD_GRAYSCALE)) for k in ("original", "copy"))
        assert copy_residual(a, b, identity) > COPY_RESIDUAL
    other_head = cv2.imread(str(sorted((phantom / "images" / "Training" / "meningioma").glob("*.jpg"))[3]), cv2.IMREAD_GRAYSCALE)
    assert copy_residual(fixed, keypoint_image(other_head), identity) > 3 * COPY_RESIDUAL
    # heads overlapping too little to compare
    assert copy_residual(fixed, fixed, np.float32([[1, 0, 150], [0, 1, 150]])) == float("inf")


def test_a_copy_whose_burnt_in_box_lowers_its_correlation_is_still_a_copy(phantom):
    files = sorted((phantom / "images").rglob("*.jpg"))
    image = cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE)
    h, w = image.shape
    boxed = image.copy()
    cv2.rectangle(boxed, (w // 2, h // 2), (3 * w // 4, 3 * h // 4), 255, -1)  # a filled box over part of the head
    found = match_keypoints(keypoints_of(image), keypoints_of(boxed), min_matches=15)
    near = load_params(REPO / "params.yaml").merge.near_duplicates
    floor = near.keypoints.residual_correlation
    assert found.inliers >= 15 and floor <= found.correlation < near.keypoints.related_correlation  # no look-alike
    assert copy_residual(keypoints_of(image).image, keypoints_of(boxed).image, found.matrix) <= COPY_RESIDUAL
    fingerprints = [fingerprint_image(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), THRESHOLD, keypoint_features=300, detail=True)
                    for f in files] + [fingerprint_image(boxed, THRESHOLD, keypoint_features=300, detail=True)]
    for floor, one_group in ((0.7, False), (floor, True)):  # residual measured on look-alikes only / params.yaml's
        # 256 words: the 4,096-word vocabulary of 93 slices took most of this test's time
        # (agreement off: it links this pair as a look-alike as well, its head-box score agrees)
        keypoints = near.keypoints.model_copy(update={"residual_correlation": floor, "words": 256,
                                                      "agreement_correlation": 0.0})
        search = find_duplicate_groups(fingerprints, THRESHOLD, near.model_copy(update={"keypoints": keypoints}))
        assert bool(search.groups[0] == search.groups[-1]) is one_group
        assert bool(search.related[0] == search.related[-1]) is one_group


def test_matches_that_could_be_copies_need_the_inliers_and_the_residual_correlation():
    keypoints = KeypointParams(min_inliers=15, related_correlation=0.7, residual_correlation=0.6, copy_residual=0.033)
    inliers = np.array([15, 14, 40, 40, 40])
    correlations = np.float32([0.9, 0.9, 0.65, 0.59, 0.6])
    assert could_be_copies(inliers, correlations, keypoints).tolist() == [True, False, True, False, True]


def test_the_residual_is_measured_on_the_best_links_of_each_pair_of_copy_groups():
    groups = np.array([0, 0, 0, 1, 1, 2, 3])  # images 0-2 are one copy group, 3-4 another
    pairs = np.array([[0, 3], [1, 3], [2, 4], [0, 4], [1, 4], [2, 5], [5, 6], [3, 6]])
    correlations = np.float32([0.80, 0.95, 0.90, 0.70, 0.85, 0.99, 0.75, 0.72])
    # groups 0-1 have five links: their best two (0.95, 0.90); every other pair of groups has one
    assert links_worth_a_residual(pairs, correlations, groups, 2).tolist() == [1, 2, 5, 6, 7]
    assert links_worth_a_residual(pairs, correlations, groups, 5).tolist() == list(range(8))
    assert links_worth_a_residual(pairs[:0], correlations[:0], groups, 2).tolist() == []


def test_a_match_under_the_look_alike_level_links_when_the_head_box_search_agrees(phantom_with_neighbours):
    """Neighbouring slices that each search alone scores just under its look-alike level: the keypoint
    match (here: its look-alike level raised out of reach) links them when the head-box score agrees."""
    planted = json.loads((phantom_with_neighbours / "planted.json").read_text())
    neighbours = [r for r in planted if r["kind"] == "adjacent_slice"]
    files = sorted(f.relative_to(phantom_with_neighbours / "images").as_posix()
                   for f in (phantom_with_neighbours / "images").rglob("*.jpg"))  # all: the vocabulary needs them
    fingerprints = [fingerprint_image(cv2.imread(str(phantom_with_neighbours / "images" / f), cv2.IMREAD_GRAYSCALE),
                                      THRESHOLD, keypoint_features=300, detail=True) for f in files]
    pairs = {tuple(sorted((files.index(r["original"]), files.index(r["copy"])))) for r in neighbours}
    near = load_params(REPO / "params.yaml").merge.near_duplicates
    # neither search links anything on its own: both levels at 1.0
    apart = near.model_copy(update={"verify_similarity": 1.0, "related_similarity": 1.0, "keypoints": near.keypoints.model_copy(
        update={"related_correlation": 1.0, "residual_correlation": 1.0, "agreement_correlation": 0.0, "words": 256})})

    def joined(agreement_correlation: float, agreement_similarity: float) -> set[tuple[int, int]]:
        keypoints = apart.keypoints.model_copy(update={"agreement_correlation": agreement_correlation,
                                                       "agreement_similarity": agreement_similarity})
        search = find_duplicate_groups(fingerprints, THRESHOLD, apart.model_copy(update={"keypoints": keypoints}))
        assert len(search.related_pairs) == search.keypoint_agreed.sum()  # the only links: by agreement
        return {pair for pair in pairs if search.related[pair[0]] == search.related[pair[1]]}

    assert joined(0.0, 0.5) == set()  # off
    agreed = joined(0.3, 0.5)
    assert len(agreed) >= 3  # the neighbours match (15 inliers, 0.3) and their heads score 0.5 or more
    assert joined(0.3, 0.999) == set()  # no head-box score that high: no link
    assert joined(0.999, 0.5) == set()  # no match that well correlated: no link


def test_head_box_similarity_reuses_the_shortlists_scores_and_verifies_the_other_pairs(phantom):
    files = sorted((phantom / "images").rglob("*.jpg"))[:6]
    fingerprints = [fingerprint_image(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), THRESHOLD) for f in files]
    heads, canonical = np.stack([f.head for f in fingerprints]), np.stack([f.canonical for f in fingerprints])
    near = NearDuplicateParams()
    pairs = np.array([[0, 1], [0, 4], [2, 3], [3, 5]])
    verified, _ = verify_pairs_posed(heads, canonical, pairs, THRESHOLD, near.max_rotation_deg, near.rotation_step_deg)
    shortlisted, scores = np.array([[0, 4], [1, 2], [3, 5]]), np.float32([0.123, 0.5, 0.456])  # sorted, as the shortlist's
    similarity = head_box_similarity(pairs, shortlisted, scores, heads, canonical, THRESHOLD, near)
    np.testing.assert_allclose(similarity, [verified[0], 0.123, verified[2], 0.456], rtol=1e-6)
    np.testing.assert_allclose(head_box_similarity(pairs, shortlisted[:0], scores[:0], heads, canonical, THRESHOLD, near),
                               verified, rtol=1e-6)
    assert len(head_box_similarity(pairs[:0], shortlisted, scores, heads, canonical, THRESHOLD, near)) == 0
