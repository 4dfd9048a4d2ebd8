"""Grad-CAM (Selvaraju et al., 2017), shared by the ``gradcam`` stage and the app, and its sanity checks.

For a class c and a conv layer with activations A (B, h, w, K)::

    z_c          the class's logit (the predictions layer before its softmax)
    alpha_k      = mean over (h, w) of d z_c / d A_k                  (B, K)    one weight per channel
    cam          = ReLU(sum_k alpha_k * A_k)                          (B, h, w)
    heatmap      = bilinear upsampling of cam to (S, S), divided by its maximum: (B, S, S) in [0, 1]

The gradient is taken of the logit, not of the softmax probability: a confident prediction (p near 1)
has vanishing softmax gradients, while the logit's gradient keeps its direction (as in the paper and
keras-io's ``grad_cam.py``, which removes the softmax for the same reason).

Use::

    cam_model = make_gradcam_model(model, gradcam_layer_name(model))   # once per model: it is traced once
    heatmaps, probabilities = grad_cam(cam_model, images)                # images (N, S, S) uint8
    rgb = overlay(images[0], heatmaps[0], alpha=0.4)

Sanity checks (Adebayo et al., 2018, "Sanity checks for saliency maps"): :func:`randomise_top_layers`
re-initialises the top of a trained model; a faithful explanation changes a lot, which
:func:`rank_correlation` and :func:`structural_similarity` measure (both low = the maps depend on
what the model learnt).
"""

from __future__ import annotations

import weakref

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import ops
from scipy.stats import rankdata

from braintumor.model.backbones import BACKBONES, default_gradcam_layer_name, feature_check_tensor, final_dense

# The name build_model gives a model: f"{backbone}_classifier".
_MODEL_SUFFIX = "_classifier"
# Grad-CAM model -> (its traced function, number of classes); an entry goes when its model does.
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- the heatmap


def gradcam_layer_name(model: keras.Model, layer: str = "auto") -> str:
    """The conv layer Grad-CAM reads: ``layer`` itself, checked, or for "auto" the backbone's default
    (:func:`braintumor.model.backbones.default_gradcam_layer_name`: the last conv block, or for Xception
    the finer block-13 map).

    Args:
        model: a classifier from :func:`braintumor.model.backbones.build_model` (or reloaded); with an explicit
            ``layer``, any Keras model whose layer ``layer`` has a 4-D output (B, h, w, K).
        layer: a layer name, or "auto" (``default_gradcam_layer_name`` of the backbone the model was
            built with, recognised by the model's name ``<backbone>_classifier``).

    Raises:
        ValueError: "auto" on a model not built by build_model; a name the model lacks (the message
            lists the conv-shaped layers it has); a layer whose output is not 4-D.
    """
    if layer == "auto":
        backbone = model.name.removesuffix(_MODEL_SUFFIX)
        if not model.name.endswith(_MODEL_SUFFIX) or backbone not in BACKBONES:
            raise ValueError(
                f"gradcam layer 'auto' needs a model from braintumor.model.backbones.build_model (named "
                f"'<backbone>_classifier', backbones {sorted(BACKBONES)}); model {model.name!r} is not one: "
                f"give the layer name (gradcam.layer)"
            )
        layer = default_gradcam_layer_name(backbone)
    names = [candidate.name for candidate in model.layers]
    if layer not in names:
        spatial = [c.name for c in model.layers if len(getattr(c.output, "shape", ())) == 4][-5:]
        raise ValueError(f"gradcam layer {layer!r} is not in model {model.name!r}; its last conv-shaped "
                         f"layers are {spatial} (see model.summary())")
    shape = model.get_layer(layer).output.shape
    if len(shape) != 4:
        raise ValueError(f"gradcam layer {layer!r} outputs shape {tuple(shape)}; Grad-CAM needs (B, h, w, K)")
    return layer


def make_gradcam_model(model: keras.Model, layer_name: str, feature_layer: str | None = None) -> keras.Model:
    """A model image (B, S, S, 1) -> (activations (B, h, w, K), logits (B, C)), sharing ``model``'s weights.

    Build it once per model and reuse it: :func:`grad_cam` traces one TensorFlow graph per Grad-CAM
    model. The logits are the last Dense layer's pre-activation (see the module docstring).

    Args:
        model: a classifier ending in a Dense softmax layer.
        layer_name: from :func:`gradcam_layer_name`.
        feature_layer: also output the out-of-distribution check's features (the input of this layer,
            averaged over space) from the same forward pass, for :func:`grad_cam_with_features`.
    """
    dense = final_dense(model)
    activations = model.get_layer(gradcam_layer_name(model, layer_name)).output
    outputs = [activations, dense.input]
    if feature_layer is not None:
        outputs.append(feature_check_tensor(model, feature_layer))
    gradcam_model = keras.Model(model.inputs, outputs, name=f"{model.name}_gradcam_{layer_name}")
    _TRACED[gradcam_model] = (_traced_gradcam(gradcam_model, dense), int(dense.units))
    return gradcam_model


