"""Shared by every stage: config, paths, MLflow tracking, atomic writes, worker pools, image IO, logging."""
