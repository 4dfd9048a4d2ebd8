"""The built-in "phantom" source: synthetic axial brain MRI slices with tumor masks and planted duplicates.

:func:`generate_phantom_source` writes a folder laid out like Nickparvar's Kaggle download, so the
rest of the pipeline cannot tell it from a real source, plus two things real sources lack::

    images/{Training,Testing}/{glioma,meningioma,notumor,pituitary}/Tr-gl_0001.jpg
    masks/<same relative path as the image, suffix .png>   uint8 0/255 tumor mask, image-sized
    planted.json                                           the duplicates planted on purpose

The masks let tests check that Grad-CAM points at the tumor; ``planted.json`` is the ground truth for
the deduplication stage. Nothing needs the network, so this is the offline default.

Design choices:

* Every slice is drawn from its own random generator, seeded by ``cfg.seed`` and the slice's index,
  so a config always gives byte-identical files, and each slice has its own anatomy (head shape,
  size and pose, skull, texture, ventricles, bias field, tumor position): two distinct slices are
  never near-duplicates, even as 32 px head thumbnails.
* Global intensity (gain, gamma, offset, bias, noise, head size) is drawn independently of the class,
  so mean brightness, contrast and file size do not give the label away.
* Planted copies are made from the decoded original file, as a real re-upload would be, and their
  masks go through exactly the same geometric transform (nearest-neighbour, so they stay 0/255).
* Copies are numbered among the originals of their folder (numbers are shuffled per folder), so no
  name or number reveals a copy. A mask describes pixels, not folders: a ``conflicting_label`` copy
  of a glioma filed under ``notumor`` keeps its glioma mask.
* ``planted.json`` records paths relative to ``images/`` and canonical labels (``no_tumor``, not the
  folder name ``notumor``), one record per copy, each copy of a different original.

The slice is drawn in :mod:`~braintumor.data.phantom.anatomy` (head, brain, slice level, scanner) and
:mod:`~braintumor.data.phantom.tumors` (the masses and their masks); the planted copies' pixels in
:mod:`~braintumor.data.phantom.copies`. This module plans the files, renders and writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from braintumor.core.config import CLASS_NAMES, PhantomSource
from braintumor.core.imageio import encode_image
from braintumor.core.parallel import available_cores, map_in_workers
from braintumor.data.phantom.anatomy import (
    apply_acquisition,
    blend,
    head_frame,
    paint_slice_level,
    render_brain,
    render_scalp_and_skull,
    sample_head,
)
from braintumor.data.phantom.copies import DUPLICATE_KINDS, copy_file_format, make_copy
from braintumor.data.phantom.tumors import TUMOR_PAINTERS

# Nickparvar's folder names and file-name codes for the canonical labels.
CLASS_FOLDERS: dict[str, str] = {
    "glioma": "glioma", "meningioma": "meningioma", "no_tumor": "notumor", "pituitary": "pituitary"
}
CLASS_CODES: dict[str, str] = {"glioma": "gl", "meningioma": "me", "no_tumor": "no", "pituitary": "pi"}
SPLITS: tuple[str, str] = ("Training", "Testing")
SPLIT_CODES: dict[str, str] = {"Training": "Tr", "Testing": "Te"}

# Streams of the seed sequence, so that adding a copy never changes an original's pixels.
_PLAN_STREAM, _SLICE_STREAM, _COPY_STREAM = 0, 1, 2


# --------------------------------------------------------------------------- one slice


def render_slice(rng: np.random.Generator, label: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial slice of class ``label``.

    Args:
        rng: the slice's own generator (every draw comes from it, so the slice is reproducible).
        label: one of ``CLASS_NAMES``.
        size: image side in pixels.

    Returns:
        (image, mask): uint8 (size, size) greyscale and bool (size, size) tumor mask (all False for
        ``no_tumor``).
    """
    if label not in TUMOR_PAINTERS:
        raise ValueError(f"unknown label {label!r}; allowed: {list(TUMOR_PAINTERS)}")
    head = sample_head(rng, size)
    frame = head_frame(head, size)
    tissue, head_weight, cranial_weight = render_scalp_and_skull(frame, head, rng)
    brain_tissue, brain = render_brain(frame, head, rng)
    tissue = blend(tissue, brain_tissue, brain)
    tissue = paint_slice_level(frame, head, rng, tissue, brain)
    tissue, window_mask = TUMOR_PAINTERS[label](frame, head, rng, tissue, brain)
    mask = np.zeros((size, size), bool)
    mask[frame.window] = window_mask
    image = apply_acquisition(tissue, head_weight, head_weight - cranial_weight, frame.window, size, rng)
    return image, mask


