"""Multi-worker training (runtime.distribution: multi_worker): TF_CONFIG checks, the in-step training loop
against Keras's fit, and two real worker processes on localhost training the tiny pipeline's stages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import braintumor.model.backbones  # noqa: F401  registers the custom layers for safe-mode loading
from braintumor.model.inputs import make_dataset
from braintumor.model.multi_worker import TF_CONFIG, cluster_role, fit_in_step
from conftest import copy_built_pipeline, set_params


def free_ports(n: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": index}})


# --------------------------------------------------------------------------- TF_CONFIG


def test_cluster_role_reads_tf_config():
    role = cluster_role({TF_CONFIG: tf_config([1111, 2222, 3333], 2)})
    assert (role.task_type, role.task_index, role.workers, role.is_chief) == ("worker", 2, 3, False)
    assert cluster_role({TF_CONFIG: tf_config([1111, 2222], 0)}).is_chief  # no chief named: worker 0 is the chief
    with_chief = {"cluster": {"chief": ["head:1"], "worker": ["a:2", "b:3"]}, "task": {"type": "worker", "index": 0}}
    assert not cluster_role({TF_CONFIG: json.dumps(with_chief)}).is_chief
    chief = cluster_role({TF_CONFIG: json.dumps({**with_chief, "task": {"type": "chief", "index": 0}})})
    assert chief.is_chief and chief.workers == 3


@pytest.mark.parametrize("value, expected", [
    (None, "TF_CONFIG is not set"),
    ("{cluster", "TF_CONFIG is not JSON"),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster" mapping'),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "['ps']"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "not a non-empty list"),
    ('{"cluster": {"worker": ["node1"]}, "task": {"type": "worker", "index": 0}}', "without host:port: ['node1']"),
    ('{"cluster": {"worker": ["a:1"]}}', "must name this node's type, one of ['worker']"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "must be 0..1"),
])
def test_malformed_tf_config_is_named(value, expected):
    environ = {} if value is None else {TF_CONFIG: value}
    with pytest.raises(ValueError) as error:
        cluster_role(environ)
    message = str(error.value)
    assert expected in message and "runtime.distribution is multi_worker" in message and '"cluster"' in message


# --------------------------------------------------------------------------- the loop against Keras's fit

_PROBLEM = """
import numpy as np, keras
from braintumor.model.inputs import make_dataset

def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)).astype("float32")
    y = ((x[:, 0] + x[:, 1] > 0).astype("int32") + 2 * (x[:, 2] > 0)).astype("int32")
    w = rng.uniform(0.5, 2.0, size=70).astype("float32")
    return x, y, w

def model():
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.BatchNormalization(synchronized=True), keras.layers.Dense(4, activation="softmax")])
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m

def datasets():
    x, y, w = problem()
    # 70 items in batches of 16: the last batch is partial (6 items), as in real epochs.
    return (make_dataset(x, np.arange(70), y, batch_size=16, training=True, augment=None, seed=3, weights=w),
            make_dataset(x, np.arange(70), y, batch_size=16, training=False, augment=None, seed=3))
"""


def _problem():
    namespace: dict = {}
    exec(_PROBLEM, namespace)  # one definition for this process and the worker processes below
    return namespace


def _fit_reference(epochs: int) -> tuple[keras.Model, dict]:
    ns = _problem()
    model = ns["model"]()
    train, val = ns["datasets"]()
    return model, model.fit(train, validation_data=val, epochs=epochs, verbose=0).history


def test_fit_in_step_is_keras_fit_in_one_process():
    """Same optimizer, loss, callbacks and batches: the same weights and history as fit, to the bit."""
    reference, history = _fit_reference(3)
    ns = _problem()
    model = ns["model"]()
    train, val = ns["datasets"]()
    ours = fit_in_step(model, train, val, 3, [], tf.distribute.get_strategy())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(ours[key], history[key], rtol=1e-6)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_fit_in_step_honours_early_stopping_and_restores_the_best_weights():
    ns = _problem()
    model = ns["model"]()
    train, val = ns["datasets"]()
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, restore_best_weights=True, start_from_epoch=0)
    model.optimizer.learning_rate = 5.0  # diverges after the first epoch
    history = fit_in_step(model, train, val, 20, [stop], tf.distribute.get_strategy())
    assert len(history["val_loss"]) < 20 and model.stop_training
    best = int(np.argmin(history["val_loss"]))
    _, val_again = ns["datasets"]()
    assert model.evaluate(val_again, verbose=0, return_dict=True)["loss"] == pytest.approx(history["val_loss"][best], rel=1e-5)


@pytest.mark.slow
def test_two_workers_train_what_one_process_trains(tmp_path):
    """Two real worker processes (MultiWorkerMirroredStrategy over gRPC on localhost), each taking
    half of every global batch, against Keras's fit in this process on the same global batches."""
    script = tmp_path / "worker.py"
    script.write_text(_PROBLEM + textwrap.dedent("""
        import sys, tensorflow as tf
        from braintumor.model.multi_worker import fit_in_step, multi_worker_strategy
        strategy, role = multi_worker_strategy()
        with strategy.scope():
            m = model()
        train, val = datasets()
        history = fit_in_step(m, train, val, 3, [], strategy)
        np.savez(sys.argv[1], *m.get_weights(), loss=np.array(history["loss"]))
    """))
    ports = free_ports(2)
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"w{i}.npz")], cwd=tmp_path,
                                env={**os.environ, TF_CONFIG: tf_config(ports, i)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    reference, history = _fit_reference(3)
    for i in range(2):
        saved = np.load(tmp_path / f"w{i}.npz")
        np.testing.assert_allclose(saved["loss"], history["loss"], rtol=1e-5)
        for k, expected in enumerate(reference.get_weights()):
            # Only the summation order differs (each worker sums half the batch): measured 3e-8.
            np.testing.assert_allclose(saved[f"arr_{k}"], expected, atol=1e-6)


# --------------------------------------------------------------------------- the stages, two workers


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".git" not in p.parts}


