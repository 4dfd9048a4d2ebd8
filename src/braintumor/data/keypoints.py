"""Copies that the head-box search misses: keypoints matched under a similarity transform.

Re-uploads saved through an augmentation tool are rotated by up to 20 degrees, zoomed so that part of
the head is cut off, shifted, flipped, with other brightness, gamma and JPEG quality; others carry
burnt-in text, arrows or frames. The head box that :mod:`braintumor.data.dedup` normalises on moves
with every cut and every annotation, so its shortlist and its aligned correlation miss most of them.
Local features do not depend on the box:

1. ORB keypoints (OpenCV) on the whole slice, CLAHE-equalised, of the image and its mirror;
2. shortlist: a bag of visual words (k-majority vocabulary, TF-IDF, square-rooted counts) and the
   nearest neighbours by cosine, of the image and of its mirror image;
3. verification: ratio-test matches, a RANSAC-estimated similarity transform (rotation, scale,
   shift), and the correlation of the two heads after warping one onto the other, over the pixels
   both show; one way only, as it is or mirrored, whichever the word histograms find nearer (on
   Nickparvar + SARTAJ this halved the verification, 94 -> 56 s, and lost no planted copy).

A pair with enough RANSAC inliers and a correlation of 0.7 or more is a look-alike (both kept, one
split); lower look-alike levels chained slices of different classes. Whether a match is a copy (one
kept) the correlation cannot tell (as copies at 0.75 its matches removed real neighbouring slices);
:func:`copy_residual` does, measured on the matches correlated ``residual_correlation`` (0.6) or more
(benchmarks/dedup_recall.py, keypoint_links.py and neighbour_slices.py, README "Merge").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
import scipy.sparse

from braintumor.core.parallel import map_positions_in_threads, on_one_thread


def load_faiss():
    """FAISS, imported on first use (only the merge needs it), its OpenMP threads set to sleep while they
    wait (``OMP_WAIT_POLICY=PASSIVE``, unless set already). Spinning, they took 3.2 times as long for the
    vocabulary on 2 busy cores (140 s against 44 s, with a training run beside it); it is read once, when
    FAISS's own OpenMP library loads, so it is set before the first import."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss

    return faiss


DETAIL_SIZE = 192  # longer side of the whole slice the keypoints are found on
_BITS = 256  # an ORB descriptor: 32 bytes
_HEAD_GREY = 12  # pixels at or below this grey level in either slice are background, not compared


@dataclass(frozen=True)
class Keypoints:
    """ORB keypoints of one slice and of its mirror image."""

    image: np.ndarray  # uint8, the whole slice, its longer side DETAIL_SIZE
    points: np.ndarray  # (K, 2) float32 x, y
    descriptors: np.ndarray  # (K, 32) uint8
    mirrored_points: np.ndarray
    mirrored_descriptors: np.ndarray


def keypoint_image(gray: np.ndarray) -> np.ndarray:
    """The whole slice, its longer side resized to :data:`DETAIL_SIZE`: what the keypoints are found on.

    The whole slice, not the head box the other search normalises on: a copy saved darker (gamma,
    brightness) loses most of its head below the head threshold, and the box then shrinks onto a few
    bright bits. Keypoints need no box (ORB's pyramid covers the scale, RANSAC the shift). On 100
    augmented copies of nickparvar-224 slices, checked pair by pair, 98 verify as copies against 92 on
    the head box, and 100 of 100 annotated copies against 98 (README, "Merge").
    """
    scale = DETAIL_SIZE / max(gray.shape)
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    # INTER_AREA enlarges like nearest-neighbour: blocky edges would become keypoints of their own
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def orb_keypoints(detail: np.ndarray, features: int) -> Keypoints:
    """Keypoints of a slice (:func:`keypoint_image`, uint8), CLAHE-equalised first so that contrast and
    gamma changes move few of them."""
    orb = cv2.ORB_create(nfeatures=features, edgeThreshold=15, patchSize=31, fastThreshold=10)
    equalised = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(detail)
    found = []
    for image in (equalised, np.ascontiguousarray(equalised[:, ::-1])):
        points, descriptors = orb.detectAndCompute(image, None)
        if descriptors is None:
            found += [np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)]
        else:
            found += [np.float32([p.pt for p in points]), descriptors]
    return Keypoints(detail, *found)


