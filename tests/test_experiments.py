"""The daily workflow, as a user runs it: a baseline `dvc repro`, then a queued grid of two learning
rates, compared with `dvc exp show`, `dvc plots diff` and MLflow (store, REST server, model registry).

One clean clone of the repo with a tiny phantom configuration; every command is the real one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import copy_built_pipeline, dvc, ran_stages
from test_tracking import run_queue

pytestmark = pytest.mark.slow

RATES = ("0.001", "0.00001")  # neither is params.yaml's 1e-4: each must rerun finetune
# What a learning-rate change must rerun; everything upstream comes from the DVC run cache.
DOWNSTREAM_OF_FINETUNE = {"finetune", "export", "evaluate", "gradcam"}


@pytest.fixture(scope="module")
def experiments(built_pipeline, tmp_path_factory, venv_env) -> tuple[Path, list]:
    """A clone whose baseline `dvc repro` has run (conftest.built_pipeline), plus a queued grid of two
    learning rates run by `dvc queue start`; returns the clone and `dvc exp show --json`.

    The grid's runs convert no exports (`export.formats=[]`; test_export covers them): the export stage
    still reruns, as it must, but without its converters, which would take half a minute per run."""
    repo = copy_built_pipeline(built_pipeline, tmp_path_factory.mktemp("workflow"))
    dvc(repo, venv_env, "exp", "run", "--queue", "-S", f"finetune.learning_rate={','.join(RATES)}",
        "-S", "export.formats=[]")
    run_queue(repo, venv_env, timeout=900)
    shown = json.loads(dvc(repo, venv_env, "exp", "show", "--json"))
    return repo, shown


def _experiment_rows(shown: list) -> dict[str, dict]:
    """DVC experiment name -> its data (params, metrics), from `dvc exp show --json`."""
    (baseline,) = [entry for entry in shown if entry["rev"] != "workspace"]
    rows = {}
    for experiment in baseline.get("experiments") or []:
        (revision,) = experiment["revs"]
        rows[experiment["name"]] = revision["data"]
    return rows


def test_repro_after_a_run_does_nothing(experiments, venv_env):
    repo, _ = experiments
    output = dvc(repo, venv_env, "repro")
    assert ran_stages(output) == set(), output
    assert "up to date" in dvc(repo, venv_env, "status")


def test_queued_grid_lands_in_exp_show_with_params_and_both_models_metrics(experiments, venv_env):
    repo, shown = experiments
    rows = _experiment_rows(shown)
    assert len(rows) == 2, rows.keys()
    rates = set()
    for data in rows.values():
        rates.add(str(data["params"]["params.yaml"]["data"]["finetune"]["learning_rate"]))
        metrics = data["metrics"]["reports/metrics.json"]["data"]
        for model in ("base", "finetuned"):
            assert 0.0 <= metrics[model]["accuracy"] <= 1.0 and "macro_f1" in metrics[model]
    assert rates == {str(float(r)) for r in RATES} or rates == set(RATES)
    # Each experiment reran only what the learning rate touches.
    for name in rows:
        logs = subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=venv_env, capture_output=True,
                              text=True).stdout
        assert ran_stages(logs) == DOWNSTREAM_OF_FINETUNE, (name, logs[-3000:])


def test_plots_diff_compares_two_experiments(experiments, venv_env):
    repo, shown = experiments
    names = sorted(_experiment_rows(shown))
    out = repo / "plots-diff"
    dvc(repo, venv_env, "plots", "diff", *names, "-o", str(out))
    html = (out / "index.html").read_text()
    for name in names:
        assert name in html
    assert "confusion" in html.lower() or "predicted" in html


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(experiments, venv_env):
    repo, _ = experiments
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}", "--workers", "1"],
        cwd=repo, env=venv_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url
    server.terminate()
    server.wait(timeout=30)


def _post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}", timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_server_returns_one_group_per_experiment_with_its_params(experiments, mlflow_server):
    _, shown = experiments
    rows = _experiment_rows(shown)
    experiment = _get(mlflow_server, "experiments/get-by-name?experiment_name=braintumor")["experiment"]
    groups = _post(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                  "filter": "tags.is_group = 'true'"})["runs"]
    by_name = {g["info"]["run_name"]: g for g in groups}
    assert set(rows) <= set(by_name), (rows.keys(), by_name.keys())
    for name, data in rows.items():
        group = by_name[name]
        params = {p["key"]: p["value"] for p in group["data"]["params"]}
        rate = data["params"]["params.yaml"]["data"]["finetune"]["learning_rate"]
        assert float(params["finetune.learning_rate"]) == float(rate)
        tags = {t["key"]: t["value"] for t in group["data"]["tags"]}
        assert tags["dvc_experiment"] == name and len(tags["git_commit"]) == 40
        children = _post(mlflow_server, "runs/search", {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"tags.mlflow.parentRunId = '{group['info']['run_id']}'"})["runs"]
        stages = {next(t["value"] for t in c["data"]["tags"] if t["key"] == "stage") for c in children}
        assert stages == DOWNSTREAM_OF_FINETUNE
        metrics = {m["key"] for m in group["data"]["metrics"]}
        assert "finetune.test_accuracy" in metrics


def test_each_run_registers_its_finetuned_model_and_it_loads_by_uri(experiments, mlflow_server, venv_env):
    repo, _ = experiments
    query = urllib.parse.urlencode({"filter": "name='braintumor-classifier'"})
    versions = _get(mlflow_server, f"model-versions/search?{query}")
    # The baseline repro and the two experiments each registered one version.
    assert len(versions["model_versions"]) == 3
    latest = max(int(v["version"]) for v in versions["model_versions"])
    script = (
        "import json, sys, numpy as np\n"
        "from braintumor.core.config import load_params\n"
        "from braintumor.serve.bundle import load_bundle\n"
        "params = load_params('params.yaml')\n"
        f"bundle = load_bundle('models:/braintumor-classifier/{latest}', None, params.preprocess,\n"
        "                     tracking_uri=sys.argv[1])\n"
        "p = bundle.model.predict(np.zeros((1, 48, 48, 1), 'float32'), verbose=0)\n"
        "print(json.dumps({'shape': list(p.shape), 'run_id': bundle.identity.mlflow_run_id,\n"
        "                  'temperature': bundle.calibration.temperature, 'source': bundle.calibration.source}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, mlflow_server], cwd=repo, env=venv_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    version = next(v for v in versions["model_versions"] if int(v["version"]) == latest)
    assert loaded["shape"] == [1, 4] and loaded["run_id"] == version["run_id"]
    # The calibration fitted by that run's evaluate stage travels with the registered version.
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert loaded["source"] == "calibration.json"
    assert loaded["temperature"] == pytest.approx(float(tags["temperature"]))
