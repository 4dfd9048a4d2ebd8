"""The one place that sets up MLflow: where runs are stored, which experiment, one run per DVC stage.

Every stage opens its run with :func:`stage_run`; nothing else calls ``mlflow.set_tracking_uri``.

Why the tracking URI needs resolving: DVC runs ``dvc exp run --temp`` and queued experiments
(``dvc exp run --queue`` + ``dvc queue start``) in throw-away copies of the repository, with the stage
command's cwd inside the copy. Measured with DVC 3.67.1::

    <main root>/.dvc/tmp/exps/standalone/tmpXXXXXXXX/   dvc exp run --temp
    <main root>/.dvc/tmp/exps/tmpXXXXXXXX/              queued runs (dvc queue start)

A relative ``sqlite:///mlflow.db`` would therefore create a new database in the copy, deleted with it.
:func:`main_project_root` maps such a workspace back to the main root, from the path itself and from
the variables DVC sets for stage commands during experiments:

- ``DVC_ROOT``: the main repository root (DVC overrides it for experiments: "point to the parent DVC
  repo root (and not an executor tempdir root)"); under plain ``dvc repro`` it is the workspace root;
- ``DVC_EXP_NAME``: the experiment's name (set only by ``dvc exp run``, also for in-place runs);
- ``DVC_EXP_BASELINE_REV``: the git commit the experiment started from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from braintumor.core.config import MlflowParams
from braintumor.core.paths import EXPS_TMP_PARTS, ENV_EXP_BASELINE_REV, ENV_EXP_NAME, main_project_root

logger = logging.getLogger(__name__)


# DVC's executor folders (dvc.repo.experiments.utils.EXEC_TMP_DIR under repo.tmp_dir = .dvc/tmp).

# MLflow's limits (mlflow.utils.validation): keys of params/metrics/tags, param and tag values.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_VALID_KEY = re.compile(r"^[/\w.\- :]+$")
_TRUNCATION_NOTE = "...[truncated from {length} chars]"
_TRUNCATED = re.compile(r"\.\.\.\[truncated from \d+ chars\]$")

# MLflow's own variable for the tracking server; it wins over params.yaml (see resolve_tracking_uri).
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

# Bare words MLflow reads as stores, not as folder names (mlflow.tracking.registry.get_store_builder).
_NAMED_STORES = frozenset({"databricks", "databricks-uc", "uc"})

# Tags every stage run carries; callers may add others but not overwrite these.
RESERVED_TAGS = ("stage", "dvc_experiment", "git_commit", "params_truncated", "group", "group_key")
# Tags of the parent run that groups one pipeline execution's stage runs (see :func:`group_run`).
GROUP_TAG = "group"
GROUP_KEY_TAG = "group_key"
IS_GROUP_TAG = "is_group"
WORKSPACE_EXPERIMENT = "workspace"


# --------------------------------------------------------------------------- where runs are stored


def _is_sqlite_scheme(scheme: str) -> bool:
    return scheme == "sqlite" or scheme.startswith("sqlite+")


def _resolve_sqlite_uri(uri: str, root: Path) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////<root>/rel.db``; absolute and in-memory URIs unchanged."""
    scheme, sep, rest = uri.partition(":///")
    if not sep:  # sqlite:// is in-memory
        return uri
    path, qmark, query = rest.partition("?")
    if not path or path.startswith("/") or path == ":memory:":
        return uri
    # The path stays as written (not URL-decoded): SQLAlchemy reads it literally.
    return f"{scheme}:///{os.path.normpath(root / path)}{qmark}{query}"


def _resolve_local_path_uri(uri: str, root: Path) -> str:
    """A file store given as ``file:rel``, ``file:./rel`` or a bare path -> an absolute ``file://`` URI."""
    path = unquote(urlparse(uri).path) if uri.startswith("file:") else uri
    if uri.startswith("file://") and not uri.startswith("file:///"):
        return uri  # file://host/...: not a local path
    if Path(path).is_absolute():
        return uri
    return Path(os.path.normpath(root / path)).as_uri()


