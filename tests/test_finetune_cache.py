"""Fine-tuning from cached activations: where the model is cut, that the cut model computes the same
function, and that cached and uncached fine-tuning reach the same weights after the same steps."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import keras
import numpy as np
import pytest

from braintumor.core.config import FinetuneParams, ModelParams, RuntimeParams
from braintumor.core.logs import Progress
from braintumor.model.backbones import build_model, freeze_backbone, unfreeze_top
from braintumor.model.activations import cache_outputs, split_at_frozen
from braintumor.model.train import configure_runtime, finetune_phase
from braintumor.split.load import SplitRows

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The structure of `inputs` doesn't match:UserWarning"),
]

SIZE = 71  # Xception's smallest input; random MobileNetV3 activations (1e-10) would underflow float16
TINY = ModelParams(backbone="xception", weights="none", dense_units=(8, 8), dropout=(0.0, 0.0))
UNFREEZE = "block13_sepconv1"  # Xception's exit flow, as on the real data


def test_xception_is_cut_at_the_block_output_that_feeds_the_residual_branch_too():
    model = build_model(ModelParams(backbone="xception", weights="none", dense_units=(8, 8)), 96)
    unfreeze_top(model, "block13_sepconv1")
    bottom, top = split_at_frozen(model)
    # block13_sepconv1_act comes first, but block 13's 1x1 residual conv reads the block-12 sum
    # (add_10) too: the latest single tensor that feeds everything above is that sum.
    # (Keras numbers Add layers per process, so the sum is found by what it feeds, not by its name.)
    block12_sum = model.get_layer("block13_sepconv1_act").input
    assert bottom.layers[-1].output is block12_sum and tuple(bottom.output.shape[1:]) == (6, 6, 728)
    assert top.get_layer("block13_sepconv1") is model.get_layer("block13_sepconv1")  # shared, not copied
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(top(bottom(images))), np.asarray(model(images)))


def test_nothing_to_cache_when_the_whole_backbone_is_unfrozen():
    model = build_model(TINY.model_copy(update={"backbone": "mobilenetv3small"}), 32)
    unfreeze_top(model, "all")
    assert split_at_frozen(model) is None
    freeze_backbone(model)  # only the head trains: the cut is the pooled features (the base phase's cache)
    bottom, top = split_at_frozen(model)
    assert bottom.layers[-1].name == "head_pool" and top.layers[1].name == "head_dense_1"


def test_cache_outputs_writes_a_float16_memmap_with_augmented_copies_and_reports_progress(tmp_path, caplog):
    model = build_model(TINY, SIZE)
    unfreeze_top(model, UNFREEZE)
    bottom, _ = split_at_frozen(model)
    images = np.random.default_rng(1).integers(0, 256, (7, SIZE, SIZE), dtype=np.uint8)
    rows = np.array([5, 0, 3])
    from braintumor.core.config import AugmentParams

    progress = Progress(logging.getLogger("test.cache"), "activation cache", 9, unit="maps", every=0.0)
    with caplog.at_level(logging.INFO, logger="test.cache"):
        out, sources = cache_outputs(bottom, images, rows, batch_size=2, augment=AugmentParams(), copies=2, seed=0,
                                     dtype="float16", path=tmp_path / "outputs.npy", progress=progress)
    # advanced by every batch (2 rows, then 1, per copy); the last, complete count is the stage's own line
    assert progress.done == 9
    assert [m.split(" (")[0] for m in caplog.messages] == [f"activation cache: {k} / 9 maps" for k in (2, 3, 5, 6, 8)]
    assert isinstance(out, np.memmap) and out.dtype == np.float16 and (tmp_path / "outputs.npy").is_file()
    assert out.shape == (9, *bottom.output.shape[1:]) and sources.tolist() == [5, 0, 3] * 3
    exact = np.asarray(bottom(images[rows][..., None].astype("float32"), training=False))
    np.testing.assert_allclose(out[:3].astype(np.float32), exact, rtol=1e-3, atol=1e-3)  # copy 0: the image
    assert not np.allclose(out[3:6].astype(np.float32), exact, atol=1e-2)  # copies 1 and 2: augmented
    again, _ = cache_outputs(bottom, images, rows, batch_size=2, augment=AugmentParams(), copies=2, seed=0)
    np.testing.assert_allclose(again, out.astype(np.float32), rtol=1e-3, atol=1e-3)  # seeded: reproducible


def finetuned_weights(activation_cache: bool, cache_dtype: str) -> tuple[list, list, list[str], dict]:
    """(initial, final) weights and their names after one fine-tuning step of the tiny model's exit flow."""
    keras.utils.set_random_seed(0)
    model = build_model(TINY, SIZE)
    initial = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (48, SIZE, SIZE), dtype=np.uint8)
    labels = np.tile(np.arange(4, dtype=np.int32), 12)
    split = {"train": SplitRows(np.arange(32), labels[:32]), "val": SplitRows(np.arange(32, 48), labels[32:])}
    phase = FinetuneParams(unfreeze=UNFREEZE, epochs=1, batch_size=32, learning_rate=1e-3,
                           activation_cache=activation_cache, cache_copies=0, cache_dtype=cache_dtype)
    result = finetune_phase(model, images, split, phase, None, configure_runtime(RuntimeParams()), seed=3)
    return initial, model.get_weights(), [w.path for w in model.weights], result


