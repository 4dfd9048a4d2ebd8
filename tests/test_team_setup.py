"""What a team shares, with the real engines on this machine: a DVC remote (push from one clone, pull
into a fresh one) and an MLflow tracking server (`make mlflow-server`) that the stages log to and the
app looks models up in, chosen by MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from braintumor.core.config import load_params
from braintumor.core.tracking import resolve_tracking_uri
from braintumor.serve.bundle import load_bundle
from conftest import REPO, copy_built_pipeline, dvc, ran_stages
from test_multi_worker import free_ports

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def test_dvc_remote_push_then_pull_into_a_fresh_clone(built_pipeline, tmp_path, venv_env):
    repo = copy_built_pipeline(built_pipeline, tmp_path / "first")
    remote = tmp_path / "remote"  # a local or NFS folder; S3 and SSH remotes differ only in the URL
    dvc(repo, venv_env, "remote", "add", "-d", "shared", str(remote))
    # What git keeps: dvc.lock, the remote's config, and the small uncached reports and metrics
    # (cache: false in dvc.yaml); DVC keeps the rest (its outputs are in .gitignore files).
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "pipeline outputs and the shared remote"], cwd=repo, check=True)
    pushed = dvc(repo, venv_env, "push")
    assert "pushed" in pushed and remote.is_dir()

    fresh = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(repo), str(fresh)], check=True)
    assert not (fresh / "models/finetuned.keras").exists() and not (fresh / "data/processed/images.npy").exists()
    dvc(fresh, venv_env, "pull")
    for output in ("models/finetuned.keras", "data/processed/images.npy", "reports/metrics.json"):
        assert (fresh / output).read_bytes() == (repo / output).read_bytes(), output
    assert "Data and pipelines are up to date" in dvc(fresh, venv_env, "status")
    output = dvc(fresh, venv_env, "repro")
    assert not ran_stages(output), f"a pulled workspace reran stages: {sorted(ran_stages(output))}"


def _wait_for(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server not answering on {url} after {seconds} s")


@pytest.fixture
def mlflow_server(tmp_path, venv_env):
    """`make mlflow-server` on a free port, its store and artifacts in tmp_path."""
    (port,) = free_ports(1)
    store, artifacts = tmp_path / "server.db", tmp_path / "artifacts"
    server = subprocess.Popen(["make", "-s", "-C", str(REPO), "mlflow-server", f"MLFLOW_PORT={port}",
                               f"MLFLOW_SERVER_STORE=sqlite:///{store}", f"MLFLOW_ARTIFACTS={artifacts}"],
                              env=venv_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, server)
        yield url, artifacts
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_mlflow_server_binds_to_localhost_by_default():
    command = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "mlflow-server"], capture_output=True, text=True,
                             check=True).stdout
    assert "mlflow server" in command and "--host 127.0.0.1" in command


def _local_runs(repo: Path) -> int:
    with sqlite3.connect(repo / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def test_stages_and_app_use_the_tracking_server(mlflow_server, built_pipeline, tmp_path, venv_env, monkeypatch):
    url, artifacts = mlflow_server
    repo = copy_built_pipeline(built_pipeline, tmp_path / "repo")
    local_before = _local_runs(repo)
    env = {**venv_env, "MLFLOW_TRACKING_URI": url}
    output = dvc(repo, env, "repro", "-f", "-s", "finetune", "evaluate")
    assert {"finetune", "evaluate"} <= ran_stages(output)
    assert f"in {url}" in output  # each stage says where its run went
    assert _local_runs(repo) == local_before, "runs went to the project's SQLite file, not to the server"

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(load_params(repo / "params.yaml").mlflow.experiment)
    runs = {r.data.tags.get("stage"): r for r in client.search_runs([experiment.experiment_id])}
    assert {"finetune", "evaluate"} <= set(runs) and runs["finetune"].info.status == "FINISHED"
    card = json.loads((repo / "models/finetuned.json").read_text())
    assert card["mlflow_run_id"] == runs["finetune"].info.run_id
    # Artifacts travel through the server (clients need no access to its disk) and land in its folder.
    assert {"model_card.json", "history.json"} <= {a.path for a in client.list_artifacts(runs["finetune"].info.run_id)}
    assert any(artifacts.rglob("model_card.json"))
    (version,) = client.search_model_versions("name = 'braintumor-classifier'")
    assert version.run_id == runs["finetune"].info.run_id

    # The app resolves the same variable and fetches the registered model, with the evaluate run's check.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    params = load_params(repo / "params.yaml")
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri, repo)
    assert tracking_uri == url
    bundle = load_bundle(f"models:/braintumor-classifier/{version.version}", None, params.preprocess,
                         tracking_uri=tracking_uri)
    assert bundle.identity.mlflow_run_id == version.run_id and bundle.feature_check is not None