def _kmajority_vocabulary(descriptors: np.ndarray, words: int, seed: int, iterations: int = 15) -> np.ndarray:
    """``words`` binary centroids (W, 32) of a sample of descriptors: k-majority, the binary k-means.

    Each descriptor joins its nearest centroid by Hamming distance, and each centroid bit becomes the
    majority of its members' bits (a tie keeps it; an empty word restarts on a random descriptor). The
    float k-means it replaces (FAISS's, on the unpacked bits, rounded) took 33 s of the Nickparvar + SARTAJ
    merge; this takes 8 s, and its words sit nearer the descriptors (mean Hamming distance 58.1 against
    58.7 bits), README "Merge".
    """
    rng = np.random.default_rng(seed)
    sample = descriptors[rng.choice(len(descriptors), min(len(descriptors), 40 * words), replace=False)]
    sample = np.ascontiguousarray(sample)
    words = min(words, len(sample))
    bits = np.unpackbits(sample, axis=1).astype(np.float32)
    centroids = np.ascontiguousarray(sample[rng.choice(len(sample), words, replace=False)])
    previous = None
    for _ in range(iterations):
        assigned = _nearest(centroids, sample)
        if previous is not None and np.array_equal(assigned, previous):
            break
        previous = assigned
        members = scipy.sparse.csr_matrix((np.ones(len(sample), np.float32), (assigned, np.arange(len(sample)))),
                                          shape=(words, len(sample)))
        ones, sizes = members @ bits, np.bincount(assigned, minlength=words)[:, None]
        old = np.unpackbits(centroids, axis=1)
        majority = np.where(2 * ones > sizes, 1, np.where(2 * ones < sizes, 0, old)).astype(np.uint8)
        empty = np.flatnonzero(sizes[:, 0] == 0)
        majority[empty] = bits[rng.choice(len(sample), len(empty), replace=False)].astype(np.uint8)
        centroids = np.ascontiguousarray(np.packbits(majority, axis=1))
    return centroids


def _nearest(codes: np.ndarray, descriptors: np.ndarray) -> np.ndarray:
    """(K,) the position of each descriptor's nearest code by Hamming distance. FAISS's function, not its
    binary index searched slice by slice: the same answers, and the word histograms of Nickparvar + SARTAJ
    (6.2 million descriptors against 4,096 words) in 17 s instead of 50 s."""
    faiss = load_faiss()

    return faiss.knn_hamming(np.ascontiguousarray(descriptors), np.ascontiguousarray(codes), 1)[1][:, 0]


