"""Run a stage script with TensorFlow's native start-up chatter filtered out of its stderr.

TensorFlow's C++ runtime writes lines such as "Could not find cuda drivers on your machine" and
"oneDNN custom operations are on" straight to file descriptor 2, partly before its logging is set up,
so ``TF_CPP_MIN_LOG_LEVEL`` does not silence them all. On a CPU machine they say nothing a user can
act on, and they bury the stage's own progress lines. ``dvc.yaml`` therefore runs each stage as

    python -m braintumor.core.quiet stages/<stage>.py [args...]

which starts the script as a child process, passes its stdout through untouched, forwards its stderr
line by line as it arrives minus the lines matched by :data:`NOISE`, and exits with the child's
status (``make demo`` filters ``dvc exp run`` the same way, which also drops DVC's warnings about
outputs a fresh clone has not built yet). Only those exact messages are dropped: every other line (warnings, errors, tracebacks, a CUDA
error on a machine that has a GPU) is forwarded. ``python stages/<stage>.py`` still runs a stage
unfiltered.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import IO, Iterable

# Each pattern matches one known message in full (the glog prefix "I0000 00:00:1796315528.405581 26132 "
# is matched loosely: its date, time and thread id vary).
_GLOG = r"^[IWE]\d{4} [\d:.]+\s+\d+ "
NOISE = tuple(re.compile(pattern) for pattern in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    _GLOG + r"port\.cc:\d+\] oneDNN custom operations are on\.",
    _GLOG + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.$",
    # 303 is "no CUDA driver at all" (a CPU machine); other cuInit failures (a broken GPU set-up) pass.
    _GLOG + r"cuda_platform\.cc:\d+\] failed call to cuInit: .*UNKNOWN ERROR \(303\)$",
    _GLOG + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .*, in other operations, rebuild TensorFlow with the appropriate compiler flags\.$",
    # On a CPU without AVX-512's float16 instructions (seen on an AMD EPYC), once per stage that reads the
    # float16 activation cache: TensorFlow falls back to its Eigen kernels by itself; finetune.cache_dtype is the knob.
    _GLOG + r"util\.cc:\d+\] oneDNN supports DT_HALF only on platforms with AVX-512\. Falling back to the default "
    r"Eigen-based implementation if present\.$",
    # tf.data graphs saved by a newer Keras name an attribute this TensorFlow ignores; harmless.
    _GLOG + r"node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool which is not in the op definition",
    # LiteRT, on every interpreter it starts: its default CPU delegate, nothing to act on.
    r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$",
    # DVC, at the start of a first `dvc exp run` in a fresh clone: the outputs are simply not built yet.
    r"^WARNING: No file hash info found for '.*'\. It won't be created\.$",
))


def is_noise(line: str) -> bool:
    """One of the known start-up messages of :data:`NOISE` (TensorFlow's on a CPU machine, and DVC's on a fresh clone)."""
    text = line.rstrip("\r\n")
    return any(pattern.search(text) for pattern in NOISE)


def forward_lines(lines: Iterable[str], out: IO[str]) -> None:
    """Write every line that is not noise to ``out`` as it comes, flushed."""
    for line in lines:
        if not is_noise(line):
            out.write(line)
            out.flush()


def run_quietly(command: list[str], **popen_kwargs) -> int:
    """Run ``command`` (``cwd``, ``env``... as for Popen) with its stderr filtered through
    :func:`forward_lines`; its exit status."""
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                          **popen_kwargs) as child:
        forward_lines(child.stderr, sys.stderr)
    return child.returncode


# Set for the filtered child and inherited by everything it starts: their stderr already goes through the filter.
FILTERED_ENV = "BRAINTUMOR_STDERR_FILTERED"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m braintumor.core.quiet SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    # MLflow announces its SQLite schema set-up at INFO on every fresh store; the stage logs the run itself.
    env = {"MLFLOW_LOGGING_LEVEL": "WARNING", **os.environ, FILTERED_ENV: "1"}
    return run_quietly([sys.executable, *args], env=env)


def rerun_filtered(python_args: list[str]) -> int | None:
    """For a command that imports TensorFlow in its own process (batch prediction, the benchmarks): None
    in a process whose stderr is already filtered (go on with the work); otherwise run
    ``python *python_args`` (the same command) as such a child and return its exit status.
    """
    if os.environ.get(FILTERED_ENV):
        return None
    return main(python_args)


def rerun_script_filtered(script: str) -> None:
    """For a script run as ``python SCRIPT ARGS...`` (a benchmark), called before it imports TensorFlow, whose
    import alone prints the chatter: unless its stderr is filtered already, run the same command as a filtered
    child (:func:`rerun_filtered`) and exit with the child's status."""
    status = rerun_filtered([script, *sys.argv[1:]])
    if status is not None:
        sys.exit(status)


if __name__ == "__main__":
    sys.exit(main())
