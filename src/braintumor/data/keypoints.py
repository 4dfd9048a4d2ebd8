"""Copies that the head-box search misses: keypoints matched under a similarity transform.

Re-uploads saved through an augmentation tool are rotated by up to 20 degrees, zoomed so that part of
the head is cut off, shifted, flipped, with other brightness, gamma and JPEG quality; others carry
burnt-in text, arrows or frames. The head box that :mod:`braintumor.data.dedup` normalises on moves
with every cut and every annotation, so its shortlist and its aligned correlation miss most of them.
Local features do not depend on the box:

1. ORB keypoints (OpenCV) on the whole slice, CLAHE-equalised, of the image and its mirror;
2. shortlist: a bag of visual words (binary k-means vocabulary, TF-IDF, square-rooted counts) and the
   nearest neighbours by cosine, of the image and of its mirror image;
3. verification: ratio-test matches, a RANSAC-estimated similarity transform (rotation, scale,
   shift), and the correlation of the two heads after warping one onto the other, over the pixels
   both show; one way only, as it is or mirrored, whichever the word histograms find nearer (on
   Nickparvar + SARTAJ this halved the verification, 94 -> 56 s, and lost no planted copy).

A pair with enough RANSAC inliers and a high correlation is a copy; with enough inliers and a lower
correlation, a look-alike (kept, same split). params.yaml makes every match a look-alike (copy level
1.0, look-alike level 0.7): as copies its matches removed real neighbouring slices, and lower look-alike
levels chained slices of different classes (benchmarks/dedup_recall.py and keypoint_links.py, README "Merge").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from braintumor.core.parallel import map_in_workers, on_one_thread, single_threaded_opencv


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


def _kmeans_vocabulary(descriptors: np.ndarray, words: int, seed: int) -> np.ndarray:
    """``words`` binary centroids (W, 32) of a sample of descriptors: k-means on the bits, rounded."""
    faiss = load_faiss()

    rng = np.random.default_rng(seed)
    sample = descriptors[rng.choice(len(descriptors), min(len(descriptors), 40 * words), replace=False)]
    words = min(words, len(sample))
    # min_points_per_centroid 1: a small dataset (a few hundred slices) has fewer than FAISS's 39 sampled
    # descriptors per word; it then prints a warning to the terminal, which would change nothing here.
    kmeans = faiss.Kmeans(_BITS, words, niter=15, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(np.unpackbits(sample, axis=1).astype(np.float32))
    return np.packbits(kmeans.centroids > 0.5, axis=1)


def bag_of_words(keypoints: list[Keypoints], words: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length word histograms (N, W) of the images and of their mirror images.

    Counts are square-rooted (a repeated texture does not dominate) and weighted by inverse document
    frequency (words every head has, such as the skull's edge, say little).
    """
    faiss = load_faiss()

    every = np.concatenate([k.descriptors for k in keypoints])
    if len(every) == 0:
        empty = np.zeros((len(keypoints), 1), np.float32)
        return empty, empty
    vocabulary = _kmeans_vocabulary(every, words, seed)
    index = faiss.IndexBinaryFlat(_BITS)
    index.add(vocabulary)

    def histograms(descriptor_sets: list[np.ndarray]) -> np.ndarray:
        counts = np.zeros((len(descriptor_sets), len(vocabulary)), np.float32)
        for row, descriptors in enumerate(descriptor_sets):
            if len(descriptors):
                _, word = index.search(descriptors, 1)
                np.add.at(counts[row], word[:, 0], 1.0)
        return counts

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


def fit_and_correlate(a: Keypoints, source: np.ndarray, target: np.ndarray, image: np.ndarray) -> tuple[int, float] | None:
    """(RANSAC inliers, correlation after warping) of the similarity transform taking the matched
    ``source`` points of ``image`` onto ``target`` points of ``a``; None when RANSAC finds none or the
    warped heads overlap too little to compare."""
    matrix, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=4.0,
                                                  maxIters=1000, confidence=0.995, refineIters=10)
    if matrix is None:
        return None
    size = (a.image.shape[1], a.image.shape[0])
    warped = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderValue=0)
    shown = cv2.warpAffine(np.full(image.shape, 255, np.uint8), matrix, size, flags=cv2.INTER_NEAREST) > 0
    both = shown & (a.image > _HEAD_GREY) & (warped > _HEAD_GREY)
    if both.sum() < 0.05 * both.size:
        return None
    return int(inliers.sum()), correlation(a.image[both], warped[both])


def match_keypoints(a: Keypoints, b: Keypoints, min_matches: int, ratio: float = 0.8,
                    mirrored: bool | None = None) -> tuple[int, float]:
    """(RANSAC inliers, correlation after warping) of the best similarity transform taking ``b``, as it
    is or mirrored (``mirrored`` None: both tried; True or False: that way only), onto ``a``; (0, -1.0)
    when no transform is found or fewer than ``min_matches`` keypoints match (RANSAC could not find that
    many inliers: most shortlisted pairs end here)."""
    variants = tuple(v for v in ((b.points, b.descriptors, False), (b.mirrored_points, b.mirrored_descriptors, True))
                     if mirrored is None or v[2] == mirrored)
    matches = ratio_test_matches(a.descriptors, [descriptors for _, descriptors, _ in variants], ratio)
    best = (0, -1.0)
    for (points, _, flipped), (query, train) in zip(variants, matches):
        if len(query) < max(min_matches, 4):
            continue
        image = np.ascontiguousarray(b.image[:, ::-1]) if flipped else b.image
        candidate = fit_and_correlate(a, points[query], a.points[train], image)
        if candidate is not None and candidate > best:
            best = candidate
    return best


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two pixel sets; -1.0 when either is flat (nothing to correlate)."""
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    scale = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / scale) if scale > 0 else -1.0


def verify_keypoint_pairs(keypoints: list[Keypoints], pairs: np.ndarray, min_inliers: int,
                          mirrored: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC inliers (M,) and correlation after warping (M,) of each pair (the second image onto the
    first, mirrored or as it is as ``mirrored`` (M,) says: :func:`keypoint_shortlist`), in ``workers``
    threads: FAISS's search and OpenCV's RANSAC and warp release the GIL, and threads share the keypoints
    without copying them. Each thread runs FAISS and OpenCV on one thread of their own, so ``workers``
    threads use ``workers`` cores."""
    faiss = load_faiss()

    def verify(chunk: np.ndarray) -> list[tuple[int, float]]:
        return [match_keypoints(keypoints[i], keypoints[j], min_inliers, mirrored=bool(flip))
                for i, j, flip in chunk.tolist()]

    # chunks of a few hundred pairs: the threads stay busy to the end, with little hand-out overhead
    rows = np.column_stack([np.asarray(pairs).reshape(-1, 2), np.asarray(mirrored, np.int64).reshape(-1)])
    chunks = np.array_split(rows, max(1, len(pairs) // 256))
    with on_one_thread(faiss.omp_get_max_threads, faiss.omp_set_num_threads), single_threaded_opencv():
        found = [result for chunk in map_in_workers(verify, chunks, workers, kind="thread") for result in chunk]
    inliers = np.array([count for count, _ in found], np.int64).reshape(len(pairs))
    correlations = np.array([score for _, score in found], np.float32).reshape(len(pairs))
    return inliers, correlations
