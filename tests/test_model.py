"""The classifier: registry, input layers, head, Grad-CAM reachability, freezing, weights, saving.

Fast: every backbone is built with ``weights="none"`` at the smallest size it accepts (32 px, 71 for
Xception), once per module. The real ImageNet Xception file in ../shared/weights is loaded once.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from pathlib import Path
from typing import Callable

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from braintumor.core import config
from braintumor.core.config import ModelParams
from braintumor.model.weights import WEIGHTS_DIR_ENV
from conftest import shared_weights_dir
from braintumor.model.backbones import (
    BACKBONES,
    HEAD_LAYER_NAMES,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    GreyToRGB,
    ImagenetPreprocessing,
    backbone_layers,
    build_model,
    default_gradcam_layer_name,
    freeze_backbone,
    last_conv_layer_name,
    preprocess_rgb,
    trainable_param_count,
    unfreeze_top,
)

HEAD = {"dense_units": (16, 8), "dropout": (0.5, 0.25)}

# Keras's own saving code calls np.array() on TensorFlow variables, which NumPy 2 flags once per variable.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def size_for(backbone: str) -> int:
    """The smallest input side keras.applications accepts for ``backbone``."""
    return BACKBONES[backbone].min_size


def grey_images(backbone: str, count: int = 2, seed: int = 0) -> np.ndarray:
    """Random grey slices (count, S, S, 1) float32 in 0..255."""
    size = size_for(backbone)
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 1)).astype("float32")


@pytest.fixture(scope="module")
def built() -> Callable[[str], keras.Model]:
    """``built(name)``: that backbone's model (weights none, small head), built once per module.

    Seeded: an unseeded build drew other random weights in every process, and one draw on CI (2026-12-07)
    gave efficientnetb0 an all-zero gradient at its last conv layer, which 12 seeds and 1,000 redrawn heads
    here never did (its random features are about 1e-6). A fixed seed makes the weights the same on every
    machine and in every test order.
    """
    cache: dict[str, keras.Model] = {}

    def get(name: str) -> keras.Model:
        if name not in cache:
            keras.utils.set_random_seed(0)
            cache[name] = build_model(ModelParams(backbone=name, weights="none", **HEAD), size_for(name))
        return cache[name]

    return get


# --------------------------------------------------------------------------- registry


def test_registry_covers_the_configurable_backbones():
    assert set(BACKBONES) == set(config.BACKBONES)
    assert set(BACKBONES) == set(ModelParams.model_fields["backbone"].annotation.__args__)


def test_last_conv_layer_name_accepts_params_entry_or_name():
    assert last_conv_layer_name(ModelParams(backbone="xception")) == "block14_sepconv2_act"
    assert last_conv_layer_name(BACKBONES["densenet121"]) == "relu"
    assert last_conv_layer_name("resnet50") == "conv5_block3_out"
    with pytest.raises(ValueError, match="'vgg16'.*known: \\['densenet121'"):
        last_conv_layer_name("vgg16")


def test_default_gradcam_layer_is_the_last_conv_block_except_for_xceptions_finer_map(built):
    assert default_gradcam_layer_name("resnet50") == "conv5_block3_out"
    assert default_gradcam_layer_name(BACKBONES["densenet121"]) == "relu"
    assert default_gradcam_layer_name(ModelParams(backbone="xception")) == "block13_sepconv2_bn"
    model = built("xception")
    # Stride 16 where the last conv block is stride 32 (14 x 14 against 7 x 7 at 224 px).
    finer = model.get_layer(default_gradcam_layer_name("xception")).output.shape[1]
    assert finer > model.get_layer(last_conv_layer_name("xception")).output.shape[1]


# --------------------------------------------------------------------------- input layers


def test_grey_to_rgb_repeats_the_channel():
    grey = np.array([[[[0.0], [10.0]], [[200.0], [255.0]]]], dtype="float32")  # (1, 2, 2, 1)
    rgb = keras.ops.convert_to_numpy(GreyToRGB()(grey))
    assert rgb.shape == (1, 2, 2, 3) and rgb.dtype == np.float32
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], grey[..., 0])


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_preprocess_rgb_matches_keras_preprocess_input(mode):
    rgb = np.array([[[[0.0, 100.0, 255.0], [30.0, 60.0, 90.0]]]], dtype="float32")  # distinct channels: BGR shows
    expected = keras.applications.imagenet_utils.preprocess_input(rgb.copy(), mode=mode)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(preprocess_rgb(rgb, mode)), expected, rtol=1e-6, atol=1e-5)


def test_preprocess_rgb_none_is_identity_and_bad_mode_is_named():
    rgb = np.full((1, 1, 1, 3), 7.0, dtype="float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(preprocess_rgb(rgb, "none")), rgb)
    with pytest.raises(ValueError, match="'inception'.*allowed"):
        ImagenetPreprocessing("inception")


# A grey pixel of 100 as the first conv layer sees it, per (R, G, B) slot, hand-computed.
FIRST_CONV_INPUT_AT_100 = {
    "resnet50": (100 - 103.939, 100 - 116.779, 100 - 123.68),  # caffe: BGR order, minus the means
    "xception": (100 / 127.5 - 1,) * 3,
    "efficientnetb0": (100 / 255,) * 3,  # its own Rescaling; weights none: Normalization mean 0, var 1
    "densenet121": tuple((100 / 255 - m) / s for m, s in zip(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)),
    "mobilenetv3small": (100 / 127.5 - 1,) * 3,  # its own Rescaling (include_preprocessing=True)
}


def first_conv_input_at_centre(model: keras.Model, grey_value: float) -> np.ndarray:
    """The 3 channels the backbone's first Conv2D receives at the image centre for a flat grey image."""
    first_conv = next(layer for layer in backbone_layers(model) if isinstance(layer, keras.layers.Conv2D))
    probe = keras.Model(model.input, first_conv.input)
    size = model.input.shape[1]
    seen = keras.ops.convert_to_numpy(probe(np.full((1, size, size, 1), grey_value, dtype="float32")))
    return seen[0, seen.shape[1] // 2, seen.shape[2] // 2]  # centre: away from any zero padding


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_grey_to_rgb_and_preprocessing_are_applied_once(built, name):
    np.testing.assert_allclose(first_conv_input_at_centre(built(name), 100.0), FIRST_CONV_INPUT_AT_100[name], atol=1e-4)


# --------------------------------------------------------------------------- head and Grad-CAM


def test_head_structure_and_probabilities(built):
    model = built("resnet50")
    head = [model.get_layer(name) for name in HEAD_LAYER_NAMES]
    assert model.layers[-len(head):] == head  # the head ends the model, in this order
    L = keras.layers
    assert [type(layer) for layer in head] == [
        L.GlobalAveragePooling2D, L.Dense, L.BatchNormalization, L.Dropout,
        L.Dense, L.BatchNormalization, L.Dropout, L.Dense,
    ]
    assert [head[1].units, head[4].units, head[7].units] == [16, 8, 4]
    assert [head[3].rate, head[6].rate] == [0.5, 0.25]
    assert head[1].activation is keras.activations.relu and head[4].activation is keras.activations.relu
    assert head[7].activation is keras.activations.softmax
    assert head[7].dtype_policy.compute_dtype == "float32"

    probs = keras.ops.convert_to_numpy(model(grey_images("resnet50", count=3), training=False))
    assert probs.shape == (3, 4) and probs.dtype == np.float32
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_output_stays_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model(ModelParams(backbone="mobilenetv3small", weights="none", **HEAD), 32)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.get_layer("preprocess").compute_dtype == "float16"
    assert model.output.dtype == "float32"
    probs = keras.ops.convert_to_numpy(model(grey_images("mobilenetv3small"), training=False))
    assert probs.dtype == np.float32 and np.isfinite(probs).all()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_last_conv_layer_is_reachable_for_gradcam(built, name):
    model = built(name)
    conv_layer = model.get_layer(last_conv_layer_name(name))
    # Not a nested sub-model: the layer sits in this graph and is what the head pools.
    assert model.get_layer("head_pool").input is conv_layer.output
    grad_model = keras.Model(model.input, [conv_layer.output, model.output])
    with tf.GradientTape() as tape:
        conv, probs = grad_model(tf.constant(grey_images(name)), training=False)  # (2, s, s, C), (2, 4)
        score = tf.gather(probs, tf.argmax(probs, axis=1), batch_dims=1)  # (2,) the predicted class
    grads = tape.gradient(score, conv)
    assert grads is not None and conv.shape.rank == 4
    assert grads.shape == conv.shape
    assert np.isfinite(grads.numpy()).all() and np.any(grads.numpy() != 0)


def test_image_size_below_the_backbone_minimum_is_refused():
    with pytest.raises(ValueError, match="64 is too small for xception: it needs at least 71"):
        build_model(ModelParams(backbone="xception", weights="none"), 64)


# --------------------------------------------------------------------------- freezing

# ResNet50's last 10 layers, conv5_block3_1_conv .. conv5_block3_out: 3 convs, 3 BN, 2 ReLU, add, ReLU.
LAST_TEN = ["conv5_block3_1_conv", "conv5_block3_1_bn", "conv5_block3_1_relu", "conv5_block3_2_conv",
            "conv5_block3_2_bn", "conv5_block3_2_relu", "conv5_block3_3_conv", "conv5_block3_3_bn",
            "conv5_block3_add", "conv5_block3_out"]
HEAD_PARAMS = (2048 * 16 + 16) + 2 * 16 + (16 * 8 + 8) + 2 * 8 + (8 * 4 + 4)  # dense, bn (gamma, beta), ...
LAST_TEN_CONV_PARAMS = (2048 * 512 + 512) + (3 * 3 * 512 * 512 + 512) + (512 * 2048 + 2048)


def test_freeze_backbone_leaves_only_the_head_trainable(built):
    model = built("resnet50")
    assert freeze_backbone(model) == HEAD_PARAMS
    assert not any(layer.trainable for layer in backbone_layers(model))
    assert all(model.get_layer(name).trainable for name in HEAD_LAYER_NAMES)
    assert len(backbone_layers(model)) == 174  # 175 in ResNet50(include_top=False) less its input


@pytest.mark.parametrize("top", [10, "conv5_block3_1_conv"], ids=["count", "name"])
def test_unfreeze_top_unfreezes_the_last_layers_but_not_batchnorm(built, top):
    model = built("resnet50")
    freeze_backbone(model)
    counts = unfreeze_top(model, top)
    expected = {"unfrozen_layers": 7, "frozen_batchnorm": 3, "trainable_params": HEAD_PARAMS + LAST_TEN_CONV_PARAMS}
    assert counts == expected
    assert counts["trainable_params"] == trainable_param_count(model)
    blayers = backbone_layers(model)
    assert [layer.name for layer in blayers[-10:]] == LAST_TEN
    assert [layer.name for layer in blayers if layer.trainable] == [n for n in LAST_TEN if not n.endswith("_bn")]


def test_unfreeze_everything_keeps_every_batchnorm_frozen(built):
    model = built("resnet50")
    blayers = backbone_layers(model)
    counts = unfreeze_top(model, len(blayers))
    batchnorms = [layer for layer in blayers if isinstance(layer, keras.layers.BatchNormalization)]
    assert counts["frozen_batchnorm"] == len(batchnorms) == 53
    assert counts["unfrozen_layers"] == len(blayers) - 53
    assert not any(layer.trainable for layer in batchnorms)
    assert model.get_layer("head_bn_1").trainable  # the new head's BN layers do train
    assert unfreeze_top(model, 0)["unfrozen_layers"] == 0


@pytest.mark.parametrize("top, message", [
    ("conv9_block1_out", "'conv9_block1_out' is not a backbone layer.*'conv1_pad' to 'conv5_block3_out'"),
    ("head_dense_1", "'head_dense_1' is not a backbone layer"),
    (-1, "layer count -1 is out of range.*174 layers \\(0..174\\)"),
    (175, "layer count 175 is out of range"),
    (True, "layer count True"),
])
def test_unfreeze_top_rejects_a_bad_name_or_count(built, top, message):
    with pytest.raises(ValueError, match=message):
        unfreeze_top(built("resnet50"), top)


def test_a_training_step_leaves_frozen_batchnorm_untouched(built):
    """Only the unfrozen convs and the head move; BN statistics and gamma/beta do not (inference mode)."""
    model = built("resnet50")
    freeze_backbone(model)
    unfreeze_top(model, 10)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", run_eagerly=True)
    watched = ["conv5_block3_3_bn", "conv5_block3_3_conv", "conv5_block2_3_conv", "head_dense_1"]
    before = {name: [w.copy() for w in model.get_layer(name).get_weights()] for name in watched}
    model.train_on_batch(grey_images("resnet50", count=4), np.array([0, 1, 2, 3]))
    after = {name: model.get_layer(name).get_weights() for name in watched}
    unchanged = lambda name: all(np.array_equal(a, b) for a, b in zip(before[name], after[name]))  # noqa: E731
    assert unchanged("conv5_block3_3_bn")  # gamma, beta, moving mean, moving variance
    assert unchanged("conv5_block2_3_conv")  # below the unfrozen range
    assert not unchanged("conv5_block3_3_conv") and not unchanged("head_dense_1")


# --------------------------------------------------------------------------- weights


def _perturbed_mobilenet_file(path: Path) -> keras.Model:
    """A keras.applications MobileNetV3Small with random positive weights, saved to ``path``."""
    source = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(1)
    for weight in source.weights:
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype(weight.dtype))  # > 0: valid BN variances too
    source.save_weights(path)
    return source


