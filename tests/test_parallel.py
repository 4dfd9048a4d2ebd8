"""core/parallel: one worker-pool helper for merge (processes), preprocess (processes) and the phantom (threads)."""

from __future__ import annotations

import cv2
import pytest

from braintumor.core.parallel import map_in_workers, resolve_workers


def _square_or_fail(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x * x


def _opencv_threads(_: int) -> int:
    return cv2.getNumThreads()


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_results_come_back_in_order(kind):
    items = [3, 1, 2, 0, 5, 4]
    assert map_in_workers(_square_or_fail, items, 2, kind=kind, chunksize=2) == [x * x for x in items]


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_failing_task_raises_its_own_error(kind):
    with pytest.raises(ValueError, match="seven"):
        map_in_workers(_square_or_fail, range(20), 2, kind=kind)


def test_worker_processes_run_opencv_on_one_thread_and_the_parent_is_restored():
    before = cv2.getNumThreads()
    assert map_in_workers(_opencv_threads, range(4), 2) == [1, 1, 1, 1]
    assert cv2.getNumThreads() == before


def test_resolve_workers_and_kind_are_checked():
    assert resolve_workers(8, 3) == 3 and resolve_workers(1, 0) == 1 and resolve_workers(0, 10**6) >= 1
    with pytest.raises(ValueError, match="got -1"):
        resolve_workers(-1, 5)
    with pytest.raises(ValueError, match="'process', 'thread'"):
        map_in_workers(_square_or_fail, range(4), 2, kind="fibre")


def test_positions_in_thread_chunks_come_back_in_order_whatever_the_split():
    from braintumor.core.parallel import map_positions_in_threads

    for count, workers, chunks in ((10, 2, 3), (10, 2, 0), (1, 2, 5), (0, 2, 4)):
        assert map_positions_in_threads(lambda rows: (rows * 10).tolist(), count, workers, chunks) == [10 * k for k in range(count)]
