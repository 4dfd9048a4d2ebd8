"""The training loss and accuracy: cross-entropy against integer labels, optionally smoothed, or against
the soft targets that mixup makes.

Label smoothing (Szegedy et al., 2016) trains toward (1 - e) on the true class and e / K on each of the
K classes, instead of a one-hot target: it keeps a model that already fits its training slices (the
fine-tuned exit flow reaches 0.99 training accuracy in a few epochs) from driving its logits apart for
the last 1%. With e = 0 and no mixup the loss is Keras's own ``sparse_categorical_crossentropy``, unchanged.

Mixup (Zhang et al., 2018; :func:`braintumor.model.inputs.mixup_batch`) trains on blends of two items
with the same blend of their one-hot labels, so training batches carry (B, K) targets while validation
keeps its (B,) integer labels: the loss and the accuracy below take either.
"""

from __future__ import annotations

import keras
from keras import ops


def _dense_targets(y_true, y_pred):
    """(B, K) targets: ``y_true`` itself when it already has the prediction's shape, else one-hot integer labels."""
    classes = ops.shape(y_pred)[-1]
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1]:
        return ops.cast(y_true, y_pred.dtype)
    return ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), classes, dtype=y_pred.dtype)


@keras.saving.register_keras_serializable(package="braintumor")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of probabilities against integer labels or (B, K) soft targets, smoothed toward
    uniform by ``smoothing``."""

    def __init__(self, smoothing: float = 0.0, reduction: str | None = "sum_over_batch_size",
                 name: str = "smoothed_sparse_crossentropy", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def call(self, y_true, y_pred):
        target = _dense_targets(y_true, y_pred)
        target = target * (1.0 - self.smoothing) + self.smoothing / ops.cast(ops.shape(y_pred)[-1], y_pred.dtype)
        return keras.losses.categorical_crossentropy(target, y_pred)

    def get_config(self) -> dict:
        return {**super().get_config(), "smoothing": self.smoothing}


@keras.saving.register_keras_serializable(package="braintumor")
def target_accuracy(y_true, y_pred):
    """1 where the predicted class is the label (or, for soft targets, the class with the largest share)."""
    labels = ops.argmax(_dense_targets(y_true, y_pred), axis=-1)
    return ops.cast(ops.equal(labels, ops.argmax(y_pred, axis=-1)), "float32")


def training_loss(smoothing: float, soft_targets: bool = False):
    """What ``compile`` gets: Keras's sparse cross-entropy, or ours when ``smoothing`` > 0 or the training
    batches carry soft targets (mixup)."""
    if smoothing == 0 and not soft_targets:
        return "sparse_categorical_crossentropy"
    return SmoothedSparseCrossentropy(smoothing)


def training_metrics(soft_targets: bool = False) -> list:
    """What ``compile`` gets as metrics: Keras's "accuracy", or one that also reads soft targets. Either
    is logged as ``accuracy`` / ``val_accuracy``, which ``select_on`` names."""
    if not soft_targets:
        return ["accuracy"]
    return [keras.metrics.MeanMetricWrapper(target_accuracy, name="accuracy")]


def per_item_loss(compiled_loss) -> keras.losses.Loss:
    """The same loss as ``compiled_loss`` (what ``training_loss`` gave), one value per item (no reduction)."""
    if isinstance(compiled_loss, SmoothedSparseCrossentropy):
        return SmoothedSparseCrossentropy(compiled_loss.smoothing, reduction=None)
    return keras.losses.SparseCategoricalCrossentropy(reduction=None)