def test_weights_path_relative_to_root_loads_into_the_backbone(tmp_path):
    source = _perturbed_mobilenet_file(tmp_path / "w.weights.h5")
    # It is a file keras.applications itself accepts as `weights`.
    keras.applications.MobileNetV3Small(include_top=False, weights=str(tmp_path / "w.weights.h5"),
                                        input_shape=(32, 32, 3))

    model = build_model(ModelParams(backbone="mobilenetv3small", weights="w.weights.h5", **HEAD), 32, root=tmp_path)
    saved = [layer.get_weights() for layer in source.layers if layer.weights]
    loaded = [layer.get_weights() for layer in backbone_layers(model) if layer.weights]
    assert len(saved) == len(loaded) > 50
    for saved_arrays, loaded_arrays in zip(saved, loaded):
        for s, w in zip(saved_arrays, loaded_arrays, strict=True):
            np.testing.assert_array_equal(w, s)


def test_efficientnet_imagenet_normalisation_divides_by_the_std(tmp_path):
    """The ImageNet EfficientNet file stores the std as the variance; a path must still give (x/255 - m)/s."""
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign(IMAGENET_MEAN_RGB)
    norm.adapt_variance.assign(IMAGENET_STD_RGB)  # as in the file (tensorflow issue 49930)
    source.save_weights(tmp_path / "effnet.weights.h5")

    model = build_model(ModelParams(backbone="efficientnetb0", weights=str(tmp_path / "effnet.weights.h5"), **HEAD), 32)
    expected = [(100 / 255 - m) / s for m, s in zip(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)]
    np.testing.assert_allclose(first_conv_input_at_centre(model, 100.0), expected, atol=1e-4)


