"""Benchmark of the web app: upload-to-result time through the Gradio API (target: p50 < 1.5 s).

A ResNet50 classifier at 224 px (``weights: none``: ImageNet weights cannot be downloaded here, and the
cost is the same) is saved with a model card and a calibration file into a temp ``models/`` folder;
``python -m braintumor.serve.app`` serves it on a free loopback port, as ``make app`` would. A
``gradio_client`` then uploads a 512 x 512 phantom slice (PNG) ``--calls`` times after ``--warmup``
calls. One call is the user's wait: upload, decode, preprocessing, prediction with Grad-CAM,
calibration, the out-of-distribution rule, PNG encoding of both images, and their download.

    .venv/bin/python benchmarks/bench_app.py [--calls 20] [--warmup 3] [--tta flip_shift]

Prints one JSON line: p50/p90/max of the call (``api_s``) and of the server's own share (``server_s``,
from the result's details), and ``other_cpu_s``, CPU time other programs took during the timed calls
(the machine is shared; a run that had to share its cores overstates the times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from braintumor.core.quiet import rerun_script_filtered  # noqa: E402

if __name__ == "__main__":  # before TensorFlow is imported: its start-up chatter filtered out of stderr
    rerun_script_filtered(__file__)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

from braintumor.core.config import CLASS_NAMES, ModelParams, PreprocessParams, load_params  # noqa: E402
from braintumor.model.tta import TTA_MODES  # noqa: E402

SIZE = 224
TARGET_P50_S = 1.5


def cpu_seconds(server_pid: int) -> tuple[float, float]:
    """(CPU seconds used by all processes on the machine, by this process and the app server)."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    server = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
    mine = os.times()
    return busy / ticks, mine.user + mine.system + (int(server[11]) + int(server[12])) / ticks  # utime, stime


def write_model(models: Path, tta: str) -> None:
    """models/finetuned.keras (ResNet50, 224 px, random weights) with its card and a calibration entry that
    says the evaluate stage predicted with ``tta``, so the app predicts each upload the same way."""
    import keras

    from braintumor.evaluate.calibration import calibration_entry
    from braintumor.model.backbones import build_model

    keras.utils.set_random_seed(0)
    model = build_model(ModelParams(backbone="resnet50", weights="none"), SIZE)
    models.mkdir(parents=True)
    model.save(models / "finetuned.keras")
    preprocess = PreprocessParams(image_size=SIZE)
    card = {"model_file": "finetuned.keras", "mlflow_run_id": "benchmark", "trained_at": None, "git_commit": None,
            "dvc_experiment": None, "backbone": "resnet50", "image_size": SIZE, "class_names": list(CLASS_NAMES),
            "preprocess": preprocess.model_dump(exclude={"workers"})}
    (models / "finetuned.json").write_text(json.dumps(card))
    probabilities = model.predict(np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 1)).astype("float32"), verbose=0)
    # Quantile 0 so that every upload is labelled and gets its Grad-CAM overlay: the full path is timed.
    entry = calibration_entry(1.0, probabilities, tta)
    entry["val_max_probability_quantiles"] = {key: 0.0 for key in entry["val_max_probability_quantiles"]}
    (models / "calibration.json").write_text(json.dumps({"finetuned": entry}))


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "-m", "braintumor.serve.app", "--model", str(model), "--port", str(port)],
                               cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"app exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("app did not start within 5 minutes")


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 3), "p90": round(float(np.percentile(values, 90)), 3),
            "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tta", choices=TTA_MODES, default=load_params(REPO / "params.yaml").evaluate.tta,
                        help="test-time augmentation the app predicts with (default: params.yaml's evaluate.tta)")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    from braintumor.data.phantom.source import render_slice

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model(tmp / "models", args.tta)
        upload = tmp / "slice.png"
        cv2.imwrite(str(upload), render_slice(np.random.default_rng(3), "glioma", 512)[0])
        process, url = start_server(tmp / "models" / "finetuned.keras", tmp / "server.log")
        try:
            client = Client(url, verbose=False, download_files=str(tmp / "downloads"), analytics_enabled=False)
            for _ in range(args.warmup):
                client.predict(handle_file(str(upload)), api_name="/classify")
            api, server = [], []
            machine_before, mine_before = cpu_seconds(process.pid)
            for _ in range(args.calls):
                started = time.perf_counter()
                label, _, _, overlay, details = client.predict(handle_file(str(upload)), api_name="/classify")
                api.append(time.perf_counter() - started)
                server.append(details["seconds"])
                assert label["label"] in CLASS_NAMES and overlay, (label, overlay)
            machine_after, mine_after = cpu_seconds(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    result = {
        "benchmark": "app_upload_to_result", "backbone": "resnet50", "image_size": SIZE, "upload": "512x512 PNG",
        "tta": args.tta, "calls": args.calls, "api_s": percentiles(api), "server_s": percentiles(server),
        "target_p50_s": TARGET_P50_S, "meets_target": bool(np.percentile(api, 50) < TARGET_P50_S),
        "nproc": os.cpu_count(), "python": platform.python_version(),
        "other_cpu_s": round((machine_after - machine_before) - (mine_after - mine_before), 1),
        "timed_wall_s": round(sum(api), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
