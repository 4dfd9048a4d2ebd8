"""Stages download and merge: the sources (Kaggle, local folders, the phantom), deduplication, the manifest."""
