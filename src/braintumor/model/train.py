"""Training: runtime set-up, the base and fine-tuning phases on cached features and activations, fitting.

The base phase trains only the head on top of a frozen backbone run in inference mode. Since the
frozen backbone maps an image to the same features every epoch, they are computed once per image
(and once per augmented copy) and the head is trained on the cached features.

Fine-tuning does the same one level down: the backbone below the unfreeze point is frozen too, so
its output (an activation map, e.g. (14, 14, 728) for Xception's exit flow at 224 px) is cached once
by the activations stage (:mod:`braintumor.model.activations`), and the epochs run only the unfrozen
top and the head on it. The base phase's features come from the same maps when they hold its copies.
In both cases the trained sub-model shares the full model's layer objects, so the saved model is
still one ordinary Keras model (backbone + head) that the app and Grad-CAM load unchanged.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from braintumor.core import atomic
from braintumor.core.config import CLASS_NAMES, AugmentParams, FinetuneParams, PhaseParams, RuntimeParams, TrainBaseParams
from braintumor.core.logs import Progress
from braintumor.model.inputs import make_dataset, predict_split, sample_weights
from braintumor.split.load import SplitRows
from braintumor.model.activations import (CACHE_BATCH, ActivationCache, build_activation_cache, cache_outputs,
                                          check_cache_matches, features_from_activations, finetuning_cut,
                                          read_activation_cache, split_at, split_at_frozen)
from braintumor.model.backbones import build_model, freeze_backbone
from braintumor.model.losses import training_loss, training_metrics
from braintumor.model.multi_worker import ClusterRole, fit_in_step, local_copy, multi_worker_strategy
from braintumor.model.weights import ResolvedWeights

log = logging.getLogger("braintumor.model.train")


@dataclass(frozen=True)
class Runtime:
    strategy: tf.distribute.Strategy
    jit_compile: bool
    precision: str  # keras dtype policy name
    gpus: int
    cluster: ClusterRole | None = None  # set with runtime.distribution: multi_worker

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the stage's outputs and MLflow run (always, outside a cluster)."""
        return self.cluster is None or self.cluster.is_chief

    def standalone(self, model: keras.Model) -> keras.Model:
        """The trained model as the chief saves and scores it on its own: itself, or under a
        multi-worker strategy a copy with plain variables (a distributed predict would wait for the
        other workers, which have finished)."""
        return model if self.cluster is None else local_copy(model)


def _resolve(setting: str, gpu_default: bool) -> bool:
    return setting == "on" or (setting == "auto" and gpu_default)


def configure_runtime(params: RuntimeParams) -> Runtime:
    """Seeds, op determinism, precision policy, XLA and distribution strategy, before any model is built.

    ``auto`` means: mixed precision and XLA with a GPU (they pay off there), off on CPU (float16 is
    slower on CPU and XLA compile time outweighs its gain for these short runs); MirroredStrategy with
    more than one GPU. ``multi_worker``: a MultiWorkerMirroredStrategy over the cluster in
    ``TF_CONFIG``, created first (TensorFlow wants it before any other operation).
    """
    cluster = None
    if params.distribution == "multi_worker":
        strategy, cluster = multi_worker_strategy()
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = len(tf.config.list_physical_devices("GPU"))
    precision = "mixed_float16" if _resolve(params.mixed_precision, gpus > 0) else "float32"
    keras.mixed_precision.set_global_policy(precision)
    if cluster is None:
        mirrored = params.distribution == "mirrored" or (params.distribution == "auto" and gpus > 1)
        strategy = tf.distribute.MirroredStrategy() if mirrored else tf.distribute.get_strategy()
    return Runtime(strategy, _resolve(params.xla, gpus > 0), precision, gpus, cluster)


class EpochLog(keras.callbacks.Callback):
    """One concise line per epoch (no per-batch progress bars in CI logs); measures images/s. An epoch
    longer than a minute (on real data on 2 cores, 3-11) also logs how far it has come, once a minute."""

    # Keras may call the batch hook from its thread pool, so the training loop never waits on it (a hook
    # called in line makes every step wait for the one before); hence the lock
    async_safe = True

    def __init__(self, phase: str, images_per_epoch: int, progress_every: float = 60.0):
        super().__init__()
        self.phase, self.images_per_epoch, self.progress_every = phase, images_per_epoch, progress_every
        self.seconds: list[float] = []
        self._progress: Progress | None = None
        self._lock = threading.Lock()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        steps = (self.params or {}).get("steps")
        with self._lock:
            self._progress = (Progress(log, f"{self.phase} epoch {epoch + 1}", steps, unit="batches",
                                       every=self.progress_every) if steps else None)

    def on_train_batch_end(self, batch, logs=None):
        with self._lock:
            if self._progress is not None:
                self._progress.advance(1)

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        logs = logs or {}
        shown = " ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "learning_rate")
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        log.info("%s epoch %d: %s lr %.2e (%.1f s, %.0f images/s)", self.phase, epoch + 1, shown, lr,
                 self.seconds[-1], self.images_per_epoch / max(self.seconds[-1], 1e-9))


