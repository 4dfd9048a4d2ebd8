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
* The glioma mask is the mass only. Its oedema halo is drawn but left out of the mask, because the
  mask is the Grad-CAM target and a radiologist outlines the tumor, not the swelling around it.
* Planted copies are made from the decoded original file, as a real re-upload would be, and their
  masks go through exactly the same geometric transform (nearest-neighbour, so they stay 0/255).
* Copies are numbered among the originals of their folder (numbers are shuffled per folder), so no
  name or number reveals a copy. A mask describes pixels, not folders: a ``conflicting_label`` copy
  of a glioma filed under ``notumor`` keeps its glioma mask.
* ``planted.json`` records paths relative to ``images/`` and canonical labels (``no_tumor``, not the
  folder name ``notumor``), one record per copy, each copy of a different original.

Anatomy is stylised, not atlas-exact: a head of random size, shape and pose; scalp, skull and CSF
layers; grey/white matter with sulci; and the deep structures of one of three slice levels (above
the ventricles, through the lateral ventricles, or through the posterior fossa with skull-base
ridges). Image coordinates: front of the head at the top, ``v > 0`` (the head's lower half) is
"inferior" for the pituitary. Tissue is built on an intensity scale of about 0..1 (CSF and bone
dark; white matter brighter than grey, T1-like, or darker, FLAIR-like) and mapped to grey levels by
:func:`apply_acquisition`.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from braintumor.core.config import CLASS_NAMES, PhantomDuplicates, PhantomSource
from braintumor.core.imageio import to_grayscale
from braintumor.data.head import head_bbox

# Nickparvar's folder names and file-name codes for the canonical labels.
CLASS_FOLDERS: dict[str, str] = {
    "glioma": "glioma", "meningioma": "meningioma", "no_tumor": "notumor", "pituitary": "pituitary"
}
CLASS_CODES: dict[str, str] = {"glioma": "gl", "meningioma": "me", "no_tumor": "no", "pituitary": "pi"}
SPLITS: tuple[str, str] = ("Training", "Testing")
SPLIT_CODES: dict[str, str] = {"Training": "Tr", "Testing": "Te"}
DUPLICATE_KINDS: tuple[str, ...] = tuple(PhantomDuplicates.model_fields)

# Grey level (after a light blur) below which a pixel is background, when a copy needs the head box.
_HEAD_THRESHOLD = 12  # the default of preprocess.head_threshold
_CSF = 0.08  # tissue intensity of cerebrospinal fluid (dark on T1)

# Streams of the seed sequence, so that adding a copy never changes an original's pixels.
_PLAN_STREAM, _SLICE_STREAM, _COPY_STREAM = 0, 1, 2


# --------------------------------------------------------------------------- small array helpers


@lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each (size, size) float32; cached, read-only."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field of ``shape`` (float32) with about unit variance and ``cells`` bumps per side.

    A coarse grid of Gaussian samples upsampled by bicubic interpolation: vectorised and cheap, and
    ``cells`` sets the feature size relative to the head (3 = bias field, 5 = blobs, 20 = gyri).
    """
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    # Bicubic upsampling of white noise keeps about 60% of its variance; restore roughly unit std.
    return field * np.float32(1.3)


def _polar_noise(
    rng: np.random.Generator, frame: Frame, radius: np.ndarray, radial_cells: int, angular_cells: int
) -> np.ndarray:
    """Smooth noise (frame-shaped) laid out around the head centre, about unit variance.

    With many more cells around than outwards its features are elongated radially, like sulci.
    ``radius`` (0 at the centre, 1 at the brain surface) sets the radial coordinate.
    """
    cell = 8  # pixels per cell in the polar image
    grid = rng.standard_normal((radial_cells + 1, angular_cells)).astype(np.float32)
    # Pad by two cells of wrap-around so the upsampled strip is periodic in angle (no seam).
    wrapped = np.pad(grid, ((0, 0), (2, 2)), mode="wrap")
    strip_size = ((angular_cells + 4) * cell, (radial_cells + 1) * cell)
    strip = cv2.resize(wrapped, strip_size, interpolation=cv2.INTER_CUBIC)
    strip = np.ascontiguousarray(strip[:, 2 * cell : (angular_cells + 2) * cell]) * np.float32(1.3)
    map_x = (frame.phi + np.float32(math.pi)) * np.float32(angular_cells * cell / (2 * math.pi))
    map_y = np.minimum(radius, 1.2) * np.float32(radial_cells * cell / 1.2)
    return cv2.remap(strip, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def _length(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sqrt(x^2 + y^2) of two float32 arrays; OpenCV's version is ~15x faster than np.hypot."""
    return cv2.magnitude(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32))


def _inside(distance: np.ndarray, edge: float, width: float) -> np.ndarray:
    """Soft indicator of ``distance < edge``: 1 inside, 0 outside, a linear ramp ``width`` wide.

    The ramp anti-aliases edges (about one pixel wide when ``width`` is a pixel in distance units);
    it crosses 0.5 exactly at ``edge``, so a hard mask ``distance < edge`` matches the drawn edge.
    """
    return np.clip((edge - distance) / np.float32(max(width, 1e-6)) + np.float32(0.5), 0.0, 1.0)


def _blend(base: np.ndarray | float, value: np.ndarray | float, weight: np.ndarray) -> np.ndarray:
    """Paint ``value`` over ``base`` with opacity ``weight`` (arrays or scalars, broadcast)."""
    return base + weight * (value - base)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


