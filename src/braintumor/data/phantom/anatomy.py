"""The phantom's anatomy: head, brain and slice level of one synthetic axial slice, and the scanner.

Anatomy is stylised, not atlas-exact: a head of random size, shape and pose; scalp, skull and CSF
layers; grey/white matter with sulci; and the deep structures of one of three slice levels (above
the ventricles, through the lateral ventricles, or through the posterior fossa with skull-base
ridges). Image coordinates: front of the head at the top, ``v > 0`` (the head's lower half) is
"inferior" for the pituitary. Tissue is built on an intensity scale of about 0..1 (CSF and bone
dark; white matter brighter than grey, T1-like, or darker, FLAIR-like) and mapped to grey levels by
:func:`apply_acquisition`, whose gain, gamma, offset, bias and noise are drawn independently of the
class, so mean brightness and contrast do not give the label away.

The small array helpers here (smooth noise, soft indicators, blending, distances to lobed shapes)
are shared with :mod:`braintumor.data.phantom.tumors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

CSF = 0.08  # tissue intensity of cerebrospinal fluid (dark on T1)


# --------------------------------------------------------------------------- small array helpers


@lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each (size, size) float32; cached, read-only."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
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


def inside(distance: np.ndarray, edge: float, width: float) -> np.ndarray:
    """Soft indicator of ``distance < edge``: 1 inside, 0 outside, a linear ramp ``width`` wide.

    The ramp anti-aliases edges (about one pixel wide when ``width`` is a pixel in distance units);
    it crosses 0.5 exactly at ``edge``, so a hard mask ``distance < edge`` matches the drawn edge.
    """
    return np.clip((edge - distance) / np.float32(max(width, 1e-6)) + np.float32(0.5), 0.0, 1.0)


def blend(base: np.ndarray | float, value: np.ndarray | float, weight: np.ndarray) -> np.ndarray:
    """Paint ``value`` over ``base`` with opacity ``weight`` (arrays or scalars, broadcast)."""
    return base + weight * (value - base)


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
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
    extent = uniform(rng, 0.55, 0.85) * size / 2  # farthest scalp point from the head centre, px
    outline = tuple((k, uniform(rng, 0.0, 0.09 / k**0.75), uniform(rng, 0, 2 * math.pi)) for k in (1, 2, 3, 4))
    atrophy = float(rng.beta(1.2, 3.0))
    half_height = extent / (1.0 + sum(amp for _, amp, _ in outline))
    # Staying within 0.47 of the frame from its centre lets the copies rotate and zoom the head
    # about the image centre without cutting it.
    max_shift = max(0.0, min(0.05 * size, 0.47 * size - extent)) / math.sqrt(2)
    shift = rng.uniform(-max_shift, max_shift, size=2)
    # Near the vertex the section cuts scalp and skull obliquely, so they look thicker.
    oblique = 1.7 if level == "high" else 1.0
    scalp_inner = 1.0 - uniform(rng, 0.03, 0.09) * oblique
    skull_inner = scalp_inner - uniform(rng, 0.03, 0.08) * oblique
    return Head(
        cx=(size - 1) / 2 + float(shift[0]),
        cy=(size - 1) / 2 + float(shift[1]),
        half_width=half_height * uniform(rng, 0.72, 0.95),  # axial heads are longer front to back
        half_height=half_height,
        angle_deg=uniform(rng, -15.0, 15.0),
        outline=outline,
        scalp_inner=scalp_inner,
        skull_inner=skull_inner,
        brain_edge=skull_inner - uniform(rng, 0.008, 0.02) - 0.06 * atrophy,
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


def ellipse_distance(
    frame: Frame, centre: tuple[float, float], axes: tuple[float, float], tilt_deg: float
) -> np.ndarray:
    """Elliptical radius around ``centre`` in the head frame: 1 on an ellipse with half-axes ``axes``."""
    cos, sin = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    du, dv = frame.u - np.float32(centre[0]), frame.v - np.float32(centre[1])
    along_u = (cos * du + sin * dv) / np.float32(axes[0])
    along_v = (cos * dv - sin * du) / np.float32(axes[1])
    return _length(along_u, along_v)


def irregular_distance(
    frame: Frame, centre: tuple[float, float], radius: float, lobes: tuple[tuple[int, float, float], ...]
) -> np.ndarray:
    """Radius around ``centre`` scaled so a lobed outline ``radius * (1 + sum amp cos(k psi + phase))`` is 1."""
    du, dv = frame.u - np.float32(centre[0]), frame.v - np.float32(centre[1])
    psi = np.arctan2(dv, du)
    outline = 1.0 + sum(amp * np.cos(k * psi + phase) for k, amp, phase in lobes)
    return _length(du, dv) / (np.float32(radius) * outline.astype(np.float32))


def random_lobes(
    rng: np.random.Generator, harmonics: tuple[int, ...], scale: float
) -> tuple[tuple[int, float, float], ...]:
    return tuple((k, uniform(rng, 0.0, scale / math.sqrt(k)), uniform(rng, 0, 2 * math.pi)) for k in harmonics)


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
    rho = frame.rho + np.float32(0.012) * smooth_noise(rng, shape, 6)
    head_weight = inside(frame.rho, 1.0, frame.pixel)
    fat = uniform(rng, 0.55, 1.1) * (1.0 + np.float32(uniform(rng, 0.1, 0.2)) * smooth_noise(rng, shape, 5))
    tissue = head_weight * fat
    # Scalp fat is thicker in places (the back of the head, over the temporal muscles).
    scalp = 1.0 - head.scalp_inner
    scalp_edge = head.scalp_inner - scalp * uniform(rng, 0.2, 0.5) * smooth_noise(rng, shape, 3)
    bone = head.scalp_inner - head.skull_inner
    scalp_edge = np.clip(scalp_edge, head.skull_inner + 0.3 * bone, 1.0 - 0.3 * scalp)
    # Bone tables are dark but, thin and partial-volumed, rarely black all the way round.
    tissue = blend(tissue, uniform(rng, 0.08, 0.2), inside(rho, scalp_edge, frame.pixel))
    bone_middle = (head.scalp_inner + head.skull_inner) / 2
    marrow = inside(np.abs(rho - np.float32(bone_middle)), bone * uniform(rng, 0.2, 0.4), frame.pixel)
    marrow *= inside(rho, scalp_edge, frame.pixel)
    tissue = blend(tissue, uniform(rng, 0.25, 0.6), marrow)
    cranial_weight = inside(rho, head.skull_inner, frame.pixel)
    return blend(tissue, CSF, cranial_weight), head_weight, cranial_weight


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
    grey = uniform(rng, 0.3, 0.6)
    # White matter brighter than grey (T1-like) or darker (FLAIR-like); CSF stays dark in both.
    white = grey + uniform(rng, 0.06, 0.3) * float(rng.choice([-0.7, 1.0]))
    white_edge = uniform(rng, 0.5, 0.85)
    # White matter reaches into the gyri: a boundary wobbling at two scales.
    boundary = np.float32(0.18) * smooth_noise(rng, shape, 4) + np.float32(0.1) * smooth_noise(rng, shape, 10)
    tissue = grey + (white - grey) * inside(radius + boundary, white_edge, 0.08)
    # Strong blobs at several cells per side give every slice its own low-resolution look; a
    # single-bump field would make many slices alike (bright centre, dark rim).
    tissue += uniform(rng, 0.1, 0.17) * smooth_noise(rng, shape, int(rng.integers(4, 9)))
    # Centre brighter or darker than the periphery, as receive coils and high fields make it.
    tissue *= 1.0 + np.float32(uniform(rng, -0.15, 0.15)) * (np.square(np.minimum(radius, 1.0)) - np.float32(0.4))
    tissue += uniform(rng, 0.015, 0.04) * smooth_noise(rng, shape, int(rng.integers(10, 20)))
    tissue = blend(tissue, grey + uniform(rng, -0.08, 0.08), render_deep_nuclei(frame, rng))
    return tissue, white_edge


def render_sulci(
    frame: Frame, head: Head, rng: np.random.Generator, radius: np.ndarray, white_edge: float
) -> np.ndarray:
    """Weight (frame-shaped) of the CSF in the cortical sulci, wider with atrophy.

    Sulci are the zero crossings of a field elongated along the radius, wiggled a little, and
    only in the cortex (outside ``white_edge``).
    """
    gyri = _polar_noise(rng, frame, radius, int(rng.integers(2, 5)), int(rng.integers(36, 72)))
    gyri += np.float32(0.35) * smooth_noise(rng, frame.shape, 20)
    cortex = 1.0 - inside(radius, white_edge - 0.05, 0.1)
    width = uniform(rng, 0.12, 0.25) + 0.15 * head.atrophy
    return np.exp(-np.square(gyri / np.float32(width))) * cortex * np.float32(uniform(rng, 0.4, 0.9))


def render_midline_fissure(frame: Frame, head: Head, rng: np.random.Generator) -> np.ndarray:
    """Weight (frame-shaped) of the interhemispheric fissure, in front of and behind the deep structures."""
    fissure_px = uniform(rng, 0.7, 1.6)
    fissure = np.exp(-np.square(frame.u * np.float32(head.half_width / fissure_px)))
    fissure *= 1.0 - inside(np.abs(frame.v) / np.float32(head.brain_edge), uniform(rng, 0.2, 0.4), 0.1)
    return fissure * np.float32(uniform(rng, 0.5, 0.9))


def render_brain(frame: Frame, head: Head, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Parenchyma with its CSF spaces: sulci, Sylvian fissures, the midline fissure.

    Returns:
        (tissue, brain weight): both frame-shaped float32.
    """
    radius = frame.rho / np.float32(head.brain_edge)  # 1 at the brain surface
    tissue, white_edge = render_parenchyma(frame, head, rng, radius)
    tissue = blend(tissue, CSF, render_sulci(frame, head, rng, radius, white_edge))
    tissue = blend(tissue, CSF, render_sylvian_fissures(frame, head, rng))
    tissue = blend(tissue, CSF, render_midline_fissure(frame, head, rng))
    return tissue, inside(radius, 1.0, frame.pixel / head.brain_edge)


