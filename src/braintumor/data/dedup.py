"""Exact and near-duplicate detection for MRI slices.

Public versions of the brain-tumor datasets hold the same slice resized, re-encoded, converted to
grey or RGB, cropped to the head or padded, and lightly rotated, flipped or rescaled. A global
perceptual hash with a small Hamming radius misses most of these (slices are mostly black and low in
contrast, and a crop or a rotation moves every hash bit), so the method here is:

1. Canonicalise: crop each slice to its head's bounding box and resize that box to a fixed square
   (not keeping its aspect ratio). This removes borders, padding, crops, rescaling and aspect changes
   in one step; histogram equalisation then removes contrast and windowing changes.
2. Shortlist: a left-right symmetrised low-resolution descriptor of the canonical image (so a mirror
   copy gets the same descriptor), centred on the dataset mean; k nearest neighbours by cosine
   similarity with an exact inner-product index (faiss), which scales to 100k images in seconds.
3. Verify: for each shortlisted pair, the best normalised cross-correlation of the two canonical
   images over mirror x small rotations, each rotation applied to the head (kept with a margin)
   before it is cropped and canonicalised again, exactly as a rotated copy would be. Only pairs
   above ``verify_similarity`` are duplicates.

4. A detail check of every copy-level pair (``merge.near_duplicates.detail_similarity``, 0 = off): the
   two heads at 96 px, turned by the pose step 3 found best, registered by ECC, correlated again.
   Neighbouring slices of one series can reach copy level at 64 px; at 96 px, registered, their
   sulci and texture differ, and they become look-alikes (kept, same split) instead of copies.

5. Optionally (``merge.near_duplicates.keypoints``), a second search on ORB keypoints for the copies
   whose head box moved: augmented and annotated re-uploads (:mod:`braintumor.data.keypoints`).

Exact duplicates (identical decoded pixels, whatever the file bytes) are found by hashing pixels.
Duplicate pairs are joined into groups as connected components of the pair graph (scipy).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from braintumor.core.config import NearDuplicateParams
from braintumor.core.imageio import collapse_equal_channels, to_grayscale
from braintumor.core.parallel import map_positions_in_threads
from braintumor.data.head import head_bbox
from braintumor.data.keypoints import (Keypoints, could_be_copies, keypoint_image, keypoint_shortlist, links_worth_a_residual, load_faiss,
                                       measure_copy_residuals, orb_keypoints, verify_keypoint_pairs)

CANONICAL_SIZE = 64
HEAD_SIZE = 96  # the head with a margin, kept for rotating before canonicalisation
HEAD_MARGIN = 0.15
# The detail check: copies and neighbouring slices differ in sulci and texture that 64 px blurs away.
DETAIL_HEAD_SIZE = 128
DETAIL_CANONICAL_SIZE = 96
DETAIL_STEP_DEG = 2.0  # ECC registration then takes out the remaining turn
DESCRIPTOR_GRID = 16
DESCRIPTOR_DIMS = 32
# The keypoint copy residual is measured on this many links per pair of copy groups, the best correlated
# first: one copy link joins the groups, and the other links mostly compare the same two slices again.
RESIDUAL_LINKS_PER_GROUP_PAIR = 3


@dataclass(frozen=True)
class Fingerprint:
    """What deduplication needs to know about one decoded image."""

    pixel_hash: str
    height: int
    width: int
    channels: int
    head: np.ndarray  # (HEAD_SIZE, HEAD_SIZE) uint8: the head, centred with a margin, aspect kept
    canonical: np.ndarray  # (CANONICAL_SIZE, CANONICAL_SIZE) uint8: :func:`canonical_head` of ``head``
    keypoints: Keypoints | None = None  # ORB keypoints, when the keypoint search is on
    detail: np.ndarray | None = None  # (DETAIL_HEAD_SIZE,) * 2 uint8: the head at higher resolution, for the detail check


def pixel_hash(image: np.ndarray) -> str:
    """Hash of the decoded pixels: equal for byte-different files that decode identically."""
    pixels = np.ascontiguousarray(collapse_equal_channels(image))
    digest = hashlib.sha1(str((pixels.shape, pixels.dtype.str)).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def head_with_margin(gray: np.ndarray, threshold: int, size: int = HEAD_SIZE) -> np.ndarray:
    """The head centred in a square ``HEAD_MARGIN`` larger than its box, resized to ``size``.

    The margin leaves room to rotate the head a few degrees without cutting it.
    """
    y0, y1, x0, x1 = head_bbox(gray, threshold)
    side = int(round(max(y1 - y0, x1 - x0) * (1 + 2 * HEAD_MARGIN)))
    top, left = (y0 + y1 - side) // 2, (x0 + x1 - side) // 2
    square = np.zeros((side, side), np.uint8)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + side, gray.shape[0]), min(left + side, gray.shape[1])
    square[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = gray[sy0:sy1, sx0:sx1]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)


def canonical_head(gray: np.ndarray, threshold: int, size: int = CANONICAL_SIZE) -> np.ndarray:
    """The head's bounding box resized (aspect ratio not kept) to ``size`` x ``size``, equalised.

    Squeezing the box to a square, instead of padding it, also matches copies whose crop was
    stretched to a square, which real re-uploads of these datasets do. Histogram equalisation undoes
    the contrast, gamma and windowing changes between versions of one slice: on the Nickparvar set it
    removes every cross-label pair scoring 0.93-0.95 (37 of 2,023 without it), all false matches.
    """
    y0, y1, x0, x1 = head_bbox(gray, threshold)
    box = cv2.resize(gray[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
    return cv2.equalizeHist(box)


def fingerprint_image(image: np.ndarray, threshold: int, keypoint_features: int = 0, detail: bool = False) -> Fingerprint:
    """Fingerprint a decoded image (any channel layout OpenCV returns); with ``keypoint_features``, its
    ORB keypoints too (:mod:`braintumor.data.keypoints`); with ``detail``, the head for the detail check."""
    gray = to_grayscale(image)
    head = head_with_margin(gray, threshold)
    channels = 1 if image.ndim == 2 else image.shape[2]
    keypoints = (orb_keypoints(keypoint_image(gray), keypoint_features)
                 if keypoint_features else None)
    return Fingerprint(
        pixel_hash=pixel_hash(image),
        height=int(image.shape[0]),
        width=int(image.shape[1]),
        channels=int(channels),
        head=head,
        canonical=canonical_head(head, threshold),
        keypoints=keypoints,
        detail=head_with_margin(gray, threshold, DETAIL_HEAD_SIZE) if detail else None,
    )


def shortlist_descriptors(canonical: np.ndarray, grid: int = DESCRIPTOR_GRID, dims: int = DESCRIPTOR_DIMS) -> np.ndarray:
    """Unit-length, mirror-invariant descriptors (N, dims) of canonical images (N, S, S).

    Block means give a ``grid`` x ``grid`` thumbnail; adding its mirror image and keeping the left
    half makes a flipped copy's descriptor identical. Centring on the dataset mean removes what all
    head slices share, so that the cosine similarity measures what distinguishes them; projecting on
    the ``dims`` principal components keeps most of the variance and makes the k-NN search 4x cheaper.
    """
    n, size, _ = canonical.shape
    if size % grid:
        raise ValueError(f"canonical size {size} is not a multiple of the descriptor grid {grid}")
    block = size // grid
    thumbs = canonical.astype(np.float32).reshape(n, grid, block, grid, block).mean(axis=(2, 4))
    symmetric = (thumbs + thumbs[:, :, ::-1])[:, :, : grid // 2].reshape(n, -1)
    symmetric -= symmetric.mean(axis=1, keepdims=True)
    symmetric -= symmetric.mean(axis=0, keepdims=True)
    return _unit_rows(_principal_components(_unit_rows(symmetric), dims))


def _principal_components(x: np.ndarray, dims: int) -> np.ndarray:
    """Project rows on the top ``dims`` eigenvectors of their covariance (deterministic up to sign)."""
    if dims >= x.shape[1] or len(x) <= dims:
        return x
    _, vectors = np.linalg.eigh(x.T.astype(np.float64) @ x)
    return x @ vectors[:, ::-1][:, :dims].astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


EXACT_SEARCH_LIMIT = 20_000


def nearest_neighbours(descriptors: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, index) of each row's ``k`` nearest rows by inner product.

    Exact (flat index) up to ``EXACT_SEARCH_LIMIT`` rows, which covers every public dataset of this
    kind; above it an inverted-file index (4 sqrt(N) cells, 8 probed) keeps 100,000 rows to seconds.
    Copies sit very close to their original, so they share a cell: 100% of 5,000 planted copies were
    still shortlisted at 100,000 rows (benchmarks/bench_dedup.py).
    """
    faiss = load_faiss()

    n, dims = descriptors.shape
    if n <= EXACT_SEARCH_LIMIT:
        index = faiss.IndexFlatIP(dims)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dims), dims, int(4 * np.sqrt(n)), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(descriptors)
        index.nprobe = 8
    index.add(descriptors)
    return index.search(descriptors, k)