def resolve_tracking_uri(uri: str, workspace_root: Path, *, environ: Mapping[str, str] | None = None) -> str:
    """The tracking URI, ``MLFLOW_TRACKING_URI`` first, with a relative local store made absolute under the project's main root.

    ``MLFLOW_TRACKING_URI``, when set, replaces params.yaml's ``mlflow.tracking_uri`` (MLflow's own
    variable, so that one export sends every stage's runs, the registry and the app's ``models:/``
    lookups to a shared server, e.g. ``make mlflow-server``'s, without editing params.yaml).

    ``sqlite:///mlflow.db``, ``file:mlruns`` and ``mlruns`` resolve against :func:`main_project_root`,
    so ``dvc repro``, ``dvc exp run --temp`` and queued experiments all log to one store. Absolute
    sqlite/file URIs, in-memory sqlite, and server URIs (``http(s)://``, ``databricks``,
    ``postgresql://``, ...) are returned unchanged.

    Args:
        uri: ``mlflow.tracking_uri`` from params.yaml.
        workspace_root: the folder holding ``dvc.yaml`` that the stage runs in.
        environ: the environment to read (default: ``os.environ``).

    Raises:
        ValueError: ``uri`` is empty.
    """
    override = (os.environ if environ is None else environ).get(ENV_TRACKING_URI, "").strip()
    uri = override or uri
    if not uri.strip():
        raise ValueError("mlflow.tracking_uri is empty: give e.g. sqlite:///mlflow.db or http://host:5000")
    scheme = urlparse(uri).scheme
    if uri in _NAMED_STORES:
        return uri
    if _is_sqlite_scheme(scheme):
        return _resolve_sqlite_uri(uri, main_project_root(workspace_root, environ=environ))
    if scheme in ("", "file"):
        return _resolve_local_path_uri(uri, main_project_root(workspace_root, environ=environ))
    return uri


def _sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of an absolute local sqlite URI, else None."""
    scheme = urlparse(tracking_uri).scheme
    if not _is_sqlite_scheme(scheme) or ":////" not in tracking_uri:
        return None
    return Path(tracking_uri.partition(":///")[2].partition("?")[0])


def experiment_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlruns/<experiment>`` beside a sqlite database.

    MLflow's default for a sqlite store is ``./mlruns`` under the *current directory* of the process
    that creates the experiment; in a DVC experiment copy that folder is deleted with the copy. Other
    stores choose for themselves (None): a file store keeps artifacts inside itself, a server has its
    own artifact root.

    Args:
        tracking_uri: a resolved tracking URI (see :func:`resolve_tracking_uri`).
        experiment: the MLflow experiment name.
    """
    db_path = _sqlite_db_path(tracking_uri)
    if db_path is None:
        return None
    folder = re.sub(r"[^\w.-]", "_", experiment)
    return (db_path.parent / "mlruns" / folder).as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name`` in the store, created (with a safe artifact location) if missing.

    Args:
        tracking_uri: a resolved tracking URI.
        name: the MLflow experiment name.

    Raises:
        ValueError: the experiment is deleted, or keeps its artifacts inside a DVC experiment copy.
    """
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=experiment_artifact_location(tracking_uri, name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another queued experiment created it between our lookup and our insert.
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} in {tracking_uri} is deleted: restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set another mlflow.experiment"
        )
    if "/".join(EXPS_TMP_PARTS) in experiment.artifact_location:
        raise ValueError(
            f"MLflow experiment {name!r} stores artifacts in a DVC experiment copy, which DVC deletes: "
            f"{experiment.artifact_location}. Delete the experiment or set another mlflow.experiment"
        )
    return experiment.experiment_id


# --------------------------------------------------------------------------- what a run is tagged with


def dvc_experiment_name(*, environ: Mapping[str, str] | None = None) -> str | None:
    """The name of the DVC experiment this stage runs in, or None under plain ``dvc repro``.

    Args:
        environ: the environment to read (default: ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    return environ.get(ENV_EXP_NAME) or None


def git_commit(root: Path, *, environ: Mapping[str, str] | None = None) -> str | None:
    """The commit the code came from: a DVC experiment's baseline, else ``HEAD`` of ``root``.

    A DVC experiment copy has its own ``HEAD`` (and a queued run may start after the main repo moved
    on), so ``DVC_EXP_BASELINE_REV`` is preferred. Never raises: None outside git or without git.

    Args:
        root: a folder inside the git repository.
        environ: the environment to read (default: ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    if baseline := environ.get(ENV_EXP_BASELINE_REV):
        return baseline
    try:
        result = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


# --------------------------------------------------------------------------- params


def _check_key(key: str, what: str = "param") -> str:
    """Return ``key`` if MLflow accepts it as a param/metric/tag name, else raise naming it."""
    if not key or len(key) > MAX_KEY_LENGTH or not _VALID_KEY.match(key):
        raise ValueError(
            f"{what} name {key!r} is not valid in MLflow: 1-{MAX_KEY_LENGTH} characters from letters, digits, "
            "'_', '-', '.', ' ', ':' and '/'"
        )
    if os.path.normpath(key) != key or key.startswith(("/", "..")):
        raise ValueError(f"{what} name {key!r} is not valid in MLflow: it must be a normalised relative path")
    return key


def _within_limit(value: str, limit: int) -> str:
    """``value``, or its start plus a note giving the original length if it is longer than ``limit``."""
    if len(value) <= limit:
        return value
    note = _TRUNCATION_NOTE.format(length=len(value))
    return value[: limit - len(note)] + note


def _param_value(key: str, value: Any) -> str:
    """A leaf value as MLflow stores it: strings as they are, everything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"param {key!r}: {type(value).__name__} value {value!r} cannot be logged ({exc})") from None


