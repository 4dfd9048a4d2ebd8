"""Running OpenCV work in several processes without oversubscribing or deadlocking.

N worker processes should each run OpenCV on one thread, so that they use N cores instead of
fighting over them. The thread count must be set in the parent *before* forking: calling
``cv2.setNumThreads`` inside a forked child deadlocks when the parent had already run OpenCV's thread
pool (the child inherits the pool's lock held by a thread that does not exist in the child).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import cv2


@contextmanager
def single_threaded_opencv() -> Iterator[None]:
    """OpenCV on one thread inside the block (and in processes forked inside it), restored after."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)
