"""Weight averaging at the end of a training phase (``average_weights_from``): the running mean of the
trainable weights over the later epochs, kept only where validation loss says it is better."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import yaml

from braintumor.core.config import FinetuneParams, ParamsError, parse_params
from braintumor.model.inputs import make_dataset
from braintumor.model.train import (WeightAverage, compile_for, fit, keep_better_of_average,
                                    saved_weights, summary_metrics)

from conftest import REPO


def _data(images: int = 32):
    rng = np.random.default_rng(0)
    y = (np.arange(images) % 4).astype(np.int32)
    x = rng.integers(0, 20, (images, 4, 4), dtype=np.uint8)
    x[np.arange(images), y, :] += 40  # class k: row k brighter, so there is something to learn
    rows = np.arange(images)
    return (make_dataset(x, rows, y, batch_size=8, training=True, augment=None, seed=0),
            make_dataset(x, rows, y, batch_size=8, training=False, augment=None, seed=0))


def _dense(phase: FinetuneParams) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    compile_for(model, phase, 32, jit_compile=False)
    return model


class _Recorder(keras.callbacks.Callback):
    """Every epoch's trainable weights, as the averaging callback sees them."""

    def __init__(self):
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([keras.ops.convert_to_numpy(v).copy() for v in self.model.trainable_weights])


def test_the_average_is_the_mean_of_the_weights_from_the_given_epoch_on():
    phase = FinetuneParams(learning_rate=0.05, epochs=5, batch_size=8)
    model = _dense(phase)
    train, val = _data()
    average, recorder = WeightAverage(from_epoch=3), _Recorder()
    model.fit(train, validation_data=val, epochs=5, callbacks=[average, recorder], verbose=0)
    assert average.epochs == [3, 4, 5]
    for mean, *per_epoch in zip(average.mean, *recorder.weights[2:]):
        np.testing.assert_allclose(mean, np.mean(per_epoch, axis=0), rtol=1e-6, atol=1e-7)
    assert not np.allclose(recorder.weights[2][0], recorder.weights[4][0])  # the epochs did differ


def test_the_average_is_kept_only_when_its_validation_loss_is_lower():
    phase = FinetuneParams(learning_rate=0.05, epochs=4, batch_size=8)
    model = _dense(phase)
    train, val = _data()
    model.fit(train, epochs=4, verbose=0)
    trained = [keras.ops.convert_to_numpy(v).copy() for v in model.trainable_weights]

    worse = WeightAverage(from_epoch=1)
    worse.epochs, worse.mean = [1, 2], [np.zeros_like(w) for w in trained]  # uniform predictions: log(4) loss
    decision = keep_better_of_average(model, worse, val)
    assert not decision["kept"] and decision["val_loss"] > decision["best_epoch_val_loss"]
    for variable, value in zip(model.trainable_weights, trained):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)

    model.set_weights([np.zeros_like(w) for w in trained])  # now the "best epoch" is the uniform model
    better = WeightAverage(from_epoch=1)
    better.epochs, better.mean = [1, 2], [w.astype(np.float64) for w in trained]
    decision = keep_better_of_average(model, better, val)
    assert decision["kept"] and decision["val_loss"] < decision["best_epoch_val_loss"]
    for variable, value in zip(model.trainable_weights, trained):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), value)


def test_one_averaged_epoch_is_not_compared():
    average = WeightAverage(from_epoch=4)
    average.epochs, average.mean = [4], [np.zeros(2)]
    decision = keep_better_of_average(None, average, None)
    assert decision == {"epochs": [4], "kept": False, "reason": "fewer than two epochs to average"}


def test_fit_reports_the_average_and_the_summary_counts_the_epochs_kept():
    phase = FinetuneParams(learning_rate=0.05, epochs=4, batch_size=8, early_stopping_patience=4,
                           average_weights_from=2)
    model = _dense(phase)
    train, val = _data()
    result = fit(model, train, val, phase, "average", 32)
    average = result["weight_average"]
    assert average["epochs"] == [2, 3, 4]
    summary = summary_metrics(result)
    assert summary["averaged_epochs"] == (3 if average["kept"] else 0)
    assert summary["averaged_val_loss"] == pytest.approx(average["val_loss"], abs=1e-6)
    kept_loss = average["val_loss"] if average["kept"] else average["best_epoch_val_loss"]
    assert model.evaluate(val, verbose=0, return_dict=True)["loss"] == pytest.approx(kept_loss, rel=1e-5)


def test_weight_averaging_is_off_by_default_and_refused_on_a_multi_worker_cluster():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(raw).finetune.average_weights_from == 0
    raw["finetune"]["average_weights_from"] = 3
    raw["runtime"]["distribution"] = "multi_worker"
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert "finetune.average_weights_from" in str(info.value) and "multi_worker" in str(info.value)


def test_the_stage_log_names_the_weights_that_were_saved():
    best = {"best_val_accuracy": 0.92, "best_val_loss": 0.27}
    assert saved_weights({**best, "averaged_epochs": 0, "averaged_val_accuracy": 0.93, "averaged_val_loss": 0.26}
                         ) == "best val accuracy 0.9200 (loss 0.2700)"
    assert saved_weights({**best, "averaged_epochs": 6, "averaged_val_accuracy": 0.93, "averaged_val_loss": 0.26}
                         ) == "the weight average of 6 epochs, val accuracy 0.9300 (loss 0.2600)"
    assert saved_weights(best) == "best val accuracy 0.9200 (loss 0.2700)"
