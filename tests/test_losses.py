"""The training loss: label smoothing, and models compiled with it saved and loaded like any other."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from braintumor.model.losses import SmoothedSparseCrossentropy, per_item_loss, training_loss


def test_smoothed_loss_is_cross_entropy_against_smoothed_targets():
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1]], np.float32)
    labels = np.array([0, 2])
    e = 0.1
    targets = np.full((2, 4), e / 4)
    targets[[0, 1], labels] += 1 - e
    expected = -(targets * np.log(probabilities)).sum(axis=1)
    per_item = per_item_loss(training_loss(e))(labels, probabilities)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(per_item), expected, rtol=1e-5)
    np.testing.assert_allclose(float(SmoothedSparseCrossentropy(e)(labels, probabilities)), expected.mean(), rtol=1e-5)
    # no smoothing: Keras's own loss, by name, as before
    assert training_loss(0.0) == "sparse_categorical_crossentropy"
    plain = keras.losses.SparseCategoricalCrossentropy(reduction=None)(labels, probabilities)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(per_item_loss(training_loss(0.0))(labels, probabilities)),
                               keras.ops.convert_to_numpy(plain), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SmoothedSparseCrossentropy(1.0)


def test_a_model_compiled_with_the_smoothed_loss_saves_and_loads_in_safe_mode(tmp_path):
    import braintumor.model.backbones  # noqa: F401  what every loader imports
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer="adam", loss=training_loss(0.1))
    model.fit(np.ones((8, 3), np.float32), np.arange(8) % 4, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert isinstance(loaded.loss, SmoothedSparseCrossentropy) and loaded.loss.smoothing == pytest.approx(0.1)
