"""Training-time augmentation as ONE fused affine transform per image.

Rotation, zoom, shift, shear and a horizontal flip are composed into a single 3x3 matrix per image,
and the whole batch is resampled by one ``ImageProjectiveTransformV3`` call (bilinear, zeros
outside). A stack of separate Keras augmentation layers resamples every image once per layer and
ran at ~95 images/s on 2 cores; one resampling per image is what makes the input pipeline fast.

Coordinates: x is the column, y the row (y points down), pixel centres sit at integers, and every
transform is about the image centre ((S - 1) / 2, (S - 1) / 2). The forward transform, applied to
the image content, is

    p_out = c + t + R(rotation) @ Shear(shear) @ Zoom(zoom) @ Flip @ (p_in - c)

with positive rotation counter-clockwise on screen, zoom > 1 enlarging the content, shift t moving
it right / down, and shear x' = x + tan(shear) * y. ``ImageProjectiveTransformV3`` wants the
opposite map, OUTPUT pixel -> INPUT pixel, so :func:`inverse_affine_matrix` composes the inverse
directly (in closed form, so the identity, flips and integer shifts stay exact).
"""

from __future__ import annotations

import math

import tensorflow as tf

from braintumor.core.config import AugmentParams


def is_identity(params: AugmentParams) -> bool:
    """True when every magnitude is 0 and the flip is off, i.e. augmentation changes nothing."""
    return (
        params.rotation_deg == 0
        and params.zoom == 0
        and params.shift == 0
        and params.shear_deg == 0
        and not params.horizontal_flip
    )