class NeighbourGenerator:
    """Replays a slice's random draws for the neighbouring slice of the same head, a few mm away.

    It wraps the slice's own generator, so every draw happens in the same order and the anatomy stays
    the same head: slice level, number and kind of structures (``integers``, ``choice``, ``random``,
    ``beta`` pass through unchanged). Continuous parameters (``uniform``, ``normal``: head size and
    pose, tissue contrasts, tumor size and position) move by ``jitter`` of their range, and every
    noise field (``standard_normal``: gyri, texture, bias, scanner noise) turns by ``angle`` radians
    towards an independent field, so sulci and texture change the way they do between real adjacent
    slices while the outline, the contrast and the tumor stay.
    """

    def __init__(self, rng: np.random.Generator, other: np.random.Generator, angle: float, jitter: float) -> None:
        self._rng, self._other = rng, other
        self._cos, self._sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        self._jitter = jitter

    def __getattr__(self, name: str):
        if name in ("integers", "choice", "random", "beta"):
            return getattr(self._rng, name)
        raise AttributeError(f"the phantom's anatomy draws {name!r}, which NeighbourGenerator does not replay")

    def uniform(self, low: float = 0.0, high: float = 1.0, size=None):
        value = self._rng.uniform(low, high, size)
        moved = value + self._other.uniform(-1.0, 1.0, size) * self._jitter * (high - low)
        return np.clip(moved, min(low, high), max(low, high))

    def normal(self, loc: float = 0.0, scale: float = 1.0, size=None):
        return self._rng.normal(loc, scale, size) + self._other.normal(0.0, self._jitter * 2 * scale, size)

    def standard_normal(self, size=None, dtype=np.float64):
        field = self._rng.standard_normal(size, dtype=dtype)
        return field * self._cos + self._other.standard_normal(size, dtype=dtype) * self._sin


