"""MLflow set-up: tracking-URI resolution, runs in a real SQLite store, and real DVC experiments
(`dvc repro`, `dvc exp run --temp`, queued runs) all logging to the one store at the repo root."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from braintumor.core.config import MlflowParams, ModelParams
from braintumor.core.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    flatten_params,
    git_commit,
    group_name,
    log_history,
    log_json_artifact,
    log_summary,
    main_project_root,
    resolve_tracking_uri,
    stage_run,
)

DVC_ENV = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE")
SHA = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- resolve_tracking_uri


def test_relative_sqlite_and_file_stores_resolve_under_the_root(tmp_path):
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path, environ={}) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///db/m.db?timeout=30", tmp_path, environ={}) == \
        f"sqlite:///{tmp_path}/db/m.db?timeout=30"
    assert resolve_tracking_uri("file:mlruns", tmp_path, environ={}) == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("./mlruns", tmp_path, environ={}) == (tmp_path / "mlruns").as_uri()


@pytest.mark.parametrize("uri", [
    "sqlite:////srv/mlflow/mlflow.db", "sqlite://", "file:///srv/mlruns", "/srv/mlruns",
    "http://127.0.0.1:5000", "https://mlflow.example.org", "databricks", "databricks://profile",
    "postgresql://user@db/mlflow",
])
def test_absolute_and_server_uris_pass_through(tmp_path, uri):
    assert resolve_tracking_uri(uri, tmp_path, environ={}) == uri


def test_mlflow_tracking_uri_variable_wins_over_params(tmp_path):
    """One export sends every stage, the registry and the app to a shared server."""
    server = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5123"}
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path, environ=server) == "http://127.0.0.1:5123"
    # A relative store in the variable resolves like one in params.yaml; an empty variable is no override.
    assert resolve_tracking_uri("http://ignored:1", tmp_path, environ={"MLFLOW_TRACKING_URI": "sqlite:///other.db"}) == \
        f"sqlite:///{tmp_path}/other.db"
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path, environ={"MLFLOW_TRACKING_URI": " "}) == \
        f"sqlite:///{tmp_path}/mlflow.db"


def test_empty_uri_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tracking_uri is empty"):
        resolve_tracking_uri(" ", tmp_path, environ={})


@pytest.mark.parametrize("layout", [
    (".dvc", "tmp", "exps", "standalone", "tmpa1b2c3d4"),  # dvc exp run --temp
    (".dvc", "tmp", "exps", "tmpa1b2c3d4"),                # queued run (dvc queue start)
])
def test_dvc_temp_workspace_resolves_to_the_main_root(tmp_path, layout):
    workspace = tmp_path.joinpath(*layout)
    workspace.mkdir(parents=True)
    # Even with no DVC variables (e.g. the script rerun by hand inside the copy) the path decides.
    assert main_project_root(workspace, environ={}) == tmp_path.resolve()
    assert resolve_tracking_uri("sqlite:///mlflow.db", workspace, environ={}) == \
        f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_dvc_root_is_used_only_during_an_experiment(tmp_path):
    main, elsewhere = tmp_path / "main", tmp_path / "executor"
    main.mkdir()
    elsewhere.mkdir()
    in_experiment = {"DVC_ROOT": str(main), "DVC_EXP_BASELINE_REV": SHA, "DVC_EXP_NAME": "e"}
    assert main_project_root(elsewhere, environ=in_experiment) == main.resolve()
    # Plain `dvc repro` keeps an inherited DVC_ROOT, which may be another repo's: ignored.
    assert main_project_root(elsewhere, environ={"DVC_ROOT": str(main)}) == elsewhere.resolve()


# --------------------------------------------------------------------------- flatten_params, git_commit


def test_flatten_params_gives_dotted_keys_and_json_values():
    assert flatten_params(ModelParams(), "model") == {
        "model.backbone": "resnet50", "model.weights": "imagenet",
        "model.dense_units": "[512, 128]", "model.dropout": "[0.5, 0.3]",
    }
    nested = {"opt": {"lr": 0.001, "nesterov": True, "decay": None}, "empty": {}, "names": ("a", "b")}
    assert flatten_params(nested, "train") == {
        "train.opt.lr": "0.001", "train.opt.nesterov": "true", "train.opt.decay": "null",
        "train.empty": "{}", "train.names": '["a", "b"]',
    }


def test_flatten_sections_joins_the_named_sections_in_order():
    from braintumor.core.config import load_params
    from braintumor.core.tracking import flatten_sections
    from conftest import REPO

    params = load_params(REPO / "params.yaml")
    joined = flatten_sections(params, "model", "runtime")
    assert joined == {**flatten_params(params.model, "model"), **flatten_params(params.runtime, "runtime")}
    assert list(joined)[0].startswith("model.") and list(joined)[-1].startswith("runtime.")


def test_flatten_params_truncates_long_values_and_refuses_bad_keys():
    value = flatten_params({"v": "x" * 7000}, "p")["p.v"]
    assert len(value) == MAX_PARAM_VALUE_LENGTH and value.endswith("...[truncated from 7000 chars]")
    with pytest.raises(ValueError, match=r"'p.a\?b'"):
        flatten_params({"a?b": 1}, "p")
    with pytest.raises(ValueError, match="not valid in MLflow"):
        flatten_params({"k" * 300: 1}, "p")


def test_git_commit_prefers_the_baseline_and_is_none_outside_git(tmp_path):
    assert git_commit(tmp_path, environ={"DVC_EXP_BASELINE_REV": SHA}) == SHA
    assert git_commit(tmp_path, environ={}) is None


# --------------------------------------------------------------------------- runs in a real SQLite store


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """One project root (and so one mlflow.db) for this module's in-process runs: the schema is built once."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(autouse=True)
def clean_mlflow(monkeypatch):
    """No DVC variables from an enclosing run; no tracking URI or active run left to other tests."""
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def store(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def test_stage_run_creates_experiment_and_run_with_params_and_tags(workspace, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-dip")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", SHA)
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="tags")
    with stage_run("train", params, workspace, logged_params=flatten_params({"lr": 0.01, "v": "x" * 7000}, "train"),
                   tags={"data_fingerprint": "abc123"}) as run:
        run_id = run.info.run_id
    client = store(workspace)
    experiment = client.get_experiment_by_name("tags")
    # Artifacts beside the database, not in ./mlruns of whatever directory created the experiment.
    assert experiment.artifact_location == (workspace / "mlruns" / "tags").as_uri()
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "lucky-dip/train"
    assert stored.data.params["train.lr"] == "0.01"
    assert {k: v for k, v in stored.data.tags.items() if not k.startswith("mlflow.")} == {
        "stage": "train", "dvc_experiment": "lucky-dip", "git_commit": SHA, "data_fingerprint": "abc123",
        "params_truncated": "train.v", "group": "lucky-dip",
    }
    # Grouped under one parent run named after the DVC experiment, which carries the params too.
    parent = client.get_run(stored.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "lucky-dip" and parent.info.status == "FINISHED"
    assert parent.data.tags["is_group"] == "true" and parent.data.tags["git_commit"] == SHA
    assert parent.data.params["train.lr"] == "0.01"


def test_stages_of_one_execution_share_a_parent_that_collects_their_summaries(workspace, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "two-stages")
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="groups")
    run_ids = []
    for stage, accuracy in (("train_base", 0.5), ("finetune", 0.75)):
        with stage_run(stage, params, workspace, logged_params={"lr": "0.1"}) as run:
            log_summary({"test_accuracy": accuracy})
            run_ids.append(run.info.run_id)
    client = store(workspace)
    parents = {client.get_run(r).data.tags["mlflow.parentRunId"] for r in run_ids}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.metrics == {"train_base.test_accuracy": 0.5, "finetune.test_accuracy": 0.75}
    assert client.get_run(run_ids[1]).data.metrics == {"test_accuracy": 0.75}
    # Another experiment is another group.
    monkeypatch.setenv("DVC_EXP_NAME", "other")
    with stage_run("finetune", params, workspace, logged_params={}) as run:
        pass
    assert client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] != parent.info.run_id