def render_sylvian_fissures(frame: Frame, head: Head, rng: np.random.Generator) -> np.ndarray:
    """Weight (frame-shaped) of the lateral (Sylvian) fissures: CSF clefts running in from the sides.

    Whether they show, and how deep, depends on the slice level; each side is drawn on its own.
    """
    weight = np.zeros(frame.shape, np.float32)
    for side in (-1.0, 1.0):
        if rng.random() < 0.4:
            continue
        length, width = uniform(rng, 0.12, 0.35), uniform(rng, 0.012, 0.03) * (1.0 + head.atrophy)
        centre = (side * (head.brain_edge - length / 2), uniform(rng, -0.2, 0.1))
        distance = ellipse_distance(frame, centre, (length / 2, width), side * uniform(rng, -10.0, 30.0))
        weight = np.maximum(weight, inside(distance, 1.0, frame.pixel / width))
    return weight


def render_deep_nuclei(frame: Frame, rng: np.random.Generator) -> np.ndarray:
    """Weight (frame-shaped) of a pair of deep grey-matter nuclei (thalami or basal ganglia) by the midline."""
    u_offset, v_offset = uniform(rng, 0.12, 0.24), uniform(rng, -0.05, 0.18)
    axes = (uniform(rng, 0.04, 0.07), uniform(rng, 0.1, 0.17))
    tilt = uniform(rng, 5.0, 35.0)  # oblique, like the lentiform nuclei
    distance = np.minimum(
        ellipse_distance(frame, (-u_offset, v_offset), axes, tilt + uniform(rng, -5.0, 5.0)),
        ellipse_distance(frame, (u_offset, v_offset), axes, -tilt + uniform(rng, -5.0, 5.0)),
    )
    return inside(distance, 1.0, 0.8)  # soft-edged: nuclei blend into the white matter


