"""The frozen part of the backbone, run once: where the model is cut, and the activation cache on disk.

Fine-tuning trains the backbone's top (from ``finetune.unfreeze``) and the head; everything below is
the backbone's frozen pretrained weights, the same in the base model and in the fine-tuned one. The
``activations`` stage runs that bottom once over every training image, over ``finetune.cache_copies``
augmented copies of each and over the validation images, and writes the maps to ``data/activations/``
(memory-mapped ``.npy``, float16 by default). Two stages read them:

- ``train_base`` derives its feature cache from them, running only the frozen rest of the backbone (from
  the cut to the pooled features; Xception's exit flow is about a tenth of its work) instead of a second
  pass over the whole backbone;
- ``finetune`` trains the unfrozen top and the head on them, and an experiment that changes only how it
  trains (rate, epochs, schedule) reuses them instead of rebuilding them.

Both caches draw their augmented copies with the same seeds (per chunk of :data:`CACHE_BATCH` rows), so
the head's copy k is the fine-tuning cache's copy k.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from braintumor.core import atomic
from braintumor.core.config import AugmentParams, FinetuneParams
from braintumor.core.logs import Progress
from braintumor.model.augment import augment_images
from braintumor.model.backbones import unfreeze_top
from braintumor.split.load import SplitRows

log = logging.getLogger("braintumor.model.activations")

# Rows per forward pass of a cache, and the chunk its augmentation seeds are drawn per: fixed, so that
# the feature cache and the activation cache hold the same copies whatever the training batch sizes.
CACHE_BATCH = 32


def frozen_cut(model: keras.Model) -> int | None:
    """Index in ``model.layers`` of the cut below the first trainable layer, or None.

    The cut is the latest single tensor that alone feeds every layer above it (in a residual
    network, a block's output, not a tensor inside the block). None when nothing frozen sits below
    the first trainable layer (the whole backbone unfrozen): there is nothing to cache. An index,
    not a name: Keras numbers some layers (``add_10``) per process, the layer order is fixed.
    """
    layers = model.layers
    first = next(i for i, layer in enumerate(layers) if layer.trainable_weights)
    # Below the last frozen layer with weights there is only input plumbing (grey to RGB, scaling):
    # caching it would save nothing.
    lowest = next((i for i in range(first) if layers[i].weights), None)
    if lowest is None:
        return None
    for cut in range(first - 1, lowest - 1, -1):
        tensor = layers[cut].output
        if isinstance(tensor, (list, tuple)):
            continue
        try:
            keras.Model(tensor, model.outputs)
        except ValueError:  # a branch above the cut needs a tensor from below it
            continue
        return cut
    return None


def split_at(model: keras.Model, cut: int) -> tuple[keras.Model, keras.Model]:
    """(bottom, top): ``model`` cut after ``model.layers[cut]``. ``top`` reuses the model's layer
    objects, so training it trains the model."""
    tensor = model.layers[cut].output
    # One input as a tensor, not a one-item list: called on a batch, a list-input model warns about the structure.
    image = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(image, tensor, name="frozen_bottom"), keras.Model(tensor, model.outputs, name="unfrozen_top")


def split_at_frozen(model: keras.Model) -> tuple[keras.Model, keras.Model] | None:
    """(bottom, top) at :func:`frozen_cut`: the frozen layers below the first trainable one, and a
    model of the rest; None when there is nothing frozen to cache."""
    cut = frozen_cut(model)
    return None if cut is None else split_at(model, cut)


def cache_outputs(
    model: keras.Model,
    images: np.ndarray,
    rows: np.ndarray,
    *,
    batch_size: int,
    augment: AugmentParams | None,
    copies: int,
    seed: int,
    dtype: str = "float32",
    path: Path | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A frozen model's outputs (R * (1 + copies), ...) for the images in ``rows``, and the row each came from.

    Copy 0 is the image itself; copies 1..K are augmented with seeds derived from (seed, copy, batch),
    so the cache is reproducible. With ``path`` the outputs go to a memory-mapped ``.npy`` file
    (an activation cache can be gigabytes); otherwise they are kept in memory. ``progress`` is advanced
    by each batch's rows.
    """
    copies = copies if augment is not None else 0
    shape = (len(rows) * (1 + copies), *model.output.shape[1:])
    out = (np.lib.format.open_memmap(Path(path), mode="w+", dtype=dtype, shape=shape)
           if path is not None else np.empty(shape, dtype))
    sources = np.empty(len(out), np.int64)
    filled = 0
    for copy in range(1 + copies):
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            x = tf.convert_to_tensor(images[batch_rows][..., None], tf.float32)  # (B, S, S, 1), 0..255
            if copy > 0:
                x = augment_images(x, augment, tf.constant([seed, copy * 1_000_003 + start], tf.int64))
            out[filled : filled + len(batch_rows)] = np.asarray(model(x, training=False))
            sources[filled : filled + len(batch_rows)] = batch_rows
            filled += len(batch_rows)
            if progress is not None:
                progress.advance(len(batch_rows))
    return out, sources


@dataclass(frozen=True)
class ActivationCache:
    """The activations stage's output, as read from disk (the arrays memory-mapped).

    ``train`` holds R * (1 + copies) maps: every training row as it is, then copy 1 of every row, and
    so on; ``sources`` gives the split row of each. ``cut`` is None when there is nothing to cache
    (``reason`` says why): fine-tuning then runs end to end.
    """

    cut: int | None
    reason: str = ""
    layer: str = ""
    copies: int = 0
    train: np.ndarray | None = None
    sources: np.ndarray | None = None
    val: np.ndarray | None = None
    train_digest: str = ""
    val_digest: str = ""


def rows_digest(rows: np.ndarray) -> str:
    """A short fingerprint of split rows (order included): a cache is only valid for the rows it was built on."""
    return hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()[:16]


class FinetuningCut(NamedTuple):
    cut: int | None  # index in model.layers, None when nothing frozen is left to cache
    reason: str  # why there is no cut, "" when there is one
    unfrozen: dict[str, int]  # unfreeze_top's counts


def finetuning_cut(model: keras.Model, finetune: FinetuneParams) -> FinetuningCut:
    """Unfreeze ``model``'s top as ``finetune.unfreeze`` says (BatchNorm stays frozen) and say where
    fine-tuning cuts it: the cut, or None and why there is nothing to cache, and the unfrozen counts."""
    unfrozen = unfreeze_top(model, finetune.unfreeze)
    if not finetune.activation_cache:
        return FinetuningCut(None, "finetune.activation_cache is off", unfrozen)
    cut = frozen_cut(model)
    reason = "" if cut is not None else f"nothing frozen below finetune.unfreeze ({finetune.unfreeze!r})"
    return FinetuningCut(cut, reason, unfrozen)


def build_activation_cache(model: keras.Model, images: np.ndarray, split: dict[str, SplitRows], *,
                           finetune: FinetuneParams, augment: AugmentParams | None, seed: int, folder: Path) -> dict:
    """Write the activation cache for fine-tuning ``model`` (its backbone's pretrained weights; the top
    is unfrozen here as ``finetune.unfreeze`` says) into ``folder``, atomically; returns its manifest.

    The folder's content depends only on its inputs (no times in it), so DVC sees a rebuild with the
    same inputs as unchanged and the stages after it are not rerun.
    """
    cut, reason, _ = finetuning_cut(model, finetune)
    train, val = split["train"], split["val"]
    with atomic.atomic_folder(Path(folder)) as staging:
        if cut is None:
            manifest = {"cut": None, "reason": reason}
        else:
            bottom, _ = split_at(model, cut)
            copies = finetune.cache_copies if augment is not None else 0
            progress = Progress(log, "activation cache", len(train.rows) * (1 + copies) + len(val.rows), unit="maps")
            x_train, sources = cache_outputs(bottom, images, train.rows, batch_size=CACHE_BATCH, augment=augment,
                                             copies=copies, seed=seed, dtype=finetune.cache_dtype,
                                             path=staging / "train.npy", progress=progress)
            x_val, _ = cache_outputs(bottom, images, val.rows, batch_size=CACHE_BATCH, augment=None, copies=0, seed=seed,
                                     dtype=finetune.cache_dtype, path=staging / "val.npy", progress=progress)
            x_train.flush()
            x_val.flush()
            np.save(staging / "train_sources.npy", sources)
            manifest = {"cut": cut, "layer": model.layers[cut].name, "shape": list(x_train.shape[1:]),
                        "dtype": finetune.cache_dtype, "copies": copies,
                        "train_maps": len(x_train), "val_maps": len(x_val),
                        "train_digest": rows_digest(train.rows), "val_digest": rows_digest(val.rows),
                        "megabytes": round((x_train.nbytes + x_val.nbytes) / 1e6, 1)}
            del x_train, x_val  # close the memmaps before the folder moves
        atomic.write_json(staging / "manifest.json", manifest)
    return manifest


def read_activation_cache(folder: Path) -> ActivationCache:
    """The activation cache in ``folder`` (arrays memory-mapped), with a clear error when there is none."""
    folder = Path(folder)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"no activation cache in {folder} (no manifest.json): run `dvc repro activations`, "
                                "the stage that writes it")
    manifest = json.loads(manifest_file.read_text())
    if manifest["cut"] is None:
        return ActivationCache(None, reason=manifest["reason"])
    return ActivationCache(
        manifest["cut"], layer=manifest["layer"], copies=manifest["copies"],
        train=np.load(folder / "train.npy", mmap_mode="r"), sources=np.load(folder / "train_sources.npy"),
        val=np.load(folder / "val.npy", mmap_mode="r"), train_digest=manifest["train_digest"],
        val_digest=manifest["val_digest"])


