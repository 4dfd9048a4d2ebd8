"""Mixup (``train_base.mixup``, ``finetune.mixup``): training items blended in pairs with their labels and
weights blended alike, in the seeded input pipeline, and a loss and accuracy that read the soft targets."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from scipy import stats

from braintumor.core.config import (FinetuneParams, ModelParams, ParamsError, RuntimeParams, TrainBaseParams,
                                    parse_params)
from braintumor.model.backbones import build_model, freeze_backbone
from braintumor.model.inputs import make_dataset, mixup_batch
from braintumor.model.losses import per_item_loss, target_accuracy, training_loss, training_metrics
from braintumor.model.train import configure_runtime, finetune_phase, train_base_phase
from braintumor.split.load import SplitRows

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The structure of `inputs` doesn't match:UserWarning"),
]

REPO = Path(__file__).resolve().parents[1]
N = 10
ROWS = np.array([9, 2, 4, 7, 0, 5, 1])
LABELS = (ROWS % 4).astype(np.int32)
WEIGHTS = (ROWS + 1).astype(np.float32)


def _identity_cache() -> np.ndarray:
    """Item r is the r-th unit vector, so a blended item says which rows it blends and how much of each."""
    return np.eye(N, dtype=np.float32)


def _passes(dataset: tf.data.Dataset, count: int) -> list[list[tuple[np.ndarray, ...]]]:
    return [[tuple(t.numpy() for t in batch) for batch in dataset] for _ in range(count)]


def test_each_item_is_a_convex_blend_and_its_target_and_weight_are_the_same_blend():
    dataset = make_dataset(_identity_cache(), ROWS, LABELS, batch_size=4, training=True, augment=None, seed=3,
                           weights=WEIGHTS, mixup=0.4)
    label_of, weight_of = np.zeros((N, 4), np.float32), np.zeros(N, np.float32)
    label_of[ROWS, LABELS], weight_of[ROWS] = 1.0, WEIGHTS
    blended = 0
    for x, y, w in _passes(dataset, 3)[2]:  # the third epoch: mixup is seeded per epoch and batch
        assert x.dtype == np.float32 and y.shape == (len(x), 4) and y.dtype == np.float32
        assert (x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-6)
        assert ((x > 0).sum(axis=1) <= 2).all() and not x[:, np.setdiff1d(np.arange(N), ROWS)].any()
        np.testing.assert_allclose(y, x @ label_of, atol=1e-6)  # the label blend is the item blend
        np.testing.assert_allclose(w, x @ weight_of, rtol=1e-6)
        blended += int(((x > 0).sum(axis=1) == 2).sum())
    assert blended >= 3  # most items have another partner than themselves


def test_mixup_is_seeded_per_epoch_and_off_it_leaves_integer_labels():
    def make(seed, mixup):
        return make_dataset(_identity_cache(), ROWS, LABELS, batch_size=4, training=True, augment=None, seed=seed,
                            weights=WEIGHTS, mixup=mixup)

    first, again, other = _passes(make(3, 0.4), 2), _passes(make(3, 0.4), 2), _passes(make(4, 0.4), 1)
    for a, b in zip(first, again):
        for one, two in zip(a, b):
            for s, t in zip(one, two):
                np.testing.assert_array_equal(s, t)
    assert not np.array_equal(np.concatenate([b[0] for b in first[0]]), np.concatenate([b[0] for b in first[1]]))
    assert not np.array_equal(np.concatenate([b[0] for b in first[0]]), np.concatenate([b[0] for b in other[0]]))
    x, y, _ = next(iter(make(3, 0.0)))
    assert y.dtype == tf.int32 and y.shape == (4,) and set(np.unique(x.numpy())) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="mixup must be >= 0 and only for training"):
        make_dataset(_identity_cache(), ROWS, LABELS, batch_size=4, training=False, augment=None, seed=3, mixup=0.4)


def test_the_blend_share_follows_beta_alpha_alpha():
    size, alpha = 3000, 0.4
    x, _ = mixup_batch(tf.eye(size), tf.zeros([size], tf.int32), None, alpha, tf.constant([5, 6], tf.int64))
    x = x.numpy()
    own = np.diag(x)
    partnered = own < 1.0  # the few items paired with themselves keep share 1 whatever was drawn
    assert partnered.mean() > 0.99
    assert stats.kstest(own[partnered], stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert stats.kstest(own[partnered], stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # the test can tell alphas apart


def test_the_loss_and_accuracy_read_soft_targets_and_integer_labels_alike():
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1]], np.float32)
    soft = np.array([[0.6, 0.4, 0.0, 0.0], [0.0, 0.3, 0.0, 0.7]], np.float32)
    loss = per_item_loss(training_loss(0.0, soft_targets=True))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss(soft, probabilities)),
                               -(soft * np.log(probabilities)).sum(axis=1), rtol=1e-5)
    labels = np.array([0, 3])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss(labels, probabilities)),
                               -np.log(probabilities[[0, 1], labels]), rtol=1e-5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(target_accuracy(soft, probabilities)), [1.0, 0.0])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(target_accuracy(labels, probabilities)), [1.0, 0.0])
    assert training_metrics(False) == ["accuracy"] and training_loss(0.0) == "sparse_categorical_crossentropy"


def test_a_model_trained_on_soft_targets_saves_and_loads_in_safe_mode(tmp_path):
    import braintumor.model.backbones  # noqa: F401  what every loader imports
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer="adam", loss=training_loss(0.0, soft_targets=True), metrics=training_metrics(True))
    history = model.fit(np.ones((8, 3), np.float32), np.eye(4, dtype=np.float32)[np.arange(8) % 4],
                        validation_data=(np.ones((4, 3), np.float32), np.arange(4)), epochs=1, verbose=0).history
    assert set(history) >= {"accuracy", "val_accuracy", "loss", "val_loss"}
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(np.ones((2, 3)), verbose=0), model.predict(np.ones((2, 3)), verbose=0))


SIZE = 71  # Xception's smallest input
TINY = ModelParams(backbone="xception", weights="none", dense_units=(8, 8), dropout=(0.0, 0.0))


def _split() -> tuple[np.ndarray, dict[str, SplitRows]]:
    images = np.random.default_rng(2).integers(0, 256, (24, SIZE, SIZE), dtype=np.uint8)
    labels = np.tile(np.arange(4, dtype=np.int32), 6)
    return images, {"train": SplitRows(np.arange(16), labels[:16]), "val": SplitRows(np.arange(16, 24), labels[16:])}


def _trained(phase_fn, phase) -> tuple[list[np.ndarray], dict]:
    keras.utils.set_random_seed(0)
    model = build_model(TINY, SIZE)
    freeze_backbone(model)
    images, split = _split()
    result = phase_fn(model, images, split, phase, None, configure_runtime(RuntimeParams()), seed=3)
    return model.get_weights(), result


@pytest.mark.parametrize("phase_fn, params", [
    (finetune_phase, lambda **kw: FinetuneParams(unfreeze="block13_sepconv1", cache_copies=0, cache_dtype="float32",
                                                 epochs=2, batch_size=8, learning_rate=1e-3, **kw)),
    (train_base_phase, lambda **kw: TrainBaseParams(feature_cache_copies=0, epochs=2, batch_size=8, **kw)),
], ids=["finetune-from-the-activation-cache", "train_base-on-cached-features"])
def test_mixup_reaches_training_in_both_phases(phase_fn, params):
    other_weights, _ = _trained(phase_fn, params(mixup=2.0))
    mixed_weights, mixed = _trained(phase_fn, params(mixup=0.4))
    if phase_fn is finetune_phase:
        assert mixed["activation_cache_layer"].startswith("add")
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert len(mixed["history"][key]) == 2 and np.isfinite(mixed["history"][key]).all(), key
    assert all(0.0 <= a <= 1.0 for a in mixed["history"]["val_accuracy"])
    # the same model, data, batches and partners (the same seeds): only the shares drawn differ, so the weights do
    assert any(not np.allclose(a, b) for a, b in zip(other_weights, mixed_weights))


def test_mixup_is_off_by_default_must_be_non_negative_and_is_refused_on_a_multi_worker_cluster():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse_params(raw)
    assert params.train_base.mixup == 0.0 and params.finetune.mixup == 0.0
    raw["finetune"]["mixup"] = -0.1
    with pytest.raises(ParamsError, match="finetune.mixup"):
        parse_params(raw)
    raw["finetune"]["mixup"] = 0.2
    assert parse_params(raw).finetune.mixup == 0.2
    raw["runtime"]["distribution"] = "multi_worker"
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert "finetune.mixup" in str(info.value) and "multi_worker" in str(info.value)
