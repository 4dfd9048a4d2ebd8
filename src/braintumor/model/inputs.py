"""tf.data input pipeline over the memory-mapped image cache ``data/processed/images.npy``, and over
the fine-tuning stage's activation cache (the frozen backbone's outputs, float16, also memory-mapped).

The cache is one (N, S, S) uint8 array; a split is a list of its row indices. Batches are gathered
from the memmap with NumPy (one fancy-indexing read per batch, never the whole array: 100,000
images at 224 px are 5 GB), cast to float32 0..255 with one channel, and, for training, augmented
with one fused affine transform per image (:mod:`braintumor.model.augment`).

Determinism: each pass over a training dataset (each ``iter()``, which is what ``model.fit`` does
once per epoch) is the next epoch e = 0, 1, 2, ...; its order is a stateless shuffle seeded by
(seed, e), and batch b's augmentation and mixup are seeded by (seed, e, b). Two datasets made with the
same arguments therefore yield identical batches, pass for pass, whatever TensorFlow's global seed.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from braintumor.model.augment import augment_images, is_identity
from braintumor.core.config import CLASS_NAMES, AugmentParams
from braintumor.split.load import SplitRows

# Separate random streams derived from the user's seed, so the shuffle and the augmentation of
# the same epoch never share random numbers.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_MIXUP_STREAM = 2


def class_weights(labels: np.ndarray, num_classes: int, weights: np.ndarray | None = None) -> dict[int, float]:
    """Balanced class weights W / (k * W_c): W the total item weight, W_c class c's.

    With unit item weights this is sklearn's "balanced" n / (k * count_c). With the training
    weights of ``split.train_copies: all`` (1 / group size) W_c counts class c's duplicate groups,
    so the classes are balanced by distinct slices, not by how often a slice was re-uploaded.

    Args:
        labels: (n,) integer class ids in [0, num_classes).
        num_classes: k.
        weights: (n,) positive item weights, or None for 1 each.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"class_weights: labels must be a non-empty 1-D integer array, got "
                         f"shape {labels.shape} dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"class_weights: labels must be in [0, {num_classes}), got {sorted(set(bad.tolist()))[:10]}")
    weights = np.ones(labels.shape) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != labels.shape or not (weights > 0).all():
        raise ValueError(f"class_weights: weights must be positive and aligned with labels {labels.shape}, "
                         f"got shape {weights.shape}")
    totals = np.bincount(labels, weights=weights, minlength=num_classes)
    missing = np.flatnonzero(totals == 0).tolist()
    if missing:
        raise ValueError(f"class_weights: class id(s) {missing} have no examples; their weight would be infinite")
    balanced = totals.sum() / (num_classes * totals)
    return {c: float(w) for c, w in enumerate(balanced)}


def sample_weights(labels: np.ndarray, num_classes: int, weights: np.ndarray | None, balance_classes: bool) -> np.ndarray:
    """(n,) float32 per-item training weights: item weight times its class weight, scaled to mean 1.

    Keras takes either ``class_weight`` or ``sample_weight``, not both, so the two are folded into
    one. Scaling to mean 1 keeps the loss, and so the learning rate, on the same scale whether or not
    copies are weighted down.
    """
    labels = np.asarray(labels)
    combined = np.ones(labels.shape) if weights is None else np.asarray(weights, np.float64).copy()
    if balance_classes:
        per_class = class_weights(labels, num_classes, weights)
        combined *= np.array([per_class[c] for c in range(num_classes)])[labels]
    if not (combined > 0).all():
        raise ValueError("sample_weights: every item weight must be positive")
    return (combined / combined.mean()).astype(np.float32)


def is_image_cache(array: np.ndarray) -> bool:
    """An (N, S, S) uint8 cache of grey slices (not an activation cache)."""
    return array.ndim == 3 and array.shape[1] == array.shape[2] and array.dtype == np.uint8


def _check_inputs(images: np.ndarray, rows: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
    """Raise ValueError naming the first bad argument of :func:`make_dataset`."""
    if not (is_image_cache(images) or (images.ndim >= 2 and np.issubdtype(images.dtype, np.floating))):
        raise ValueError(f"make_dataset: images must be an (N, S, S) uint8 image cache or an (N, ...) float "
                         f"activation cache, got shape {images.shape} dtype {images.dtype}")
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"make_dataset: rows must be a non-empty 1-D integer array, got shape "
                         f"{rows.shape} dtype {rows.dtype}")
    if rows.min() < 0 or rows.max() >= len(images):
        raise ValueError(f"make_dataset: rows must be in [0, {len(images)}), got min {rows.min()} max {rows.max()}")
    if labels.shape != rows.shape or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"make_dataset: labels must be non-negative integers aligned with rows {rows.shape}, "
                         f"got shape {labels.shape} dtype {labels.dtype}")
    if batch_size < 1:
        raise ValueError(f"make_dataset: batch_size must be >= 1, got {batch_size}")