def bag_of_words(keypoints: list[Keypoints], words: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length word histograms (N, W) of the images and of their mirror images.

    Counts are square-rooted (a repeated texture does not dominate) and weighted by inverse document
    frequency (words every head has, such as the skull's edge, say little).
    """
    every = np.concatenate([k.descriptors for k in keypoints])
    if len(every) == 0:
        empty = np.zeros((len(keypoints), 1), np.float32)
        return empty, empty
    vocabulary = _kmajority_vocabulary(every, words, seed)

    def histograms(descriptor_sets: list[np.ndarray]) -> np.ndarray:
        image = np.repeat(np.arange(len(descriptor_sets)), [len(d) for d in descriptor_sets])
        word = _nearest(vocabulary, np.concatenate(descriptor_sets))
        counts = np.bincount(image * len(vocabulary) + word, minlength=len(descriptor_sets) * len(vocabulary))
        return counts.reshape(len(descriptor_sets), len(vocabulary)).astype(np.float32)

    plain = histograms([k.descriptors for k in keypoints])
    mirrored = histograms([k.mirrored_descriptors for k in keypoints])
    idf = np.log((len(keypoints) + 1) / ((plain > 0).sum(axis=0) + 1)).astype(np.float32)

    def unit(counts: np.ndarray) -> np.ndarray:
        weighted = np.sqrt(counts) * idf
        return weighted / np.maximum(np.linalg.norm(weighted, axis=1, keepdims=True), 1e-12)

    return unit(plain), unit(mirrored)


def keypoint_shortlist(keypoints: list[Keypoints], words: int, neighbours: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (M, 2), i < j: each image's ``neighbours`` nearest images by word histogram, as
    it is and mirrored; and for each pair whether the second image looks likelier mirrored (its mirror
    image's histogram nearer the first's than its own), the one way :func:`match_keypoints` then tries."""
    faiss = load_faiss()

    n = len(keypoints)
    if n < 2:
        return np.empty((0, 2), np.int64), np.empty(0, bool)
    plain, mirrored = bag_of_words(keypoints, words, seed)
    index = faiss.IndexFlatIP(plain.shape[1])
    index.add(plain)
    k = min(neighbours + 1, n)
    rows, cols = [], []
    for queries in (plain, mirrored):
        _, nearest = index.search(np.ascontiguousarray(queries), k)
        rows.append(np.repeat(np.arange(n), k))
        cols.append(nearest.ravel())
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    keep = (cols >= 0) & (cols != rows)
    low, high = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    keys = np.unique(low.astype(np.int64) * n + high)
    pairs = np.stack([keys // n, keys % n], axis=1)
    return pairs, likelier_mirrored(plain, mirrored, pairs)


def likelier_mirrored(plain: np.ndarray, mirrored: np.ndarray, pairs: np.ndarray, block: int = 4096) -> np.ndarray:
    """(M,) bool: for each pair (i, j), whether j's mirror image's histogram is nearer i's than j's own
    (``plain[i] . mirrored[j] > plain[i] . plain[j]``). In blocks: the rows of all pairs at once would
    be gigabytes."""
    out = np.empty(len(pairs), bool)
    for start in range(0, len(pairs), block):
        first = plain[pairs[start : start + block, 0]]  # gathered once for both products
        second = pairs[start : start + block, 1]
        out[start : start + block] = (np.einsum("ij,ij->i", first, mirrored[second])
                                      > np.einsum("ij,ij->i", first, plain[second]))
    return out


def ratio_test_matches(train: np.ndarray, queries: list[np.ndarray], ratio: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query descriptor set, (query indices, train indices) of the matches that pass Lowe's ratio
    test: the query's nearest ``train`` descriptor (Hamming distance) nearer than ``ratio`` times the
    second nearest. FAISS's binary index, not OpenCV's matcher: the same matches, and the keypoint
    verification about 3x faster (OpenCV's k-nearest matching was most of its time)."""
    faiss = load_faiss()

    sizes = [len(q) for q in queries]
    if len(train) < 2 or not sum(sizes):
        return [(np.empty(0, np.int64), np.empty(0, np.int64)) for _ in queries]
    index = faiss.IndexBinaryFlat(_BITS)
    index.add(np.ascontiguousarray(train))
    # each search is small (hundreds of descriptors): with FAISS's OpenMP threads on each one, the
    # keypoint search ran 14-20x slower on a busy 2-core machine
    with on_one_thread(faiss.omp_get_max_threads, faiss.omp_set_num_threads):
        distances, nearest = index.search(np.ascontiguousarray(np.concatenate(queries)), 2)
    passed = distances[:, 0] < ratio * distances[:, 1]
    found, start = [], 0
    for size in sizes:
        rows = np.flatnonzero(passed[start : start + size])
        found.append((rows, nearest[start + rows, 0]))
        start += size
    return found


@dataclass(frozen=True)
class KeypointMatch:
    """The best similarity transform found between two slices and how alike they are under it."""

    inliers: int = 0  # RANSAC inliers; 0: no transform found
    correlation: float = -1.0  # of the two heads after warping; -1.0 when not measured (too few inliers)
    matrix: np.ndarray | None = None  # (2, 3) float32: the second image (as matched) onto the first

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, KeypointMatch) and (self.inliers, self.correlation) == (other.inliers, other.correlation)
                and np.array_equal(self.matrix, other.matrix))


def fit_and_correlate(a: Keypoints, source: np.ndarray, target: np.ndarray, image: np.ndarray,
                      min_inliers: int = 0) -> KeypointMatch | None:
    """The similarity transform taking the matched ``source`` points of ``image`` onto ``target`` points
    of ``a`` (RANSAC) and the correlation after warping; None when RANSAC finds no transform or the
    warped heads overlap too little to compare.

    With fewer than ``min_inliers`` inliers the match cannot become a link, and the warps are skipped
    (correlation -1.0): on Nickparvar + SARTAJ about 60% of the RANSAC fits end there, and their two
    warps and correlation were a fifth of the keypoint verification's time."""
    matrix, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=4.0,
                                                  maxIters=1000, confidence=0.995, refineIters=10)
    if matrix is None:
        return None
    if int(inliers.sum()) < min_inliers:
        return KeypointMatch(int(inliers.sum()), -1.0, matrix.astype(np.float32))
    size = (a.image.shape[1], a.image.shape[0])
    warped = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderValue=0)
    shown = cv2.warpAffine(np.full(image.shape, 255, np.uint8), matrix, size, flags=cv2.INTER_NEAREST) > 0
    both = shown & (a.image > _HEAD_GREY) & (warped > _HEAD_GREY)
    if both.sum() < 0.05 * both.size:
        return None
    return KeypointMatch(int(inliers.sum()), correlation(a.image[both], warped[both]), matrix.astype(np.float32))


def match_keypoints(a: Keypoints, b: Keypoints, min_matches: int, ratio: float = 0.8,
                    mirrored: bool | None = None) -> KeypointMatch:
    """The best similarity transform taking ``b``, as it is or mirrored (``mirrored`` None: both tried;
    True or False: that way only), onto ``a`` (most RANSAC inliers, then the higher correlation), as
    :func:`fit_and_correlate` scores it; ``KeypointMatch()`` (0 inliers) when none is found or fewer
    than ``min_matches`` keypoints match (RANSAC could not find that many inliers: most shortlisted
    pairs end here); a fit with fewer than ``min_matches`` inliers keeps correlation -1.0 (not measured)."""
    variants = tuple(v for v in ((b.points, b.descriptors, False), (b.mirrored_points, b.mirrored_descriptors, True))
                     if mirrored is None or v[2] == mirrored)
    matches = ratio_test_matches(a.descriptors, [descriptors for _, descriptors, _ in variants], ratio)
    best = KeypointMatch()
    for (points, _, flipped), (query, train) in zip(variants, matches):
        if len(query) < max(min_matches, 4):
            continue
        image = np.ascontiguousarray(b.image[:, ::-1]) if flipped else b.image
        candidate = fit_and_correlate(a, points[query], a.points[train], image, min_matches)
        if candidate is not None and (candidate.inliers, candidate.correlation) > (best.inliers, best.correlation):
            best = candidate
    return best


_RESIDUAL_BLUR = 0.7  # sigma (px at DETAIL_SIZE): the JPEG noise of a re-saved copy is finer than a sulcus
_RESIDUAL_BINS = 32  # grey-level bins of the monotone mapping
_RESIDUAL_QUANTILE = 30  # percentile of the residuals: burnt-in marks and cut-off parts stay above it
# ECC iterations refining RANSAC's transform (an affine one): from RANSAC's start 4 decide as 10 and 50 do
# on planted copies and real neighbouring slices; a phase correlation (a shift only) was thrown off by
# burnt-in marks
_RESIDUAL_ECC_STEPS = 5


def copy_residual(fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray) -> float:
    """How far two slices are from being one slice re-saved: small for a copy, however augmented or
    annotated; larger for a neighbouring slice, whose sulci differ.

    ``matrix`` (2 x 3, from RANSAC) takes ``moving`` onto ``fixed``. The slice shown larger is warped
    onto the smaller one (no upsampling blur on either side), ECC refines the alignment to a fraction of
    a pixel (an affine warp), and over the head both show, lightly blurred, each grey level of one slice is
    mapped to the median grey level the other has there (brightness, contrast and gamma changes are
    monotone mappings). The result is the 30th percentile of the absolute residual of that mapping, in
    units of the slice's interquartile grey-level range: a low quantile, so burnt-in text, arrows, the
    fill of a rotated canvas and cut-off parts (up to a third of the head) do not count.

    Measured (BENCHMARKS.md, ``copy_residual.py`` and ``neighbour_slices.py``): 97% of the phantom's
    matched augmented copies at most 0.031, every annotated one at most 0.030, its neighbouring slices
    0.038 and more; real neighbouring slices of figshare's numbered series 0.036 and more, real copies
    median 0.016. ``inf`` when the slices share too little head to compare.
    """
    if abs(np.linalg.det(matrix[:, :2])) > 1.0:
        fixed, moving, matrix = moving, fixed, cv2.invertAffineTransform(matrix)
    size = (fixed.shape[1], fixed.shape[0])
    warped = cv2.warpAffine(moving, matrix, size, flags=cv2.INTER_LINEAR)
    shown = cv2.warpAffine(np.full(moving.shape, 255, np.uint8), matrix, size, flags=cv2.INTER_NEAREST)
    both = (cv2.erode(shown, np.ones((5, 5), np.uint8)) > 0) & (fixed > _HEAD_GREY) & (warped > _HEAD_GREY)
    if both.sum() < max(0.05 * both.size, 4 * _RESIDUAL_BINS):
        return float("inf")
    x0, y0, width, height = cv2.boundingRect(both.astype(np.uint8))  # ECC's cost grows with the image, not the mask
    box = (slice(y0, y0 + height), slice(x0, x0 + width))
    fixed, warped, both, size = fixed[box], warped[box], both[box], (width, height)
    fixed_grey, moving_grey = fixed.astype(np.float32), warped.astype(np.float32)
    refined = np.eye(2, 3, dtype=np.float32)
    try:  # on grey levels matched by rank: the two then differ in structure only
        _, refined = cv2.findTransformECC(fixed_grey, _matched_grey(warped, fixed, both), refined, cv2.MOTION_AFFINE,
                                          (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, _RESIDUAL_ECC_STEPS, 1e-5),
                                          both.astype(np.uint8), 3)
    except cv2.error:  # no convergence (flat or unrelated heads): RANSAC's alignment is the best known
        pass
    x = cv2.GaussianBlur(fixed_grey, (0, 0), _RESIDUAL_BLUR)
    y = cv2.warpAffine(cv2.GaussianBlur(moving_grey, (0, 0), _RESIDUAL_BLUR), refined, size,
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    moved = cv2.warpAffine(both.astype(np.uint8), refined, size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP) > 0
    both = cv2.erode((both & moved).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    x, y = x[both], y[both]
    if len(x) < 4 * _RESIDUAL_BINS:
        return float("inf")
    order = np.argsort(x, kind="stable")
    order = order[: len(order) - len(order) % _RESIDUAL_BINS].reshape(_RESIDUAL_BINS, -1)  # equal bins by x
    predicted = np.interp(x, np.median(x[order], axis=1), np.median(y[order], axis=1))
    spread = float(np.subtract(*np.percentile(y, [75, 25])))
    return float(np.percentile(np.abs(y - predicted), _RESIDUAL_QUANTILE) / max(spread, 1e-6))


def _matched_grey(image: np.ndarray, reference: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``image`` (float32) with its grey levels inside ``where`` replaced by ``reference``'s of the same
    rank (0 outside)."""
    out = np.zeros(image.shape, np.float32)
    values = np.empty(int(where.sum()), np.float32)
    values[np.argsort(image[where], kind="stable")] = np.sort(reference[where]).astype(np.float32)
    out[where] = values
    return out


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two pixel sets; -1.0 when either is flat (nothing to correlate)."""
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    scale = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / scale) if scale > 0 else -1.0


def verify_keypoint_pairs(keypoints: list[Keypoints], pairs: np.ndarray, min_inliers: int, mirrored: np.ndarray,
                          workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RANSAC inliers (M,), correlation after warping (M,) and the transform (M, 2, 3; NaN where none was
    found) of each pair (the second image onto the first, mirrored or as it is as ``mirrored`` (M,)
    says: :func:`keypoint_shortlist`), in ``workers`` threads: FAISS's search and OpenCV's RANSAC and
    warp release the GIL, and threads share the keypoints without copying them. Each thread runs FAISS
    and OpenCV on one thread of their own, so ``workers`` threads use ``workers`` cores."""
    faiss = load_faiss()

    pairs, flips = np.asarray(pairs).reshape(-1, 2), np.asarray(mirrored, bool).reshape(-1)

    def verify(rows: np.ndarray) -> list[KeypointMatch]:
        return [match_keypoints(keypoints[pairs[k, 0]], keypoints[pairs[k, 1]], min_inliers, mirrored=bool(flips[k]))
                for k in rows.tolist()]

    # chunks of a few hundred pairs: the threads stay busy to the end, with little hand-out overhead
    with on_one_thread(faiss.omp_get_max_threads, faiss.omp_set_num_threads):
        found = map_positions_in_threads(verify, len(pairs), workers, len(pairs) // 256)
    inliers = np.array([m.inliers for m in found], np.int64).reshape(len(pairs))
    correlations = np.array([m.correlation for m in found], np.float32).reshape(len(pairs))
    matrices = np.full((len(pairs), 2, 3), np.nan, np.float32)
    for k, m in enumerate(found):
        if m.matrix is not None:
            matrices[k] = m.matrix
    return inliers, correlations, matrices


def could_be_copies(inliers: np.ndarray, correlations: np.ndarray, keypoints) -> np.ndarray:
    """(M,) bool: the matches whose copy residual decides whether they are copies: ``min_inliers`` RANSAC
    inliers and a correlation after warping of ``residual_correlation`` or more (``keypoints``:
    :class:`~braintumor.core.config.KeypointParams`)."""
    return (np.asarray(inliers) >= keypoints.min_inliers) & (np.asarray(correlations) >= keypoints.residual_correlation)


def links_worth_a_residual(pairs: np.ndarray, correlations: np.ndarray, groups: np.ndarray, per_group_pair: int) -> np.ndarray:
    """Positions of the links whose copy residual is measured: per pair of copy groups (``groups``: each
    image's), its ``per_group_pair`` best-correlated links. One copy link joins two groups, and a real
    dataset links the members of two groups many times over (nickparvar-224 + figshare: 14,466 links
    between 1,679 pairs of groups), so the rest would mostly measure the same two slices again."""
    if len(pairs) == 0:
        return np.empty(0, np.int64)
    first, second = groups[pairs[:, 0]], groups[pairs[:, 1]]
    low, high = np.minimum(first, second), np.maximum(first, second)
    order = np.lexsort((-correlations, high, low))  # by group pair, the best-correlated first
    key = low[order].astype(np.int64) * (int(groups.max()) + 1) + high[order]
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return np.sort(order[rank < per_group_pair])


def measure_copy_residuals(keypoints: list[Keypoints], pairs: np.ndarray, mirrored: np.ndarray, matrices: np.ndarray,
                           workers: int = 1) -> np.ndarray:
    """:func:`copy_residual` (M,) of each pair under its verified transform (``matrices``, from
    :func:`verify_keypoint_pairs`; NaN: inf), in ``workers`` threads (OpenCV's warps and ECC release the GIL)."""
    pairs, flips = np.asarray(pairs).reshape(-1, 2), np.asarray(mirrored, bool).reshape(-1)

    def measure(rows: np.ndarray) -> list[float]:
        out = []
        for k in rows.tolist():
            i, j = pairs[k]
            moving = np.ascontiguousarray(keypoints[j].image[:, ::-1]) if flips[k] else keypoints[j].image
            out.append(float("inf") if np.isnan(matrices[k]).any()
                       else copy_residual(keypoints[i].image, moving, matrices[k]))
        return out

    found = map_positions_in_threads(measure, len(pairs), workers, min(len(pairs) // 32, 4 * max(1, workers)))
    return np.array(found, np.float32).reshape(len(pairs))
