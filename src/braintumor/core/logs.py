"""One log format for every stage: concise lines that read well in CI and `dvc repro` output."""

from __future__ import annotations

import logging


def setup_logging(stage: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s", force=True)
    # faiss reports which CPU build it loaded, at INFO, on every import.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    return logging.getLogger(f"braintumor.{stage}")