def shortlist_pairs(descriptors: np.ndarray, neighbours: int, min_similarity: float) -> np.ndarray:
    """Candidate pairs (M, 2), i < j, among each row's ``neighbours`` nearest rows by cosine.

    No Python loop over pairs: a k-NN index does the search (:func:`nearest_neighbours`).
    """
    n = len(descriptors)
    if n < 2:
        return np.empty((0, 2), np.int64)
    k = min(neighbours + 1, n)  # +1: each row finds itself first
    similarity, nearest = nearest_neighbours(descriptors, k)
    rows = np.repeat(np.arange(n), k)
    cols = nearest.ravel()
    keep = (cols >= 0) & (cols != rows) & (similarity.ravel() >= min_similarity)
    low, high = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    keys = np.unique(low.astype(np.int64) * n + high)  # one key per unordered pair, sorted
    return np.stack([keys // n, keys % n], axis=1)


def _standardised(image: np.ndarray) -> np.ndarray:
    # A light blur absorbs JPEG blocking and resampling differences between copies.
    x = cv2.GaussianBlur(image.astype(np.float32), (3, 3), 0).ravel()
    x -= x.mean()
    return x / max(float(np.linalg.norm(x)), 1e-6)


def _head_outline(head: np.ndarray, threshold: int) -> np.ndarray:
    """Convex hull (K, 2) of the head's foreground pixels, as x, y points."""
    y0, y1, x0, x1 = head_bbox(head, threshold)
    _, mask = cv2.threshold(cv2.GaussianBlur(head, (3, 3), 0)[y0:y1, x0:x1], threshold, 255, cv2.THRESH_BINARY)
    # the hull of the outer contours is the hull of every foreground pixel, from a few hundred points
    # instead of thousands (the detail check's hulls on Nickparvar + SARTAJ: 11.8 s -> about 1 s of one core)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:  # nothing above the threshold: the box is the whole image
        contours = [np.array([[[0, 0]], [[x1 - x0 - 1, y1 - y0 - 1]]], np.int32)]
    return cv2.convexHull(np.concatenate(contours)).reshape(-1, 2).astype(np.float32) + np.float32([x0, y0])


def _turned_head_box(turned: np.ndarray, outline: np.ndarray, threshold: int) -> tuple[int, int, int, int]:
    """:func:`head_bbox` of a turned head, searched only near its turned outline.

    Thresholding a window around the outline finds the same box as the full search (which also
    weighs every other bright component) at a fifth of the cost.
    """
    size = turned.shape[0]
    x0, y0 = np.maximum(np.floor(outline.min(axis=0)).astype(int) - 3, 0)
    x1, y1 = np.minimum(np.floor(outline.max(axis=0)).astype(int) + 4, size)
    window = turned[y0:y1, x0:x1]
    _, mask = cv2.threshold(cv2.GaussianBlur(window, (3, 3), 0), threshold, 255, cv2.THRESH_BINARY)
    bx, by, bw, bh = cv2.boundingRect(mask)
    if bw == 0:
        return y0, y1, x0, x1
    return y0 + by, y0 + by + bh, x0 + bx, x0 + bx + bw


def variant_poses(max_rotation_deg: float, step_deg: float) -> list[tuple[bool, float]]:
    """(mirrored, angle) of each variant :func:`aligned_variants` builds, in its order."""
    angles = np.arange(-max_rotation_deg, max_rotation_deg + 1e-9, step_deg) if max_rotation_deg > 0 else [0.0]
    return [(mirrored, float(angle)) for mirrored in (False, True) for angle in angles]


def aligned_variants(head: np.ndarray, threshold: int, max_rotation_deg: float, step_deg: float,
                     canonical_size: int = CANONICAL_SIZE, poses: list[tuple[bool, float]] | None = None) -> np.ndarray:
    """Standardised canonical images (V, S*S) of one head: mirror x rotations in the given range
    (:func:`variant_poses`), or only the ``poses`` given.

    Each rotation turns the head with its margin, then crops the turned head's box and canonicalises
    it, so the variant is what :func:`canonical_head` gives for a copy rotated by that angle.
    """
    size = head.shape[0]
    centre = ((size - 1) / 2.0, (size - 1) / 2.0)
    outline = _head_outline(head, threshold)
    sides = {False: (head, outline),
             True: (np.ascontiguousarray(head[:, ::-1]), outline * np.float32([-1, 1]) + np.float32([size - 1, 0]))}
    variants = []
    for mirrored, angle in poses if poses is not None else variant_poses(max_rotation_deg, step_deg):
        image, points = sides[mirrored]
        matrix = cv2.getRotationMatrix2D(centre, float(angle), 1.0)
        rotated = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
        turned_outline = points @ matrix[:, :2].T.astype(np.float32) + matrix[:, 2].astype(np.float32)
        y0, y1, x0, x1 = _turned_head_box(rotated, turned_outline, threshold)
        box = cv2.resize(rotated[y0:y1, x0:x1], (canonical_size,) * 2, interpolation=cv2.INTER_AREA)
        variants.append(_standardised(cv2.equalizeHist(box)))
    return np.stack(variants)


@dataclass(frozen=True)
class PairPoses:
    """How each verified pair matched best: image ``turned`` of the pair, mirrored or not, by ``angle``
    degrees, onto the other. The detail check starts from it instead of searching every variant again."""

    turned: np.ndarray  # (M,) the image of each pair that was turned
    mirrored: np.ndarray  # (M,) bool
    angle: np.ndarray  # (M,) degrees

    def take(self, rows: np.ndarray) -> "PairPoses":
        return PairPoses(self.turned[rows], self.mirrored[rows], self.angle[rows])


def verify_pairs(
    heads: np.ndarray,
    canonical: np.ndarray,
    pairs: np.ndarray,
    threshold: int,
    max_rotation_deg: float,
    step_deg: float,
) -> np.ndarray:
    """Best normalised cross-correlation of each pair over mirror x rotation, shape (M,).

    ``canonical`` holds :func:`canonical_head` of each of ``heads``, at any one size.

    Symmetric: each image of a pair is turned to match the other and the better score counts, since
    resampling makes "turn A onto B" and "turn B onto A" differ slightly.
    """
    return verify_pairs_posed(heads, canonical, pairs, threshold, max_rotation_deg, step_deg)[0]


def verify_pairs_posed(heads: np.ndarray, canonical: np.ndarray, pairs: np.ndarray, threshold: int,
                       max_rotation_deg: float, step_deg: float) -> tuple[np.ndarray, PairPoses]:
    """:func:`verify_pairs`, and the pose of each pair's best match.

    Every image's variants are built once and scored against all of its partners with one matrix
    product. (In two threads it took longer, 29.6 s against 27.4 s on Nickparvar + SARTAJ: small arrays,
    so mostly Python holding the GIL.)
    """
    poses = variant_poses(max_rotation_deg, step_deg)
    sides = np.concatenate([pairs, pairs[:, ::-1]]).reshape(-1, 2)  # (2M, 2): (partner, turned image)
    side_scores = np.full(len(sides), -1.0, np.float32)
    side_variant = np.zeros(len(sides), np.int64)
    order = np.argsort(sides[:, 1], kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(sides[order, 1]) != 0]) if len(sides) else np.empty(0, np.int64)
    ends = np.r_[starts[1:], len(order)]
    # each image is a partner in ~60 sides (nickparvar-224 + SARTAJ): standardised once, not once a side
    involved = np.unique(pairs)
    standardised = np.zeros((len(canonical), canonical.shape[1] * canonical.shape[2]), np.float32)
    for i in involved:
        standardised[i] = _standardised(canonical[i])

    for start, end in zip(starts, ends):
        members = order[start:end]
        turned = sides[members[0], 1]
        variants = aligned_variants(heads[turned], threshold, max_rotation_deg, step_deg, canonical.shape[1])
        products = standardised[sides[members, 0]] @ variants.T
        side_variant[members] = products.argmax(axis=1)
        side_scores[members] = products.max(axis=1)
    m = len(pairs)
    second_better = side_scores[m:] > side_scores[:m]
    best_side = np.where(second_better, np.arange(m) + m, np.arange(m))
    chosen = [poses[v] for v in side_variant[best_side]]
    return np.maximum(side_scores[:m], side_scores[m:]), PairPoses(
        turned=sides[best_side, 1] if m else np.empty(0, np.int64),
        mirrored=np.array([mirrored for mirrored, _ in chosen], bool),
        angle=np.array([angle for _, angle in chosen], np.float32),
    )


def exact_pairs(pixel_hashes: list[str]) -> np.ndarray:
    """Pairs (M, 2) linking every image to the first image with the same pixel hash."""
    first: dict[str, int] = {}
    pairs = []
    for i, h in enumerate(pixel_hashes):
        if h in first:
            pairs.append((first[h], i))
        else:
            first[h] = i
    return np.array(pairs, np.int64).reshape(-1, 2)


def group_ids(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph: a group id per item, numbered by first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Renumber so that ids follow the order of each group's first member: stable across runs.
    _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first_index))
    return rank[inverse]


