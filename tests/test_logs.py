"""Progress lines of long loops: at most one a minute, with the rate and the time left, none at the end."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import keras
import numpy as np
import pytest

from braintumor.core.logs import Progress
from braintumor.model.train import EpochLog

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_at_most_once_per_interval_with_rate_and_time_left(caplog):
    clock = Clock()
    progress = Progress(logging.getLogger("test.progress"), "activation cache", 1000, unit="maps", every=60.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for seconds in (30, 59, 61, 100, 125, 400):  # 100 maps at each of these times
            clock.now = 1000.0 + seconds
            progress.advance(100)
    # lines at 61 s, at 125 s (60 s after the last line, not after the start: 100 s passes) and at 400 s
    assert caplog.messages == ["activation cache: 300 / 1000 maps (30%), 4.9 maps/s, about 2 min left",
                               "activation cache: 500 / 1000 maps (50%), 4.0 maps/s, about 2 min left",
                               "activation cache: 600 / 1000 maps (60%), 1.5 maps/s, about 4 min left"]
    clock.now += 1000
    progress.advance(400)  # done: the stage's own summary line says so
    assert len(caplog.messages) == 3 and progress.done == 1000


def test_progress_says_seconds_when_little_is_left(caplog):
    clock = Clock()
    progress = Progress(logging.getLogger("test.progress"), "finetune epoch 3", 10, unit="batches", every=0.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.now += 20
        progress.advance(8)
    assert caplog.messages == ["finetune epoch 3: 8 / 10 batches (80%), 0.4 batches/s, about 5 s left"]


def test_a_training_epoch_reports_its_batches_as_it_goes(caplog):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).normal(size=(10, 3)).astype("float32"), np.array([0, 1] * 5)
    with caplog.at_level(logging.INFO, logger="braintumor.model.train"):
        model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[EpochLog("finetune", 10, progress_every=0.0)])
    progress = [m.split(" (")[0] for m in caplog.messages if "batches" in m]
    assert progress == [f"finetune epoch {e}: {b} / 5 batches" for e in (1, 2) for b in (1, 2, 3, 4)]
    assert sum(m.startswith("finetune epoch") and "images/s" in m for m in caplog.messages) == 2  # the epoch lines