def _stream_seed(seed: int, stream: int, epoch: tf.Tensor) -> tf.Tensor:
    """Shape-[2] int64 stateless seed for one random stream of one epoch."""
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, stream], tf.int64), epoch)


def _epoch_batches(epoch: tf.Tensor, num_items: int, batch_size: int, seed: int | None) -> tf.data.Dataset:
    """(epoch, batch index, positions (B,) int64) for one epoch; shuffled unless seed is None."""
    positions = tf.range(num_items, dtype=tf.int64)
    if seed is not None:
        positions = tf.random.experimental.stateless_shuffle(positions, _stream_seed(seed, _SHUFFLE_STREAM, epoch))
    batches = tf.data.Dataset.from_tensor_slices(positions).batch(batch_size)  # keeps the partial batch
    return batches.enumerate().map(lambda index, batch: (epoch, index, batch))


def _epoch_counter() -> tf.data.Dataset:
    """One element per pass over the dataset: 0 on the first pass, 1 on the next, ...

    tf.data datasets are re-iterated once per epoch and have no epoch number of their own; a
    variable read-and-incremented when a pass starts gives each pass its own, reproducible index.
    """
    passes = tf.Variable(0, dtype=tf.int64, trainable=False, name="input_pipeline_epoch")
    return tf.data.Dataset.range(1).map(lambda _: passes.assign_add(1) - 1)


def _row_reader(images: np.ndarray):
    """A function rows (B,) int64 -> (B, ...) copy of those rows, read from ``images``."""

    def read(rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images[rows])  # one read per batch; a memmap pages in only these rows

    return read


def mixup_batch(x: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor | None, alpha: float, seed: tf.Tensor,
                num_classes: int = len(CLASS_NAMES)) -> tuple[tf.Tensor, ...]:
    """Mixup (Zhang et al., 2018) within one batch: item i becomes l_i * item i + (1 - l_i) * item p(i).

    p is a seeded permutation of the batch and l_i ~ Beta(alpha, alpha), one per item; the targets are the
    same blend of the two one-hot labels, and the training weights (copy and class weights) the same blend
    of the two weights. On the activation cache the blend is of the frozen layers' outputs ("manifold
    mixup", Verma et al., 2019): new training inputs every epoch at no extra cost.

    Args:
        x: (B, ...) float32 images or activations.
        labels: (B,) integer class ids.
        weights: (B,) per-item weights, or None.
        alpha: the Beta distribution's parameter, > 0.
        seed: shape-[2] stateless seed for this batch.

    Returns:
        (x, targets (B, num_classes) float32[, weights (B,)]).
    """
    size = tf.shape(x)[0]
    partner = tf.random.experimental.stateless_shuffle(tf.range(size),
                                                       tf.random.experimental.stateless_fold_in(seed, 0))
    gamma = [tf.random.stateless_gamma([size], tf.random.experimental.stateless_fold_in(seed, stream), alpha)
             for stream in (1, 2)]
    share = gamma[0] / (gamma[0] + gamma[1])  # Beta(alpha, alpha) from two Gamma(alpha, 1) draws
    broadcast = tf.reshape(share, tf.concat([[size], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0))
    mixed = broadcast * x + (1.0 - broadcast) * tf.gather(x, partner)
    one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    targets = share[:, None] * one_hot + (1.0 - share[:, None]) * tf.gather(one_hot, partner)
    if weights is None:
        return mixed, targets
    return mixed, targets, share * weights + (1.0 - share) * tf.gather(weights, partner)


def make_dataset(
    images: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    augment: AugmentParams | None,
    seed: int,
    weights: np.ndarray | None = None,
    mixup: float = 0.0,
) -> tf.data.Dataset:
    """Batches (x (B, S, S, 1) float32 in 0..255, y (B,) int32[, w (B,) float32]) of one split of the image cache.

    An activation cache (N, h, w, c) float16 gives x (B, h, w, c) float32, shuffled the same way and
    never augmented (its augmented copies were made before the frozen layers, see
    :func:`braintumor.model.train.cache_outputs`).

    Training: reshuffled every pass (epoch), augmented when ``augment`` is given. Evaluation
    (``training=False``): the rows in the given order, never augmented. Every row appears exactly
    once per pass; the last batch may be smaller. Prefetched.

    Args:
        images: (N, S, S) uint8 cache, typically ``np.load(path, mmap_mode="r")``, or an (N, ...) float
            activation cache.
        rows: (n,) row indices of this split into ``images``.
        labels: (n,) integer class ids aligned with ``rows``.
        batch_size: images per batch.
        training: shuffle and augment.
        augment: augmentation magnitudes, or None for none; ignored when ``training`` is False.
        seed: seeds the shuffle and the augmentation of every epoch.
        weights: (n,) per-item training weights aligned with ``rows`` (:func:`sample_weights`), yielded
            as the third element of each batch; None yields (x, y) pairs.
        mixup: Beta(mixup, mixup) blends of each batch's items (:func:`mixup_batch`), after augmentation;
            y is then (B, classes) float32 soft targets. 0 = off; training only.
    """
    rows, labels = np.asarray(rows), np.asarray(labels)
    _check_inputs(images, rows, labels, batch_size)
    if weights is not None and np.shape(weights) != rows.shape:
        raise ValueError(f"make_dataset: weights must be aligned with rows {rows.shape}, got shape {np.shape(weights)}")
    if mixup < 0 or (mixup > 0 and not training):
        raise ValueError(f"make_dataset: mixup must be >= 0 and only for training, got {mixup} (training={training})")
    image_cache = is_image_cache(images)
    item_shape = [images.shape[1], images.shape[2], 1] if image_cache else list(images.shape[1:])
    if training:
        indices = _epoch_counter().flat_map(lambda epoch: _epoch_batches(epoch, len(rows), batch_size, seed))
    else:
        indices = _epoch_batches(tf.constant(0, tf.int64), len(rows), batch_size, seed=None)
    rows_t, labels_t = tf.constant(rows, tf.int64), tf.constant(labels, tf.int32)
    weights_t = None if weights is None else tf.constant(weights, tf.float32)
    read_rows = _row_reader(images)
    if augment is not None and training and not image_cache and not is_identity(augment):
        raise ValueError("make_dataset: an activation cache cannot be augmented; augment the images before caching")
    augment = augment if training and augment is not None and not is_identity(augment) else None
    stored = tf.as_dtype(images.dtype)

    def load(epoch: tf.Tensor, index: tf.Tensor, positions: tf.Tensor) -> tuple[tf.Tensor, ...]:
        values = tf.numpy_function(read_rows, [tf.gather(rows_t, positions)], stored, stateful=False)
        x = tf.cast(tf.reshape(values, [-1, *item_shape]), tf.float32)  # (B, S, S, 1) 0..255, or activations
        if augment is not None:
            batch_seed = tf.random.experimental.stateless_fold_in(_stream_seed(seed, _AUGMENT_STREAM, epoch), index)
            x = augment_images(x, augment, batch_seed)
        y, w = tf.gather(labels_t, positions), None if weights_t is None else tf.gather(weights_t, positions)
        if mixup > 0:
            return mixup_batch(x, y, w, mixup,
                               tf.random.experimental.stateless_fold_in(_stream_seed(seed, _MIXUP_STREAM, epoch), index))
        return (x, y) if w is None else (x, y, w)

    dataset = indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(len(rows) / batch_size)))
    return dataset.prefetch(tf.data.AUTOTUNE)


