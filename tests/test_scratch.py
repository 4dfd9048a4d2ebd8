"""Process scratch folders: removed when the process ends, including by SIGTERM once the server asked for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys, time
from braintumor.core.scratch import exit_on_sigterm, process_scratch_folder
if sys.argv[1] == "handled":
    exit_on_sigterm()
folder = process_scratch_folder("braintumor-test-")
(folder / "model.keras").write_bytes(b"weights")
print(folder, flush=True)
if sys.argv[2] == "wait":
    time.sleep(120)
"""


def run_until_printed(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(tmp_path)})
    folder = Path(process.stdout.readline().strip())
    assert folder.parent == tmp_path
    return process, folder


def test_the_folder_is_removed_when_the_process_ends(tmp_path):
    process, folder = run_until_printed(tmp_path, "handled", "exit")
    assert process.wait(timeout=60) == 0
    assert not folder.exists()


@pytest.mark.parametrize("handled", [True, False])
def test_sigterm_removes_the_folder_only_once_exit_on_sigterm_ran(tmp_path, handled):
    process, folder = run_until_printed(tmp_path, "handled" if handled else "default", "wait")
    assert (folder / "model.keras").is_file()  # the handler was installed before the path was printed
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    if handled:
        assert code == 143 and not folder.exists()
    else:  # Python's default: the process just ends, and the folder stays (what every stopped server did)
        assert code == -signal.SIGTERM and folder.exists()
