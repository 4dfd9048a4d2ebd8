"""One log format for every stage: concise lines that read well in CI and `dvc repro` output."""

from __future__ import annotations

import logging
import time


def setup_logging(stage: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s", force=True)
    # faiss reports which CPU build it loaded, at INFO, on every import.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    return logging.getLogger(f"braintumor.{stage}")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Progress:
    """Logs how far a long loop has come, at most once every ``every`` seconds: done / total, the rate and
    the time left. On real data a stage's loop can run for a quarter of an hour (the activation cache:
    13-23 minutes on 2 cores, README "Real data"), and its terminal would otherwise show nothing between
    the stage's first line and its last. Nothing is logged once the loop is done (the stage's own summary
    line says that) or when it ends within ``every`` seconds (the demo and the tests stay as quiet as before)."""

    def __init__(self, log: logging.Logger, what: str, total: int, *, unit: str = "images", every: float = 60.0,
                 clock=time.monotonic) -> None:
        self.log, self.what, self.total, self.unit, self.every, self.clock = log, what, int(total), unit, every, clock
        self.done = 0
        self._start = self._last = clock()

    def advance(self, count: int) -> None:
        self.done += int(count)
        now = self.clock()
        if self.done >= self.total or now - self._last < self.every:
            return
        self._last = now
        rate = self.done / max(now - self._start, 1e-9)
        self.log.info("%s: %d / %d %s (%.0f%%), %.1f %s/s, about %s left", self.what, self.done, self.total, self.unit,
                      100 * self.done / self.total, rate, self.unit, _duration((self.total - self.done) / rate))