def render_ventricles(frame: Frame, head: Head, rng: np.random.Generator, shrink: float = 1.0) -> np.ndarray:
    """Weight (frame-shaped) of the lateral ventricles and sometimes the third: dark CSF near the centre.

    Size, spacing, tilt, left-right asymmetry and the presence of the occipital horns all vary,
    as they do with age and slice level; ``shrink`` < 1 leaves the slivers seen above the ventricles.
    """
    scale = float(np.clip(math.exp(rng.normal(0.0, 0.35)), 0.45, 1.6)) * (1.0 + 0.6 * head.atrophy) * shrink
    gap = uniform(rng, 0.025, 0.07)
    # Midline shift and slice level move the whole system.
    shift_u, shift_v = float(rng.normal(0.0, 0.025)), uniform(rng, -0.12, 0.12)
    front = uniform(rng, 0.0, 0.25) - shift_v
    parts = []
    for side in (-1.0, 1.0):
        own = scale * uniform(rng, 0.8, 1.2)
        width, length = uniform(rng, 0.025, 0.06) * own, uniform(rng, 0.1, 0.22) * own
        centre = (shift_u + side * (gap + width), -front)
        # Frontal horns diverge towards the front and the occipital horns towards the back: ")(".
        parts.append(ellipse_distance(frame, centre, (width, length), side * uniform(rng, 2.0, 20.0)))
        if rng.random() < 0.75:
            width, length = uniform(rng, 0.02, 0.045) * own, uniform(rng, 0.07, 0.16) * own
            centre = (shift_u + side * (gap + uniform(rng, 0.04, 0.12)), shift_v + uniform(rng, 0.08, 0.25))
            parts.append(ellipse_distance(frame, centre, (width, length), -side * uniform(rng, 5.0, 35.0)))
    if rng.random() < 0.5:
        third = (uniform(rng, 0.008, 0.015), uniform(rng, 0.04, 0.09))
        parts.append(ellipse_distance(frame, (shift_u, shift_v + uniform(rng, 0.0, 0.1)), third, 0.0))
    distance = np.minimum.reduce(parts)
    return inside(distance, 1.0, frame.pixel / 0.05)


