"""Training on several machines: TensorFlow's MultiWorkerMirroredStrategy, configured from ``TF_CONFIG``.

Every worker runs the same stage script with its own ``TF_CONFIG`` (the standard variable TensorFlow's
cluster resolvers read), holds a full copy of the model, and takes its share of every global batch;
gradients are summed across workers (all-reduce) before each update, so the run computes what one
process would with the same global batch, up to float summation order.

Why a training loop of its own: Keras 3's ``Model.fit`` does not run under this strategy (it fails
building the model from a distributed batch, then reducing a scalar metric; keras-team/keras#20585,
reproduced with Keras 3.13 / TensorFlow 2.21). :func:`fit_in_step` is the smallest loop that does
the same thing as ``fit`` here: the same compiled optimizer, loss and Keras callbacks (early
stopping with the best weights restored, learning-rate reduction, the epoch log), driven by
validation numbers that are all-reduced, so that every worker takes the same decisions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from braintumor.model.losses import per_item_loss

log = logging.getLogger("braintumor.model.multi_worker")

TF_CONFIG = "TF_CONFIG"
_EXAMPLE = ('{"cluster": {"worker": ["node1:12345", "node2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}')


@dataclass(frozen=True)
class ClusterRole:
    """This process's place in the cluster ``TF_CONFIG`` describes."""

    task_type: str
    task_index: int
    workers: int  # processes training in step (chief included)
    has_chief: bool

    @property
    def is_chief(self) -> bool:
        """The process that writes models, reports and MLflow runs: the ``chief`` task, or worker 0
        when the cluster names no chief (TensorFlow's own convention)."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0 and not self.has_chief)


def _fail(problem: str) -> ValueError:
    return ValueError(f"runtime.distribution is multi_worker, but {problem}. Expected {TF_CONFIG} to be JSON "
                      f"like {_EXAMPLE} (one address host:port per worker, the same cluster on every node, "
                      "and this node's own task type and index)")


def cluster_role(environ: Mapping[str, str] | None = None) -> ClusterRole:
    """This process's role, from ``TF_CONFIG``; a ValueError naming what is missing or malformed."""
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG, "").strip()
    if not text:
        raise _fail(f"{TF_CONFIG} is not set")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"{TF_CONFIG} is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise _fail(f'{TF_CONFIG} has no "cluster" mapping')
    cluster = config["cluster"]
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise _fail(f'{TF_CONFIG}\'s cluster names {unknown}; this strategy knows "chief" and "worker" only')
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise _fail(f'{TF_CONFIG}\'s cluster "{job}" is not a non-empty list of addresses')
        bad = [a for a in addresses if not (isinstance(a, str) and a.rpartition(":")[2].isdigit() and a.rpartition(":")[0])]
        if bad:
            raise _fail(f'{TF_CONFIG}\'s cluster "{job}" has addresses without host:port: {bad}')
    if len(cluster.get("chief", [])) > 1:
        raise _fail(f'{TF_CONFIG}\'s cluster has {len(cluster["chief"])} chiefs')
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise _fail(f'{TF_CONFIG}\'s "task" must name this node\'s type, one of {sorted(cluster)}: got {task!r}')
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task["type"]]):
        raise _fail(f'{TF_CONFIG}\'s task index must be 0..{len(cluster[task["type"]]) - 1} for '
                    f'"{task["type"]}": got {index!r}')
    return ClusterRole(task["type"], index, sum(len(a) for a in cluster.values()), "chief" in cluster)


def multi_worker_strategy() -> tuple[tf.distribute.Strategy, ClusterRole]:
    """The strategy, after checking ``TF_CONFIG``. Its first collective waits until every worker has started."""
    role = cluster_role()
    # TensorFlow logs every all-reduce it sets up at INFO (dozens of lines per stage): not for users.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    log.info("multi-worker training: %s %d of a cluster of %d workers%s", role.task_type, role.task_index,
             role.workers, " (the chief: it writes the outputs)" if role.is_chief else " (writes nothing)")
    return strategy, role


