"""The phantom's tumors: glioma, meningioma and pituitary masses painted into a slice, with their masks.

Each painter takes the slice's geometry, its generator, the tissue so far and the brain weight, and
returns the tissue with the mass and the mass's mask (a bool array over the head window). The glioma
mask is the mass only: its oedema halo is drawn but left out of the mask, because the mask is the
Grad-CAM target and a radiologist outlines the tumor, not the swelling around it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from braintumor.data.phantom.anatomy import (
    CSF,
    Frame,
    Head,
    blend,
    ellipse_distance,
    inside,
    irregular_distance,
    random_lobes,
    smooth_noise,
    uniform,
)


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
    radius = uniform(rng, 0.5, 1.0) * room / 2.6
    where, angle = uniform(rng, 0.0, room - 1.7 * radius), uniform(rng, 0, 2 * math.pi)
    centre = (where * math.cos(angle), where * math.sin(angle))
    distance = irregular_distance(frame, centre, radius, random_lobes(rng, (2, 3, 4, 5), 0.15))
    distance += np.float32(0.1) * smooth_noise(rng, shape, 24)
    oedema = inside(distance, uniform(rng, 1.5, 2.3), 0.6) * brain
    tissue = tissue * (1.0 + np.float32(rng.choice([-1.0, 1.0]) * uniform(rng, 0.2, 0.35)) * oedema)
    # Either clearly brighter than brain, or darker inside an enhancing rim: never lost in it.
    bright = rng.random() < 0.6
    level = uniform(rng, 0.75, 1.0) if bright else uniform(rng, 0.1, 0.25)
    mass = level * (1.0 + np.float32(uniform(rng, 0.1, 0.25)) * smooth_noise(rng, shape, 32))
    if bright and rng.random() < 0.6:  # necrotic core
        mass = blend(mass, uniform(rng, 0.05, 0.25), inside(distance, uniform(rng, 0.3, 0.6), 0.25))
    if not bright or rng.random() < 0.5:  # enhancing rim
        rim = np.exp(-np.square((distance - np.float32(0.85)) / np.float32(0.12)))
        mass = mass + uniform(rng, 0.4, 0.7) * rim
    tissue = blend(tissue, mass, inside(distance, 1.0, frame.pixel / radius))
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
    radius, angle = uniform(rng, 0.09, 0.2), uniform(rng, 0, 2 * math.pi)
    where = head.skull_inner * float(head.outline_radius(angle)) - uniform(rng, 0.35, 0.7) * radius
    centre = (where * math.cos(angle), where * math.sin(angle))
    distance = irregular_distance(frame, centre, radius, random_lobes(rng, (2, 3), 0.05))
    distance += np.float32(0.02) * smooth_noise(rng, shape, 16)
    intracranial = inside(frame.rho, head.skull_inner, frame.pixel)
    cleft = (1.0 - inside(distance, 1.0, 0.05)) * inside(distance, uniform(rng, 1.06, 1.16), 0.05)
    tissue = blend(tissue, CSF, cleft * intracranial * np.float32(0.7))
    mass = uniform(rng, 0.75, 1.05) * (1.0 + np.float32(0.04) * smooth_noise(rng, shape, 20))
    tissue = blend(tissue, mass, inside(distance, 1.0, frame.pixel / radius) * intracranial)
    return tissue, (distance < 1.0) & (frame.rho < head.skull_inner)


def paint_pituitary(
    frame: Frame, head: Head, rng: np.random.Generator, tissue: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Small midline mass in the lower-middle of the brain (the sella region in image terms).

    Arguments as :func:`paint_glioma` (``brain`` is unused).
    """
    shape = frame.shape
    radius = uniform(rng, 0.055, 0.1)
    centre = (float(rng.normal(0.0, 0.012)), uniform(rng, 0.3, 0.5) * head.brain_edge)
    distance = irregular_distance(frame, centre, radius, random_lobes(rng, (2, 3), 0.08))
    distance += np.float32(0.04) * smooth_noise(rng, shape, 24)
    mass = uniform(rng, 0.75, 1.0) * (1.0 + np.float32(0.06) * smooth_noise(rng, shape, 32))
    if rng.random() < 0.3:  # cystic part
        offset = rng.uniform(-0.5, 0.5, size=2) * radius
        cyst_centre = (centre[0] + float(offset[0]), centre[1] + float(offset[1]))
        cyst = ellipse_distance(frame, cyst_centre, (0.4 * radius, 0.4 * radius), 0.0)
        mass = blend(mass, uniform(rng, 0.1, 0.3), inside(cyst, 1.0, 0.3) * inside(distance, 0.9, 0.1))
    tissue = blend(tissue, mass, inside(distance, 1.0, frame.pixel / radius))
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
