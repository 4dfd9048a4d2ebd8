"""The training loss: sparse categorical cross-entropy, optionally against smoothed labels.

Label smoothing (Szegedy et al., 2016) trains toward (1 - e) on the true class and e / K on each of the
K classes, instead of a one-hot target: it keeps a model that already fits its training slices (the
fine-tuned exit flow reaches 0.99 training accuracy in a few epochs) from driving its logits apart for
the last 1%. With e = 0 the loss is Keras's own ``sparse_categorical_crossentropy``, unchanged.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="braintumor")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of probabilities against integer labels smoothed toward uniform by ``smoothing``."""

    def __init__(self, smoothing: float = 0.0, reduction: str | None = "sum_over_batch_size",
                 name: str = "smoothed_sparse_crossentropy", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def call(self, y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        target = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), classes, dtype=y_pred.dtype)
        target = target * (1.0 - self.smoothing) + self.smoothing / ops.cast(classes, y_pred.dtype)
        return keras.losses.categorical_crossentropy(target, y_pred)

    def get_config(self) -> dict:
        return {**super().get_config(), "smoothing": self.smoothing}


def training_loss(smoothing: float):
    """What ``compile`` gets: Keras's sparse cross-entropy, or the smoothed one when ``smoothing`` > 0."""
    return "sparse_categorical_crossentropy" if smoothing == 0 else SmoothedSparseCrossentropy(smoothing)


def per_item_loss(compiled_loss) -> keras.losses.Loss:
    """The same loss as ``compiled_loss`` (what ``training_loss`` gave), one value per item (no reduction)."""
    if isinstance(compiled_loss, SmoothedSparseCrossentropy):
        return SmoothedSparseCrossentropy(compiled_loss.smoothing, reduction=None)
    return keras.losses.SparseCategoricalCrossentropy(reduction=None)
