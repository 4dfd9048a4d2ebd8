"""Learning-rate schedules of a training phase (plateau reduction, the default, and cosine decay) and the
validation number that picks its best epoch (``select_on``)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import yaml

from braintumor.core.config import FinetuneParams, ParamsError, parse_params
from braintumor.model.inputs import make_dataset
from braintumor.model.train import (best_epoch_index, callbacks_for, compile_for, fit, is_better, learning_rate_for,
                                    summary_metrics)

from conftest import REPO


def _fit_dense(phase: FinetuneParams, images: int = 24) -> tuple[keras.Model, dict]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 4, 4), dtype=np.uint8)
    y = (np.arange(images) % 4).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    compile_for(model, phase, images, jit_compile=False)
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


@pytest.mark.parametrize("section, key, value, allowed", [
    ("finetune", "schedule", "onecycle", ["'plateau'", "'cosine'"]),
    ("train_base", "select_on", "val_auc", ["'val_loss'", "'val_accuracy'"]),
])
def test_an_unknown_choice_is_named_with_the_allowed_values(section, key, value, allowed):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section][key] = value
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert f"{section}.{key}" in str(info.value) and all(name in str(info.value) for name in allowed)


def _fit_with_noisy_validation(select_on: str) -> tuple[keras.Model, dict, tuple]:
    """8 epochs, no early stop, no rate change; a quarter of the validation labels are wrong, so the epoch
    with the lowest validation loss is not the most accurate one."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 4, 4), dtype=np.uint8)
    y = (np.arange(32) % 4).astype(np.int32)
    y_val = y.copy()
    y_val[:8] = (y_val[:8] + 1) % 4
    phase = FinetuneParams(learning_rate=0.01, epochs=8, batch_size=8, early_stopping_patience=8,
                           reduce_lr_patience=8, select_on=select_on)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    compile_for(model, phase, 32, jit_compile=False)
    rows = np.arange(32)
    validation = make_dataset(x, rows, y_val, batch_size=8, training=False, augment=None, seed=0)
    result = fit(model, make_dataset(x, rows, y, batch_size=8, training=True, augment=None, seed=0),
                 validation, phase, "select", 32)
    return model, result, validation


@pytest.mark.parametrize("select_on", ["val_loss", "val_accuracy"])
def test_the_restored_weights_are_the_best_epoch_on_select_on(select_on):
    model, result, validation = _fit_with_noisy_validation(select_on)
    history = result["history"]
    by_loss, by_accuracy = int(np.argmin(history["val_loss"])), int(np.argmax(history["val_accuracy"]))
    assert result["epochs_run"] == 8 and by_loss != by_accuracy  # the two choices differ here
    best = by_loss if select_on == "val_loss" else by_accuracy
    assert summary_metrics(result)["best_epoch"] == best + 1
    restored = model.evaluate(validation, verbose=0, return_dict=True)
    assert restored["loss"] == pytest.approx(history["val_loss"][best], rel=1e-5)
    assert restored["accuracy"] == pytest.approx(history["val_accuracy"][best])


def test_select_on_drives_early_stopping_and_the_plateau_in_its_direction():
    for select_on, mode in (("val_accuracy", "max"), ("val_loss", "min")):
        phase = FinetuneParams(select_on=select_on)
        stop, plateau = (next(c for c in callbacks_for(phase, "p", 24) if isinstance(c, kind))
                         for kind in (keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau))
        assert (stop.monitor, stop.mode, plateau.monitor, plateau.mode) == (select_on, mode, select_on, mode)
    assert FinetuneParams().select_on == "val_loss"


def test_ties_keep_the_earlier_epoch_and_better_is_strict():
    history = {"val_loss": [0.5, 0.3, 0.3, 0.4], "val_accuracy": [0.7, 0.9, 0.8, 0.9]}
    assert best_epoch_index(history, "val_loss") == 1
    assert best_epoch_index(history, "val_accuracy") == 1
    assert is_better({"loss": 0.2, "accuracy": 0.5}, {"loss": 0.3, "accuracy": 0.9}, "val_loss")
    assert not is_better({"loss": 0.2, "accuracy": 0.9}, {"loss": 0.3, "accuracy": 0.9}, "val_accuracy")
    with pytest.raises(ValueError, match=r"one of \['val_accuracy', 'val_loss'\]"):
        best_epoch_index(history, "accuracy")