def registered_correlation(moving: np.ndarray, fixed: np.ndarray, border: int = 4) -> float:
    """Correlation of two same-size images after ECC refines their alignment (a small affine warp).

    The head-box alignment is good to about a pixel; at 96 px that alone leaves copies at 0.98 and
    lets neighbouring slices reach them. Registered, copies reach 0.994 and more on the phantom's
    planted kinds, while a neighbouring slice's new sulci stay (at most 0.98). ``border`` pixels the
    warp may have filled are left out. If ECC does not converge (flat or unrelated images), the
    unrefined alignment is scored: for such a pair that is already the best known.
    """
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-5)
    try:
        _, warp = cv2.findTransformECC(fixed, moving, warp, cv2.MOTION_AFFINE, criteria, None, 1)
    except cv2.error:
        pass
    height, width = fixed.shape
    warped = cv2.warpAffine(moving, warp, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    inner = (slice(border, height - border), slice(border, width - border))
    a, b = warped[inner].ravel() - warped[inner].mean(), fixed[inner].ravel() - fixed[inner].mean()
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def detail_scores(details: list[np.ndarray], pairs: np.ndarray, threshold: int, max_rotation_deg: float,
                  enough: float = 1.0, poses: PairPoses | None = None) -> np.ndarray:
    """Registered correlation of each pair's heads at 96 px, shape (M,): the detail check.

    With ``poses`` (the head-box verification's best match of each pair), that one variant is
    registered first; most copies reach ``enough`` with it, one variant built instead of every one.
    Otherwise, or when it stays below ``enough``, one head is turned (mirror x rotation, as in
    :func:`verify_pairs`) onto the other's canonical image, the best variant registered with
    :func:`registered_correlation`, and the other way round is tried when that stays below ``enough``.
    """
    size = DETAIL_CANONICAL_SIZE
    scores = np.full(len(pairs), -1.0, np.float32)
    canonical: dict[int, np.ndarray] = {}

    def target_of(partner: int) -> np.ndarray:
        if partner not in canonical:
            canonical[partner] = _standardised(canonical_head(details[partner], threshold, size))
        return canonical[partner]

    def registered(variant: np.ndarray, partner: int) -> float:
        return registered_correlation(variant.reshape(size, size), target_of(partner).reshape(size, size))

    def searched(turned: int, partner: int) -> float:
        variants = aligned_variants(details[turned], threshold, max_rotation_deg, DETAIL_STEP_DEG, size)
        return registered(variants[int(np.argmax(variants @ target_of(partner)))], partner)

    for k, (i, j) in enumerate(pairs.tolist()):
        if poses is not None:
            turned = int(poses.turned[k])
            pose = [(bool(poses.mirrored[k]), float(poses.angle[k]))]
            variant = aligned_variants(details[turned], threshold, 0.0, 1.0, size, poses=pose)[0]  # the range is unused
            scores[k] = registered(variant, i + j - turned)
            if scores[k] >= enough:
                continue
        scores[k] = max(scores[k], searched(i, j))
        if scores[k] < enough:
            scores[k] = max(scores[k], searched(j, i))
    return scores


@dataclass(frozen=True)
class DuplicateSearch:
    groups: np.ndarray  # (N,) duplicate group per image: copies of one slice
    related: np.ndarray  # (N,) related group per image: duplicates plus look-alike slices (split unit)
    exact: np.ndarray  # (M1, 2) exact pairs
    near: np.ndarray  # (M2, 2) verified near-duplicate pairs (not exact)
    near_scores: np.ndarray  # (M2,) their aligned similarity
    related_pairs: np.ndarray  # (M3, 2) pairs similar enough to keep in one split, below duplicate level
    shortlisted: int  # candidate pairs checked
    # every verified candidate pair (not byte- or pixel-identical) and its aligned similarity: what the
    # merge report samples around the thresholds
    candidates: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))
    candidate_scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    # the keypoint search's verified shortlist (pairs not already copies), RANSAC inliers, correlation,
    # copy residual (inf where not measured)
    keypoint_candidates: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))
    keypoint_inliers: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    keypoint_correlation: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    keypoint_residual: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    keypoint_copy: np.ndarray = field(default_factory=lambda: np.empty(0, bool))  # (M,) links that are copies
    # the copy-level pairs the detail check compared and their registered correlation at 96 px; those
    # below ``detail_similarity`` are look-alikes (related pairs), not copies
    detail_pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))
    detail_scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    detail_apart: np.ndarray = field(default_factory=lambda: np.empty(0, bool))  # (K,) failed it: look-alikes
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part of the search that ran
    # (M,) keypoint links made by agreement (matched under the look-alike correlation, head-box score high
    # enough) between split groups that the other links left apart
    keypoint_agreed: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    # the keypoint matches the agreement rule scored (A, 2) and their head-box similarity (A,): the merge report
    # samples them around agreement_similarity
    agreement_pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))
    agreement_scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))