def _share(strategy: tf.distribute.Strategy, batch: tuple[tf.Tensor, ...]) -> tuple:
    """Each replica's interleaved share of a global batch (every worker builds the same global batches)."""
    n = strategy.num_replicas_in_sync
    return tuple(strategy.experimental_distribute_values_from_function(
        lambda ctx, t=t: t[ctx.replica_id_in_sync_group::n]) for t in batch)


def _correct(probabilities: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probabilities, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32))


def fit_in_step(model: keras.Model, train: tf.data.Dataset, validation: tf.data.Dataset, epochs: int,
                callbacks: list[keras.callbacks.Callback], strategy: tf.distribute.Strategy) -> dict[str, list[float]]:
    """``model.fit`` for a multi-worker strategy: the compiled optimizer and loss, the given callbacks.

    Args:
        model: built and compiled under ``strategy.scope()`` (``compile`` sets the optimizer).
        train: (x, y[, w]) global batches, the same sequence on every worker (a seeded pipeline,
            reshuffled per pass); each replica takes an interleaved share of every batch.
        validation: (x, y) global batches.
        epochs: passes over ``train``; callbacks may stop earlier (``model.stop_training``).
        callbacks: Keras callbacks, called as ``fit`` calls them once per epoch.

    Returns:
        The history, as ``fit``'s: loss, accuracy, val_loss, val_accuracy per epoch.

    The loss of a batch is the sum of its weighted per-item losses divided by the global batch's
    item count (Keras's ``sum_over_batch_size``), so the gradients summed across replicas are one
    process's gradients. Validation totals are all-reduced: every worker sees the same numbers and
    its callbacks take the same decisions (stop, lower the rate), which keeps the workers in step.
    """
    optimizer = model.optimizer
    item_loss = per_item_loss(model.loss)

    def replica_train(x, y, w):
        items = tf.distribute.get_replica_context().all_reduce("SUM", tf.cast(tf.size(y), tf.float32))
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            loss = tf.reduce_sum(item_loss(y, probabilities) * w) / items
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return tf.stack([loss * items, _correct(probabilities, y), tf.cast(tf.size(y), tf.float32)])

    def replica_eval(x, y):
        probabilities = model(x, training=False)
        return tf.stack([tf.reduce_sum(item_loss(y, probabilities)), _correct(probabilities, y),
                         tf.cast(tf.size(y), tf.float32)])

    @tf.function(reduce_retracing=True)
    def train_step(x, y, w):
        return strategy.reduce("SUM", strategy.run(replica_train, args=(x, y, w)), axis=None)

    @tf.function(reduce_retracing=True)
    def eval_step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_eval, args=(x, y)), axis=None)

    def totals(dataset: tf.data.Dataset, step, weighted: bool) -> tuple[float, float]:
        """(mean loss, accuracy) over one pass."""
        summed = np.zeros(3)
        for batch in dataset:
            x, y = batch[0], batch[1]
            parts = (x, y, batch[2] if len(batch) > 2 else tf.ones(tf.shape(y), tf.float32)) if weighted else (x, y)
            summed += step(*_share(strategy, parts)).numpy()
        return summed[0] / max(summed[2], 1), summed[1] / max(summed[2], 1)

    history: dict[str, list[float]] = {}
    hooks = keras.callbacks.CallbackList(callbacks, model=model)
    model.stop_training = False
    hooks.on_train_begin()
    for epoch in range(epochs):
        hooks.on_epoch_begin(epoch)
        loss, accuracy = totals(train, train_step, weighted=True)
        val_loss, val_accuracy = totals(validation, eval_step, weighted=False)
        logs = {"accuracy": accuracy, "loss": loss, "val_accuracy": val_accuracy, "val_loss": val_loss}
        hooks.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        history.setdefault("learning_rate", []).append(float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
        if model.stop_training:
            break
    hooks.on_train_end()
    return history


def local_copy(model: keras.Model) -> keras.Model:
    """The model with plain (not distributed) variables holding the same weights: what the chief
    predicts with alone, after the other workers have finished (a distributed predict would wait for them)."""
    if tf.distribute.has_strategy():
        raise RuntimeError("local_copy: call it outside the strategy's scope, or the copy is distributed too")
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy
