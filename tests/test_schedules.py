"""Learning-rate schedules of a training phase: plateau reduction (the default) and cosine decay."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import yaml

from braintumor.core.config import FinetuneParams, ParamsError, parse_params
from braintumor.model.inputs import make_dataset
from braintumor.model.train import callbacks_for, compile_for, fit, learning_rate_for

from conftest import REPO


def _fit_dense(phase: FinetuneParams, images: int = 24) -> tuple[keras.Model, dict]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 4, 4), dtype=np.uint8)
    y = (np.arange(images) % 4).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    compile_for(model, learning_rate_for(phase, images), jit_compile=False)
    rows = np.arange(images)
    result = fit(model, make_dataset(x, rows, y, batch_size=phase.batch_size, training=True, augment=None, seed=0),
                 make_dataset(x, rows, y, batch_size=phase.batch_size, training=False, augment=None, seed=0),
                 phase, "schedule", images)
    return model, result


def test_cosine_decays_from_the_rate_to_min_lr_over_every_step_of_the_epochs():
    phase = FinetuneParams(schedule="cosine", learning_rate=1e-2, min_lr=1e-4, epochs=3, batch_size=8,
                           early_stopping_patience=3)
    schedule = learning_rate_for(phase, images_per_epoch=20)  # 3 steps per epoch, 9 in all
    rates = [float(schedule(step)) for step in range(10)]
    assert rates[0] == pytest.approx(1e-2)
    assert rates[9] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[4] == pytest.approx(1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + np.cos(np.pi * 4 / 9)), rel=1e-5)


def test_a_cosine_phase_ends_at_min_lr_and_has_no_plateau_callback():
    phase = FinetuneParams(schedule="cosine", learning_rate=1e-2, min_lr=1e-4, epochs=3, batch_size=8,
                           early_stopping_patience=3)
    assert not any(isinstance(c, keras.callbacks.ReduceLROnPlateau) for c in callbacks_for(phase, "p", 24))
    model, result = _fit_dense(phase)
    assert result["epochs_run"] == 3
    assert int(model.optimizer.iterations) == 9
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(1e-4, rel=1e-4)


def test_the_plateau_schedule_keeps_a_constant_rate_until_validation_stalls():
    phase = FinetuneParams(learning_rate=1e-3, epochs=2, batch_size=8, early_stopping_patience=3, reduce_lr_patience=5)
    assert learning_rate_for(phase, 24) == 1e-3
    assert any(isinstance(c, keras.callbacks.ReduceLROnPlateau) for c in callbacks_for(phase, "p", 24))
    model, _ = _fit_dense(phase)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(1e-3)


def test_an_unknown_schedule_is_named_with_the_allowed_values():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["finetune"]["schedule"] = "onecycle"
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert "finetune.schedule" in str(info.value) and "'plateau'" in str(info.value) and "'cosine'" in str(info.value)
