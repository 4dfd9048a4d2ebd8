"""Duplicate search on tiny hand-made slices: a copy, a rotated copy, an adjacent slice, a different one.

The slices are drawn with OpenCV (a 96 px head of two ellipses with a few blobs and two "ventricles"), so
every relation is known: the rotated copy is the same pixels turned 5 degrees, the adjacent slice moves
the ventricles 4 px (the next slice of one series), the different slice shares nothing.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from braintumor.core.config import KeypointParams, NearDuplicateParams
from braintumor.data.dedup import (detail_scores, exact_pairs, find_duplicate_groups, fingerprint_image, group_ids,
                                   verify_pairs, verify_pairs_posed)

THRESHOLD = 12  # preprocess.head_threshold's default
# Everything reaches verification (no shortlist cut: five images have no meaningful dataset mean), and
# the related level sits between the adjacent slice (~0.93) and the different one (~0.67).
# The head-box search alone (the keypoint search has its own tests in test_keypoints.py).
HEAD_BOX_ONLY = KeypointParams(enabled=False)
PARAMS = NearDuplicateParams(shortlist_similarity=-1.0, verify_similarity=0.95, related_similarity=0.90, detail_similarity=0,
                             keypoints=HEAD_BOX_ONLY)


def head_slice(ventricle_shift: int = 0) -> np.ndarray:
    img = np.zeros((96, 96), np.uint8)
    cv2.ellipse(img, (48, 48), (34, 40), 0, 0, 360, 120, -1)
    cv2.ellipse(img, (48, 48), (28, 34), 0, 0, 360, 170, -1)
    rng = np.random.default_rng(0)
    for _ in range(6):
        centre = tuple(int(v) for v in rng.integers(30, 66, 2))
        cv2.circle(img, centre, int(rng.integers(3, 8)), int(rng.integers(40, 250)), -1)
    cv2.ellipse(img, (40 + ventricle_shift, 44), (5, 10), 0, 0, 360, 60, -1)
    cv2.ellipse(img, (56 - ventricle_shift, 44), (5, 10), 0, 0, 360, 60, -1)
    return img


def different_slice() -> np.ndarray:
    img = np.zeros((96, 96), np.uint8)
    cv2.ellipse(img, (48, 48), (40, 30), 0, 0, 360, 150, -1)
    cv2.rectangle(img, (30, 40), (66, 56), 230, -1)
    cv2.circle(img, (48, 30), 6, 40, -1)
    return img


@pytest.fixture(scope="module")
def slices() -> list[np.ndarray]:
    original = head_slice()
    rotated = cv2.warpAffine(original, cv2.getRotationMatrix2D((48, 48), 5, 1.0), (96, 96))
    return [original, original.copy(), rotated, head_slice(ventricle_shift=4), different_slice()]


def test_exact_pairs_link_each_repeat_to_the_first_with_its_hash():
    assert exact_pairs(["a", "b", "a", "c", "a", "b"]).tolist() == [[0, 2], [0, 4], [1, 5]]
    assert exact_pairs(["a", "b"]).shape == (0, 2) and exact_pairs([]).dtype == np.int64


def test_group_ids_are_connected_components_numbered_by_first_member():
    # 0-3 and 3-4 join {0, 3, 4}; 2-1 joins {1, 2}; 5 is alone.
    assert group_ids(6, np.array([[0, 3], [3, 4], [2, 1]])).tolist() == [0, 1, 1, 0, 0, 2]
    assert group_ids(3, np.empty((0, 2), np.int64)).tolist() == [0, 1, 2]


def test_fingerprint_ignores_the_file_encoding_of_identical_pixels(slices):
    rgb = cv2.cvtColor(slices[0], cv2.COLOR_GRAY2BGR)
    first, second = fingerprint_image(slices[0], THRESHOLD), fingerprint_image(rgb, THRESHOLD)
    assert first.pixel_hash == second.pixel_hash
    np.testing.assert_array_equal(first.canonical, second.canonical)


def test_verification_scores_order_copy_rotation_adjacent_different(slices):
    prints = [fingerprint_image(s, THRESHOLD) for s in slices]
    heads, canonical = np.stack([p.head for p in prints]), np.stack([p.canonical for p in prints])
    copy, rotated, adjacent, different = verify_pairs(heads, canonical, np.array([[0, 1], [0, 2], [0, 3], [0, 4]]),
                                                      THRESHOLD, PARAMS.max_rotation_deg, PARAMS.rotation_step_deg)
    assert copy == pytest.approx(1.0, abs=1e-5)
    assert rotated >= 0.99  # the rotation search turns it back
    assert 0.91 < adjacent < 0.95  # alike, but not a copy
    assert different < 0.8


def test_verification_remembers_the_pose_the_detail_check_starts_from(slices):
    mirrored = cv2.warpAffine(np.ascontiguousarray(slices[0][:, ::-1]), cv2.getRotationMatrix2D((48, 48), -6, 1.0), (96, 96))
    prints = [fingerprint_image(s, THRESHOLD, detail=True) for s in (slices[0], slices[2], mirrored, slices[3])]
    heads, canonical = np.stack([p.head for p in prints]), np.stack([p.canonical for p in prints])
    pairs = np.array([[0, 1], [0, 2], [0, 3]])
    scores, poses = verify_pairs_posed(heads, canonical, pairs, THRESHOLD, 8.0, 2.0)
    np.testing.assert_array_equal(scores, verify_pairs(heads, canonical, pairs, THRESHOLD, 8.0, 2.0))
    assert poses.mirrored.tolist() == [False, True, False]
    assert 4.0 <= abs(float(poses.angle[0])) <= 6.0 and 4.0 <= abs(float(poses.angle[1])) <= 8.0  # turned 5 and 6 degrees
    assert all(t in pair for t, pair in zip(poses.turned.tolist(), pairs.tolist()))  # one of its own pair
    details = [p.detail for p in prints]
    started = detail_scores(details, pairs, THRESHOLD, 8.0, enough=0.98, poses=poses)
    searched = detail_scores(details, pairs, THRESHOLD, 8.0, enough=0.98)
    assert (started[:2] >= 0.98).all() and (searched[:2] >= 0.98).all()  # both copies, from the pose or by search
    assert started[2] < 0.98 and started[2] >= searched[2]  # the neighbouring slice: searched too, never worse


def test_find_duplicate_groups_on_the_four_relations(slices):
    search = find_duplicate_groups([fingerprint_image(s, THRESHOLD) for s in slices], THRESHOLD, PARAMS)
    assert search.exact.tolist() == [[0, 1]]
    assert {tuple(sorted(p)) for p in search.near.tolist()} == {(0, 2), (1, 2)}  # the rotated copy, of both
    assert search.groups.tolist() == [0, 0, 0, 1, 2]  # copies of one slice: one kept later
    assert search.related.tolist() == [0, 0, 0, 0, 1]  # the adjacent slice shares their split
    assert search.shortlisted == 10  # every pair of five was verified


def test_near_search_off_finds_only_exact_copies(slices):
    off = PARAMS.model_copy(update={"enabled": False})
    search = find_duplicate_groups([fingerprint_image(s, THRESHOLD) for s in slices], THRESHOLD, off)
    assert search.groups.tolist() == search.related.tolist() == [0, 0, 1, 2, 3] and search.shortlisted == 0


@pytest.mark.parametrize("index", [0, 3])  # adjacent slices at 0.96 and 0.989 on the 64 px check
def test_detail_check_keeps_a_neighbouring_slice_that_passes_as_a_copy_at_64_px(index):
    from braintumor.data.phantom.copies import make_copy
    from braintumor.data.phantom.source import render_adjacent_slice, render_slice

    original, mask = render_slice(np.random.default_rng([0, index]), "meningioma", 256)
    adjacent, _ = render_adjacent_slice(np.random.default_rng([0, index]), np.random.default_rng([1, index]),
                                        "meningioma", 256)
    copy, _ = make_copy("rescaled", original, mask.astype(np.uint8) * 255, np.random.default_rng([2, index]))
    prints = [fingerprint_image(image, THRESHOLD, detail=True) for image in (original, copy, adjacent)]
    coarse = NearDuplicateParams(shortlist_similarity=-1.0, detail_similarity=0, keypoints=HEAD_BOX_ONLY)
    assert find_duplicate_groups(prints, THRESHOLD, coarse).groups.tolist() == [0, 0, 0]  # the gap it closes
    search = find_duplicate_groups(prints, THRESHOLD, coarse.model_copy(update={"detail_similarity": 0.99}))
    assert search.groups.tolist() == [0, 0, 1]  # the copy stays a copy, the neighbouring slice is kept
    assert search.related.tolist() == [0, 0, 0]  # and goes into the same split
    assert search.detail_apart.sum() == 2 and (search.detail_scores[~search.detail_apart] > 0.995).all()


def test_detail_check_needs_detail_heads():
    prints = [fingerprint_image(head_slice(), THRESHOLD), fingerprint_image(cv2.resize(head_slice(), (120, 120)), THRESHOLD)]
    with pytest.raises(ValueError, match="detail_similarity is on, but the fingerprints carry no detail"):
        find_duplicate_groups(prints, THRESHOLD, PARAMS.model_copy(update={"detail_similarity": 0.99}))


def test_detail_check_in_two_threads_gives_what_one_gives():
    from braintumor.data.dedup import _detail_check
    from braintumor.data.phantom.copies import make_copy
    from braintumor.data.phantom.source import render_adjacent_slice, render_slice

    original, mask = render_slice(np.random.default_rng([0, 3]), "glioma", 128)
    adjacent, _ = render_adjacent_slice(np.random.default_rng([0, 3]), np.random.default_rng([1, 3]), "glioma", 128)
    copy, _ = make_copy("rotated", original, mask.astype(np.uint8) * 255, np.random.default_rng([2, 3]))
    prints = [fingerprint_image(image, THRESHOLD, detail=True) for image in (original, copy, adjacent)]
    heads, canonical = np.stack([p.head for p in prints]), np.stack([p.canonical for p in prints])
    pairs = np.tile(np.array([[0, 1], [0, 2], [1, 2]]), (60, 1))  # 180 pairs: three chunks of 60, two threads
    _, poses = verify_pairs_posed(heads, canonical, pairs, THRESHOLD, 8.0, 2.0)
    near = NearDuplicateParams(detail_similarity=0.98)
    one = _detail_check(prints, pairs, THRESHOLD, near, poses, workers=1)
    two = _detail_check(prints, pairs, THRESHOLD, near, poses, workers=2)
    np.testing.assert_array_equal(one, two)
    assert one[0] >= 0.98 > one[1]  # the copy passes, the neighbouring slice does not
    assert _detail_check(prints, pairs[:0], THRESHOLD, near, poses.take(np.arange(0)), workers=2).shape == (0,)


def test_a_heads_outline_is_the_convex_hull_of_all_its_foreground_pixels():
    from braintumor.data.dedup import _head_outline
    from braintumor.data.head import head_bbox

    rng = np.random.default_rng(0)
    heads = [head_slice(), different_slice()]
    for _ in range(3):  # a head with stray bright islands, as real slices have (text, a scanner's marks)
        image = head_slice(int(rng.integers(0, 5)))
        for _ in range(4):
            cv2.circle(image, tuple(int(v) for v in rng.integers(2, 94, 2)), int(rng.integers(1, 4)), 200, -1)
        heads.append(image)
    heads.append(np.zeros((96, 96), np.uint8))  # nothing above the threshold
    for head in heads:
        y0, y1, x0, x1 = head_bbox(head, THRESHOLD)
        _, mask = cv2.threshold(cv2.GaussianBlur(head, (3, 3), 0)[y0:y1, x0:x1], THRESHOLD, 255, cv2.THRESH_BINARY)
        pixels = cv2.findNonZero(mask)
        expected = (cv2.convexHull(pixels).reshape(-1, 2) + [x0, y0] if pixels is not None
                    else np.array([[x0, y0], [x1 - 1, y1 - 1]]))
        outline = _head_outline(head, THRESHOLD)
        assert set(map(tuple, outline.astype(int).tolist())) == set(map(tuple, expected.tolist()))
