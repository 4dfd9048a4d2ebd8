"""What every benchmark reports beside its numbers: the machine, and how busy it was meanwhile."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    """CPU model, core count and library versions (read from the installed packages: importing TensorFlow
    here would print its CPU banner into the benchmark's output)."""
    from importlib.metadata import version

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    # TensorFlow runs about twice as fast with AVX-512 as with AVX2 only: a time means little without it.
    return {"nproc": os.cpu_count(), "cpu_model": model, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),  # set: the AVX2 kernels were emulated
            "python": platform.python_version(),
            "tensorflow": version("tensorflow"), "keras": version("keras"), "numpy": version("numpy")}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by all processes on the machine, by this process): their difference over a
    run is what other programs took, so a number measured on a busy machine says so."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    mine = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), mine.user + mine.system