def check_cache_matches(cache: ActivationCache, model: keras.Model, cut: int | None, images: np.ndarray,
                        split: dict[str, SplitRows]) -> None:
    """Raise ValueError, naming what differs, unless ``cache`` was built for cutting ``model`` at ``cut``
    on this split: the same cut, the same rows, and maps the model's frozen layers reproduce (checked
    on two images, so a backbone whose weights changed since is caught too)."""
    problems = []
    if cache.cut != cut:
        ours = "nothing to cache" if cut is None else f"after layer {cut} ({model.layers[cut].name})"
        theirs = f"nothing ({cache.reason})" if cache.cut is None else f"after layer {cache.cut} ({cache.layer})"
        problems.append(f"it was cut {theirs}, this model {ours}")
    elif cut is not None:
        if tuple(cache.train.shape[1:]) != tuple(model.layers[cut].output.shape[1:]):
            problems.append(f"its maps are {tuple(cache.train.shape[1:])}, this model's {tuple(model.layers[cut].output.shape[1:])}")
        if cache.train_digest != rows_digest(split["train"].rows) or cache.val_digest != rows_digest(split["val"].rows):
            problems.append("it holds other training or validation images than data/split/split.csv")
    if not problems and cut is not None and len(split["train"].rows):
        rows = split["train"].rows[:2]
        fresh = np.asarray(split_at(model, cut)[0](np.asarray(images[rows][..., None], np.float32), training=False))
        cached = np.asarray(cache.train[: len(rows)], np.float32)
        scale = max(float(np.abs(fresh).max()), 1e-6)
        if not np.allclose(cached, fresh, rtol=1e-2, atol=1e-2 * scale):
            problems.append(f"its maps differ from this model's frozen layers (largest difference "
                            f"{float(np.abs(cached - fresh).max()):.3g}, largest value {scale:.3g}): the backbone's "
                            "weights changed since it was built")
    if problems:
        raise ValueError("the activation cache does not match: " + "; ".join(problems)
                         + ". Rebuild it: `dvc repro activations`")


