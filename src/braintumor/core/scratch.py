"""Scratch folders that live as long as the process, and a SIGTERM that lets them be removed.

The app writes its example slices, and a registry URI is fetched into, a temporary folder that is read
for as long as the process serves. Python removes nothing on ``kill`` (SIGTERM, what ``docker stop``, systemd
and test harnesses send): its default action ends the process without running ``atexit``, so every
stopped server left its folders in ``/tmp``. :func:`exit_on_sigterm` turns the signal into
``SystemExit``, which unwinds ``finally`` blocks and runs ``atexit`` like Ctrl-C does.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import sys
import tempfile
from pathlib import Path

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # the shell's convention for "ended by signal 15"


def process_scratch_folder(prefix: str) -> Path:
    """A new private folder under the system's temp folder, removed with its contents when the process
    exits normally, on an uncaught exception, on Ctrl-C, or on SIGTERM once :func:`exit_on_sigterm` ran."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(_remove_if_present, folder)
    return folder


def _remove_if_present(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)


def exit_on_sigterm() -> None:
    """Make SIGTERM end the process through ``SystemExit`` (exit code 143), so exit handlers run.

    Only the main thread may install signal handlers; servers call this once from ``main``.
    """
    signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum, frame) -> None:
    sys.exit(SIGTERM_EXIT_CODE)