def _run_stage(folder: Path, stage: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "braintumor.core.quiet", f"stages/{stage}.py"], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_training_stages_on_two_workers(built_pipeline, tmp_path, venv_env):
    """train_base and finetune of the tiny pipeline on a cluster of two processes, each in its own copy
    of the workspace (two nodes after `dvc pull`): both finish, only the chief writes models, reports
    and MLflow runs, and the chief's model is the one a single process trains on the same global batches."""
    # Augmentation and the global-batch shuffle are seeded per batch, so every worker builds the same
    # batches; dropout masks are drawn per replica (no single-process equivalent), so the comparison runs
    # without dropout; the head's BatchNorm is synchronized across workers (the global batch's statistics).
    # One augmented copy per image in the activation cache: each step adds its rounding, which Adam can
    # amplify (see the tolerance below), so the comparison is kept to few steps.
    overrides = {"model.dropout": [0.0, 0.0], "train_base.feature_cache": False, "finetune.cache_copies": 1}
    single, chief, worker = (copy_built_pipeline(built_pipeline, tmp_path / name) for name in ("single", "chief", "worker"))
    for folder in (single, chief, worker):
        set_params(folder, {**overrides, "runtime.distribution": "none" if folder is single else "multi_worker"})
        # The activation cache for these params, on each node's own copy of the data (one process each).
        run = _run_stage(folder, "activations", venv_env)
        assert run.wait(timeout=600) == 0, run.stdout.read()[-3000:]
    for stage in ("train_base", "finetune"):
        run = _run_stage(single, stage, venv_env)
        assert run.wait(timeout=600) == 0, run.stdout.read()[-3000:]
        if stage == "finetune":  # the worker reads the chief's base model, as from a shared disk or `dvc pull`
            for name in ("base.keras", "base.json"):
                (worker / "models" / name).write_bytes((chief / "models" / name).read_bytes())
        before = _snapshot(worker)
        ports = free_ports(2)
        runs = [_run_stage(folder, stage, {**venv_env, TF_CONFIG: tf_config(ports, i)}) for i, folder in enumerate((chief, worker))]
        logs = [run.communicate(timeout=600)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], "\n".join(log[-3000:] for log in logs)
        assert _snapshot(worker) == before, f"the worker wrote: {set(_snapshot(worker).items()) ^ set(before.items())}"
        assert "multi-worker training: worker 0 of a cluster of 2 workers (the chief" in logs[0]
        assert "(writes nothing)" in logs[1] and "MLflow run" not in logs[1]
        assert "INFO:tensorflow" not in logs[0] + logs[1], "TensorFlow's collective set-up lines reach the terminal"
        chief_history = json.loads((chief / f"reports/{stage}/history.json").read_text())
        single_history = json.loads((single / f"reports/{stage}/history.json").read_text())
        for key in ("loss", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(chief_history[key], single_history[key], atol=1e-5)
    ours = keras.saving.load_model(chief / "models/finetuned.keras", safe_mode=True)
    theirs = keras.saving.load_model(single / "models/finetuned.keras", safe_mode=True)
    images = np.load(single / "data/processed/images.npy", mmap_mode="r")[:64][..., None].astype("float32")
    # The stated tolerance: outputs within 1e-4, weights within 1e-2. The tiny, untrained backbone leaves
    # some head units always active, and BatchNorm then cancels their Dense bias: its gradient is zero up
    # to rounding, and Adam turns that rounding into full-size steps (1e-3 per step), in one process too.
    np.testing.assert_allclose(ours.predict(images, verbose=0), theirs.predict(images, verbose=0), atol=1e-4)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-2)