def _flatten(data: Any, key: str, out: dict[str, str]) -> None:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    # An empty section is logged as "{}" so that it shows up; only a bare call has no key for it.
    if isinstance(data, Mapping) and (data or not key):
        for name, value in data.items():
            _flatten(value, f"{key}.{name}" if key else str(name), out)
        return
    if not key:
        raise ValueError("flatten_params: a bare value needs a prefix to name it")
    out[_check_key(key)] = _within_limit(_param_value(key, data), MAX_PARAM_VALUE_LENGTH)


def flatten_params(section: BaseModel | Mapping[str, Any], prefix: str) -> dict[str, str]:
    """A params section as MLflow params: dotted keys, string values within MLflow's limits.

    Nested sections become dotted keys (``train.optimizer.learning_rate``); tuples and lists become
    JSON (``[512, 128]``), as do numbers, booleans (``true``) and None (``null``); an empty mapping is
    logged as ``{}``. A value longer than 6000 characters is truncated and ends with
    ``...[truncated from N chars]`` (:func:`stage_run` then lists it in the ``params_truncated`` tag).

    Args:
        section: a pydantic params section or a plain mapping.
        prefix: the section's name in params.yaml (``"train"``); ``""`` for no prefix.

    Raises:
        ValueError: a key MLflow would reject (bad characters or longer than 250 characters).
        TypeError: a value that is not JSON-serialisable.
    """
    out: dict[str, str] = {}
    _flatten(section, prefix, out)
    return out


def flatten_sections(params: BaseModel, *sections: str) -> dict[str, str]:
    """:func:`flatten_params` of several top-level sections of ``params``, each under its own name."""
    return {key: value for name in sections for key, value in flatten_params(getattr(params, name), name).items()}


# --------------------------------------------------------------------------- the run


