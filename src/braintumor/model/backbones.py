"""The classifier: a keras.applications backbone under the seed's dense head, in one flat model.

Graph (S = image size, C = the backbone's feature channels)::

    image (B, S, S, 1) float32 in 0..255          the cached grey slice
    -> grey_to_rgb    (B, S, S, 3)                the same grey value in R, G and B
    -> preprocess     (B, S, S, 3)                the backbone's ImageNet preprocessing (or none, see below)
    -> backbone       (B, s, s, C)                layers inlined via ``input_tensor=``, not one nested layer
    -> head_pool      (B, C)
    -> head_dense_1 -> head_bn_1 -> head_dropout_1 -> head_dense_2 -> head_bn_2 -> head_dropout_2
    -> predictions    (B, num_classes) float32 softmax

Why the backbone is inlined: Grad-CAM needs the last conv layer's output as a model output, and a
backbone nested as one sub-model layer hides it (keras-io issue 1999). Here
``model.get_layer(last_conv_layer_name(params))`` works, also on a model reloaded from ``.keras``.

Why the keras-io advice "call the backbone with training=False" holds without such a call: the
backbone's BatchNormalization layers are kept ``trainable=False`` by :func:`freeze_backbone` and
:func:`unfreeze_top`, and in Keras 3 a non-trainable BatchNormalization always uses its moving
statistics. (EfficientNetB0's stochastic-depth Dropout layers do stay active while training, as in
keras-io's EfficientNet fine-tuning example, which also builds with ``input_tensor=``.)

Preprocessing is applied exactly once. ResNet50, Xception and DenseNet121 expect the caller to
preprocess, which :class:`ImagenetPreprocessing` does inside the model. EfficientNetB0 and
MobileNetV3Small rescale inside their own graphs, so their ``preprocess`` layer is the identity.

Weights: the backbone is always built with ``weights=None`` and the file is loaded afterwards, so the
architecture is the same whatever ``model.weights`` says. (keras.applications' EfficientNet adds one
Rescaling layer only when ``weights="imagenet"``; :func:`_correct_imagenet_stddev` does its job on the
loaded Normalization weights instead, so a path to the same ImageNet file gives the same model.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
from keras import layers, ops
from keras.applications import imagenet_utils

from braintumor.core.config import CLASS_NAMES, ModelParams
from braintumor.model import losses  # noqa: F401  registers the training loss, so saved models load with it
from braintumor.model.weights import ResolvedWeights, resolve_weights

# ImageNet channel statistics, RGB order (keras.applications.imagenet_utils): EfficientNet's Normalization check.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")
# The head's global pooling: where the backbone ends. Find it by this name, not by type: EfficientNet's
# and MobileNetV3's squeeze-and-excitation blocks contain GlobalAveragePooling2D layers too.
HEAD_POOL_LAYER = "head_pool"
HEAD_LAYER_NAMES = (
    HEAD_POOL_LAYER, "head_dense_1", "head_bn_1", "head_dropout_1",
    "head_dense_2", "head_bn_2", "head_dropout_2", "predictions",
)


@dataclass(frozen=True)
class Backbone:
    """One keras.applications backbone and what the model needs to know about it.

    Args:
        name: the key used in ``params.yaml`` (``model.backbone``).
        constructor: the keras.applications function; called with ``include_top=False``.
        preprocessing: the mode of the model's ``preprocess`` layer, one of :data:`PREPROCESSING_MODES`.
        preprocessing_note: what happens to a 0..255 RGB pixel before the first conv, in words.
        last_conv_layer: name of the last conv block's output (the Grad-CAM layer); it is also the
            backbone's output.
        feature_check_layer: the layer whose *input*, averaged over space, the out-of-distribution
            check reads: the output of the stride-16 stage (Xception's middle flow), where what kind
            of image this is still shows and the classes do not yet dominate (measured in BENCHMARKS.md).
        min_size: the smallest input side keras.applications accepts.
        constructor_kwargs: extra keyword arguments for ``constructor``.
        gradcam_layer: the layer Grad-CAM reads for ``gradcam.layer: auto``, where a finer one than the
            last conv block was measured to localise better; None = ``last_conv_layer``.
    """

    name: str
    constructor: Callable[..., keras.Model]
    preprocessing: str
    preprocessing_note: str
    last_conv_layer: str
    feature_check_layer: str
    min_size: int = 32
    constructor_kwargs: tuple[tuple[str, Any], ...] = ()
    gradcam_layer: str | None = None


BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(
        name="resnet50",
        constructor=keras.applications.ResNet50,
        preprocessing="caffe",
        preprocessing_note="caffe: RGB -> BGR, minus the ImageNet channel means (103.939, 116.779, 123.68), no scaling",
        last_conv_layer="conv5_block3_out",
        feature_check_layer="conv5_block1_1_conv",
    ),
    "xception": Backbone(
        name="xception",
        constructor=keras.applications.Xception,
        preprocessing="tf",
        preprocessing_note="tf: x / 127.5 - 1, to [-1, 1]",
        last_conv_layer="block14_sepconv2_act",
        feature_check_layer="block13_sepconv1_act",
        min_size=71,
        # The exit flow's last stride-16 map (14 x 14 at 224 px) instead of the 7 x 7 block 14: on real
        # tumor boxes (figshare, 450 slices) its peak lands in the box 0.25 of the time against 0.14,
        # and the fine-tuned layers (block 13 on) are still all behind it (README, Grad-CAM).
        gradcam_layer="block13_sepconv2_bn",
    ),
    "efficientnetb0": Backbone(
        name="efficientnetb0",
        constructor=keras.applications.EfficientNetB0,
        preprocessing="none",
        preprocessing_note=(
            "inside the backbone: Rescaling(1/255) then Normalization with the ImageNet mean and std "
            "that come with the weights (mean 0, variance 1, i.e. just x / 255, with weights none)"
        ),
        last_conv_layer="top_activation",
        feature_check_layer="block6a_expand_conv",
    ),
    "densenet121": Backbone(
        name="densenet121",
        constructor=keras.applications.DenseNet121,
        preprocessing="torch",
        preprocessing_note="torch: x / 255, minus mean (0.485, 0.456, 0.406), divided by std (0.229, 0.224, 0.225)",
        last_conv_layer="relu",
        feature_check_layer="pool4_bn",
    ),
    "mobilenetv3small": Backbone(
        name="mobilenetv3small",
        constructor=keras.applications.MobileNetV3Small,
        preprocessing="none",
        preprocessing_note="inside the backbone (include_preprocessing=True): Rescaling x / 127.5 - 1, to [-1, 1]",
        # keras.applications leaves this hard-swish Activation auto-named ("activation_17" or so,
        # depending on what the process built before); build_model gives it this stable name.
        last_conv_layer="conv_1_act",
        feature_check_layer="expanded_conv_8_expand",
        constructor_kwargs=(("include_preprocessing", True),),
    ),
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``; a ValueError lists the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None


def _backbone_of(params_or_backbone: ModelParams | Backbone | str) -> Backbone:
    if isinstance(params_or_backbone, Backbone):
        return params_or_backbone
    name = params_or_backbone.backbone if isinstance(params_or_backbone, ModelParams) else params_or_backbone
    return get_backbone(name)


def last_conv_layer_name(params_or_backbone: ModelParams | Backbone | str) -> str:
    """Name of the last conv block's output of the chosen backbone (the backbone's output).

    Args:
        params_or_backbone: the model params, a registry entry, or a backbone name.
    """
    return _backbone_of(params_or_backbone).last_conv_layer


def default_gradcam_layer_name(params_or_backbone: ModelParams | Backbone | str) -> str:
    """Name of the layer Grad-CAM reads by default (``gradcam.layer: auto``) for the chosen backbone:
    its ``gradcam_layer`` where one was measured to localise better, else the last conv block."""
    spec = _backbone_of(params_or_backbone)
    return spec.gradcam_layer or spec.last_conv_layer


# --------------------------------------------------------------------------- input layers


def preprocess_rgb(rgb: Any, mode: str) -> Any:
    """ImageNet preprocessing of RGB pixels in 0..255: keras.applications' ``preprocess_input``.

    Args:
        rgb: tensor (..., 3), RGB order, values 0..255.
        mode: "caffe" (BGR, minus channel means), "tf" (to [-1, 1]), "torch" (to [0, 1], then
            standardised per channel) or "none" (unchanged: the backbone rescales itself).
    """
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; allowed: {list(PREPROCESSING_MODES)}")
    if mode == "none":
        return rgb
    # As a tensor: given a NumPy array, preprocess_input would scale the caller's array in place.
    return imagenet_utils.preprocess_input(ops.convert_to_tensor(rgb), data_format="channels_last", mode=mode)


@keras.saving.register_keras_serializable(package="braintumor")
class GreyToRGB(keras.layers.Layer):
    """Repeat the one grey channel into R, G and B: (B, H, W, 1) -> (B, H, W, 3).

    A layer rather than a Lambda so ``keras.saving.load_model(..., safe_mode=True)`` accepts it.
    """

    def build(self, input_shape):
        if input_shape[-1] not in (1, None):
            raise ValueError(f"{self.name}: expected one grey channel (B, H, W, 1), got shape {input_shape}")
        self.built = True

    def call(self, grey):
        return ops.repeat(grey, 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


@keras.saving.register_keras_serializable(package="braintumor")
class ImagenetPreprocessing(keras.layers.Layer):
    """The backbone's own input preprocessing, as a serialisable layer (see :func:`preprocess_rgb`).

    Args:
        mode: one of :data:`PREPROCESSING_MODES`.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; allowed: {list(PREPROCESSING_MODES)}")
        self.mode = mode

    def call(self, rgb):
        return preprocess_rgb(rgb, self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# --------------------------------------------------------------------------- weights


def _correct_imagenet_stddev(backbone: keras.Model) -> None:
    """Make EfficientNet's Normalization divide by the ImageNet std, not by its square root.

    The ImageNet EfficientNet files store the std (0.229, 0.224, 0.225) as the Normalization
    layer's *variance* (tensorflow issue 49930); keras.applications compensates with an extra
    Rescaling layer only when built with ``weights="imagenet"``. Squaring the stored values here
    gives the same (x / 255 - mean) / std for a path too. Idempotent: corrected values no longer match.
    """
    for layer in backbone.layers:
        if isinstance(layer, layers.Normalization) and getattr(layer, "adapt_variance", None) is not None:
            variance = ops.convert_to_numpy(layer.adapt_variance)
            if variance.shape == (3,) and np.allclose(variance, IMAGENET_STD_RGB, atol=1e-4):
                layer.adapt_variance.assign(np.square(variance))
                layer.finalize_state()


def load_backbone_weights(backbone: keras.Model, path: Path, spec: Backbone) -> None:
    """Load a weights file (Keras ``.weights.h5`` or legacy ``.h5``) into the backbone's layers.

    Raises:
        ValueError: the file does not fit this backbone; the message names the file and backbone.
    """
    try:
        backbone.load_weights(str(path))
    except (ValueError, OSError, KeyError) as exc:
        detail = "\n".join(str(exc).splitlines()[:3])  # Keras goes on to list every layer that failed
        raise ValueError(
            f"cannot load {path} into backbone {spec.name!r} (a file for another backbone?): {detail}"
        ) from exc
    _correct_imagenet_stddev(backbone)


# --------------------------------------------------------------------------- model


def _head(features: Any, params: ModelParams, num_classes: int, synchronized_batchnorm: bool = False) -> Any:
    """The seed's head on the backbone's features (B, s, s, C) -> class probabilities (B, num_classes).

    ``synchronized_batchnorm``: batch statistics over the global batch, all-reduced across the
    replicas of a distribution strategy (each replica's share alone would give other statistics
    than one process training on the same batch).
    """
    x = layers.GlobalAveragePooling2D(name=HEAD_POOL_LAYER)(features)  # (B, C)
    for i, (units, rate) in enumerate(zip(params.dense_units, params.dropout), start=1):
        x = layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
        x = layers.BatchNormalization(synchronized=synchronized_batchnorm, name=f"head_bn_{i}")(x)
        x = layers.Dropout(rate, name=f"head_dropout_{i}")(x)
    # float32 so the softmax (and the loss on it) stays float32 under a mixed-precision policy.
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def _name_backbone_output(backbone: keras.Model, spec: Backbone) -> None:
    """Give the backbone's output layer (its last conv block's activation) the registry's name.

    A no-op for every backbone but MobileNetV3Small, whose constructor leaves that layer auto-named.
    """
    output_layer = backbone.layers[-1]  # layers are in topological order: this one yields (B, s, s, C)
    output_layer.name = spec.last_conv_layer


def build_model(
    params: ModelParams,
    image_size: int,
    num_classes: int = len(CLASS_NAMES),
    root: Path | None = None,
    weights: ResolvedWeights | None = None,
    synchronized_batchnorm: bool = False,
) -> keras.Model:
    """The classifier: grey (B, S, S, 1) 0..255 -> probabilities (B, num_classes), every layer trainable.

    Call :func:`freeze_backbone` (and compile) before training the head on a pretrained backbone.

    Args:
        params: backbone, weights ("imagenet" | "none" | path), head units and dropout rates.
        image_size: S, the side of the square input; at least the backbone's ``min_size``.
        num_classes: number of softmax outputs.
        root: folder that relative weights paths are resolved against (default: the cwd).
        weights: ``params.weights`` already resolved (:func:`braintumor.model.weights.resolve_weights`), for a
            caller that records where they came from; resolved here when None.
        synchronized_batchnorm: the head's BatchNorm layers use the global batch's statistics under
            a distribution strategy (multi-worker training); no effect in one process.

    Raises:
        WeightsUnavailableError: "imagenet" with no local copy, offline.
        FileNotFoundError: a weights path that does not exist.
        ValueError: an image size below the backbone's minimum, or a weights file that does not fit.
    """
    spec = get_backbone(params.backbone)
    if image_size < spec.min_size:
        raise ValueError(f"image_size {image_size} is too small for {spec.name}: it needs at least {spec.min_size}")
    # Resolve (and, for imagenet, fetch) the weights first: fail in seconds, before the slow build.
    if weights is None:
        weights = resolve_weights(spec.name, params.weights, Path.cwd() if root is None else Path(root))

    image = keras.Input((image_size, image_size, 1), dtype="float32", name="image")
    rgb = GreyToRGB(name="grey_to_rgb")(image)  # (B, S, S, 3)
    ready = ImagenetPreprocessing(spec.preprocessing, name="preprocess")(rgb)
    # input_tensor= inlines the backbone's layers into this graph (Grad-CAM can reach them).
    backbone = spec.constructor(include_top=False, weights=None, input_tensor=ready, **dict(spec.constructor_kwargs))
    _name_backbone_output(backbone, spec)
    if weights.path is not None:
        load_backbone_weights(backbone, weights.path, spec)
    outputs = _head(backbone.output, params, num_classes, synchronized_batchnorm)
    return keras.Model(image, outputs, name=f"{spec.name}_classifier")


# --------------------------------------------------------------------------- freezing


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers, input to output, in a model from :func:`build_model` (or reloaded).

    Every layer but the input, ``grey_to_rgb``, ``preprocess`` (found by type) and the head (by name);
    ``model.layers`` is in topological order, so the last one is the last conv block's output.
    """
    return [
        layer for layer in model.layers
        if layer.name not in HEAD_LAYER_NAMES
        and not isinstance(layer, (keras.layers.InputLayer, GreyToRGB, ImagenetPreprocessing))
    ]


def trainable_param_count(model: keras.Model) -> int:
    """Number of trainable scalars, as ``model.summary()`` reports "Trainable params"."""
    return int(sum(math.prod(weight.shape) for weight in model.trainable_weights))


def freeze_backbone(model: keras.Model) -> int:
    """Freeze every backbone layer; only the head trains. Recompile afterwards.

    Returns:
        The number of trainable parameters left (the head's).
    """
    for layer in backbone_layers(model):
        layer.trainable = False
    return trainable_param_count(model)


def _first_unfrozen_index(names: list[str], top: int | str) -> int:
    """Index into ``names`` (the backbone layers) from which layers are unfrozen ("all": 0)."""
    if top == "all":
        return 0
    if isinstance(top, str):
        if top not in names:
            raise ValueError(
                f"unfreeze: {top!r} is not a backbone layer; give a name from {names[0]!r} to "
                f"{names[-1]!r} (see model.summary()) or a count from 0 to {len(names)}"
            )
        return names.index(top)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= len(names):
        raise ValueError(
            f"unfreeze: layer count {top!r} is out of range; the backbone has {len(names)} layers (0..{len(names)})"
        )
    return len(names) - top


def unfreeze_top(model: keras.Model, top: int | str) -> dict[str, int]:
    """Unfreeze the top of the backbone for fine-tuning; everything below stays frozen. Recompile afterwards.

    BatchNormalization layers stay frozen (``trainable=False``): their moving statistics and
    gamma/beta are not touched, and they keep running in inference mode.

    Args:
        model: from :func:`build_model`.
        top: how many of the last backbone layers to unfreeze (0..number of backbone layers), the
            name of the first backbone layer to unfreeze (it and every later backbone layer), or
            "all" (a backbone trained from scratch, ``model.weights: none``).

    Returns:
        ``unfrozen_layers`` (now trainable), ``frozen_batchnorm`` (BatchNormalization layers in the
        unfrozen range kept frozen), ``trainable_params`` (whole model, head included).
    """
    blayers = backbone_layers(model)
    start = _first_unfrozen_index([layer.name for layer in blayers], top)
    unfrozen = kept_frozen = 0
    for index, layer in enumerate(blayers):
        is_bn = isinstance(layer, layers.BatchNormalization)
        layer.trainable = index >= start and not is_bn
        unfrozen += layer.trainable
        kept_frozen += index >= start and is_bn
    return {
        "unfrozen_layers": unfrozen,
        "frozen_batchnorm": kept_frozen,
        "trainable_params": trainable_param_count(model),
    }


def final_dense(model: keras.Model) -> keras.layers.Dense:
    """The classifier's last layer, a Dense softmax (or linear) layer: its input is the penultimate feature vector
    (the out-of-distribution check), its pre-activation the class logits (Grad-CAM)."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    logit_activations = (keras.activations.softmax, keras.activations.linear)
    if not isinstance(last, keras.layers.Dense) or activation not in logit_activations:
        raise ValueError(
            f"the model's last layer must be a Dense layer with a softmax (or no) activation, "
            f"to read the class logits and features; model {model.name!r} ends with {type(last).__name__} {last.name!r}"
        )
    return last


def feature_check_layer_name(setting: str, backbone: str) -> str:
    """``evaluate.feature_check.layer``: "auto" = the backbone's :attr:`Backbone.feature_check_layer`, else the name given."""
    return get_backbone(backbone).feature_check_layer if setting == "auto" else setting


def feature_check_tensor(model: keras.Model, layer_name: str) -> Any:
    """The symbolic (B, C) input of ``layer_name`` averaged over space: what the out-of-distribution check reads."""
    try:
        tensor = model.get_layer(layer_name).input
    except ValueError:
        raise ValueError(f"the model {model.name!r} has no layer {layer_name!r} for the out-of-distribution check") from None
    if len(tensor.shape) != 4:
        raise ValueError(f"the out-of-distribution check needs a (B, h, w, C) input of {layer_name!r}, got {tensor.shape}")
    return ops.mean(tensor, axis=(1, 2))