# A Dense bias right before a BatchNormalization in training mode has an analytically zero gradient
# (the batch mean absorbs it); its computed gradient is float noise, which Adam scales to a full
# learning-rate step of either sign. Those gauge parameters (and the moving mean that tracks them)
# differ between any two summation orders and change nothing the model computes.
GAUGE = ("head_dense_1/bias", "head_dense_2/bias", "head_bn_1/moving_mean", "head_bn_2/moving_mean")
# Adam moves a weight by up to the learning rate whatever its gradient's size, so where a gradient is
# tiny (1e-8) rounding shows as a visible fraction of the step: "the same step" is within 1% of it.
STEP_TOLERANCE = 0.01 * 1e-3


def test_cached_and_uncached_finetuning_take_the_same_step():
    initial, uncached, names, plain = finetuned_weights(activation_cache=False, cache_dtype="float32")
    _, cached, _, result = finetuned_weights(activation_cache=True, cache_dtype="float32")
    # Keras numbers its Add layers per process: the cut is the block-12 sum, whatever its number.
    assert "activation_cache_layer" not in plain and result["activation_cache_layer"].startswith("add")
    np.testing.assert_allclose(result["history"]["val_loss"], plain["history"]["val_loss"], rtol=1e-5)
    moved = [name for name, a, b in zip(names, initial, uncached) if not np.array_equal(a, b)]
    assert "block13_sepconv1/pointwise_kernel" in moved and "predictions/kernel" in moved  # a real step
    for name, before, a, b in zip(names, initial, uncached, cached):
        if name in GAUGE:
            continue
        np.testing.assert_allclose(b, a, rtol=0, atol=STEP_TOLERANCE, err_msg=name)
        if np.array_equal(before, a):  # frozen weights stay exactly as they were in both
            np.testing.assert_array_equal(b, before, err_msg=name)
    # float16 storage (the default) rounds the activations (relative 1e-3), which flips the sign of
    # some of this random network's near-zero gradients, so weights differ by up to 2 Adam steps; what
    # the step does to the loss is the same.
    _, _, _, half = finetuned_weights(activation_cache=True, cache_dtype="float16")
    np.testing.assert_allclose(half["history"]["loss"], plain["history"]["loss"], rtol=1e-3)
    np.testing.assert_allclose(half["history"]["val_loss"], plain["history"]["val_loss"], rtol=1e-3)


def _dense_steps(images: np.ndarray, labels: np.ndarray, copy_weights: np.ndarray | None) -> list[np.ndarray]:
    """Weights and losses of a BatchNorm-free softmax model after five full-batch steps through ``fit``
    and ``make_dataset`` (five, because Adam's first step moves every weight by the learning rate
    whatever the gradient's size: only later steps show the gradients)."""
    from braintumor.model.inputs import make_dataset, sample_weights
    from braintumor.model.train import compile_for, fit

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    phase = FinetuneParams(learning_rate=1e-2, epochs=5, early_stopping_patience=5, reduce_lr_patience=5)
    compile_for(model, phase, len(images), jit_compile=False)
    weights = sample_weights(labels, 4, copy_weights, balance_classes=True)
    rows = np.arange(len(images))
    result = fit(model, make_dataset(images, rows, labels, batch_size=len(rows), training=True, augment=None, seed=0,
                                     weights=weights),
                 make_dataset(images, rows, labels, batch_size=len(rows), training=False, augment=None, seed=0),
                 phase, "weights", len(rows))
    return [*model.get_weights(), np.array(result["history"]["loss"])]