def _paint_csf(tissue: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return blend(tissue, CSF, weight)


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
    wing_v, ridge_v = uniform(rng, -0.15, -0.02), uniform(rng, 0.05, 0.2)
    for side in (-1.0, 1.0):
        for start_v, low, high, sign in ((wing_v, -5.0, 25.0, -1.0), (ridge_v, 20.0, 45.0, 1.0)):
            angle, length = math.radians(uniform(rng, low, high)), head.brain_edge * uniform(rng, 0.6, 0.95)
            start = (side * 0.06, start_v)
            end = (start[0] + side * length * math.cos(angle), start_v + sign * length * math.sin(angle))
            distance, along = _segment_distance(frame, start, end)
            # A wedge: thin at the midline, widening towards the skull.
            width = np.float32(0.01) + np.float32(uniform(rng, 0.03, 0.07)) * along
            weight = np.maximum(weight, inside(distance / width, 1.0, frame.pixel / 0.03))
    return weight


def paint_posterior_fossa(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """Deep structures of a low slice: the tentorium arching over the cerebellum, the midbrain in its
    cistern, the fourth ventricle and the temporal horns (no lateral ventricle bodies at this level).
    """
    apex = uniform(rng, 0.0, 0.25)  # v of the tentorium's apex
    half_u, half_v = uniform(rng, 0.45, 0.7), uniform(rng, 0.4, 0.6)
    arch = ellipse_distance(frame, (0.0, apex + half_v), (half_u, half_v), uniform(rng, -5.0, 5.0))
    # The cerebellum below the arch has its own intensity and concentric folia.
    folia = np.sin(arch * np.float32(uniform(rng, 40.0, 70.0)))
    cerebellum = inside(arch, 1.0, 0.05) * brain
    tissue = tissue * (1.0 + (np.float32(uniform(rng, -0.15, 0.15)) + np.float32(0.06) * folia) * cerebellum)
    # The tentorium is the upper half of the arch only.
    tentorium = np.exp(-np.square((arch - 1.0) / np.float32(uniform(rng, 0.025, 0.05))))
    tentorium *= inside(frame.v, apex + half_v, 0.05) * np.float32(uniform(rng, 0.5, 0.8))
    tissue = _paint_csf(tissue, tentorium * brain)
    # The midbrain sits just in front of the apex, ringed by its cistern.
    radius = uniform(rng, 0.09, 0.14)
    midbrain = ellipse_distance(frame, (float(rng.normal(0.0, 0.01)), apex - radius), (1.2 * radius, radius), 0.0)
    cistern = inside(midbrain, uniform(rng, 1.2, 1.45), 0.1) * (1.0 - inside(midbrain, 1.0, 0.1))
    tissue = _paint_csf(tissue, cistern * brain)
    fourth_axes = (uniform(rng, 0.025, 0.045), uniform(rng, 0.02, 0.035))
    fourth = ellipse_distance(frame, (0.0, apex + uniform(rng, 0.1, 0.18)), fourth_axes, 0.0)
    tissue = _paint_csf(tissue, inside(fourth, 1.0, 0.3))
    for side in (-1.0, 1.0):
        centre = (side * uniform(rng, 0.25, 0.4), uniform(rng, -0.1, 0.1))
        axes = (uniform(rng, 0.01, 0.02), uniform(rng, 0.04, 0.08))
        horn = ellipse_distance(frame, centre, axes, side * uniform(rng, 10.0, 40.0))
        tissue = _paint_csf(tissue, inside(horn, 1.0, 0.3) * brain)
    return tissue


def paint_slice_level(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """Paint the deep structures of a randomly chosen slice level (drawn independently of the class).

    High slices (above the ventricles) show at most slivers of ventricle, middle slices the lateral
    ventricles, low slices the posterior fossa (:func:`paint_posterior_fossa`).
    """
    if head.level == "low":
        tissue = blend(tissue, uniform(rng, 0.03, 0.15), render_skull_base(frame, head, rng) * brain)
        return paint_posterior_fossa(frame, head, rng, tissue, brain)
    return _paint_csf(tissue, render_ventricles(frame, head, rng, 0.35 if head.level == "high" else 1.0) * brain)


# --------------------------------------------------------------------------- acquisition


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
    slope_x, slope_y = (np.float32(uniform(rng, -0.3, 0.3) / size) for _ in range(2))
    log_bias = uniform(rng, 0.15, 0.3) * smooth_noise(rng, tissue.shape, 3)
    bias = np.exp(log_bias + slope_x * (xs - np.float32(size / 2)) + slope_y * (ys - np.float32(size / 2)))
    # Scalp and skull lie next to the receive coils, so shading never darkens them: a dim scalp
    # would make the head's outline (which preprocessing and deduplication crop to) unstable.
    bias = blend(bias, np.maximum(bias, 1.0), periphery)
    head = np.power(np.maximum(tissue * bias, 0.0), np.float32(uniform(rng, 0.7, 1.4)))
    head = head * np.float32(uniform(rng, 140.0, 245.0)) + np.float32(uniform(rng, -10.0, 10.0)) * head_weight
    scan = np.zeros((size, size), np.float32)
    scan[window] = head
    scan = cv2.GaussianBlur(scan, (0, 0), uniform(rng, 0.3, 0.9))  # scanner resolution, partial volume
    # Magnitude images have Rician noise: the modulus of signal plus complex Gaussian noise.
    sigma = np.float32(uniform(rng, 0.8, 4.0))
    real, imaginary = rng.standard_normal((2, size, size), dtype=np.float32) * sigma
    scan = np.sqrt(np.square(scan + real) + np.square(imaginary))
    return np.clip(scan + np.float32(0.5), 0, 255).astype(np.uint8)