def features_from_activations(model: keras.Model, cut: int, maps: np.ndarray, batch_size: int = CACHE_BATCH) -> np.ndarray:
    """The pooled backbone features (the head's input) of cached maps: the frozen layers from the cut
    to the pooling run on them, in float32. ``model``'s backbone must be frozen (the base phase)."""
    rest = keras.Model(model.layers[cut].output, model.layers[frozen_cut(model)].output, name="frozen_rest")
    out = np.empty((len(maps), *rest.output.shape[1:]), np.float32)
    for start, outputs in batches_through(rest, maps, len(maps), batch_size):
        out[start : start + len(outputs)] = outputs
    return out


def batches_through(rest: keras.Model | None, maps: np.ndarray, count: int, batch_size: int):
    """(start, float32 outputs) for each batch of the first ``count`` cached maps, run through ``rest``
    (the layers from the cut up), or as stored when ``rest`` is None."""
    for start in range(0, count, batch_size):
        batch = np.asarray(maps[start : min(start + batch_size, count)], np.float32)
        yield start, batch if rest is None else np.asarray(rest(batch, training=False))


def cached_layer_input_means(cache: ActivationCache, model: keras.Model, layer_name: str, images: np.ndarray,
                             split: dict[str, SplitRows], batch_size: int = 256) -> np.ndarray | None:
    """(R, C): each training image's input of ``layer_name`` averaged over space, from the cache (copy 0)
    when that input is the cache's cut in ``model`` or lies above it (the out-of-distribution check's
    features, e.g. Xception's block-12 sum): read as stored, or the layers between the cut and it run on
    the maps, never the frozen bottom. None when the input lies below the cut or is several tensors.

    The layers above the cut may be fine-tuned: they run with ``model``'s own weights, so the features
    are this model's, as if it ran on the images.

    Raises ValueError (:func:`check_cache_matches`) if the cache was made for other rows or other frozen weights.
    """
    if cache.cut is None:
        return None
    cut_tensor, layer = model.layers[cache.cut].output, model.get_layer(layer_name)
    if isinstance(layer.input, (list, tuple)):
        return None
    at_cut = layer.input is cut_tensor
    if not at_cut and model.layers.index(layer) <= cache.cut:
        return None
    check_cache_matches(cache, model, cache.cut, images, split)
    # the cut is the one tensor that alone feeds every layer above it (frozen_cut): this sub-model is connected
    rest = None if at_cut else keras.Model(cut_tensor, layer.input, name="cut_to_feature_layer")
    count = len(split["train"].rows)
    out = np.empty((count, layer.input.shape[-1]), np.float32)
    for start, outputs in batches_through(rest, cache.train, count, batch_size):
        out[start : start + len(outputs)] = outputs.mean(axis=(1, 2))
    return out