# --------------------------------------------------------------------------- head geometry


SLICE_LEVELS: dict[str, float] = {"high": 0.2, "middle": 0.5, "low": 0.3}  # level -> probability


@dataclass(frozen=True)
class Head:
    """Pose, shape and layer radii of one slice's head.

    The head frame has ``u`` along the head's left-right axis and ``v`` along its front-back axis
    (``v > 0`` is the lower part of the image), scaled by the half-axes so that the scalp surface
    lies at elliptical radius ``rho == 1``. Layer edges (``scalp_inner`` ...) are in ``rho`` units.
    """

    cx: float
    cy: float
    half_width: float
    half_height: float
    angle_deg: float
    outline: tuple[tuple[int, float, float], ...]  # (harmonic, amplitude, phase) of the scalp outline
    scalp_inner: float
    skull_inner: float
    brain_edge: float
    atrophy: float  # 0..1: widens the CSF spaces (sulci, the gap under the skull, ventricles)
    level: str  # slice level, a key of SLICE_LEVELS

    def outline_radius(self, phi: np.ndarray | float) -> np.ndarray | float:
        """Scalp radius (in u, v units) in direction ``phi``: 1 for a pure ellipse."""
        return 1.0 + sum(amp * np.cos(k * phi + phase) for k, amp, phase in self.outline)


@dataclass(frozen=True)
class Frame:
    """Head-frame coordinates of the pixels of one slice's head window, each (h, w) float32.

    Everything outside ``window`` (the head's bounding box in the image) is background, so the
    anatomy is only computed inside it: half the work for an average head.
    """

    window: tuple[slice, slice]  # (rows, columns) of the image
    u: np.ndarray
    v: np.ndarray
    phi: np.ndarray  # direction from the head centre, radians in [-pi, pi]
    rho: np.ndarray
    pixel: float  # one pixel, in u/v/rho units (the ramp width of an anti-aliased edge)

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape


def sample_head(rng: np.random.Generator, size: int) -> Head:
    """Draw a head: 55-85% of the frame, elliptical with a wobbly outline, rotated +-15 deg, shifted.

    Args:
        rng: the slice's generator.
        size: image side in pixels.
    """
    level = str(rng.choice(list(SLICE_LEVELS), p=list(SLICE_LEVELS.values())))
    extent = _uniform(rng, 0.55, 0.85) * size / 2  # farthest scalp point from the head centre, px
    outline = tuple((k, _uniform(rng, 0.0, 0.09 / k**0.75), _uniform(rng, 0, 2 * math.pi)) for k in (1, 2, 3, 4))
    atrophy = float(rng.beta(1.2, 3.0))
    half_height = extent / (1.0 + sum(amp for _, amp, _ in outline))
    # Staying within 0.47 of the frame from its centre lets the copies rotate and zoom the head
    # about the image centre without cutting it.
    max_shift = max(0.0, min(0.05 * size, 0.47 * size - extent)) / math.sqrt(2)
    shift = rng.uniform(-max_shift, max_shift, size=2)
    # Near the vertex the section cuts scalp and skull obliquely, so they look thicker.
    oblique = 1.7 if level == "high" else 1.0
    scalp_inner = 1.0 - _uniform(rng, 0.03, 0.09) * oblique
    skull_inner = scalp_inner - _uniform(rng, 0.03, 0.08) * oblique
    return Head(
        cx=(size - 1) / 2 + float(shift[0]),
        cy=(size - 1) / 2 + float(shift[1]),
        half_width=half_height * _uniform(rng, 0.72, 0.95),  # axial heads are longer front to back
        half_height=half_height,
        angle_deg=_uniform(rng, -15.0, 15.0),
        outline=outline,
        scalp_inner=scalp_inner,
        skull_inner=skull_inner,
        brain_edge=skull_inner - _uniform(rng, 0.008, 0.02) - 0.06 * atrophy,
        atrophy=atrophy,
        level=level,
    )


def _head_window(head: Head, size: int) -> tuple[slice, slice]:
    """Rows and columns of the image that hold the head (its rotated, wobbly ellipse) plus a margin."""
    cos, sin = math.cos(math.radians(head.angle_deg)), math.sin(math.radians(head.angle_deg))
    reach = 1.0 + sum(amp for _, amp, _ in head.outline)
    half_x = reach * math.hypot(head.half_width * cos, head.half_height * sin) + 3
    half_y = reach * math.hypot(head.half_width * sin, head.half_height * cos) + 3
    rows = slice(max(0, math.floor(head.cy - half_y)), min(size, math.ceil(head.cy + half_y) + 1))
    return rows, slice(max(0, math.floor(head.cx - half_x)), min(size, math.ceil(head.cx + half_x) + 1))


def head_frame(head: Head, size: int) -> Frame:
    """Head-frame coordinates of the pixels in the head's window (see :class:`Head`)."""
    window = _head_window(head, size)
    ys, xs = (grid[window] for grid in _pixel_grid(size))
    cos, sin = math.cos(math.radians(head.angle_deg)), math.sin(math.radians(head.angle_deg))
    dx, dy = xs - np.float32(head.cx), ys - np.float32(head.cy)
    u = (cos * dx + sin * dy) / np.float32(head.half_width)
    v = (cos * dy - sin * dx) / np.float32(head.half_height)
    phi = np.arctan2(v, u)
    rho = _length(u, v) / head.outline_radius(phi).astype(np.float32)
    return Frame(window=window, u=u, v=v, phi=phi, rho=rho, pixel=2.0 / (head.half_width + head.half_height))