def _traced_gradcam(gradcam_model: keras.Model, dense: keras.layers.Dense):
    """One tf.function per Grad-CAM model: (images (B, S, S, 1) float32, class ids (B,), -1 = predicted)."""
    size = gradcam_model.inputs[0].shape[1:3]
    # A weak reference: the function is the value of _TRACED[gradcam_model] and must not keep its key alive.
    model_ref = weakref.ref(gradcam_model)

    @tf.function(input_signature=[tf.TensorSpec((None, *gradcam_model.inputs[0].shape[1:]), tf.float32),
                                  tf.TensorSpec((None,), tf.int32)], reduce_retracing=True)
    def heatmaps_and_probabilities(images, class_index):
        with tf.GradientTape() as tape:
            activations, features, *check_features = model_ref()(images, training=False)
            tape.watch(activations)
            logits = ops.matmul(ops.cast(features, "float32"), ops.cast(dense.kernel, "float32"))
            if dense.use_bias:
                logits = logits + ops.cast(dense.bias, "float32")
            probabilities = tf.nn.softmax(logits)
            target = tf.where(class_index < 0, tf.argmax(logits, axis=1, output_type=tf.int32), class_index)
            # Images are independent (inference mode), so the gradient of the sum is each image's own.
            score = tf.reduce_sum(tf.gather(logits, target, batch_dims=1))
        gradients = tape.gradient(score, activations)  # (B, h, w, K)
        weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)  # (B, 1, 1, K)
        cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(activations, tf.float32), axis=-1, keepdims=True))
        cam = tf.image.resize(cam, size, method="bilinear")[..., 0]  # (B, S, S)
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        # (B, 0) when the model has no feature-check output: one return structure for both kinds.
        pooled = check_features[0] if check_features else tf.zeros((tf.shape(images)[0], 0))
        return tf.math.divide_no_nan(cam, peak), probabilities, tf.cast(pooled, tf.float32)

    return heatmaps_and_probabilities


def _check_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 2:
        raise ValueError(f"grad_cam: images must be a batch (N, S, S); got one image {images.shape}: pass images[None]")
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1:] != tuple(size):
        raise ValueError(f"grad_cam: images must be (N, {size[0]}, {size[1]}) uint8 preprocessed slices, "
                         f"got shape {images.shape} dtype {images.dtype}")
    return images


def _class_ids(class_index: int | np.ndarray | None, count: int, num_classes: int) -> np.ndarray:
    """(N,) int32 class ids, -1 meaning "the predicted class"."""
    if class_index is None:
        return np.full(count, -1, np.int32)
    ids = np.broadcast_to(np.asarray(class_index), (count,)).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"grad_cam: class_index must be in [0, {num_classes}), got {sorted(set(ids.tolist()))}")
    return ids.astype(np.int32)