def test_copies_weighted_one_over_group_size_take_the_same_steps_as_one_image_per_group():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (12, 4, 4), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3], np.int32)
    one = _dense_steps(images, labels, None)
    # Slices 0 and 7 uploaded three and two times: with split.train_copies: all they enter training
    # with weights 1/3 and 1/2, and the steps (and the training loss) are those of one image per group.
    copies = np.concatenate([images, images[[0, 0, 7]]])
    copy_labels = np.concatenate([labels, labels[[0, 0, 7]]])
    copy_weights = np.ones(len(copies))
    copy_weights[[0, 12, 13]] = 1 / 3
    copy_weights[[7, 14]] = 1 / 2
    for a, b in zip(one, _dense_steps(copies, copy_labels, copy_weights)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # Unweighted, the copies pull the steps towards slices 0 and 7: the test can tell the difference.
    unweighted = _dense_steps(copies, copy_labels, np.ones(len(copies)))
    assert not np.allclose(unweighted[0], one[0], atol=1e-4)
    assert not np.allclose(unweighted[-1], one[-1], rtol=1e-3)


# --------------------------------------------------------------------------- the activations stage's cache, shared


def _tiny_split(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, SplitRows]]:
    images = rng.integers(0, 256, (11, SIZE, SIZE), dtype=np.uint8)
    labels = np.arange(11, dtype=np.int32) % 4
    return images, {"train": SplitRows(np.array([7, 1, 4, 9, 0, 6]), labels[[7, 1, 4, 9, 0, 6]]),
                    "val": SplitRows(np.array([2, 10, 5]), labels[[2, 10, 5]])}