class WeightAverage(keras.callbacks.Callback):
    """The running mean of the trainable weights at the end of epoch ``from_epoch`` (1-based) and every later one.

    With BatchNorm frozen, an average of weights along the path (stochastic weight averaging) needs no
    statistics recomputed: it is a model as it stands.
    """

    def __init__(self, from_epoch: int):
        super().__init__()
        self.from_epoch = from_epoch
        self.epochs: list[int] = []
        self.mean: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 < self.from_epoch:
            return
        current = [keras.ops.convert_to_numpy(v).astype(np.float64) for v in self.model.trainable_weights]
        self.epochs.append(epoch + 1)
        if self.mean is None:
            self.mean = current
        else:  # incremental mean: no sum of many float32 tensors to lose precision in
            self.mean = [m + (c - m) / len(self.epochs) for m, c in zip(self.mean, current)]


def keep_better_of_average(model: keras.Model, average: WeightAverage, validation, select_on: str = "val_loss") -> dict:
    """Put the averaged weights in ``model`` if they are better on ``select_on`` than its current
    (best-epoch) weights (strictly: lower loss or higher accuracy), else leave them; what was compared and kept.

    Both are scored by one ``evaluate`` each, so the comparison is like for like (``fit``'s per-epoch
    validation numbers come from the same computation). Fewer than two averaged epochs: nothing to compare.
    """
    if average.mean is None or len(average.epochs) < 2:
        return {"epochs": average.epochs, "kept": False, "reason": "fewer than two epochs to average"}

    def scores() -> dict:
        x, y = validation if isinstance(validation, tuple) else (validation, None)
        return model.evaluate(x, y, verbose=0, return_dict=True)

    best = [keras.ops.convert_to_numpy(v) for v in model.trainable_weights]
    best_scores = scores()
    for variable, value in zip(model.trainable_weights, average.mean):
        variable.assign(value.astype(variable.dtype))
    averaged_scores = scores()
    kept = is_better(averaged_scores, best_scores, select_on)
    if not kept:
        for variable, value in zip(model.trainable_weights, best):
            variable.assign(value)
    log.info("weight average of epochs %d-%d: val_loss %.4f val_accuracy %.4f against the best epoch's %.4f / %.4f "
             "(on %s): %s", average.epochs[0], average.epochs[-1], averaged_scores["loss"], averaged_scores["accuracy"],
             best_scores["loss"], best_scores["accuracy"], select_on, "kept the average" if kept else "kept the best epoch")
    return {"epochs": average.epochs, "kept": bool(kept), "select_on": select_on,
            "val_loss": float(averaged_scores["loss"]), "val_accuracy": float(averaged_scores["accuracy"]),
            "best_epoch_val_loss": float(best_scores["loss"]), "best_epoch_val_accuracy": float(best_scores["accuracy"])}


# select_on -> the key in ``evaluate``'s dict, and whether higher is better
SELECTION = {"val_loss": ("loss", False), "val_accuracy": ("accuracy", True)}


def selection(select_on: str) -> tuple[str, bool]:
    if select_on not in SELECTION:
        raise ValueError(f"select_on must be one of {sorted(SELECTION)}, got {select_on!r}")
    return SELECTION[select_on]


def is_better(scores: dict, reference: dict, select_on: str) -> bool:
    """Whether ``scores`` (``evaluate``'s dict: loss, accuracy) strictly beat ``reference`` on ``select_on``."""
    key, higher = selection(select_on)
    return scores[key] > reference[key] if higher else scores[key] < reference[key]


def best_epoch_index(history: dict[str, list[float]], select_on: str) -> int:
    """The epoch (0-based) that early stopping restored: the lowest loss or the highest accuracy, the earlier on a tie."""
    _, higher = selection(select_on)
    return int(np.argmax(history[select_on]) if higher else np.argmin(history[select_on]))