def _matrices_2x2(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
    """(B, 2, 2) matrices [[a, b], [c, d]] from four (B,) tensors."""
    return tf.reshape(tf.stack([a, b, c, d], axis=-1), [-1, 2, 2])


def inverse_affine_matrix(
    rotation_deg: tf.Tensor,
    zoom: tf.Tensor,
    shift_x: tf.Tensor,
    shift_y: tf.Tensor,
    shear_deg: tf.Tensor,
    flip: tf.Tensor,
    image_size: int,
) -> tf.Tensor:
    """The (B, 3, 3) matrices that map OUTPUT pixel (x, y, 1) to INPUT pixel, per image.

    They invert the forward transform in the module docstring (flip, then zoom, shear, rotate about
    the centre, then shift).

    Args:
        rotation_deg: (B,) rotation in degrees; positive turns the content counter-clockwise.
        zoom: (B,) scale factor of the content (> 0; 1 = none).
        shift_x: (B,) pixels the content moves right.
        shift_y: (B,) pixels the content moves down.
        shear_deg: (B,) shear angle in degrees (x' = x + tan(shear) * y about the centre).
        flip: (B,) bool, mirror left-right.
        image_size: side S of the square image, in pixels.
    """
    rotation = tf.convert_to_tensor(rotation_deg, tf.float32) * (math.pi / 180.0)
    zoom = tf.convert_to_tensor(zoom, tf.float32)
    shear = tf.convert_to_tensor(shear_deg, tf.float32) * (math.pi / 180.0)
    zero, one = tf.zeros_like(rotation), tf.ones_like(rotation)
    cos, sin = tf.cos(rotation), tf.sin(rotation)
    # Each factor is the inverse of its forward counterpart; they apply in reverse order.
    unrotate = _matrices_2x2(cos, -sin, sin, cos)
    unshear = _matrices_2x2(one, -tf.tan(shear), zero, one)
    unzoom = _matrices_2x2(1.0 / zoom, zero, zero, 1.0 / zoom)
    unflip = _matrices_2x2(tf.where(tf.convert_to_tensor(flip, tf.bool), -one, one), zero, zero, one)
    linear = unflip @ unzoom @ unshear @ unrotate  # (B, 2, 2)
    centre = tf.fill([tf.shape(rotation)[0], 2], (image_size - 1) / 2.0)  # (B, 2)
    shift = tf.stack([tf.cast(shift_x, tf.float32), tf.cast(shift_y, tf.float32)], axis=-1)  # (B, 2)
    # p_in = c + L (p_out - c - t) = L p_out + (c - L (c + t))
    offset = centre - tf.linalg.matvec(linear, centre + shift)  # (B, 2)
    top = tf.concat([linear, offset[:, :, None]], axis=-1)  # (B, 2, 3)
    bottom = tf.tile(tf.constant([[[0.0, 0.0, 1.0]]]), [tf.shape(top)[0], 1, 1])  # (B, 1, 3)
    return tf.concat([top, bottom], axis=1)


def to_projective_transforms(matrices: tf.Tensor) -> tf.Tensor:
    """(B, 8) rows [a0, a1, a2, b0, b1, b2, c0, c1] for ``ImageProjectiveTransformV3``.

    Args:
        matrices: (B, 3, 3) output-to-input matrices whose last row is [c0, c1, 1].
    """
    return tf.reshape(matrices, [-1, 9])[:, :8]


def random_affine_transforms(
    batch_size: int | tf.Tensor, image_size: int, params: AugmentParams, seed: tf.Tensor
) -> tf.Tensor:
    """(B, 8) float32 random projective transforms (output -> input), one per image.

    Args:
        batch_size: B, number of transforms.
        image_size: side S of the square images, in pixels (shifts are fractions of it).
        params: magnitudes; each value is drawn uniformly in [-m, m] (zoom in [1 - z, 1 + z]), and
            the flip with probability 1/2 when ``horizontal_flip`` is on.
        seed: shape-[2] integer seed; the same seed gives the same transforms.
    """
    # One stateless draw for all six parameters: (B, 6) uniform in [0, 1), mapped to [-1, 1).
    unit = tf.random.stateless_uniform([batch_size, 6], seed=seed, dtype=tf.float32)
    signed = 2.0 * unit - 1.0
    flip = unit[:, 5] < 0.5 if params.horizontal_flip else tf.zeros_like(unit[:, 5], tf.bool)
    matrices = inverse_affine_matrix(
        rotation_deg=params.rotation_deg * signed[:, 0],
        zoom=1.0 + params.zoom * signed[:, 1],
        shift_x=params.shift * image_size * signed[:, 2],
        shift_y=params.shift * image_size * signed[:, 3],
        shear_deg=params.shear_deg * signed[:, 4],
        flip=flip,
        image_size=image_size,
    )
    return to_projective_transforms(matrices)


def apply_transforms(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """Resample each image with its (8,) output-to-input transform: bilinear, 0 outside the image.

    Args:
        images: (B, H, W, C) float32.
        transforms: (B, 8) float32, as made by :func:`to_projective_transforms`.
    """
    resampled = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.cast(transforms, tf.float32),
        output_shape=tf.shape(images)[1:3],
        fill_value=tf.constant(0.0, tf.float32),
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    resampled.set_shape(images.shape)  # the op forgets the static size; the model needs it
    return resampled


def augment_images(images: tf.Tensor, params: AugmentParams, seed: tf.Tensor) -> tf.Tensor:
    """Randomly rotated, zoomed, shifted, sheared and flipped copies of a batch of square images.

    Args:
        images: (B, S, S, 1) float32.
        params: augmentation magnitudes; if :func:`is_identity`, the input is returned unchanged.
        seed: shape-[2] integer seed (stateless: the same seed and images give the same output).
    """
    images = tf.convert_to_tensor(images)
    shape = images.shape
    if shape.rank != 4 or shape[-1] != 1:
        raise ValueError(f"augment_images: images must have shape (B, S, S, 1), got {shape}")
    if images.dtype != tf.float32:
        raise ValueError(f"augment_images: images must be float32, got {images.dtype.name}")
    if shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"augment_images: images must be square with a known size, got {shape}")
    if is_identity(params):
        return images
    transforms = random_affine_transforms(tf.shape(images)[0], int(shape[1]), params, seed)
    return apply_transforms(images, transforms)
