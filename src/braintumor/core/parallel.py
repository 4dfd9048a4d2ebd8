"""Worker pools: one function that maps a task over items in processes or threads, keeping order.

N worker processes should each run OpenCV on one thread, so that they use N cores instead of
fighting over them. The thread count must be set in the parent *before* forking: calling
``cv2.setNumThreads`` inside a forked child deadlocks when the parent had already run OpenCV's thread
pool (the child inherits the pool's lock held by a thread that does not exist in the child).
:func:`map_in_workers` does this for its processes. Processes are forked where the platform can (the
workers share the imported modules and need no ``__main__`` guard), else spawned; a worker that dies
raises ``BrokenProcessPool`` instead of hanging the parent. The first task that fails stops the
handing out of the rest and its exception is raised in the caller.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, Literal, TypeVar

import cv2
import numpy as np

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def on_one_thread(get_threads: Callable[[], int], set_threads: Callable[[int], None]) -> Iterator[None]:
    """A library's thread count (read by ``get_threads``, set by ``set_threads``) at 1 inside the block,
    restored after."""
    previous = get_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(previous)


def single_threaded_opencv() -> AbstractContextManager[None]:
    """OpenCV on one thread inside the block (and in processes forked inside it), restored after."""
    return on_one_thread(cv2.getNumThreads, cv2.setNumThreads)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(workers: int, jobs: int) -> int:
    """Workers for ``jobs`` tasks: ``workers`` (0 = one per available core), at most ``jobs``, at least 1.

    Raises:
        ValueError: if ``workers`` is negative.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per core), got {workers}")
    return max(1, min(workers or available_cores(), jobs))


def map_in_workers(task: Callable[[T], R], items: Iterable[T], workers: int, *,
                   kind: Literal["process", "thread"] = "process", chunksize: int = 1) -> list[R]:
    """``[task(item) for item in items]``, computed by ``workers`` processes or threads.

    Args:
        task: a module-level function (processes pickle it by name).
        items: its arguments, one per call; results come back in this order.
        workers: pool size; 1 runs every call here, in order.
        kind: ``"process"`` for CPU-bound work that holds the GIL, ``"thread"`` for work that
            releases it (NumPy and OpenCV array operations) and so needs no process start-up.
        chunksize: items sent to a process at a time (ignored by threads).
    """
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1 or len(items) <= 1:
        return [task(item) for item in items]
    if kind == "process":
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool: Executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    elif kind == "thread":
        pool = ThreadPoolExecutor(workers)
    else:
        raise ValueError(f"unknown worker kind {kind!r}; allowed: 'process', 'thread'")
    # The processes are forked inside map(), so inside this block (see the module docstring).
    with single_threaded_opencv() if kind == "process" else nullcontext():
        try:
            return list(pool.map(task, items, chunksize=chunksize))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def map_positions_in_threads(task: Callable[[np.ndarray], Iterable[R]], count: int, workers: int, chunks: int) -> list[R]:
    """``task`` over positions ``0 .. count - 1`` split into ``chunks`` runs (at least one), in ``workers``
    threads with OpenCV on one thread each, its results flattened in order. For array work that releases
    the GIL (OpenCV's warps and ECC, FAISS's search) on items the threads share without copying."""
    parts = np.array_split(np.arange(count), max(1, chunks))
    with single_threaded_opencv():
        return [result for part in map_in_workers(task, parts, workers, kind="thread") for result in part]