def callbacks_for(phase: PhaseParams, name: str, images_per_epoch: int) -> list[keras.callbacks.Callback]:
    mode = "max" if selection(phase.select_on)[1] else "min"
    plateau = [keras.callbacks.ReduceLROnPlateau(monitor=phase.select_on, mode=mode, factor=phase.reduce_lr_factor,
                                                 patience=phase.reduce_lr_patience, min_lr=phase.min_lr, verbose=0)]
    return [
        keras.callbacks.EarlyStopping(monitor=phase.select_on, mode=mode, patience=phase.early_stopping_patience,
                                      restore_best_weights=True),
        *(plateau if phase.schedule == "plateau" else []),  # a cosine schedule owns the rate; the callback would fight it
        EpochLog(name, images_per_epoch),
    ]


def learning_rate_for(phase: PhaseParams, images_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The phase's starting rate, or its cosine decay to ``min_lr`` over every step of ``epochs`` epochs."""
    if phase.schedule == "plateau":
        return phase.learning_rate
    steps = phase.epochs * math.ceil(images_per_epoch / phase.batch_size)
    return keras.optimizers.schedules.CosineDecay(phase.learning_rate, decay_steps=steps,
                                                  alpha=min(phase.min_lr / phase.learning_rate, 1.0))


def compile_for(model: keras.Model, phase: PhaseParams, images_per_epoch: int, jit_compile: bool) -> None:
    """Adam at the phase's rate (its schedule spread over ``images_per_epoch``) on the phase's training loss;
    with ``phase.mixup`` the loss and accuracy also take the soft targets it makes."""
    soft_targets = phase.mixup > 0
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate_for(phase, images_per_epoch)),
        loss=training_loss(phase.label_smoothing, soft_targets=soft_targets),
        metrics=training_metrics(soft_targets=soft_targets),
        jit_compile=jit_compile,
    )


def fit(model: keras.Model, train, validation, phase: PhaseParams, name: str, images_per_epoch: int,
        runtime: Runtime | None = None, **fit_kwargs) -> dict:
    """Fit with early stopping and LR reduction on ``phase.select_on``; returns history and speed.

    Args:
        train: a tf.data.Dataset of (x, y, w) batches, or an (x, y, w) triple of arrays (w: the
            per-item weights of :func:`braintumor.model.inputs.sample_weights`).
        validation: (x, y) batches or arrays for validation.
        runtime: with a multi-worker cluster, both must be datasets, and the workers train in step
            (:func:`braintumor.model.multi_worker.fit_in_step`).
    """
    callbacks = callbacks_for(phase, name, images_per_epoch)
    epoch_log = callbacks[-1]
    average = WeightAverage(phase.average_weights_from) if phase.average_weights_from else None
    if runtime is not None and runtime.cluster is not None:
        if average is not None:  # Params refuses this at load; a direct caller gets the same answer
            raise ValueError("average_weights_from must be 0 with a multi-worker cluster")
        history = fit_in_step(model, train, validation, phase.epochs, callbacks, runtime.strategy)
    else:
        x, y, w = train if isinstance(train, tuple) else (train, None, None)
        fit_kwargs.setdefault("shuffle", y is not None)  # a tf.data pipeline shuffles itself, seeded
        # the average records each epoch's weights before early stopping restores the best ones at the end
        history = model.fit(x, y, sample_weight=w, validation_data=validation, epochs=phase.epochs,
                            callbacks=[*([average] if average else []), *callbacks], verbose=0, **fit_kwargs).history
    seconds = sum(epoch_log.seconds)
    result = {
        "history": {k: [float(v) for v in values] for k, values in history.items()},
        "epochs_run": len(epoch_log.seconds),
        "train_images_per_second": round(images_per_epoch * len(epoch_log.seconds) / max(seconds, 1e-9), 1),
        "select_on": phase.select_on,
    }
    if average is not None:
        result["weight_average"] = keep_better_of_average(model, average, validation, phase.select_on)
    return result


def summary_metrics(result: dict, extra: dict | None = None) -> dict:
    """Best validation accuracy and loss (at the restored best epoch), epochs run, training speed."""
    history = result["history"]
    best = best_epoch_index(history, result.get("select_on", "val_loss"))
    averaged = {}
    if "weight_average" in result:  # numbers only (MLflow metrics): how many epochs the kept weights average, 0 = none
        average = result["weight_average"]
        averaged = {"averaged_epochs": len(average["epochs"]) if average["kept"] else 0}
        if "val_loss" in average:
            averaged.update(averaged_val_loss=round(average["val_loss"], 6),
                            averaged_val_accuracy=round(average["val_accuracy"], 6))
    return {
        "best_val_loss": round(history["val_loss"][best], 6),
        "best_val_accuracy": round(history["val_accuracy"][best], 6),
        "best_epoch": best + 1,
        "epochs_run": result["epochs_run"],
        "train_images_per_second": result["train_images_per_second"],
        **averaged,
        **(extra or {}),
    }