def _run_tags(stage: str, root: Path, extra: Mapping[str, str] | None, truncated: Sequence[str]) -> dict[str, str]:
    """The tags of a stage run: the reserved ones plus the caller's."""
    extra = dict(extra or {})
    if clash := sorted(set(extra) & set(RESERVED_TAGS)):
        raise ValueError(f"stage_run: tags {clash} are set by stage_run itself (reserved: {list(RESERVED_TAGS)})")
    tags = {"stage": stage, "dvc_experiment": dvc_experiment_name() or WORKSPACE_EXPERIMENT}
    if commit := git_commit(root):
        tags["git_commit"] = commit
    if truncated:
        tags["params_truncated"] = ", ".join(truncated)
    for key, value in extra.items():
        if not isinstance(value, str):
            raise TypeError(f"stage_run: tag {key!r} must be a string, got {type(value).__name__} {value!r}")
        tags[_check_key(key, "tag")] = value
    return {key: _within_limit(value, MAX_TAG_VALUE_LENGTH) for key, value in tags.items()}


def _checked_params(logged_params: Mapping[str, str]) -> dict[str, str]:
    """``logged_params`` with valid keys and values within MLflow's limit (see :func:`flatten_params`)."""
    checked = {}
    for key, value in logged_params.items():
        if not isinstance(value, str):
            raise TypeError(f"stage_run: param {key!r} must be a string (use flatten_params), got {value!r}")
        checked[_check_key(key)] = _within_limit(value, MAX_PARAM_VALUE_LENGTH)
    return checked


def _end_run(run_id: str, status: str) -> None:
    """End run ``run_id`` with ``status``, whether or not the body already ended it."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        MlflowClient().set_terminated(run_id, status)


def params_digest(workspace_root: Path) -> str:
    """A short hash of the workspace's params.yaml: tells apart pipeline executions at one commit."""
    import hashlib

    path = Path(workspace_root) / "params.yaml"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "no-params"


def group_name(commit: str | None, *, environ: Mapping[str, str] | None = None) -> str:
    """The name of the group a stage run belongs to: the DVC experiment, else ``workspace@<commit>``."""
    if name := dvc_experiment_name(environ=environ):
        return name
    return f"{WORKSPACE_EXPERIMENT}@{commit[:8]}" if commit else WORKSPACE_EXPERIMENT