def test_group_name_is_the_experiment_or_the_workspace_at_its_commit():
    assert group_name(SHA, environ={"DVC_EXP_NAME": "exp-1"}) == "exp-1"
    assert group_name(SHA, environ={}) == f"workspace@{SHA[:8]}"
    assert group_name(None, environ={}) == "workspace"


def test_log_history_writes_one_step_per_epoch(workspace):
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="history")
    with stage_run("train", params, workspace, logged_params={}) as run:
        log_history({"loss": [0.9, 0.5, 0.25], "val_accuracy": [0.5, 0.7, 0.8]})
        log_json_artifact({"classes": ["glioma", "no_tumor"], "n": 2}, "report.json")
    client = store(workspace)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.9), (1, 0.5), (2, 0.25)]
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 3
    stored = client.get_run(run.info.run_id)
    assert stored.data.tags["dvc_experiment"] == "workspace" and "git_commit" not in stored.data.tags
    report = Path(urlparse(stored.info.artifact_uri).path) / "report.json"
    assert json.loads(report.read_text()) == {"classes": ["glioma", "no_tumor"], "n": 2}


def test_failing_body_ends_run_failed_and_propagates(workspace):
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="failing")
    with pytest.raises(ZeroDivisionError):
        with stage_run("train", params, workspace, logged_params={}):
            1 / 0
    assert mlflow.active_run() is None
    runs = store(workspace).search_runs([store(workspace).get_experiment_by_name("failing").experiment_id])
    (failed,) = [r for r in runs if "is_group" not in r.data.tags]
    assert failed.info.status == "FAILED"
    assert store(workspace).get_run(failed.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_reserved_tags_and_calls_outside_a_run_are_refused(workspace):
    params = MlflowParams(tracking_uri="sqlite:///mlflow.db", experiment="refused")
    with pytest.raises(ValueError, match="reserved"):
        with stage_run("train", params, workspace, logged_params={}, tags={"stage": "other"}):
            pass
    with pytest.raises(RuntimeError, match="inside `with stage_run"):
        log_history({"loss": [1.0]})


# --------------------------------------------------------------------------- real DVC experiments

STAGE_SCRIPT = '''\
"""The throw-away repo's one stage: a run through braintumor.core.tracking, as the real stages log."""
from braintumor.core.config import MlflowParams, read_yaml
from braintumor.core.paths import find_project_root
from braintumor.core.tracking import flatten_params, log_history, log_json_artifact, stage_run

root = find_project_root()
raw = read_yaml((root / "params.yaml").read_text())
factor = raw["train"]["factor"]
with stage_run("train", MlflowParams(**raw["mlflow"]), root, logged_params=flatten_params(raw["train"], "train"),
               tags={"workspace_path": str(root)}):
    log_history({"loss": [1.0 / factor, 0.5 / factor]})
    log_json_artifact({"factor": factor}, "report.json")
(root / "out.txt").write_text(str(factor))
'''

DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [train.factor]
    outs: [out.txt]
"""

PARAMS_YAML = """\
train:
  factor: 1
mlflow:
  tracking_uri: sqlite:///mlflow.db
  experiment: e2e
"""


def run(repo: Path, env: dict, *args: str) -> str:
    result = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def dvc_env(venv_env) -> dict[str, str]:
    env = {k: v for k, v in venv_env.items() if k not in DVC_ENV and not k.startswith("MLFLOW_")}
    return env | {"DVC_NO_ANALYTICS": "1"}


def make_repo(repo: Path, env: dict) -> str:
    """A git + DVC repo with one stage that logs to MLflow; returns its commit."""
    (repo / "train.py").write_text(STAGE_SCRIPT)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text(PARAMS_YAML)
    # Otherwise DVC experiments would commit the store into their refs.
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    run(repo, env, "git", "init", "-q")
    run(repo, env, "git", "config", "user.name", "test")
    run(repo, env, "git", "config", "user.email", "test@example.invalid")
    run(repo, env, "dvc", "init", "-q")
    run(repo, env, "dvc", "config", "core.analytics", "false")
    run(repo, env, "git", "add", "-A")
    run(repo, env, "git", "commit", "-qm", "tiny pipeline")
    return run(repo, env, "git", "rev-parse", "HEAD").strip()


def run_queue(repo: Path, env: dict, timeout: float = 60.0) -> None:
    """Start the queue worker and wait until no task is queued or running (there is no `dvc queue wait`)."""
    # The worker it spawns inherits stdout/stderr: with pipes, waiting for EOF would wait for the worker.
    started = subprocess.run(["dvc", "queue", "start"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=120)
    assert started.returncode == 0, "dvc queue start failed"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            status = run(repo, env, "dvc", "queue", "status")
            if not any(word in status for word in ("Queued", "Running")):
                failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
                assert not failed, status + "".join(
                    subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env, capture_output=True,
                                   text=True).stdout[-3000:] for name in failed)
                return
            time.sleep(1)
        pytest.fail(f"queued experiments still pending after {timeout} s:\n{status}")
    finally:
        # The worker exits by itself once the queue is empty; this makes sure even on failure.
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=60)


@pytest.mark.slow
def test_dvc_experiments_log_to_the_main_roots_store(tmp_path, dvc_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    commit = make_repo(repo, dvc_env)
    run(repo, dvc_env, "dvc", "repro")
    run(repo, dvc_env, "dvc", "exp", "run", "--temp", "-n", "temp-exp", "-S", "train.factor=2")
    run(repo, dvc_env, "dvc", "exp", "run", "--queue", "-n", "queued-a", "-S", "train.factor=3")
    run(repo, dvc_env, "dvc", "exp", "run", "--queue", "-n", "queued-b", "-S", "train.factor=4")
    run_queue(repo, dvc_env)

    assert not list((repo / ".dvc").rglob("mlflow.db")), "a store was created inside a DVC temp workspace"
    client = store(repo)
    found = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    runs = [r for r in found if "is_group" not in r.data.tags]
    parents = {r.info.run_id: r for r in found if "is_group" in r.data.tags}
    by_experiment = {r.data.tags["dvc_experiment"]: r for r in runs}
    assert len(runs) == 4 and set(by_experiment) == {"workspace", "temp-exp", "queued-a", "queued-b"}
    assert {p.info.run_name for p in parents.values()} == {f"workspace@{commit[:8]}", "temp-exp", "queued-a", "queued-b"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == set(parents)
    exps_dir = repo.resolve() / ".dvc" / "tmp" / "exps"
    expected = {  # DVC experiment -> (train.factor, run name, where the stage ran)
        "workspace": ("1", f"workspace@{commit[:8]}/train", repo.resolve()),
        "temp-exp": ("2", "temp-exp/train", exps_dir / "standalone"),
        "queued-a": ("3", "queued-a/train", exps_dir),
        "queued-b": ("4", "queued-b/train", exps_dir),
    }
    for name, (factor, run_name, workspace_parent) in expected.items():
        stored = by_experiment[name]
        assert stored.info.status == "FINISHED" and stored.info.run_name == run_name
        assert stored.data.params["train.factor"] == factor
        assert stored.data.tags["git_commit"] == commit
        # The run really ran where DVC puts it: the repo itself, or a temp copy under .dvc/tmp/exps.
        ran_in = Path(stored.data.tags["workspace_path"])
        assert ran_in == workspace_parent if name == "workspace" else ran_in.parent == workspace_parent
        assert [m.step for m in client.get_metric_history(stored.info.run_id, "loss")] == [0, 1]
        # The artifact outlives the temp copy: it is under the main root.
        report = Path(urlparse(stored.info.artifact_uri).path) / "report.json"
        assert report.is_relative_to(repo.resolve() / "mlruns")
        assert json.loads(report.read_text()) == {"factor": int(factor)}


def test_mlflow_ui_target_refuses_a_server_uri():
    """`make mlflow-ui` serves a local store; with MLFLOW_TRACKING_URI on a server it says where to look instead."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, "-m", "braintumor.core.tracking"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"})
    assert result.returncode == 1 and "tracking server (http://127.0.0.1:5999" in result.stderr and not result.stdout
