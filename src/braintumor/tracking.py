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
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from braintumor.config import MlflowParams

logger = logging.getLogger(__name__)

ENV_DVC_ROOT = "DVC_ROOT"
ENV_EXP_NAME = "DVC_EXP_NAME"
ENV_EXP_BASELINE_REV = "DVC_EXP_BASELINE_REV"

# DVC's executor folders (dvc.repo.experiments.utils.EXEC_TMP_DIR under repo.tmp_dir = .dvc/tmp).
_EXPS_TMP_PARTS = (".dvc", "tmp", "exps")

# MLflow's limits (mlflow.utils.validation): keys of params/metrics/tags, param and tag values.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_VALID_KEY = re.compile(r"^[/\w.\- :]+$")
_TRUNCATION_NOTE = "...[truncated from {length} chars]"
_TRUNCATED = re.compile(r"\.\.\.\[truncated from \d+ chars\]$")

# Bare words MLflow reads as stores, not as folder names (mlflow.tracking.registry.get_store_builder).
_NAMED_STORES = frozenset({"databricks", "databricks-uc", "uc"})

# Tags every stage run carries; callers may add others but not overwrite these.
RESERVED_TAGS = ("stage", "dvc_experiment", "git_commit", "params_truncated")
WORKSPACE_EXPERIMENT = "workspace"


# --------------------------------------------------------------------------- where runs are stored


def _temp_workspace_origin(workspace: Path) -> Path | None:
    """The repository a DVC experiment copy was made from, or None if ``workspace`` is no such copy.

    Args:
        workspace: an absolute, resolved folder.
    """
    parts = workspace.parts
    n = len(_EXPS_TMP_PARTS)
    # The last match wins: a project that itself lives in another project's experiment copy.
    for start in range(len(parts) - n - 1, -1, -1):
        if parts[start:start + n] == _EXPS_TMP_PARTS:
            return Path(*parts[:start])
    return None


def main_project_root(workspace_root: Path, *, environ: Mapping[str, str] | None = None) -> Path:
    """The project's main root: ``workspace_root`` itself, or the repo a DVC experiment copy came from.

    The path is checked first: a folder under ``<root>/.dvc/tmp/exps/`` is a copy of ``<root>``
    whatever the environment says. Otherwise, during a DVC experiment (``DVC_EXP_BASELINE_REV`` set),
    ``DVC_ROOT`` names the main root, which covers executor folders elsewhere. Outside experiments
    ``DVC_ROOT`` is ignored: ``dvc repro`` keeps an inherited value, which may belong to another repo.

    Args:
        workspace_root: the folder holding ``dvc.yaml`` that the stage runs in.
        environ: the environment to read (default: ``os.environ``).

    Raises:
        FileNotFoundError: DVC_ROOT is set during an experiment but is not a folder.
    """
    environ = os.environ if environ is None else environ
    workspace = Path(workspace_root).resolve()
    if (origin := _temp_workspace_origin(workspace)) is not None:
        return origin
    dvc_root = environ.get(ENV_DVC_ROOT)
    if environ.get(ENV_EXP_BASELINE_REV) and dvc_root:
        if not Path(dvc_root).is_dir():
            raise FileNotFoundError(f"{ENV_DVC_ROOT}={dvc_root!r} (set by DVC for this experiment) is not a folder")
        return Path(dvc_root).resolve()
    return workspace


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
    """The tracking URI with a relative local store made absolute under the project's main root.

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
    if "/".join(_EXPS_TMP_PARTS) in experiment.artifact_location:
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
    exp_name = dvc_experiment_name()
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{exp_name}/{stage}" if exp_name else stage,
                           tags=run_tags)
    run_id = run.info.run_id
    logger.info("MLflow run %s (experiment %r) in %s", run_id, params.experiment, tracking_uri)
    try:
        mlflow.log_params(checked)
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            _end_run(run_id, status)
        except Exception:
            # Keep the stage's own error as the one that propagates; this one is only reported.
            logger.exception("could not mark MLflow run %s as %s", run_id, status)
        raise
    _end_run(run_id, RunStatus.to_string(RunStatus.FINISHED))


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


def log_phase(history: Mapping[str, Sequence[float]], metrics: Mapping[str, float], model_path: Path) -> None:
    """A training phase's per-epoch history, summary metrics, history file and model file."""
    log_history(history)
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()})
    log_json_artifact(dict(history), "history.json")
    mlflow.log_artifact(str(model_path))