def _ellipse_distance(
    frame: Frame, centre: tuple[float, float], axes: tuple[float, float], tilt_deg: float
) -> np.ndarray:
    """Elliptical radius around ``centre`` in the head frame: 1 on an ellipse with half-axes ``axes``."""
    cos, sin = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    du, dv = frame.u - np.float32(centre[0]), frame.v - np.float32(centre[1])
    along_u = (cos * du + sin * dv) / np.float32(axes[0])
    along_v = (cos * dv - sin * du) / np.float32(axes[1])
    return _length(along_u, along_v)


def _irregular_distance(
    frame: Frame, centre: tuple[float, float], radius: float, lobes: tuple[tuple[int, float, float], ...]
) -> np.ndarray:
    """Radius around ``centre`` scaled so a lobed outline ``radius * (1 + sum amp cos(k psi + phase))`` is 1."""
    du, dv = frame.u - np.float32(centre[0]), frame.v - np.float32(centre[1])
    psi = np.arctan2(dv, du)
    outline = 1.0 + sum(amp * np.cos(k * psi + phase) for k, amp, phase in lobes)
    return _length(du, dv) / (np.float32(radius) * outline.astype(np.float32))


def _random_lobes(
    rng: np.random.Generator, harmonics: tuple[int, ...], scale: float
) -> tuple[tuple[int, float, float], ...]:
    return tuple((k, _uniform(rng, 0.0, scale / math.sqrt(k)), _uniform(rng, 0, 2 * math.pi)) for k in harmonics)


# --------------------------------------------------------------------------- anatomy