def _frozen_model(weights_seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(weights_seed)
    model = build_model(TINY, SIZE)
    freeze_backbone(model)
    return model


def test_the_heads_features_derived_from_the_activation_cache_are_the_backbones_own(tmp_path):
    """train_base's feature cache from the activations stage's maps: the same vectors (copy 0 the image,
    copy 1 the same augmented copy) as running the whole frozen backbone over the images."""
    from braintumor.core.config import AugmentParams, TrainBaseParams
    from braintumor.model.activations import build_activation_cache, read_activation_cache
    from braintumor.model.train import head_features

    images, split = _tiny_split(np.random.default_rng(3))
    finetune = FinetuneParams(unfreeze=UNFREEZE, cache_copies=2, cache_dtype="float32")
    manifest = build_activation_cache(_frozen_model(), images, split, finetune=finetune, augment=AugmentParams(), seed=4,
                                      folder=tmp_path / "activations")
    assert manifest["copies"] == 2 and manifest["train_maps"] == 18 and manifest["val_maps"] == 3
    cache = read_activation_cache(tmp_path / "activations")
    assert isinstance(cache.train, np.memmap) and cache.sources.tolist() == [7, 1, 4, 9, 0, 6] * 3
    phase = TrainBaseParams(feature_cache_copies=1)
    model = _frozen_model()  # a fresh build of the same weights, as train_base's
    derived, sources, val, how = head_features(model, images, split, phase, AugmentParams(), 4, cache)
    own, own_sources, own_val, own_how = head_features(model, images, split, phase, AugmentParams(), 4, None)
    assert how.startswith("from the activation cache") and own_how == "from the images"
    assert derived.shape == own.shape and len(own) == 12 and sources.tolist() == own_sources.tolist()
    scale = float(np.abs(own).max())  # a random backbone's features are tiny (1e-5): compare relative to them
    np.testing.assert_allclose(derived / scale, own / scale, rtol=0, atol=1e-5)
    np.testing.assert_allclose(val / scale, own_val / scale, rtol=0, atol=1e-5)
    assert np.abs(own[:6] - own[6:]).max() > 0.1 * scale  # copy 1 is augmented: the comparison covers the seeds
    # More copies than the cache holds: the backbone runs over the images, and the log says why.
    *_, more = head_features(model, images, split, TrainBaseParams(feature_cache_copies=3), AugmentParams(), 4, cache)
    assert more == "from the images (train_base.feature_cache_copies 3 > the activation cache's 2 copies)"


def test_an_activation_cache_built_for_another_model_or_split_is_refused_by_name(tmp_path):
    from braintumor.core.config import AugmentParams
    from braintumor.model.activations import (build_activation_cache, check_cache_matches, finetuning_cut,
                                              read_activation_cache)

    images, split = _tiny_split(np.random.default_rng(5))
    finetune = FinetuneParams(unfreeze=UNFREEZE, cache_copies=0)
    build_activation_cache(_frozen_model(), images, split, finetune=finetune, augment=AugmentParams(), seed=0,
                           folder=tmp_path / "activations")
    cache = read_activation_cache(tmp_path / "activations")
    model = _frozen_model()
    cut = finetuning_cut(model, finetune).cut
    check_cache_matches(cache, model, cut, images, split)  # its own model and split: accepted
    other_split = {**split, "train": SplitRows(split["train"].rows[::-1], split["train"].labels[::-1])}
    with pytest.raises(ValueError, match="other training or validation images than data/split/split.csv"):
        check_cache_matches(cache, model, cut, images, other_split)
    deeper = finetuning_cut(_frozen_model(), FinetuneParams(unfreeze="block14_sepconv1")).cut
    with pytest.raises(ValueError, match=r"it was cut after layer \d+ \(add.*\), this model after layer \d+ .*"
                                         r"Rebuild it: `dvc repro activations`"):
        check_cache_matches(cache, model, deeper, images, split)
    other_weights = _frozen_model(weights_seed=1)  # another random initialisation: its maps differ
    finetuning_cut(other_weights, finetune)
    with pytest.raises(ValueError, match="its maps differ from this model's frozen layers .* weights changed"):
        check_cache_matches(cache, other_weights, cut, images, split)
    with pytest.raises(FileNotFoundError, match=r"no activation cache in .*missing.*`dvc repro activations`"):
        read_activation_cache(tmp_path / "missing")


def test_with_the_whole_backbone_unfrozen_the_cache_says_why_it_is_empty_and_finetuning_runs_end_to_end(tmp_path):
    from braintumor.core.config import AugmentParams
    from braintumor.model.activations import build_activation_cache, read_activation_cache

    images, split = _tiny_split(np.random.default_rng(6))
    for finetune, reason in ((FinetuneParams(unfreeze="all"), "nothing frozen below finetune.unfreeze ('all')"),
                             (FinetuneParams(unfreeze=UNFREEZE, activation_cache=False), "finetune.activation_cache is off")):
        manifest = build_activation_cache(_frozen_model(), images, split, finetune=finetune, augment=AugmentParams(),
                                          seed=0, folder=tmp_path / "activations")
        assert manifest == {"cut": None, "reason": reason}
        assert sorted(p.name for p in (tmp_path / "activations").iterdir()) == ["manifest.json"]
    cache = read_activation_cache(tmp_path / "activations")
    result = finetune_phase(_frozen_model(), images, split, FinetuneParams(unfreeze=UNFREEZE, activation_cache=False,
                                                                           epochs=1, batch_size=8),
                            None, configure_runtime(RuntimeParams()), seed=0, activations=cache)
    assert "activation_cache_layer" not in result and result["epochs_run"] == 1


def test_the_feature_checks_training_features_come_from_the_cache_at_and_above_its_cut(tmp_path):
    """evaluate's out-of-distribution check reads the input of Xception's block13_sepconv1_act averaged over
    space: with the exit flow fine-tuned, that input is the cache's cut, so the cached maps (copy 0) give
    the same features as the model; for a layer above the cut the layers in between run on the maps, with
    the model's own (here changed) weights; below the cut there is nothing to read (None)."""
    from braintumor.core.config import AugmentParams
    from braintumor.model.activations import build_activation_cache, cached_layer_input_means, read_activation_cache
    from braintumor.model.backbones import feature_check_tensor

    images, split = _tiny_split(np.random.default_rng(7))
    build_activation_cache(_frozen_model(), images, split, finetune=FinetuneParams(unfreeze=UNFREEZE, cache_copies=1,
                                                                                   cache_dtype="float32"),
                           augment=AugmentParams(), seed=0, folder=tmp_path / "activations")
    cache = read_activation_cache(tmp_path / "activations")
    model = _frozen_model()
    cached = cached_layer_input_means(cache, model, "block13_sepconv1_act", images, split)
    own = keras.Model(model.inputs[0], feature_check_tensor(model, "block13_sepconv1_act"))(
        np.asarray(images[split["train"].rows][..., None], np.float32))
    own = np.asarray(own)
    assert cached.shape == own.shape == (6, 728)
    np.testing.assert_allclose(cached / np.abs(own).max(), own / np.abs(own).max(), rtol=0, atol=1e-5)

    # a layer above the cut, after a fine-tuned layer in between has moved: the model's features, not the base's
    block13 = model.get_layer("block13_sepconv1")
    block13.set_weights([w * 1.5 for w in block13.get_weights()])
    above = cached_layer_input_means(cache, model, "block14_sepconv1_act", images, split)
    own = np.asarray(keras.Model(model.inputs[0], feature_check_tensor(model, "block14_sepconv1_act"))(
        np.asarray(images[split["train"].rows][..., None], np.float32)))
    assert above.shape == own.shape == (6, 1536)
    np.testing.assert_allclose(above / np.abs(own).max(), own / np.abs(own).max(), rtol=0, atol=1e-5)
    assert cached_layer_input_means(cache, model, "block12_sepconv1_act", images, split) is None  # below the cut