def render_adjacent_slice(
    rng: np.random.Generator, other: np.random.Generator, label: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The neighbouring slice of the slice :func:`render_slice` draws from ``rng`` (a generator in the
    same state), with ``other`` supplying the change: a distinct image of the same head, not a copy.
    """
    # 0.35-0.6 rad leaves 0.83-0.94 of each noise field's variance shared with the original slice.
    neighbour = NeighbourGenerator(rng, other, angle=float(other.uniform(0.35, 0.6)), jitter=0.03)
    return render_slice(neighbour, label, size)  # type: ignore[arg-type]  # duck-typed generator


def encode_original(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """JPEG bytes of an original at quality 88-95, as one grey channel or as three equal channels."""
    quality = int(rng.integers(88, 96))
    if rng.random() < 0.5:  # the public datasets mix greyscale and RGB files of the same modality
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return encode_image(image, ".jpg", quality)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedImage:
    """One file to write: an original (``kind == ""``) or a planted copy of original ``original``."""

    split: str
    label: str
    original: int  # index of the rendered slice it shows
    kind: str = ""
    file_format: str = "jpg"  # "jpg", "png", or "same" (the original file's bytes)
    quality: int = 0  # JPEG quality of a re-encoded copy

    @property
    def suffix(self) -> str:
        return ".png" if self.file_format == "png" else ".jpg"


def _seed_entropy(seed: int) -> list[int]:
    # SeedSequence takes non-negative integers only; keep negative seeds distinct from positive ones.
    return [0, seed] if seed >= 0 else [1, -seed]


def plan_originals(cfg: PhantomSource) -> list[PlannedImage]:
    """``images_per_class`` originals per class, ``test_fraction`` of each class in Testing.

    Original ``i`` is class ``CLASS_NAMES[i // images_per_class]``.
    """
    rng = np.random.default_rng([*_seed_entropy(cfg.seed), _PLAN_STREAM])
    per_class = cfg.images_per_class
    n_test = round(per_class * cfg.test_fraction)
    plans = []
    for class_index, label in enumerate(CLASS_NAMES):
        testing = set(rng.permutation(per_class)[:n_test].tolist())
        for j in range(per_class):
            split = "Testing" if j in testing else "Training"
            plans.append(PlannedImage(split=split, label=label, original=class_index * per_class + j))
    return plans


def plan_copies(cfg: PhantomSource, originals: list[PlannedImage], rng: np.random.Generator) -> list[PlannedImage]:
    """The planted copies: each of a distinct original, about half of each kind in the other split.

    Raises:
        ValueError: if more copies are asked for than there are originals.
    """
    counts = cfg.duplicates.model_dump()
    total = sum(counts.values())
    if total > len(originals):
        raise ValueError(
            f"phantom: {total} planted copies need as many distinct originals, but there are only "
            f"{len(originals)} (images_per_class={cfg.images_per_class}); "
            "lower duplicates.* or raise images_per_class"
        )
    sources = iter(rng.permutation(len(originals))[:total].tolist())
    copies = []
    for kind in DUPLICATE_KINDS:
        # Cross-folder leakage (a Training slice again in Testing) is what real datasets suffer from.
        moved = rng.permutation(np.arange(counts[kind]) < (counts[kind] + 1) // 2)
        for move in moved.tolist():
            original = originals[next(sources)]
            split = SPLITS[1 - SPLITS.index(original.split)] if move else original.split
            label = original.label
            if kind == "conflicting_label":
                label = str(rng.choice([name for name in CLASS_NAMES if name != original.label]))
            file_format, quality = copy_file_format(kind, rng)
            copies.append(PlannedImage(split, label, original.original, kind, file_format, quality))
    return copies


def assign_file_names(plans: list[PlannedImage], rng: np.random.Generator) -> list[str]:
    """Relative paths like ``Training/glioma/Tr-gl_0007.jpg``, one per plan, in plan order.

    Each folder numbers its files 1..n in random order, so copies are not the highest numbers.
    """
    folders: dict[tuple[str, str], list[int]] = {}
    for i, plan in enumerate(plans):
        folders.setdefault((plan.split, plan.label), []).append(i)
    names = [""] * len(plans)
    for (split, label), members in folders.items():
        for i, number in zip(members, (rng.permutation(len(members)) + 1).tolist()):
            stem = f"{SPLIT_CODES[split]}-{CLASS_CODES[label]}_{number:04d}"
            names[i] = f"{split}/{CLASS_FOLDERS[label]}/{stem}{plans[i].suffix}"
    return names


# --------------------------------------------------------------------------- rendering and writing


def _render_original(job: tuple[list[int], PlannedImage, int]) -> tuple[bytes, bytes]:
    """(image file bytes, mask PNG bytes) of one original, from its own generator."""
    entropy, plan, size = job
    rng = np.random.default_rng([*entropy, _SLICE_STREAM, plan.original])
    image, mask = render_slice(rng, plan.label, size)
    return encode_original(image, rng), encode_image(mask.astype(np.uint8) * 255, ".png")


def _worker_count(jobs: int) -> int:
    # A thread pool only pays off once there is enough work to share.
    return 1 if jobs < 64 else min(available_cores(), 8)


def render_originals(originals: list[PlannedImage], cfg: PhantomSource) -> list[tuple[bytes, bytes]]:
    """File bytes of every original and its mask, rendered by a few threads when there are many.

    Threads, not processes: NumPy and OpenCV release the GIL inside their array operations, so
    threads share the work without starting processes or sending images back. Each slice has its
    own seed, so the result does not depend on the number of workers.
    """
    jobs = [(_seed_entropy(cfg.seed), plan, cfg.image_size) for plan in originals]
    return map_in_workers(_render_original, jobs, _worker_count(len(jobs)), kind="thread")


def render_copy(
    plan: PlannedImage, original: tuple[bytes, bytes], rng: np.random.Generator, seed: int = 0, size: int = 0
) -> tuple[bytes, bytes]:
    """(image file bytes, mask PNG bytes) of a planted copy, made from the original's files.

    An ``adjacent_slice`` is not made from the file: it is rendered again from the original's seed
    (``seed`` and ``size`` are the source's), with ``rng`` moving it to the neighbouring slice.
    """
    if plan.kind == "adjacent_slice":
        slice_rng = np.random.default_rng([*_seed_entropy(seed), _SLICE_STREAM, plan.original])
        image, mask = render_adjacent_slice(slice_rng, rng, plan.label, size)
        return encode_original(image, rng), encode_image(mask.astype(np.uint8) * 255, ".png")
    if plan.file_format == "same":
        return original
    image = cv2.imdecode(np.frombuffer(original[0], np.uint8), cv2.IMREAD_UNCHANGED)
    mask = cv2.imdecode(np.frombuffer(original[1], np.uint8), cv2.IMREAD_GRAYSCALE)
    image, mask = make_copy(plan.kind, image, mask, rng)
    return encode_image(image, plan.suffix, plan.quality), encode_image(mask, ".png")


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _check_destination(dest: Path, cfg: PhantomSource) -> None:
    if not dest.is_dir():
        raise FileNotFoundError(f"phantom destination {dest} is not an existing directory")
    if any(dest.iterdir()):
        raise FileExistsError(f"phantom destination {dest} is not empty; it must be a fresh folder")
    if cfg.subdir:
        raise ValueError(
            f"phantom sources write their class folders directly under images/; subdir must be '' (got {cfg.subdir!r})"
        )


def _planted_records(
    copies: list[PlannedImage], copy_names: list[str], names: list[str], originals: list[PlannedImage]
) -> list[dict]:
    """The ``planted.json`` records; ``names`` lists the originals' paths first, in index order."""
    return [
        {
            "original": names[copy.original],
            "copy": name,
            "kind": copy.kind,
            "original_label": originals[copy.original].label,
            "copy_label": copy.label,
        }
        for copy, name in zip(copies, copy_names)
    ]


def _summary(plans: list[PlannedImage], cfg: PhantomSource) -> dict:
    files = {split: {CLASS_FOLDERS[label]: 0 for label in CLASS_NAMES} for split in SPLITS}
    for plan in plans:
        files[plan.split][CLASS_FOLDERS[plan.label]] += 1
    planted = {kind: sum(plan.kind == kind for plan in plans) for kind in DUPLICATE_KINDS}
    originals = sum(plan.kind == "" for plan in plans)
    return {
        "originals": originals,
        "planted": planted,
        "planted_total": len(plans) - originals,
        "files": files,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
    }


def _make_class_folders(dest: Path) -> None:
    # Every split/class folder exists, even one left empty by a tiny config, as in a real download.
    for root in ("images", "masks"):
        for split in SPLITS:
            for label in CLASS_NAMES:
                (dest / root / split / CLASS_FOLDERS[label]).mkdir(parents=True, exist_ok=True)


def generate_phantom_source(dest: Path, cfg: PhantomSource) -> dict:
    """Write the phantom dataset (images, masks, planted.json) into the empty folder ``dest``.

    Args:
        dest: an existing, empty folder.
        cfg: the source's validated params.

    Returns:
        Summary: ``originals``, ``planted`` (count per kind), ``planted_total`` and ``files``
        (count per split and class folder, copies included).
    """
    dest = Path(dest)
    _check_destination(dest, cfg)
    originals = plan_originals(cfg)
    plan_rng = np.random.default_rng([*_seed_entropy(cfg.seed), _PLAN_STREAM, 1])
    copies = plan_copies(cfg, originals, plan_rng)
    names = assign_file_names(originals + copies, plan_rng)
    files = render_originals(originals, cfg)
    for j, copy in enumerate(copies):
        rng = np.random.default_rng([*_seed_entropy(cfg.seed), _COPY_STREAM, j])
        files.append(render_copy(copy, files[copy.original], rng, cfg.seed, cfg.image_size))
    _make_class_folders(dest)
    for name, (image_bytes, mask_bytes) in zip(names, files):
        _write_file(dest / "images" / name, image_bytes)
        _write_file(dest / "masks" / Path(name).with_suffix(".png"), mask_bytes)
    records = _planted_records(copies, names[len(originals) :], names, originals)
    (dest / "planted.json").write_text(json.dumps(records, indent=1) + "\n")
    return _summary(originals + copies, cfg)
