"""The stage runner drops TensorFlow's known start-up lines from stderr and nothing else."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from braintumor.core.quiet import FILTERED_ENV, is_noise, rerun_filtered, run_quietly

# Captured from a real stage run on a CPU machine (TensorFlow 2.20).
TF_CHATTER = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796315528.405581   26132 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. "
    "To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1796315528.406170   26132 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
    "E0000 00:00:1796314920.031830   23134 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796315530.100000   26132 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
    "E0000 00:00:1796522842.046003   10746 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512. "
    "Falling back to the default Eigen-based implementation if present.",
    "WARNING: No file hash info found for '/work/rd_one/models/base.keras'. It won't be created.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
]
KEPT = [
    "[train_base] feature cache: 4998 training and 536 validation vectors in 520.9 s",
    # A GPU machine whose driver is broken must still see why.
    "E0000 00:00:1796314920.031830   23134 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE (100)",
    "Traceback (most recent call last):",
    "ValueError: split.csv has no weight column",
    "WARNING: Output 'models/base.keras' of stage 'train_base' changed because it is 'not in cache'.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for GPU.",  # not the CPU one: a different set-up, shown
]


def test_only_the_known_messages_are_noise():
    assert all(is_noise(line) for line in TF_CHATTER)
    assert not any(is_noise(line) for line in KEPT)


def test_the_runner_forwards_everything_else_and_the_exit_status(tmp_path, capfd):
    script = tmp_path / "stage.py"
    lines = [TF_CHATTER[0], KEPT[0], *TF_CHATTER[1:], *KEPT[1:]]
    script.write_text(
        "import sys\n"
        f"for line in {lines!r}:\n"
        "    print(line, file=sys.stderr)\n"
        "print('metrics written')\n"
        "sys.exit(3)\n"
    )
    assert run_quietly([sys.executable, str(script)]) == 3
    out, err = capfd.readouterr()
    assert out == "metrics written\n"
    assert err.splitlines() == KEPT


def test_a_command_reruns_itself_filtered_once(tmp_path, monkeypatch):
    """rerun_filtered: the first process starts the same command as a filtered child, which (and whatever it
    starts) does the work unfiltered by itself, so nothing is wrapped twice."""
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import sys\nprint({TF_CHATTER[1]!r}, file=sys.stderr)\n")
    script = tmp_path / "tool.py"
    script.write_text(
        "import os, subprocess, sys\n"
        "from braintumor.core.quiet import rerun_filtered\n"
        "if (status := rerun_filtered([__file__, *sys.argv[1:]])) is not None:\n"
        "    sys.exit(status)\n"
        f"print({TF_CHATTER[0]!r}, file=sys.stderr)\n"
        f"print({KEPT[0]!r}, file=sys.stderr)\n"
        # a grandchild writes to the inherited stderr: the same filter
        f"subprocess.run([sys.executable, {str(grandchild)!r}], check=True)\n"
        "print('pid', os.getpid(), sys.argv[1:])\n"
        "sys.exit(4)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != FILTERED_ENV}
    result = subprocess.run([sys.executable, str(script), "--flag"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4
    assert result.stderr.splitlines() == [KEPT[0]]
    assert result.stdout.count("pid") == 1 and "['--flag']" in result.stdout
    # In a process already filtered, it is the work itself: None, nothing started.
    monkeypatch.setenv(FILTERED_ENV, "1")
    assert rerun_filtered(["-c", "raise SystemExit(9)"]) is None


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# A benchmark that imports any of these (at the top or inside a function) starts TensorFlow.
TENSORFLOW_IMPORT = re.compile(r"^\s*(import (keras|tensorflow)\b|from (keras|tensorflow)\b|"
                               r"(from|import) braintumor\.(model|explain|serve|evaluate|predict)\b)", re.M)
GUARD = re.compile(r'^if __name__ == "__main__":.*\n    rerun_script_filtered\(__file__\)$', re.M)


def test_every_benchmark_that_starts_tensorflow_reruns_itself_filtered_before_it_does():
    """Importing TensorFlow prints its chatter (TF_CPP_MIN_LOG_LEVEL does not stop it): the rerun must come first.
    real_data.py and peers.py import no TensorFlow at the top and rerun in main() instead."""
    starting = {}
    for path in sorted(BENCHMARKS.glob("*.py")):
        source = path.read_text()
        first = TENSORFLOW_IMPORT.search(source)
        if first is None or path.name in {"real_data.py", "peers.py"}:
            continue
        guard = GUARD.search(source)
        starting[path.name] = guard is not None and guard.start() < first.start()
    assert len(starting) >= 7, sorted(starting)
    assert all(starting.values()), sorted(name for name, ok in starting.items() if not ok)


def test_a_benchmark_run_shows_no_tensorflow_chatter():
    """bench_gradcam.py imports Keras at the top; its --help still prints nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in (FILTERED_ENV, "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_gradcam.py"), "--help"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert result.stderr == ""