def group_run(client: MlflowClient, experiment_id: str, name: str, key: str, tags: Mapping[str, str]) -> str:
    """The id of the parent run that groups one pipeline execution's stage runs; created if missing.

    One group per DVC experiment (``dvc exp run``, also ``--temp`` and queued runs), or, under plain
    ``dvc repro``, per commit and params.yaml content. ``key`` (name plus params digest) finds it again
    from the next stage's process; the stages of one pipeline run one after another, so two processes
    never race to create the same group.
    """
    found = client.search_runs([experiment_id], filter_string=f"tags.{GROUP_KEY_TAG} = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=name,
                            tags={**tags, GROUP_TAG: name, GROUP_KEY_TAG: key, IS_GROUP_TAG: "true"})
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: MlflowParams, workspace_root: Path, *, logged_params: Mapping[str, str],
              tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one DVC stage; end it FINISHED, or FAILED (KILLED on Ctrl-C) and re-raise.

    Sets the tracking URI (resolved, see :func:`resolve_tracking_uri`), creates the experiment if
    needed, and starts a run named ``stage`` (``<dvc experiment>/<stage>`` during ``dvc exp run``)
    tagged ``stage``, ``dvc_experiment`` (the DVC experiment name, or ``workspace``), ``git_commit``
    (see :func:`git_commit`; absent outside git) and ``tags``; then logs ``logged_params``.

    Args:
        stage: the DVC stage name, e.g. ``train`` or ``download@phantom``.
        params: the ``mlflow`` section of params.yaml.
        workspace_root: the folder holding ``dvc.yaml`` that the stage runs in.
        logged_params: MLflow params, normally from :func:`flatten_params`.
        tags: extra tags, e.g. ``{"data_fingerprint": ...}``; may not override the reserved ones.

    Yields:
        The active run; log to it with ``mlflow.*``, :func:`log_history`, :func:`log_json_artifact`.
    """
    tracking_uri = resolve_tracking_uri(params.tracking_uri, workspace_root)
    checked = _checked_params(logged_params)
    run_tags = _run_tags(stage, main_project_root(workspace_root), tags,
                         [key for key, value in checked.items() if _TRUNCATED.search(value)])
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, params.experiment)
    client = MlflowClient(tracking_uri)
    group = group_name(run_tags.get("git_commit"))
    parent_id = group_run(client, experiment_id, group, f"{group}#{params_digest(workspace_root)}",
                          {k: v for k, v in run_tags.items() if k in ("dvc_experiment", "git_commit")})
    # The parent carries the params too (every stage of a group reads the same params.yaml), so the
    # MLflow UI can compare groups as it compares runs.
    client.log_batch(parent_id, params=[Param(k, v) for k, v in checked.items()
                                        if k not in client.get_run(parent_id).data.params])
    run_tags = {**run_tags, GROUP_TAG: group, "mlflow.parentRunId": parent_id}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{group}/{stage}", tags=run_tags)
    run_id = run.info.run_id
    logger.info("MLflow run %s (experiment %r, group %r) in %s", run_id, params.experiment, group, tracking_uri)
    try:
        mlflow.log_params(checked)
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            _end_run(run_id, status)
            client.set_terminated(parent_id, status)
        except Exception:
            # Keep the stage's own error as the one that propagates; this one is only reported.
            logger.exception("could not mark MLflow run %s as %s", run_id, status)
        raise
    _end_run(run_id, RunStatus.to_string(RunStatus.FINISHED))
    client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FINISHED))


# --------------------------------------------------------------------------- logging inside a run


def _active_run_id(caller: str) -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"{caller} needs an active MLflow run: call it inside `with stage_run(...)`")
    return run.info.run_id


def log_history(history: Mapping[str, Sequence[float]]) -> None:
    """Log a Keras-style history as per-epoch metrics of the active run, step = epoch (from 0).

    Args:
        history: metric name -> one value per epoch, e.g. ``model.fit(...).history``.

    Raises:
        RuntimeError: no run is active.
        TypeError: a value is not a number.
    """
    run_id = _active_run_id("log_history")
    timestamp = int(time.time() * 1000)
    metrics = []
    for name, values in history.items():
        _check_key(name, "metric")
        for epoch, value in enumerate(values):
            try:
                metrics.append(Metric(key=name, value=float(value), timestamp=timestamp, step=epoch))
            except (TypeError, ValueError):
                raise TypeError(f"log_history: {name}[{epoch}] = {value!r} is not a number") from None
    # One batch call (MLflow splits it into chunks of 1000) rather than a round trip per value.
    MlflowClient().log_batch(run_id, metrics=metrics)


def _json_default(value: Any) -> Any:
    """numpy arrays and scalars, and paths, as JSON; anything else fails loudly."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON-serialisable")


def log_json_artifact(data: Any, name: str) -> None:
    """Log ``data`` as a JSON file artifact of the active run.

    Args:
        data: JSON-serialisable data (numpy arrays and scalars are converted; NaN is refused,
            as it is not JSON: use None).
        name: the artifact path, e.g. ``confusion_matrix.json`` or ``reports/split.json``.

    Raises:
        RuntimeError: no run is active.
        ValueError: ``name`` does not end in ``.json``, or ``data`` holds NaN or infinity.
    """
    _active_run_id("log_json_artifact")
    if not name.endswith(".json") or name.startswith("/"):
        raise ValueError(f"log_json_artifact: name must be a relative path ending in .json, got {name!r}")
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    except ValueError as exc:
        raise ValueError(f"log_json_artifact({name!r}): {exc} (NaN/infinity are not JSON; use None)") from None
    mlflow.log_text(text, name)