def grad_cam(
    gradcam_model: keras.Model,
    images: np.ndarray,
    class_index: int | np.ndarray | None = None,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps and class probabilities of preprocessed slices.

    Args:
        gradcam_model: from :func:`make_gradcam_model`.
        images: (N, S, S) uint8, as :func:`braintumor.preprocess.slices.preprocess_slice` returns them.
        class_index: the class to explain: one id for all images, (N,) ids, or None for each image's
            predicted class.
        batch_size: images per forward/backward pass (memory bound, not a result).

    Returns:
        heatmaps (N, S, S) float32 in [0, 1] (each divided by its maximum; all zeros when no pixel
        speaks for the class), probabilities (N, C) float32 (softmax of the logits).
    """
    heatmaps, probabilities, _ = grad_cam_with_features(gradcam_model, images, class_index, batch_size)
    return heatmaps, probabilities


def grad_cam_with_features(
    gradcam_model: keras.Model,
    images: np.ndarray,
    class_index: int | np.ndarray | None = None,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`grad_cam`, plus the out-of-distribution check's features (N, C) float32 from the same pass
    ((N, 0) when the Grad-CAM model was made without ``feature_layer``)."""
    size = tuple(gradcam_model.inputs[0].shape[1:3])
    images = _check_images(images, size)
    if gradcam_model not in _TRACED:
        raise ValueError(f"grad_cam: {gradcam_model.name!r} was not made by make_gradcam_model")
    function, num_classes = _TRACED[gradcam_model]
    ids = _class_ids(class_index, len(images), num_classes)
    heatmaps, probabilities, features = [], [], []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start:start + batch_size, ..., None], tf.float32)
        maps, probs, pooled = function(batch, tf.convert_to_tensor(ids[start:start + batch_size]))
        heatmaps.append(maps.numpy())
        probabilities.append(probs.numpy())
        features.append(pooled.numpy())
    if not heatmaps:
        width = int(gradcam_model.outputs[2].shape[-1]) if len(gradcam_model.outputs) > 2 else 0
        return (np.zeros((0, *size), np.float32), np.zeros((0, num_classes), np.float32),
                np.zeros((0, width), np.float32))
    return (np.concatenate(heatmaps).astype(np.float32), np.concatenate(probabilities).astype(np.float32),
            np.concatenate(features).astype(np.float32))


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N, C) of (N, S, S) uint8 slices, converted to float one batch at a time."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"predict_probabilities: images must be (N, S, S) uint8, got {images.shape} {images.dtype}")
    batches = [model.predict_on_batch(images[start:start + batch_size, ..., None].astype(np.float32))
               for start in range(0, len(images), batch_size)]
    return np.concatenate(batches).astype(np.float32) if batches else np.zeros((0, model.output_shape[-1]), np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    """The heatmap in OpenCV's JET colours blended over the grey slice: RGB uint8 (S, S, 3).

    Args:
        image: (S, S) uint8 preprocessed slice.
        heatmap: (S, S) float in [0, 1] (from :func:`grad_cam`).
        alpha: weight of the colours (0 = the slice alone, 1 = the colours alone).
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"overlay: image must be a 2-D uint8 slice, got shape {image.shape} dtype {image.dtype}")
    if heatmap.shape != image.shape:
        raise ValueError(f"overlay: heatmap {heatmap.shape} and image {image.shape} differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    levels = np.round(np.clip(heatmap, 0.0, 1.0) * 255).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    grey = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(colours, float(alpha), grey, 1.0 - float(alpha), 0.0)


# --------------------------------------------------------------------------- sanity: model randomisation


def _first_randomised_index(names: list[str], top: int | str) -> int:
    if isinstance(top, str):
        if top not in names:
            raise ValueError(f"randomise_top: {top!r} is not a layer of the model; give a name from "
                             f"{names[1]!r} to {names[-1]!r} or a count from 1 to {len(names) - 1}")
        return names.index(top)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(names) - 1:
        raise ValueError(f"randomise_top: layer count {top!r} is out of range; the model has "
                         f"{len(names) - 1} layers after its input (1..{len(names) - 1})")
    return len(names) - top


def randomised_layer_names(model: keras.Model, top: int | str) -> list[str]:
    """Names of the layers :func:`randomise_top_layers` re-initialises for ``top``, input side first."""
    names = [layer.name for layer in model.layers]
    return names[_first_randomised_index(names, top):]


def randomise_top_layers(model: keras.Model, top: int | str, seed: int) -> keras.Model:
    """A copy of ``model`` whose top layers are re-initialised; the layers below keep ``model``'s weights.

    The model randomisation test of Adebayo et al. (2018): an explanation that reflects what the model
    learnt must change when the learnt weights are replaced by random ones. ``model`` is not changed.
    Re-initialised means each layer's own initialisers, as for a new model (BatchNormalization
    statistics back to mean 0, variance 1).

    Args:
        model: a functional Keras model.
        top: how many of the last layers of ``model.layers`` to re-initialise (layers without weights
            count too; a classifier from build_model ends with its 8 head layers, so 8 + N is the head
            and the last N backbone layers), or the name of the first layer to re-initialise.
        seed: seeds the new weights (sets Keras's global seed).
    """
    start = len(model.layers) - len(randomised_layer_names(model, top))
    keras.utils.set_random_seed(seed)
    clone = keras.models.clone_model(model)
    # Auto-named layers get new names in the clone; the order and the kinds of layers are what must match.
    if [type(layer) for layer in clone.layers] != [type(layer) for layer in model.layers]:
        raise RuntimeError(f"clone_model changed the layers of {model.name!r}; cannot match weights by position")
    for original, copy in zip(model.layers[:start], clone.layers[:start]):
        copy.set_weights(original.get_weights())
    return clone


def _check_maps(maps_a: np.ndarray, maps_b: np.ndarray, caller: str) -> tuple[np.ndarray, np.ndarray]:
    maps_a, maps_b = np.asarray(maps_a, np.float64), np.asarray(maps_b, np.float64)
    if maps_a.shape != maps_b.shape or maps_a.ndim != 3 or len(maps_a) == 0:
        raise ValueError(f"{caller}: expected two non-empty (N, S, S) stacks of maps of one shape, "
                         f"got {maps_a.shape} and {maps_b.shape}")
    return maps_a, maps_b


def spearman_per_image(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (N,), ties ranked by their average rank.

    A constant map (Grad-CAM gives all zeros when no pixel speaks for the class) has no ranking: two
    identical constant maps count as 1, a constant map against any other as 0.
    """
    maps_a, maps_b = _check_maps(maps_a, maps_b, "spearman_per_image")
    flat_a, flat_b = maps_a.reshape(len(maps_a), -1), maps_b.reshape(len(maps_b), -1)
    ranks_a = rankdata(flat_a, axis=1) - (flat_a.shape[1] + 1) / 2  # centred ranks
    ranks_b = rankdata(flat_b, axis=1) - (flat_b.shape[1] + 1) / 2
    norms = np.linalg.norm(ranks_a, axis=1) * np.linalg.norm(ranks_b, axis=1)  # 0 iff a map is constant
    rho = np.zeros(len(flat_a))
    defined = norms > 0
    rho[defined] = np.sum(ranks_a[defined] * ranks_b[defined], axis=1) / norms[defined]
    rho[(flat_a == flat_b).all(axis=1)] = 1.0  # covers two identical constant maps
    return rho


def rank_correlation(maps_a: np.ndarray, maps_b: np.ndarray) -> float:
    """Mean Spearman rank correlation of paired maps (see :func:`spearman_per_image`); 1 = same ranking."""
    return float(np.mean(spearman_per_image(maps_a, maps_b)))


def ssim_per_image(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Structural similarity (Wang et al., 2004) of each pair of maps in [0, 1] (N,): 1 = identical.

    The usual settings: Gaussian window sigma 1.5 (11 x 11), data range 1, C1 = 0.01^2, C2 = 0.03^2;
    the mean of the SSIM map.
    """
    maps_a, maps_b = _check_maps(maps_a, maps_b, "ssim_per_image")
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    scores = []
    for a, b in zip(maps_a, maps_b):
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
        covariance = blur(a * b) - mu_a * mu_b
        ssim = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        scores.append(float(ssim.mean()))
    return np.array(scores)


def structural_similarity(maps_a: np.ndarray, maps_b: np.ndarray) -> float:
    """Mean SSIM of paired maps (see :func:`ssim_per_image`)."""
    return float(np.mean(ssim_per_image(maps_a, maps_b)))


def randomisation_test(model: keras.Model, layer_name: str, images: np.ndarray, class_index: np.ndarray,
                       maps: np.ndarray, top: int | str, seed: int, max_rank_correlation: float) -> dict:
    """The model randomisation test of one model: its maps against those of its randomised copy.

    Args:
        model: the trained classifier.
        layer_name: the Grad-CAM layer.
        images: (N, S, S) uint8 slices.
        class_index: (N,) classes explained (the same for both models).
        maps: (N, S, S) the trained model's maps of those images and classes.
        top: what :func:`randomise_top_layers` re-initialises.
        seed: seeds the new weights.
        max_rank_correlation: the test passes when the mean Spearman correlation is below this.

    Returns:
        ``rank_correlation`` and ``ssim`` (means), ``passed``, ``randomised_layers`` (count) and
        ``first_randomised_layer``.
    """
    randomised = randomise_top_layers(model, top, seed)
    random_maps, _ = grad_cam(make_gradcam_model(randomised, layer_name), images, class_index)
    rho = rank_correlation(maps, random_maps)
    names = randomised_layer_names(model, top)
    return {
        "rank_correlation": round(rho, 4),
        "ssim": round(structural_similarity(maps, random_maps), 4),
        "passed": bool(rho < max_rank_correlation),
        "randomised_layers": len(names),
        "first_randomised_layer": names[0],
    }
