"""Fused affine augmentation (hand-computed matrices and pixels) and the tf.data input pipeline."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from braintumor.model.augment import (
    apply_transforms,
    augment_images,
    inverse_affine_matrix,
    is_identity,
    random_affine_transforms,
    to_projective_transforms,
)
from braintumor.core.config import AugmentParams
from braintumor.model.inputs import class_weights, make_dataset, sample_weights

OFF = AugmentParams(rotation_deg=0.0, zoom=0.0, shift=0.0, shear_deg=0.0, horizontal_flip=False)
SEED = tf.constant([7, 11], tf.int64)


def _one(rotation=0.0, zoom=1.0, shift_x=0.0, shift_y=0.0, shear=0.0, flip=False, size=5) -> np.ndarray:
    """The (3, 3) output-to-input matrix for one image with explicit values."""
    return inverse_affine_matrix([rotation], [zoom], [shift_x], [shift_y], [shear], [flip], size)[0].numpy()


def _warp(image: np.ndarray, **values) -> np.ndarray:
    """(S, S) float image resampled by the transform with explicit values."""
    matrix = _one(size=image.shape[0], **values)
    out = apply_transforms(tf.constant(image[None, :, :, None], tf.float32), to_projective_transforms(matrix[None]))
    return out[0, :, :, 0].numpy()


# --------------------------------------------------------------------------- matrices


def test_zero_magnitudes_give_the_identity_transform_exactly():
    transforms = random_affine_transforms(4, 32, OFF, SEED).numpy()
    assert transforms.dtype == np.float32 and transforms.shape == (4, 8)
    np.testing.assert_array_equal(transforms, np.tile([1, 0, 0, 0, 1, 0, 0, 0], (4, 1)))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # content moves right 3, up 2: output (x, y) reads input (x - 3, y + 2)
        ({"shift_x": 3.0, "shift_y": -2.0}, [[1, 0, -3], [0, 1, 2], [0, 0, 1]]),
        # mirror about the centre column 2: x -> 4 - x
        ({"flip": True}, [[-1, 0, 4], [0, 1, 0], [0, 0, 1]]),
        # 90 degrees counter-clockwise about (2, 2): output (x, y) reads input (4 - y, x)
        ({"rotation": 90.0}, [[0, -1, 4], [1, 0, 0], [0, 0, 1]]),
        # content twice as large: output (x, y) reads input (2 + (x - 2) / 2, ...)
        ({"zoom": 2.0}, [[0.5, 0, 1], [0, 0.5, 1], [0, 0, 1]]),
        # x' = x + tan(45) y about the centre: input x = x' - (y' - 2)
        ({"shear": 45.0}, [[1, -1, 2], [0, 1, 0], [0, 0, 1]]),
    ],
)
def test_inverse_matrix_matches_hand_computed(values, expected):
    np.testing.assert_allclose(_one(size=5, **values), expected, atol=1e-6)


def test_inverse_matrix_inverts_the_forward_composition():
    # Forward, from the module docstring: p_out = c + t + R Sh Z F (p_in - c), y pointing down.
    rot, zoom, tx, ty, shear, c = math.radians(20.0), 1.1, 2.5, -1.5, math.radians(7.0), 15.5
    rotate = np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])
    linear = rotate @ np.array([[1, math.tan(shear)], [0, 1]]) @ np.diag([zoom, zoom]) @ np.diag([-1, 1])
    forward = np.eye(3)
    forward[:2, :2], forward[:2, 2] = linear, np.array([c + tx, c + ty]) - linear @ [c, c]
    inverse = _one(rotation=20.0, zoom=zoom, shift_x=tx, shift_y=ty, shear=7.0, flip=True, size=32)
    np.testing.assert_allclose(forward @ inverse, np.eye(3), atol=1e-5)


# --------------------------------------------------------------------------- pixels


def test_shift_moves_a_bright_pixel_where_expected():
    image = np.zeros((8, 8), np.float32)
    image[2, 4] = 200.0  # row 2, column 4
    moved = _warp(image, shift_x=3.0, shift_y=1.0)
    expected = np.zeros_like(image)
    expected[3, 7] = 200.0
    np.testing.assert_array_equal(moved, expected)


def test_rotation_by_90_degrees_turns_a_pattern_counter_clockwise():
    image = np.arange(25, dtype=np.float32).reshape(5, 5)
    # float32 cos(90 deg) is -4e-8, not 0, so a pixel may borrow ~1e-6 from a neighbour
    np.testing.assert_allclose(_warp(image, rotation=90.0), np.rot90(image), atol=1e-4)


def test_flip_only_mirrors_each_image_exactly_or_leaves_it():
    image = np.arange(36, dtype=np.float32).reshape(1, 6, 6, 1) * 7.0
    batch = np.repeat(image, 16, axis=0)
    out = augment_images(tf.constant(batch), OFF.model_copy(update={"horizontal_flip": True}), SEED).numpy()
    mirrored = [np.array_equal(o, image[0, :, ::-1]) for o in out]
    unchanged = [np.array_equal(o, image[0]) for o in out]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert any(mirrored) and any(unchanged)  # flip with probability 1/2: 16 images show both


def test_all_off_returns_the_input_and_identity_transform_changes_nothing():
    images = tf.random.stateless_uniform([3, 8, 8, 1], [1, 2], maxval=255.0)
    assert is_identity(OFF)
    assert augment_images(images, OFF, SEED) is images
    identity = random_affine_transforms(3, 8, OFF, SEED)
    np.testing.assert_array_equal(apply_transforms(images, identity).numpy(), images.numpy())


def test_augment_is_seeded_and_keeps_shape_dtype_and_range():
    images = tf.random.stateless_uniform([4, 16, 16, 1], [1, 2], maxval=255.0)
    first = augment_images(images, AugmentParams(), SEED)
    again = augment_images(images, AugmentParams(), SEED)
    other = augment_images(images, AugmentParams(), tf.constant([7, 12], tf.int64))
    assert first.shape == (4, 16, 16, 1) and first.dtype == tf.float32
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    assert not np.array_equal(first.numpy(), other.numpy())
    assert first.numpy().min() >= 0.0 and first.numpy().max() <= 255.0


@pytest.mark.parametrize(
    ("images", "message"),
    [(np.zeros((2, 8, 8), np.float32), r"\(B, S, S, 1\)"), (np.zeros((2, 8, 8, 1), np.uint8), "float32"),
     (np.zeros((2, 8, 6, 1), np.float32), "square")],
)
def test_augment_rejects_bad_images_naming_them(images, message):
    with pytest.raises(ValueError, match=message):
        augment_images(tf.constant(images), AugmentParams(), SEED)


# --------------------------------------------------------------------------- dataset


@pytest.fixture()
def cache(tmp_path) -> np.ndarray:
    """A memory-mapped (10, 16, 16) uint8 cache whose image r is filled with 10 * r + 5."""
    path = tmp_path / "images.npy"
    np.save(path, (10 * np.arange(10, dtype=np.uint8) + 5)[:, None, None] * np.ones((1, 16, 16), np.uint8))
    return np.load(path, mmap_mode="r")


ROWS = np.array([9, 2, 4, 7, 0, 5, 1])  # a split: 7 of the 10 rows, not in row order
LABELS = ROWS % 4


def _epochs(dataset: tf.data.Dataset, count: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """``count`` passes over the dataset, as lists of (x, y) NumPy batches."""
    return [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(count)]


def _rows_of(x: np.ndarray) -> np.ndarray:
    """Row ids of un-augmented cache images (pixel value 10 * r + 5)."""
    return ((x[:, 0, 0, 0] - 5) / 10).astype(int)


def test_batches_have_the_model_shapes_and_dtypes(cache):
    dataset = make_dataset(cache, ROWS, LABELS, batch_size=3, training=True, augment=AugmentParams(), seed=0)
    assert dataset.element_spec == (
        tf.TensorSpec((None, 16, 16, 1), tf.float32), tf.TensorSpec((None,), tf.int32))
    assert int(dataset.cardinality()) == 3
    batches = _epochs(dataset, 1)[0]
    assert [len(y) for _, y in batches] == [3, 3, 1]  # the partial batch is kept
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() >= 0.0 and x.max() <= 255.0


def test_evaluation_is_never_augmented_and_keeps_the_given_order(cache):
    dataset = make_dataset(cache, ROWS, LABELS, batch_size=3, training=False, augment=AugmentParams(), seed=0)
    x = np.concatenate([x for x, _ in _epochs(dataset, 1)[0]])
    np.testing.assert_array_equal(x[..., 0], np.asarray(cache)[ROWS].astype(np.float32))


def test_each_row_once_per_epoch_with_its_label_and_reshuffled_each_epoch(cache):
    dataset = make_dataset(cache, ROWS, LABELS, batch_size=3, training=True, augment=None, seed=3)
    orders = []
    for epoch in _epochs(dataset, 3):
        seen = np.concatenate([_rows_of(x) for x, _ in epoch])
        labels = np.concatenate([y for _, y in epoch])
        assert sorted(seen) == sorted(ROWS)
        np.testing.assert_array_equal(labels, seen % 4)  # labels travel with their images
        orders.append(seen.tolist())
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_same_seed_gives_identical_batches_and_another_seed_does_not(cache):
    def run(seed: int) -> np.ndarray:
        dataset = make_dataset(cache, ROWS, LABELS, batch_size=3, training=True, augment=AugmentParams(), seed=seed)
        return np.concatenate([x for epoch in _epochs(dataset, 2) for x, _ in epoch])

    first = run(1)
    np.testing.assert_array_equal(first, run(1))
    assert not np.array_equal(first, run(2))


def test_model_fit_starts_a_new_epoch_on_each_pass(cache):
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(), keras.layers.Dense(4)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fitted = make_dataset(cache, ROWS, LABELS, batch_size=3, training=True, augment=None, seed=5)
    model.fit(fitted, epochs=2, verbose=0, shuffle=False)  # passes 0 and 1
    reference = make_dataset(cache, ROWS, LABELS, batch_size=3, training=True, augment=None, seed=5)
    next_pass = [y.tolist() for _, y in _epochs(fitted, 1)[0]]
    assert next_pass == [y.tolist() for _, y in _epochs(reference, 3)[2]]


def test_make_dataset_rejects_rows_outside_the_cache(cache):
    with pytest.raises(ValueError, match=r"rows must be in \[0, 10\), got min 0 max 10"):
        make_dataset(cache, np.array([0, 10]), np.array([0, 1]), batch_size=2, training=False, augment=None, seed=0)


def test_an_activation_cache_is_read_as_float32_maps_shuffled_like_images_and_never_augmented(cache):
    activations = (np.arange(10 * 2 * 2 * 3, dtype=np.float32).reshape(10, 2, 2, 3) / 7).astype(np.float16)
    maps = make_dataset(activations, ROWS, LABELS, batch_size=3, training=True, augment=None, seed=3)
    images = make_dataset(cache, ROWS, LABELS, batch_size=3, training=True, augment=None, seed=3)
    for (x, y), (x_images, y_images) in zip(_epochs(maps, 2)[1], _epochs(images, 2)[1]):
        assert x.dtype == np.float32 and x.shape[1:] == (2, 2, 3)
        # The second epoch, in the same order as the image cache with the same seed; values only cast.
        np.testing.assert_array_equal(x, activations[_rows_of(x_images)].astype(np.float32))
        assert y.tolist() == y_images.tolist()
    with pytest.raises(ValueError, match="activation cache cannot be augmented"):
        make_dataset(activations, ROWS, LABELS, batch_size=3, training=True, augment=AugmentParams(), seed=0)
    with pytest.raises(ValueError, match=r"\(N, S, S\) uint8 image cache or an \(N, \.\.\.\) float"):
        make_dataset(activations.astype(np.int32), ROWS, LABELS, batch_size=3, training=False, augment=None, seed=0)


# --------------------------------------------------------------------------- class weights


def test_class_weights_are_balanced():
    # n = 6, k = 3, counts 3, 2, 1: weights 6 / 9, 6 / 6, 6 / 3
    weights = class_weights(np.array([0, 0, 0, 1, 1, 2]), 3)
    assert weights == pytest.approx({0: 2 / 3, 1: 1.0, 2: 2.0})


@pytest.mark.parametrize(
    ("labels", "message"), [([0, 0, 2], r"class id\(s\) \[1\] have no examples"), ([0, 1, 3], r"in \[0, 3\), got \[3\]")]
)
def test_class_weights_reject_empty_or_unknown_classes(labels, message):
    with pytest.raises(ValueError, match=message):
        class_weights(np.array(labels), 3)


def test_class_weights_count_weighted_items():
    # Class 0: one slice uploaded three times (weights 1/3 each) and one single slice: 2 groups.
    # Class 1: 2 single slices. Balanced by groups, both classes weigh the same.
    labels = np.array([0, 0, 0, 0, 1, 1])
    weights = np.array([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0, 1.0])
    assert class_weights(labels, 2, weights) == pytest.approx({0: 1.0, 1: 1.0})
    assert class_weights(labels, 2) == pytest.approx({0: 6 / 8, 1: 6 / 4})  # unweighted: by files
    with pytest.raises(ValueError, match="weights must be positive"):
        class_weights(labels, 2, np.zeros(6))


def test_sample_weights_fold_copy_and_class_weights_to_mean_one():
    labels = np.array([0, 0, 0, 0, 1, 1])
    copies = np.array([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0, 1.0])
    combined = sample_weights(labels, 2, copies, balance_classes=True)
    assert combined.mean() == pytest.approx(1.0)
    # Each group, and so each class (2 groups each), carries the same total weight.
    assert combined[:3].sum() == pytest.approx(combined[3]) == pytest.approx(combined[4])
    # Unit weights with class balancing: exactly Keras's class_weight, which has mean 1 already.
    plain = sample_weights(labels, 2, None, balance_classes=True)
    assert plain == pytest.approx(np.array([0.75, 0.75, 0.75, 0.75, 1.5, 1.5]))
    assert (sample_weights(labels, 2, None, balance_classes=False) == 1.0).all()


def test_make_dataset_yields_the_weights_of_its_rows(cache):
    weights = np.linspace(0.5, 2.0, len(ROWS)).astype(np.float32)
    seen = {}
    for x, _, w in make_dataset(cache, ROWS, LABELS, batch_size=4, training=True, augment=None, seed=3, weights=weights):
        seen.update(zip(_rows_of(x.numpy()).tolist(), w.numpy().tolist()))
    assert seen == pytest.approx(dict(zip(ROWS.tolist(), weights.tolist())))
    with pytest.raises(ValueError, match="weights must be aligned with rows"):
        make_dataset(cache, ROWS, LABELS, batch_size=4, training=True, augment=None, seed=3, weights=weights[:-1])


def test_flip_tta_model_averages_the_slice_and_its_mirror_image():
    from braintumor.core.config import ModelParams
    from braintumor.model.backbones import BACKBONES, build_model
    from braintumor.model.inputs import features_and_probabilities_model

    keras.utils.set_random_seed(0)
    model = build_model(ModelParams(backbone="mobilenetv3small", weights="none", dense_units=(16, 8)), 48)
    for layer in model.layers:  # a few steps only: let BatchNorm's moving statistics follow them
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    # Trained to tell which side a bright square is on, so that the mirror image predicts differently.
    side = np.arange(32) % 2
    train = np.zeros((32, 48, 48, 1), "float32")
    for i, s in enumerate(side):
        train[i, 16:32, (4 if s == 0 else 28):(4 if s == 0 else 28) + 16] = 255
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(train, side, epochs=5, batch_size=8, verbose=0)
    layer = BACKBONES["mobilenetv3small"].feature_check_layer
    images = train[:3]
    plain_features, plain = features_and_probabilities_model(model, layer).predict(images, verbose=0)
    flip_features, averaged = features_and_probabilities_model(model, layer, "flip").predict(images, verbose=0)
    mirrored = model.predict(images[:, :, ::-1], verbose=0)
    assert not np.allclose(plain, mirrored, atol=1e-4)  # the mirror image really predicts differently
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(flip_features, plain_features, atol=1e-6)  # the check reads the slice itself
    # flip_shift: the mean over the ten views, the mirror image's too, each moved 2 px (10 / 224 of 48)
    shift_features, shifted = features_and_probabilities_model(model, layer, "flip_shift").predict(images, verbose=0)
    pad = [(0, 0), (2, 2), (2, 2), (0, 0)]
    views = [np.pad(v, pad)[:, 2 + dy:50 + dy, 2 + dx:50 + dx] for v in (images, images[:, :, ::-1])
             for dy, dx in [(0, 0), (0, 2), (0, -2), (2, 0), (-2, 0)]]
    expected = np.mean([model.predict(v, verbose=0) for v in views], axis=0)
    assert not np.allclose(shifted, averaged, atol=1e-4)
    np.testing.assert_allclose(shifted, expected, atol=1e-5)
    np.testing.assert_allclose(shift_features, plain_features, atol=1e-6)
    with pytest.raises(ValueError, match=r"tta must be one of \['none', 'flip', 'flip_shift'\], got 'rotate'"):
        features_and_probabilities_model(model, layer, "rotate")