def test_missing_weights_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_model(ModelParams(backbone="resnet50", weights="weights/nope.weights.h5"), 32, root=tmp_path)
    assert str(tmp_path / "weights" / "nope.weights.h5") in str(info.value)


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras warns per layer before it raises
def test_weights_file_of_another_model_is_refused_with_its_name(tmp_path):
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save_weights(tmp_path / "dense.weights.h5")
    with pytest.raises(ValueError, match="dense.weights.h5 into backbone 'mobilenetv3small'"):
        build_model(ModelParams(backbone="mobilenetv3small", weights=str(tmp_path / "dense.weights.h5")), 32)


def test_real_imagenet_xception_weights_load_through_the_weights_dir(tmp_path, monkeypatch, no_network):
    """``model.weights: imagenet`` finds the shared Keras 3 file through BRAINTUMOR_WEIGHTS_DIR, offline."""
    weights_dir = shared_weights_dir()
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(weights_dir))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty Keras cache: the setting alone must find it
    model = build_model(ModelParams(backbone="xception", weights="imagenet", **HEAD), 96)
    with h5py.File(weights_dir / "xception_imagenet_notop.weights.h5", "r") as f:
        first_kernel = f["layers/conv2d/vars/0"][()]  # Keras names entries by class: the first Conv2D
    np.testing.assert_array_equal(model.get_layer("block1_conv1").kernel.numpy(), first_kernel)
    # The deepest BN holds ImageNet statistics, not the initial variance of ones.
    assert not np.allclose(model.get_layer("block14_sepconv2_bn").moving_variance.numpy(), 1.0)
    images = np.random.default_rng(2).uniform(0, 255, (2, 96, 96, 1)).astype("float32")
    assert np.isfinite(keras.ops.convert_to_numpy(model(images, training=False))).all()


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv3small"])
def test_saved_model_reloads_in_safe_mode_with_identical_predictions(built, tmp_path, name):
    model = built(name)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    images = grey_images(name, count=3, seed=5)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(reloaded(images, training=False)),
        keras.ops.convert_to_numpy(model(images, training=False)),
    )
    assert reloaded.get_layer("preprocess").mode == BACKBONES[name].preprocessing
    assert isinstance(reloaded.get_layer("grey_to_rgb"), GreyToRGB)
    assert reloaded.get_layer(last_conv_layer_name(name)).output is reloaded.get_layer("head_pool").input