def render_scalp_and_skull(
    frame: Frame, head: Head, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue of scalp fat, skull (dark tables, brighter marrow) and intracranial CSF.

    Returns:
        (tissue, head weight, cranial weight): frame-shaped float32; the weights are 1 inside the
        scalp surface and inside the skull respectively.
    """
    shape = frame.shape
    # Skull thickness varies around the head: perturb the radius the inner layers are measured on.
    rho = frame.rho + np.float32(0.012) * _smooth_noise(rng, shape, 6)
    head_weight = _inside(frame.rho, 1.0, frame.pixel)
    fat = _uniform(rng, 0.55, 1.1) * (1.0 + np.float32(_uniform(rng, 0.1, 0.2)) * _smooth_noise(rng, shape, 5))
    tissue = head_weight * fat
    # Scalp fat is thicker in places (the back of the head, over the temporal muscles).
    scalp = 1.0 - head.scalp_inner
    scalp_edge = head.scalp_inner - scalp * _uniform(rng, 0.2, 0.5) * _smooth_noise(rng, shape, 3)
    bone = head.scalp_inner - head.skull_inner
    scalp_edge = np.clip(scalp_edge, head.skull_inner + 0.3 * bone, 1.0 - 0.3 * scalp)
    # Bone tables are dark but, thin and partial-volumed, rarely black all the way round.
    tissue = _blend(tissue, _uniform(rng, 0.08, 0.2), _inside(rho, scalp_edge, frame.pixel))
    bone_middle = (head.scalp_inner + head.skull_inner) / 2
    marrow = _inside(np.abs(rho - np.float32(bone_middle)), bone * _uniform(rng, 0.2, 0.4), frame.pixel)
    marrow *= _inside(rho, scalp_edge, frame.pixel)
    tissue = _blend(tissue, _uniform(rng, 0.25, 0.6), marrow)
    cranial_weight = _inside(rho, head.skull_inner, frame.pixel)
    return _blend(tissue, _CSF, cranial_weight), head_weight, cranial_weight


def render_parenchyma(
    frame: Frame, head: Head, rng: np.random.Generator, radius: np.ndarray
) -> tuple[np.ndarray, float]:
    """Grey and white matter with texture at two scales and deep nuclei (no CSF yet).

    Args:
        radius: ``rho`` scaled to 1 at the brain surface.

    Returns:
        (tissue, white_edge): frame-shaped float32, and the radius where the cortex begins.
    """
    shape = frame.shape
    grey = _uniform(rng, 0.3, 0.6)
    # White matter brighter than grey (T1-like) or darker (FLAIR-like); CSF stays dark in both.
    white = grey + _uniform(rng, 0.06, 0.3) * float(rng.choice([-0.7, 1.0]))
    white_edge = _uniform(rng, 0.5, 0.85)
    # White matter reaches into the gyri: a boundary wobbling at two scales.
    boundary = np.float32(0.18) * _smooth_noise(rng, shape, 4) + np.float32(0.1) * _smooth_noise(rng, shape, 10)
    tissue = grey + (white - grey) * _inside(radius + boundary, white_edge, 0.08)
    # Strong blobs at several cells per side give every slice its own low-resolution look; a
    # single-bump field would make many slices alike (bright centre, dark rim).
    tissue += _uniform(rng, 0.1, 0.17) * _smooth_noise(rng, shape, int(rng.integers(4, 9)))
    # Centre brighter or darker than the periphery, as receive coils and high fields make it.
    tissue *= 1.0 + np.float32(_uniform(rng, -0.15, 0.15)) * (np.square(np.minimum(radius, 1.0)) - np.float32(0.4))
    tissue += _uniform(rng, 0.015, 0.04) * _smooth_noise(rng, shape, int(rng.integers(10, 20)))
    tissue = _blend(tissue, grey + _uniform(rng, -0.08, 0.08), render_deep_nuclei(frame, rng))
    return tissue, white_edge


def render_sulci(
    frame: Frame, head: Head, rng: np.random.Generator, radius: np.ndarray, white_edge: float
) -> np.ndarray:
    """Weight (frame-shaped) of the CSF in the cortical sulci, wider with atrophy.

    Sulci are the zero crossings of a field elongated along the radius, wiggled a little, and
    only in the cortex (outside ``white_edge``).
    """
    gyri = _polar_noise(rng, frame, radius, int(rng.integers(2, 5)), int(rng.integers(36, 72)))
    gyri += np.float32(0.35) * _smooth_noise(rng, frame.shape, 20)
    cortex = 1.0 - _inside(radius, white_edge - 0.05, 0.1)
    width = _uniform(rng, 0.12, 0.25) + 0.15 * head.atrophy
    return np.exp(-np.square(gyri / np.float32(width))) * cortex * np.float32(_uniform(rng, 0.4, 0.9))


def render_midline_fissure(frame: Frame, head: Head, rng: np.random.Generator) -> np.ndarray:
    """Weight (frame-shaped) of the interhemispheric fissure, in front of and behind the deep structures."""
    fissure_px = _uniform(rng, 0.7, 1.6)
    fissure = np.exp(-np.square(frame.u * np.float32(head.half_width / fissure_px)))
    fissure *= 1.0 - _inside(np.abs(frame.v) / np.float32(head.brain_edge), _uniform(rng, 0.2, 0.4), 0.1)
    return fissure * np.float32(_uniform(rng, 0.5, 0.9))


def render_brain(frame: Frame, head: Head, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Parenchyma with its CSF spaces: sulci, Sylvian fissures, the midline fissure.

    Returns:
        (tissue, brain weight): both frame-shaped float32.
    """
    radius = frame.rho / np.float32(head.brain_edge)  # 1 at the brain surface
    tissue, white_edge = render_parenchyma(frame, head, rng, radius)
    tissue = _blend(tissue, _CSF, render_sulci(frame, head, rng, radius, white_edge))
    tissue = _blend(tissue, _CSF, render_sylvian_fissures(frame, head, rng))
    tissue = _blend(tissue, _CSF, render_midline_fissure(frame, head, rng))
    return tissue, _inside(radius, 1.0, frame.pixel / head.brain_edge)


def render_sylvian_fissures(frame: Frame, head: Head, rng: np.random.Generator) -> np.ndarray:
    """Weight (frame-shaped) of the lateral (Sylvian) fissures: CSF clefts running in from the sides.

    Whether they show, and how deep, depends on the slice level; each side is drawn on its own.
    """
    weight = np.zeros(frame.shape, np.float32)
    for side in (-1.0, 1.0):
        if rng.random() < 0.4:
            continue
        length, width = _uniform(rng, 0.12, 0.35), _uniform(rng, 0.012, 0.03) * (1.0 + head.atrophy)
        centre = (side * (head.brain_edge - length / 2), _uniform(rng, -0.2, 0.1))
        distance = _ellipse_distance(frame, centre, (length / 2, width), side * _uniform(rng, -10.0, 30.0))
        weight = np.maximum(weight, _inside(distance, 1.0, frame.pixel / width))
    return weight


def render_deep_nuclei(frame: Frame, rng: np.random.Generator) -> np.ndarray:
    """Weight (frame-shaped) of a pair of deep grey-matter nuclei (thalami or basal ganglia) by the midline."""
    u_offset, v_offset = _uniform(rng, 0.12, 0.24), _uniform(rng, -0.05, 0.18)
    axes = (_uniform(rng, 0.04, 0.07), _uniform(rng, 0.1, 0.17))
    tilt = _uniform(rng, 5.0, 35.0)  # oblique, like the lentiform nuclei
    distance = np.minimum(
        _ellipse_distance(frame, (-u_offset, v_offset), axes, tilt + _uniform(rng, -5.0, 5.0)),
        _ellipse_distance(frame, (u_offset, v_offset), axes, -tilt + _uniform(rng, -5.0, 5.0)),
    )
    return _inside(distance, 1.0, 0.8)  # soft-edged: nuclei blend into the white matter


def render_ventricles(frame: Frame, head: Head, rng: np.random.Generator, shrink: float = 1.0) -> np.ndarray:
    """Weight (frame-shaped) of the lateral ventricles and sometimes the third: dark CSF near the centre.

    Size, spacing, tilt, left-right asymmetry and the presence of the occipital horns all vary,
    as they do with age and slice level; ``shrink`` < 1 leaves the slivers seen above the ventricles.
    """
    scale = float(np.clip(math.exp(rng.normal(0.0, 0.35)), 0.45, 1.6)) * (1.0 + 0.6 * head.atrophy) * shrink
    gap = _uniform(rng, 0.025, 0.07)
    # Midline shift and slice level move the whole system.
    shift_u, shift_v = float(rng.normal(0.0, 0.025)), _uniform(rng, -0.12, 0.12)
    front = _uniform(rng, 0.0, 0.25) - shift_v
    parts = []
    for side in (-1.0, 1.0):
        own = scale * _uniform(rng, 0.8, 1.2)
        width, length = _uniform(rng, 0.025, 0.06) * own, _uniform(rng, 0.1, 0.22) * own
        centre = (shift_u + side * (gap + width), -front)
        # Frontal horns diverge towards the front and the occipital horns towards the back: ")(".
        parts.append(_ellipse_distance(frame, centre, (width, length), side * _uniform(rng, 2.0, 20.0)))
        if rng.random() < 0.75:
            width, length = _uniform(rng, 0.02, 0.045) * own, _uniform(rng, 0.07, 0.16) * own
            centre = (shift_u + side * (gap + _uniform(rng, 0.04, 0.12)), shift_v + _uniform(rng, 0.08, 0.25))
            parts.append(_ellipse_distance(frame, centre, (width, length), -side * _uniform(rng, 5.0, 35.0)))
    if rng.random() < 0.5:
        third = (_uniform(rng, 0.008, 0.015), _uniform(rng, 0.04, 0.09))
        parts.append(_ellipse_distance(frame, (shift_u, shift_v + _uniform(rng, 0.0, 0.1)), third, 0.0))
    distance = np.minimum.reduce(parts)
    return _inside(distance, 1.0, frame.pixel / 0.05)


def _paint_csf(tissue: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return _blend(tissue, _CSF, weight)


def _segment_distance(
    frame: Frame, start: tuple[float, float], end: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distance (head-frame units) of every pixel from the segment ``start``-``end``, and where along
    the segment (0 at ``start``, 1 at ``end``) its nearest point lies."""
    du, dv = end[0] - start[0], end[1] - start[1]
    pu, pv = frame.u - np.float32(start[0]), frame.v - np.float32(start[1])
    t = np.clip((pu * du + pv * dv) / np.float32(du * du + dv * dv), 0.0, 1.0)
    return _length(pu - t * np.float32(du), pv - t * np.float32(dv)), t


def render_skull_base(frame: Frame, head: Head, rng: np.random.Generator) -> np.ndarray:
    """Weight (frame-shaped) of the bone ridges crossing a low slice.

    The sphenoid wings run out from the midline towards the front-sides (between frontal and
    temporal lobes), the petrous ridges towards the back-sides (between temporal lobes and
    cerebellum); their angles and lengths vary.
    """
    weight = np.zeros(frame.shape, np.float32)
    wing_v, ridge_v = _uniform(rng, -0.15, -0.02), _uniform(rng, 0.05, 0.2)
    for side in (-1.0, 1.0):
        for start_v, low, high, sign in ((wing_v, -5.0, 25.0, -1.0), (ridge_v, 20.0, 45.0, 1.0)):
            angle, length = math.radians(_uniform(rng, low, high)), head.brain_edge * _uniform(rng, 0.6, 0.95)
            start = (side * 0.06, start_v)
            end = (start[0] + side * length * math.cos(angle), start_v + sign * length * math.sin(angle))
            distance, along = _segment_distance(frame, start, end)
            # A wedge: thin at the midline, widening towards the skull.
            width = np.float32(0.01) + np.float32(_uniform(rng, 0.03, 0.07)) * along
            weight = np.maximum(weight, _inside(distance / width, 1.0, frame.pixel / 0.03))
    return weight


def paint_posterior_fossa(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """Deep structures of a low slice: the tentorium arching over the cerebellum, the midbrain in its
    cistern, the fourth ventricle and the temporal horns (no lateral ventricle bodies at this level).
    """
    apex = _uniform(rng, 0.0, 0.25)  # v of the tentorium's apex
    half_u, half_v = _uniform(rng, 0.45, 0.7), _uniform(rng, 0.4, 0.6)
    arch = _ellipse_distance(frame, (0.0, apex + half_v), (half_u, half_v), _uniform(rng, -5.0, 5.0))
    # The cerebellum below the arch has its own intensity and concentric folia.
    folia = np.sin(arch * np.float32(_uniform(rng, 40.0, 70.0)))
    cerebellum = _inside(arch, 1.0, 0.05) * brain
    tissue = tissue * (1.0 + (np.float32(_uniform(rng, -0.15, 0.15)) + np.float32(0.06) * folia) * cerebellum)
    # The tentorium is the upper half of the arch only.
    tentorium = np.exp(-np.square((arch - 1.0) / np.float32(_uniform(rng, 0.025, 0.05))))
    tentorium *= _inside(frame.v, apex + half_v, 0.05) * np.float32(_uniform(rng, 0.5, 0.8))
    tissue = _paint_csf(tissue, tentorium * brain)
    # The midbrain sits just in front of the apex, ringed by its cistern.
    radius = _uniform(rng, 0.09, 0.14)
    midbrain = _ellipse_distance(frame, (float(rng.normal(0.0, 0.01)), apex - radius), (1.2 * radius, radius), 0.0)
    cistern = _inside(midbrain, _uniform(rng, 1.2, 1.45), 0.1) * (1.0 - _inside(midbrain, 1.0, 0.1))
    tissue = _paint_csf(tissue, cistern * brain)
    fourth_axes = (_uniform(rng, 0.025, 0.045), _uniform(rng, 0.02, 0.035))
    fourth = _ellipse_distance(frame, (0.0, apex + _uniform(rng, 0.1, 0.18)), fourth_axes, 0.0)
    tissue = _paint_csf(tissue, _inside(fourth, 1.0, 0.3))
    for side in (-1.0, 1.0):
        centre = (side * _uniform(rng, 0.25, 0.4), _uniform(rng, -0.1, 0.1))
        axes = (_uniform(rng, 0.01, 0.02), _uniform(rng, 0.04, 0.08))
        horn = _ellipse_distance(frame, centre, axes, side * _uniform(rng, 10.0, 40.0))
        tissue = _paint_csf(tissue, _inside(horn, 1.0, 0.3) * brain)
    return tissue


def paint_slice_level(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """Paint the deep structures of a randomly chosen slice level (drawn independently of the class).

    High slices (above the ventricles) show at most slivers of ventricle, middle slices the lateral
    ventricles, low slices the posterior fossa (:func:`paint_posterior_fossa`).
    """
    if head.level == "low":
        tissue = _blend(tissue, _uniform(rng, 0.03, 0.15), render_skull_base(frame, head, rng) * brain)
        return paint_posterior_fossa(frame, head, rng, tissue, brain)
    return _paint_csf(tissue, render_ventricles(frame, head, rng, 0.35 if head.level == "high" else 1.0) * brain)


# --------------------------------------------------------------------------- tumors


def paint_glioma(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular, heterogeneous intra-axial mass with an oedema halo; mask = the mass only.

    Args:
        frame, head: the slice's geometry.
        rng: the slice's generator.
        tissue: the slice so far, frame-shaped float32.
        brain: brain weight, where oedema can spread.
    """
    shape = frame.shape
    # Keep the mass (up to ~1.7 radii with lobes and boundary noise) within 72% of the brain.
    room = 0.72 * head.brain_edge * (1.0 - sum(amp for _, amp, _ in head.outline))
    radius = _uniform(rng, 0.5, 1.0) * room / 2.6
    where, angle = _uniform(rng, 0.0, room - 1.7 * radius), _uniform(rng, 0, 2 * math.pi)
    centre = (where * math.cos(angle), where * math.sin(angle))
    distance = _irregular_distance(frame, centre, radius, _random_lobes(rng, (2, 3, 4, 5), 0.15))
    distance += np.float32(0.1) * _smooth_noise(rng, shape, 24)
    oedema = _inside(distance, _uniform(rng, 1.5, 2.3), 0.6) * brain
    tissue = tissue * (1.0 + np.float32(rng.choice([-1.0, 1.0]) * _uniform(rng, 0.2, 0.35)) * oedema)
    # Either clearly brighter than brain, or darker inside an enhancing rim: never lost in it.
    bright = rng.random() < 0.6
    level = _uniform(rng, 0.75, 1.0) if bright else _uniform(rng, 0.1, 0.25)
    mass = level * (1.0 + np.float32(_uniform(rng, 0.1, 0.25)) * _smooth_noise(rng, shape, 32))
    if bright and rng.random() < 0.6:  # necrotic core
        mass = _blend(mass, _uniform(rng, 0.05, 0.25), _inside(distance, _uniform(rng, 0.3, 0.6), 0.25))
    if not bright or rng.random() < 0.5:  # enhancing rim
        rim = np.exp(-np.square((distance - np.float32(0.85)) / np.float32(0.12)))
        mass = mass + _uniform(rng, 0.4, 0.7) * rim
    tissue = _blend(tissue, mass, _inside(distance, 1.0, frame.pixel / radius))
    return tissue, distance < 1.0


def paint_meningioma(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Well-circumscribed, bright, roughly round extra-axial mass against the inner skull.

    It sits on the skull's inner surface, fills the intracranial space there and pushes the brain
    back behind a thin CSF cleft; the mask is the mass inside the skull. Arguments as
    :func:`paint_glioma` (``brain`` is unused: the mass is outside the brain).
    """
    shape = frame.shape
    radius, angle = _uniform(rng, 0.09, 0.2), _uniform(rng, 0, 2 * math.pi)
    where = head.skull_inner * float(head.outline_radius(angle)) - _uniform(rng, 0.35, 0.7) * radius
    centre = (where * math.cos(angle), where * math.sin(angle))
    distance = _irregular_distance(frame, centre, radius, _random_lobes(rng, (2, 3), 0.05))
    distance += np.float32(0.02) * _smooth_noise(rng, shape, 16)
    intracranial = _inside(frame.rho, head.skull_inner, frame.pixel)
    cleft = (1.0 - _inside(distance, 1.0, 0.05)) * _inside(distance, _uniform(rng, 1.06, 1.16), 0.05)
    tissue = _blend(tissue, _CSF, cleft * intracranial * np.float32(0.7))
    mass = _uniform(rng, 0.75, 1.05) * (1.0 + np.float32(0.04) * _smooth_noise(rng, shape, 20))
    tissue = _blend(tissue, mass, _inside(distance, 1.0, frame.pixel / radius) * intracranial)
    return tissue, (distance < 1.0) & (frame.rho < head.skull_inner)


def paint_pituitary(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Small midline mass in the lower-middle of the brain (the sella region in image terms).

    Arguments as :func:`paint_glioma` (``brain`` is unused).
    """
    shape = frame.shape
    radius = _uniform(rng, 0.055, 0.1)
    centre = (float(rng.normal(0.0, 0.012)), _uniform(rng, 0.3, 0.5) * head.brain_edge)
    distance = _irregular_distance(frame, centre, radius, _random_lobes(rng, (2, 3), 0.08))
    distance += np.float32(0.04) * _smooth_noise(rng, shape, 24)
    mass = _uniform(rng, 0.75, 1.0) * (1.0 + np.float32(0.06) * _smooth_noise(rng, shape, 32))
    if rng.random() < 0.3:  # cystic part
        offset = rng.uniform(-0.5, 0.5, size=2) * radius
        cyst_centre = (centre[0] + float(offset[0]), centre[1] + float(offset[1]))
        cyst = _ellipse_distance(frame, cyst_centre, (0.4 * radius, 0.4 * radius), 0.0)
        mass = _blend(mass, _uniform(rng, 0.1, 0.3), _inside(cyst, 1.0, 0.3) * _inside(distance, 0.9, 0.1))
    tissue = _blend(tissue, mass, _inside(distance, 1.0, frame.pixel / radius))
    return tissue, distance < 1.0


def _paint_nothing(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return tissue, np.zeros(tissue.shape, bool)


_TumorPainter = Callable[[Frame, Head, np.random.Generator, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
TUMOR_PAINTERS: dict[str, _TumorPainter] = {
    "glioma": paint_glioma,
    "meningioma": paint_meningioma,
    "no_tumor": _paint_nothing,
    "pituitary": paint_pituitary,
}


# --------------------------------------------------------------------------- acquisition and slice


def apply_acquisition(
    tissue: np.ndarray,
    head_weight: np.ndarray,
    periphery: np.ndarray,
    window: tuple[slice, slice],
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Turn the head window's tissue into a uint8 scan: bias field, gamma, gain, offset, blur, Rician noise.

    All drawn independently of the class, so that brightness and contrast do not reveal it.

    Args:
        tissue, head_weight: the head window, float32 (h, w).
        periphery: weight of scalp and skull in the window, which shading does not darken.
        window: where the window sits in the (size, size) image.
        size: image side.
        rng: the slice's generator.
    """
    ys, xs = (grid[window] for grid in _pixel_grid(size))
    slope_x, slope_y = (np.float32(_uniform(rng, -0.3, 0.3) / size) for _ in range(2))
    log_bias = _uniform(rng, 0.15, 0.3) * _smooth_noise(rng, tissue.shape, 3)
    bias = np.exp(log_bias + slope_x * (xs - np.float32(size / 2)) + slope_y * (ys - np.float32(size / 2)))
    # Scalp and skull lie next to the receive coils, so shading never darkens them: a dim scalp
    # would make the head's outline (which preprocessing and deduplication crop to) unstable.
    bias = _blend(bias, np.maximum(bias, 1.0), periphery)
    head = np.power(np.maximum(tissue * bias, 0.0), np.float32(_uniform(rng, 0.7, 1.4)))
    head = head * np.float32(_uniform(rng, 140.0, 245.0)) + np.float32(_uniform(rng, -10.0, 10.0)) * head_weight
    scan = np.zeros((size, size), np.float32)
    scan[window] = head
    scan = cv2.GaussianBlur(scan, (0, 0), _uniform(rng, 0.3, 0.9))  # scanner resolution, partial volume
    # Magnitude images have Rician noise: the modulus of signal plus complex Gaussian noise.
    sigma = np.float32(_uniform(rng, 0.8, 4.0))
    real, imaginary = rng.standard_normal((2, size, size), dtype=np.float32) * sigma
    scan = np.sqrt(np.square(scan + real) + np.square(imaginary))
    return np.clip(scan + np.float32(0.5), 0, 255).astype(np.uint8)


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
    tissue = _blend(tissue, brain_tissue, brain)
    tissue = paint_slice_level(frame, head, rng, tissue, brain)
    tissue, window_mask = TUMOR_PAINTERS[label](frame, head, rng, tissue, brain)
    mask = np.zeros((size, size), bool)
    mask[frame.window] = window_mask
    image = apply_acquisition(tissue, head_weight, head_weight - cranial_weight, frame.window, size, rng)
    return image, mask


def encode_image(image: np.ndarray, suffix: str, quality: int = 95) -> bytes:
    """Encode an image as ``.jpg`` (at ``quality``) or ``.png`` bytes with OpenCV."""
    if suffix == ".jpg":
        ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif suffix == ".png":
        ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    else:
        raise ValueError(f"unsupported suffix {suffix!r}; allowed: '.jpg', '.png'")
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} {image.dtype} image as {suffix}")
    return buffer.tobytes()


def encode_original(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """JPEG bytes of an original at quality 88-95, as one grey channel or as three equal channels."""
    quality = int(rng.integers(88, 96))
    if rng.random() < 0.5:  # the public datasets mix greyscale and RGB files of the same modality
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return encode_image(image, ".jpg", quality)


# --------------------------------------------------------------------------- planted duplicates


def head_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """The head's bounding box (y0, y1, x0, x1), as the pipeline finds it (:func:`head_bbox`)."""
    return head_bbox(to_grayscale(image), _HEAD_THRESHOLD)


def _warp_both(image: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply one affine ``matrix`` (2, 3) to image and mask on the same canvas; the mask stays 0/255."""
    height, width = mask.shape
    warped = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    return warped, cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST, borderValue=0)


def _resize_both(image: np.ndarray, mask: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    shrinking = width * height < mask.shape[0] * mask.shape[1]
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    return resized, cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def _centre(shape: tuple[int, ...]) -> tuple[float, float]:
    """(x, y) of the centre of an image of ``shape`` (H, W, ...), as OpenCV's warps expect it."""
    return (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0


def _copy_pixels(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # exact, reencoded and conflicting_label keep the pixels; only the file (or its folder) changes.
    return image, mask


def _copy_resized(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    side = mask.shape[0]
    # 512/224/384/192 for 256 px originals: the sizes the public re-uploads use.
    choices = sorted({max(32, round(side * f)) for f in (2.0, 0.875, 1.5, 0.75)} - {side})
    new_side = int(rng.choice(choices))
    return _resize_both(image, mask, new_side, new_side)


def _copy_grayscale_rgb(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), mask
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), mask


def _copy_cropped(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y0, y1, x0, x1 = head_box(image)
    cropped, cropped_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if rng.random() < 0.5:  # re-uploads often stretch the crop back to a square
        return _resize_both(cropped, cropped_mask, mask.shape[1], mask.shape[0])
    return np.ascontiguousarray(cropped), np.ascontiguousarray(cropped_mask)


def _copy_padded(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    height, width = mask.shape
    top, bottom = (round(f * height) for f in rng.uniform(0.1, 0.25, size=2))
    left, right = (round(f * width) for f in rng.uniform(0.1, 0.25, size=2))
    padded = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    padded_mask = cv2.copyMakeBorder(mask, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    return _resize_both(padded, padded_mask, width, height)


def _copy_rotated(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    angle = _uniform(rng, 2.0, 7.0) * float(rng.choice([-1.0, 1.0]))
    # Heads stay within 0.47 of the frame from its centre (sample_head), so nothing is cut off.
    return _warp_both(image, mask, cv2.getRotationMatrix2D(_centre(mask.shape), angle, 1.0))


def _copy_flipped(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return cv2.flip(image, 1), cv2.flip(mask, 1)


def _largest_zoom_keeping_head(image: np.ndarray) -> float:
    """The largest zoom about the image centre that keeps the head's bounding box inside the frame."""
    y0, y1, x0, x1 = head_box(image)
    cx, cy = _centre(image.shape)
    # Each box side may move out to the frame edge: zoom <= (centre to frame edge) / (centre to box side).
    reach = [cx - x0, x1 - 1 - cx, cy - y0, y1 - 1 - cy]
    room = [cx, cx, cy, cy]
    return min(r / max(d, 1e-6) for r, d in zip(room, reach))


def _copy_rescaled(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    zoom_in_limit = min(1.08, _largest_zoom_keeping_head(image))
    if rng.random() < 0.5 and zoom_in_limit >= 1.03:
        zoom = _uniform(rng, 1.03, zoom_in_limit)
    else:
        zoom = _uniform(rng, 0.85, 0.95)
    return _warp_both(image, mask, cv2.getRotationMatrix2D(_centre(mask.shape), 0.0, zoom))


_CopyMaker = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
COPY_MAKERS: dict[str, _CopyMaker] = {
    "exact": _copy_pixels,
    "resized": _copy_resized,
    "reencoded": _copy_pixels,
    "grayscale_rgb": _copy_grayscale_rgb,
    "cropped": _copy_cropped,
    "padded": _copy_padded,
    "rotated": _copy_rotated,
    "flipped": _copy_flipped,
    "rescaled": _copy_rescaled,
    "conflicting_label": _copy_pixels,
}


def make_copy(
    kind: str, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a planted copy of ``kind`` and its mask, transformed identically.

    Args:
        kind: a :class:`PhantomDuplicates` field name.
        image: the decoded original, uint8 (H, W) or (H, W, 3).
        mask: its tumor mask, uint8 (H, W), 0/255.
        rng: the copy's generator.
    """
    if kind not in COPY_MAKERS:
        raise ValueError(f"unknown duplicate kind {kind!r}; allowed: {list(COPY_MAKERS)}")
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in size")
    return COPY_MAKERS[kind](image, mask, rng)


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


def _copy_file_format(kind: str, rng: np.random.Generator) -> tuple[str, int]:
    """(file format, JPEG quality) of a planted copy of ``kind``."""
    if kind == "exact":
        return "same", 0
    if kind == "reencoded":
        return ("png", 0) if rng.random() < 0.3 else ("jpg", int(rng.integers(60, 86)))
    if kind == "conflicting_label":
        return ("same", 0) if rng.random() < 0.5 else ("jpg", int(rng.integers(60, 86)))
    return "jpg", int(rng.integers(80, 96))


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
            file_format, quality = _copy_file_format(kind, rng)
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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if jobs < 64 else min(cores, 8)


def render_originals(originals: list[PlannedImage], cfg: PhantomSource) -> list[tuple[bytes, bytes]]:
    """File bytes of every original and its mask, rendered by a few threads when there are many.

    Threads, not processes: NumPy and OpenCV release the GIL inside their array operations, and a
    thread pool needs neither a ``__main__`` guard in the caller (spawn) nor a fork of OpenCV's
    thread pool, on which a child can hang. Each slice has its own seed, so the result does not
    depend on the number of workers.
    """
    jobs = [(_seed_entropy(cfg.seed), plan, cfg.image_size) for plan in originals]
    workers = _worker_count(len(jobs))
    if workers == 1:
        return [_render_original(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_render_original, jobs))


def render_copy(
    plan: PlannedImage, original: tuple[bytes, bytes], rng: np.random.Generator
) -> tuple[bytes, bytes]:
    """(image file bytes, mask PNG bytes) of a planted copy, made from the original's files."""
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
        files.append(render_copy(copy, files[copy.original], rng))
    _make_class_folders(dest)
    for name, (image_bytes, mask_bytes) in zip(names, files):
        _write_file(dest / "images" / name, image_bytes)
        _write_file(dest / "masks" / Path(name).with_suffix(".png"), mask_bytes)
    records = _planted_records(copies, names[len(originals) :], names, originals)
    (dest / "planted.json").write_text(json.dumps(records, indent=1) + "\n")
    return _summary(originals + copies, cfg)