def predict_split(model: keras.Model, images: np.ndarray, split: SplitRows, batch_size: int) -> np.ndarray:
    """(n, k) float32 softmax outputs for a split's rows, in order, through the inference input pipeline."""
    dataset = make_dataset(images, split.rows, split.labels, batch_size=batch_size, training=False, augment=None, seed=0)
    return np.asarray(model.predict(dataset, verbose=0), np.float32)


def features_and_probabilities_model(model: keras.Model, feature_layer: str, tta: str = "none") -> keras.Model:
    """image (B, S, S, 1) -> (the out-of-distribution check's features (B, C), softmax (B, k)), sharing weights.

    Args:
        feature_layer: a layer whose input, averaged over space, are the features
            (:func:`braintumor.model.backbones.feature_check_tensor`).
        tta: the softmax is the mean over the views of :func:`braintumor.model.tta.tta_views` ("flip": the
            image's and its left-right mirror image's); the features stay the image's own.
    """
    from braintumor.model.backbones import feature_check_tensor
    from braintumor.model.tta import tta_views

    features = keras.Model(model.inputs, [feature_check_tensor(model, feature_layer), model.output])
    if tta == "none":
        return features
    image = keras.Input(model.inputs[0].shape[1:], name="image")
    views = tta_views(image, tta)
    pooled, probabilities = features(views[0])
    others = [features(view)[1] for view in views[1:]]
    averaged = keras.ops.mean(keras.ops.stack([probabilities, *others]), axis=0)
    return keras.Model(image, [pooled, averaged], name=f"{model.name}_features_{tta}")


def predict_features(model: keras.Model, images: np.ndarray, split: SplitRows,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """((n, C) features, (n, k) softmax outputs) of a split's rows, in order, in one pass.

    Args:
        model: from :func:`features_and_probabilities_model`.
    """
    dataset = make_dataset(images, split.rows, split.labels, batch_size=batch_size, training=False, augment=None, seed=0)
    features, probabilities = model.predict(dataset, verbose=0)
    return np.asarray(features, np.float32), np.asarray(probabilities, np.float32)