class _PartClock:
    """Wall seconds between laps, by part name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = round(now - self._last, 2)
        self._last = now


def find_duplicate_groups(fingerprints: list[Fingerprint], head_threshold: int, near: NearDuplicateParams,
                          workers: int = 1) -> DuplicateSearch:
    """Exact pairs by pixel hash, near pairs by shortlist + aligned verification, then groups.
    ``workers``: threads for the detail check and the keypoint verification. ``seconds`` of the result says where the time went.

    Two levels: pairs scoring ``near.verify_similarity`` or more are copies of one slice (one is
    kept); pairs between ``near.related_similarity`` and that are different but look-alike slices,
    typically neighbouring slices of one patient's series, which are all kept but share a split.
    Keypoint matches (``near.keypoints``) add look-alikes: correlated ``related_correlation`` or more after
    warping, or ``agreement_correlation`` or more where the pair's head-box score reaches
    ``agreement_similarity``; and copies, by their copy residual.
    """
    n = len(fingerprints)
    clock = _PartClock()
    exact = exact_pairs([f.pixel_hash for f in fingerprints])
    empty = np.empty((0, 2), np.int64)
    near_pairs, related_pairs, near_scores, shortlisted = empty, empty, np.empty(0, np.float32), 0
    detail_pairs, detail_checked_scores, detail_apart = empty, np.empty(0, np.float32), np.empty(0, bool)
    candidates, scores = empty, np.empty(0, np.float32)
    if near.enabled and n > 1:
        canonical = np.stack([f.canonical for f in fingerprints])
        candidates = shortlist_pairs(shortlist_descriptors(canonical), near.neighbours, near.shortlist_similarity)
        shortlisted = len(candidates)
        hashes = np.array([f.pixel_hash for f in fingerprints])
        candidates = candidates[hashes[candidates[:, 0]] != hashes[candidates[:, 1]]]
        heads = np.stack([f.head for f in fingerprints])
        clock.lap("head_box_shortlist")
        scores, poses = verify_pairs_posed(heads, canonical, candidates, head_threshold, near.max_rotation_deg,
                                           near.rotation_step_deg)
        clock.lap("head_box_verification")
        duplicate = scores >= near.verify_similarity
        if near.detail_similarity > 0:  # copy-level pairs that fail it become look-alikes
            checked = np.flatnonzero(duplicate)
            detail_pairs = candidates[checked]
            detail_checked_scores = _detail_check(fingerprints, detail_pairs, head_threshold, near, poses.take(checked),
                                                  workers)
            clock.lap("detail_check")
            detail_apart = detail_checked_scores < near.detail_similarity
            duplicate[checked[detail_apart]] = False
        near_pairs, near_scores = candidates[duplicate], scores[duplicate]
        related_pairs = candidates[~duplicate & (scores >= near.related_similarity)]
    keypoint = near.keypoints
    extra, inliers, correlation, residual = empty, np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float32)
    copy, agreed = np.empty(0, bool), np.empty(0, bool)
    agreement_pairs, agreement_scores = empty, np.empty(0, np.float32)
    if near.enabled and keypoint.enabled and n > 1:
        if any(f.keypoints is None for f in fingerprints):
            raise ValueError("merge.near_duplicates.keypoints is on, but the fingerprints carry no keypoints "
                             "(fingerprint_image(..., keypoint_features=N))")
        found = [f.keypoints for f in fingerprints]
        extra, mirrored = keypoint_shortlist(found, keypoint.words, keypoint.neighbours)
        clock.lap("keypoint_shortlist")
        copies_so_far = group_ids(n, np.concatenate([exact, near_pairs]))
        unjoined = copies_so_far[extra[:, 0]] != copies_so_far[extra[:, 1]]
        extra, mirrored = extra[unjoined], mirrored[unjoined]
        inliers, correlation, matrices = verify_keypoint_pairs(found, extra, keypoint.min_inliers, mirrored, workers)
        clock.lap("keypoint_verification")
        linked = (inliers >= keypoint.min_inliers) & (correlation >= keypoint.related_correlation)
        agreed = np.zeros(len(extra), bool)
        if keypoint.agreement_correlation > 0:
            weaker = np.flatnonzero((inliers >= keypoint.min_inliers) & ~linked
                                    & (correlation >= keypoint.agreement_correlation))
            # only where the link would join two split groups: on nickparvar-224, 1,093 of 3,797 pairs
            so_far = group_ids(n, np.concatenate([exact, near_pairs, related_pairs, extra[linked]]))
            weaker = weaker[so_far[extra[weaker, 0]] != so_far[extra[weaker, 1]]]
            agreement_pairs = extra[weaker]
            agreement_scores = head_box_similarity(agreement_pairs, candidates, scores, heads, canonical, head_threshold, near)
            agreed[weaker[agreement_scores >= keypoint.agreement_similarity]] = True
            linked |= agreed
            clock.lap("keypoint_agreement")
        residual = np.full(len(extra), np.inf, np.float32)
        if keypoint.copy_residual > 0:
            chosen = np.flatnonzero(could_be_copies(inliers, correlation, keypoint))
            chosen = chosen[links_worth_a_residual(extra[chosen], correlation[chosen], copies_so_far,
                                                   RESIDUAL_LINKS_PER_GROUP_PAIR)]
            residual[chosen] = measure_copy_residuals(found, extra[chosen], mirrored[chosen], matrices[chosen], workers)
            clock.lap("keypoint_copy_residual")
        copy = residual <= keypoint.copy_residual  # only measured on matches
        near_pairs = np.concatenate([near_pairs, extra[copy]])
        near_scores = np.concatenate([near_scores, correlation[copy]])
        related_pairs = np.concatenate([related_pairs, extra[linked & ~copy]])
    groups = group_ids(n, np.concatenate([exact, near_pairs]))
    related = group_ids(n, np.concatenate([exact, near_pairs, related_pairs]))
    return DuplicateSearch(groups, related, exact, near_pairs, near_scores, related_pairs, shortlisted, candidates, scores,
                           extra, inliers, correlation, residual, copy, detail_pairs, detail_checked_scores, detail_apart, clock.seconds,
                           keypoint_agreed=agreed, agreement_pairs=agreement_pairs, agreement_scores=agreement_scores)


def head_box_similarity(pairs: np.ndarray, candidates: np.ndarray, candidate_scores: np.ndarray, heads: np.ndarray,
                        canonical: np.ndarray, threshold: int, near: NearDuplicateParams) -> np.ndarray:
    """(M,) the head-box search's aligned similarity of each pair (i < j): its score where the head-box
    shortlist held the pair (``candidates``, sorted, and ``candidate_scores``), verified now where it did not."""
    n = len(heads)
    keys, known = pairs[:, 0].astype(np.int64) * n + pairs[:, 1], candidates[:, 0].astype(np.int64) * n + candidates[:, 1]
    at = np.searchsorted(known, keys)
    found = at < len(known)
    found[found] = known[at[found]] == keys[found]
    similarity = np.full(len(pairs), -1.0, np.float32)
    similarity[found] = candidate_scores[at[found]]
    if (~found).any():
        similarity[~found] = verify_pairs_posed(heads, canonical, pairs[~found], threshold, near.max_rotation_deg,
                                                near.rotation_step_deg)[0]
    return similarity


def _detail_check(fingerprints: list[Fingerprint], pairs: np.ndarray, head_threshold: int,
                  near: NearDuplicateParams, poses: PairPoses, workers: int = 1) -> np.ndarray:
    """:func:`detail_scores` of copy-level ``pairs``: neighbouring slices of one series can score as copies
    at 64 px; at 96 px, registered, their sulci differ.

    In ``workers`` threads, OpenCV on one thread each: its warps and ECC release the GIL (2,000 pairs of
    nickparvar-224: 2.4 s on two threads against 4.0 s on one, the same scores)."""
    if any(f.detail is None for f in fingerprints):
        raise ValueError("merge.near_duplicates.detail_similarity is on, but the fingerprints carry no detail "
                         "head (fingerprint_image(..., detail=True))")
    details = [f.detail for f in fingerprints]

    def check(rows: np.ndarray) -> np.ndarray:
        return detail_scores(details, pairs[rows], head_threshold, near.max_rotation_deg,
                             enough=near.detail_similarity, poses=poses.take(rows))

    scores = map_positions_in_threads(check, len(pairs), workers, min(len(pairs) // 64, 4 * workers))
    return np.array(scores, np.float32).reshape(len(pairs))