def log_summary(metrics: Mapping[str, float]) -> None:
    """A stage's summary metrics, on its run and, prefixed with the stage, on its group's parent run.

    The parent then shows every stage's headline numbers in one row of the MLflow UI.
    """
    run_id = _active_run_id("log_summary")
    values = {_check_key(key, "metric"): float(value) for key, value in metrics.items()}
    mlflow.log_metrics(values)
    run = MlflowClient().get_run(run_id)
    if parent_id := run.data.tags.get("mlflow.parentRunId"):
        stage = run.data.tags["stage"]
        now = int(time.time() * 1000)
        MlflowClient().log_batch(parent_id, metrics=[Metric(f"{stage}.{key}", value, now, 0)
                                                     for key, value in values.items()])


def log_phase(history: Mapping[str, Sequence[float]], metrics: Mapping[str, float], model_path: Path,
              card: Mapping[str, Any] | None = None, registered_model: str | None = None, model: Any = None) -> str | None:
    """A training phase's per-epoch history, summary metrics, history file and model.

    With ``registered_model``, ``model`` (the Keras model just saved to ``model_path``) is logged as an
    MLflow Keras model (MLmodel + ``.keras``, card in its metadata) and registered under that name;
    returns the new version. Otherwise the ``.keras`` file is logged as a plain artifact.
    """
    log_history(history)
    log_summary(metrics)
    log_json_artifact(dict(history), "history.json")
    if card is not None:
        log_json_artifact(dict(card), "model_card.json")
        if weights := card.get("weights"):  # searchable in the UI: which ImageNet file the run started from
            mlflow.set_tags({f"weights_{key}": str(value) for key, value in weights.items()})
    if registered_model is None:
        mlflow.log_artifact(str(model_path))
        return None
    if model is None:
        raise ValueError("log_phase: registering a model needs the Keras model itself (model=...)")
    return register_keras_model(model, registered_model, card or {})


def register_keras_model(model: Any, name: str, card: Mapping[str, Any]) -> str:
    """Log a Keras model as an MLflow Keras model of the active run and register it as ``name``.

    The requirements are pinned to what runs here, given explicitly: MLflow's inference would load
    the model once more in a subprocess just to guess them.
    """
    import keras
    import mlflow.keras
    import tensorflow as tf

    _active_run_id("register_keras_model")
    info = mlflow.keras.log_model(model, name="model", registered_model_name=name, metadata={"card": dict(card)},
                                  signature=keras_model_signature(model), pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
                                  await_registration_for=0)
    version = str(info.registered_model_version)
    logger.info("registered %s version %s (%s)", name, version, info.model_uri)
    return version


def keras_model_signature(model: Any):
    """What the registry shows a client: the preprocessed slices in, float32 (N, S, S, 1) in 0..255,
    and the softmax out, float32 (N, K), as the model card says."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *model.input_shape[1:]), "slices")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *model.output_shape[1:]), "probabilities")]))


def tag_registered_version(name: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Tag the registered version of ``name`` that run ``run_id`` logged; returns the version.

    The evaluate stage adds what it learns about the fine-tuned model (calibration temperature,
    test metrics) to that model's registry entry, so a model loaded by URI brings them along.

    Raises:
        LookupError: no version of ``name`` comes from ``run_id`` (the finetune stage registers one).
    """
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        raise LookupError(f"no version of registered model {name!r} was logged by run {run_id}: "
                          "rerun the finetune stage (`dvc repro -f finetune`), which registers it")
    version = versions[0].version
    for key, value in tags.items():
        client.set_model_version_tag(name, version, _check_key(key, "tag"), _within_limit(str(value), MAX_TAG_VALUE_LENGTH))
    return str(version)


def main() -> None:
    """Print the resolved tracking URI of the project around the current directory (for `make mlflow-ui`)."""
    from braintumor.core.config import load_params
    from braintumor.core.paths import find_project_root

    root = find_project_root()
    uri = resolve_tracking_uri(load_params(root / "params.yaml").mlflow.tracking_uri, root)
    if urlparse(uri).scheme in ("http", "https"):
        raise SystemExit(f"the runs are on a tracking server ({uri}, from {ENV_TRACKING_URI} or params.yaml): "
                         "open that address in a browser; `make mlflow-ui` serves a local store")
    print(uri)


if __name__ == "__main__":
    main()