def saved_weights(metrics: dict) -> str:
    """Which weights a phase saved, with their validation numbers, for the stage's last log line."""
    if metrics.get("averaged_epochs"):
        return (f"the weight average of {metrics['averaged_epochs']} epochs, val accuracy "
                f"{metrics['averaged_val_accuracy']:.4f} (loss {metrics['averaged_val_loss']:.4f})")
    return f"best val accuracy {metrics['best_val_accuracy']:.4f} (loss {metrics['best_val_loss']:.4f})"


def training_weights(train: SplitRows, balance_classes: bool) -> np.ndarray:
    """(R,) per-row weights of the training split: its copy weights times the class weights, mean 1."""
    return sample_weights(train.labels, len(CLASS_NAMES), train.weights, balance_classes)


def per_item(sources: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` (aligned with ``rows``) looked up for each cached output, from the row it came from."""
    value_of = dict(zip(rows.tolist(), values.tolist()))
    return np.array([value_of[r] for r in sources.tolist()], np.asarray(values).dtype)


def labels_of(sources: np.ndarray, split: SplitRows) -> np.ndarray:
    """The class id of each cached output, from the image row it came from."""
    return per_item(sources, split.rows, split.labels).astype(np.int32)


def head_features(model: keras.Model, images: np.ndarray, split: dict[str, SplitRows], phase: TrainBaseParams,
                  augment: AugmentParams, seed: int, activations: ActivationCache | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(training features, the row each came from, validation features, how they were made): the frozen
    backbone's pooled features of every training image and its ``feature_cache_copies`` augmented copies.

    From the activation cache when it holds those copies (the same seeds, so the same copies): only the
    frozen layers above its cut run. Otherwise the whole backbone runs over the images.
    """
    train, val = split["train"], split["val"]
    copies = phase.feature_cache_copies if augment is not None else 0
    if activations is not None and activations.cut is not None and activations.copies >= copies:
        check_cache_matches(activations, model, activations.cut, images, split)
        count = len(train.rows) * (1 + copies)
        return (features_from_activations(model, activations.cut, activations.train[:count]),
                np.asarray(activations.sources[:count]), features_from_activations(model, activations.cut, activations.val),
                f"from the activation cache at {activations.layer}")
    if activations is None or activations.cut is None:
        how = "from the images" + (f" (no activation cache: {activations.reason})" if activations is not None else "")
    else:
        how = (f"from the images (train_base.feature_cache_copies {copies} > the activation cache's "
               f"{activations.copies} copies)")
    features, _ = split_at_frozen(model)  # frozen backbone: cut at the pooled features
    x_train, sources = cache_outputs(features, images, train.rows, batch_size=CACHE_BATCH, augment=augment,
                                     copies=copies, seed=seed)
    x_val, _ = cache_outputs(features, images, val.rows, batch_size=CACHE_BATCH, augment=None, copies=0, seed=seed)
    return x_train, sources, x_val, how


def train_base_phase(model: keras.Model, images: np.ndarray, split: dict[str, SplitRows], phase: TrainBaseParams,
                     augment: AugmentParams, runtime: Runtime, seed: int, activations: ActivationCache | None = None) -> dict:
    """Train the head on a frozen backbone: on cached features (:func:`head_features`), or end to end through tf.data."""
    train, val = split["train"], split["val"]
    weight = training_weights(train, phase.class_weights)
    if not phase.feature_cache:
        compile_for(model, phase, len(train.rows), runtime.jit_compile)
        return fit(model, make_dataset(images, train.rows, train.labels, batch_size=phase.batch_size, training=True,
                                       augment=augment, seed=seed, weights=weight, mixup=phase.mixup),
                   make_dataset(images, val.rows, val.labels, batch_size=phase.batch_size, training=False, augment=None, seed=seed),
                   phase, "train_base", len(train.rows), runtime)
    started = time.perf_counter()
    x_train, sources, x_val, how = head_features(model, images, split, phase, augment, seed, activations)
    y_train, w_train = labels_of(sources, train), per_item(sources, train.rows, weight)
    cache_seconds = time.perf_counter() - started
    log.info("feature cache: %d training and %d validation vectors %s in %.1f s", len(x_train), len(x_val), how,
             cache_seconds)
    _, head = split_at_frozen(model)
    compile_for(head, phase, len(x_train), runtime.jit_compile)
    if runtime.cluster is None and not phase.mixup:
        train_data, val_data = (x_train, y_train, w_train), (x_val, val.labels)
    else:  # workers in step need the same seeded batches, and mixup blends them: the pipeline, not fit's shuffling
        train_data = make_dataset(x_train, np.arange(len(x_train)), y_train, batch_size=phase.batch_size,
                                  training=True, augment=None, seed=seed, weights=w_train, mixup=phase.mixup)
        val_data = make_dataset(x_val, np.arange(len(x_val)), val.labels, batch_size=phase.batch_size,
                                training=False, augment=None, seed=seed)
    arrays = {"batch_size": phase.batch_size, "shuffle": True} if isinstance(train_data, tuple) else {}
    result = fit(head, train_data, val_data, phase, "train_base", len(x_train), runtime, **arrays)
    result["feature_cache_seconds"] = round(cache_seconds, 2)
    return result


def finetune_phase(model: keras.Model, images: np.ndarray, split: dict[str, SplitRows], phase: FinetuneParams,
                   augment: AugmentParams, runtime: Runtime, seed: int, activations: ActivationCache | None = None) -> dict:
    """Unfreeze the top of the backbone (BatchNorm stays frozen), recompile, train: on the activation
    cache when ``phase.activation_cache`` and something frozen lies below the unfrozen layers, else
    end to end through the image pipeline.

    ``activations``: the activations stage's cache, checked against this model and split; without it
    the cache is built here, in a temporary folder.
    """
    cut, reason, counts = finetuning_cut(model, phase)
    if activations is None and cut is not None:
        with tempfile.TemporaryDirectory(prefix="activations-") as folder:
            build_activation_cache(model, images, split, finetune=phase, augment=augment, seed=seed,
                                   folder=Path(folder) / "cache")
            return finetune_phase(model, images, split, phase, augment, runtime, seed,
                                  read_activation_cache(Path(folder) / "cache"))
    if activations is not None:
        check_cache_matches(activations, model, cut, images, split)
    train, val = split["train"], split["val"]
    weight = training_weights(train, phase.class_weights)
    if cut is None:
        log.info("fine-tuning end to end (%s)", reason)
        compile_for(model, phase, len(train.rows), runtime.jit_compile)
        result = fit(model,
                     make_dataset(images, train.rows, train.labels, batch_size=phase.batch_size, training=True,
                                  augment=augment, seed=seed, weights=weight, mixup=phase.mixup),
                     make_dataset(images, val.rows, val.labels, batch_size=phase.batch_size, training=False, augment=None, seed=seed),
                     phase, "finetune", len(train.rows), runtime)
        return {**result, "unfrozen": counts}
    _, top = split_at(model, cut)
    x_train, x_val = activations.train, activations.val
    log.info("fine-tuning from the activation cache: %d training and %d validation maps %s at %s",
             len(x_train), len(x_val), tuple(x_train.shape[1:]), activations.layer)
    y_train, w_train = labels_of(activations.sources, train), per_item(activations.sources, train.rows, weight)
    compile_for(top, phase, len(x_train), runtime.jit_compile)
    result = fit(top,
                 make_dataset(x_train, np.arange(len(x_train)), y_train, batch_size=phase.batch_size, training=True,
                              augment=None, seed=seed, weights=w_train, mixup=phase.mixup),
                 make_dataset(x_val, np.arange(len(x_val)), val.labels, batch_size=phase.batch_size,
                              training=False, augment=None, seed=seed),
                 phase, "finetune", len(x_train), runtime)
    return {**result, "unfrozen": counts, "activation_cache_layer": activations.layer}


def train_base_model(params, images: np.ndarray, split: dict[str, SplitRows], runtime: Runtime,
                     weights: ResolvedWeights, root: Path, activations: ActivationCache | None = None
                     ) -> tuple[keras.Model, dict]:
    """The train_base stage's training: the model built under the runtime's strategy, its backbone
    frozen, the head trained. Every worker of a cluster runs it; returns (model, result)."""
    with runtime.strategy.scope():
        model = build_model(params.model, params.preprocess.image_size, root=root, weights=weights,
                            synchronized_batchnorm=runtime.cluster is not None)
        freeze_backbone(model)
        result = train_base_phase(model, images, split, params.train_base, params.augment, runtime, params.runtime.seed,
                                  activations)
    return runtime.standalone(model), result


def finetune_model(params, base_model: Path, images: np.ndarray, split: dict[str, SplitRows],
                   runtime: Runtime, activations: ActivationCache | None = None) -> tuple[keras.Model, dict]:
    """The finetune stage's training: the base model loaded under the runtime's strategy, its top
    unfrozen and trained. Every worker of a cluster runs it; returns (model, result)."""
    with runtime.strategy.scope():
        model = keras.saving.load_model(base_model, safe_mode=True)
        result = finetune_phase(model, images, split, params.finetune, params.augment, runtime, params.runtime.seed,
                                activations)
    return runtime.standalone(model), result


def training_data_record(params, split_report: dict) -> dict:
    """What a model was trained on, for its card: the merged sources and their kind (``phantom`` is
    synthetic), the split strategy, and the images per split and per class (``reports/data/split.json``).

    ``synthetic_only`` is true when every source is the phantom: such a model knows nothing of real
    scans, and the app says so beside every prediction. External sources (``split.external``) were
    never trained on: they are listed apart, with the size of their external set.
    """
    sources = [{"name": name, "kind": params.download.sources[name].kind} for name in params.download.use
               if name not in params.split.external]
    external = {name: split_report.get("external", {}).get(name, {}).get("n", 0) for name in params.split.external}
    return {
        "sources": sources,
        "synthetic_only": all(source["kind"] == "phantom" for source in sources),
        "split_strategy": split_report["strategy"],
        "images_per_split": split_report["per_split"],
        "train_images_per_class": split_report["per_split_per_class"]["train"],
        **({"external_sets": external} if external else {}),
    }


def model_card(model_file: str, run_id: str, params, data_fingerprint: str, *, git_commit: str | None,
               dvc_experiment: str | None, weights: ResolvedWeights, training_data: dict | None = None) -> dict:
    """What travels with a saved model: its identity and everything needed to feed it an image.

    The app reads this beside the model, so a model brings its own preprocessing and class names
    instead of trusting whatever params.yaml says today.
    """
    from datetime import datetime, timezone

    return {
        "model_file": model_file,
        "mlflow_run_id": run_id,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit,
        "dvc_experiment": dvc_experiment,
        "backbone": params.model.backbone,
        "weights": weights.record(),  # which ImageNet file (local, Keras's cache, downloaded) or none
        "image_size": params.preprocess.image_size,
        "class_names": list(CLASS_NAMES),
        "data_fingerprint": data_fingerprint,
        "training_data": training_data,  # provenance (training_data_record): shown by the app with every result
        "preprocess": params.preprocess.model_dump(exclude={"workers"}),
    }


def finetune_card(base_card: dict, run_id: str, *, git_commit: str | None, dvc_experiment: str | None) -> dict:
    """The fine-tuned model's card: the base model's input contract (backbone, size, preprocessing,
    class names, data) with this run's identity."""
    from datetime import datetime, timezone

    return {**base_card, "model_file": "finetuned.keras", "mlflow_run_id": run_id,
            "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit, "dvc_experiment": dvc_experiment}


def save_phase(model: keras.Model, result: dict, metrics: dict, model_path: Path, report_dir: Path,
               card: dict) -> None:
    """The model (``.keras``) with its card (``.json`` beside it), per-epoch history and summary metrics,
    each written atomically."""
    with atomic.atomic_path(model_path, suffix=".keras") as tmp:
        model.save(tmp)
    atomic.write_json(Path(model_path).with_suffix(".json"), card)
    atomic.write_json(report_dir / "history.json", result["history"])
    atomic.write_json(report_dir / "metrics.json", metrics)


def test_scores(model: keras.Model, images: np.ndarray, test: SplitRows, batch_size: int) -> dict[str, float]:
    """Accuracy and macro-F1 on the test split, for the stage's summary (the evaluate stage does the rest)."""
    from sklearn.metrics import f1_score

    predicted = predict_split(model, images, test, batch_size).argmax(axis=1)
    return {
        "test_accuracy": round(float(np.mean(predicted == test.labels)), 6),
        "test_macro_f1": round(float(f1_score(test.labels, predicted, labels=range(len(CLASS_NAMES)),
                                              average="macro", zero_division=0)), 6),
    }
