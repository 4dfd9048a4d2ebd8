"""Fetching sources: local copies, atomic replacement, the record written beside the data."""

from __future__ import annotations

import json
import stat

import pytest

from braintumor.core.config import KaggleSource, LocalSource
from braintumor.data.download import fetch_source


def _dataset(root):
    (root / "Training" / "glioma").mkdir(parents=True)
    (root / "Training" / "glioma" / "a.jpg").write_bytes(b"\xff\xd8\xff one")
    (root / "Testing" / "notumor").mkdir(parents=True)
    (root / "Testing" / "notumor" / "b.jpg").write_bytes(b"\xff\xd8\xff two")
    return root


@pytest.mark.parametrize("mode", ["copy", "hardlink"])
def test_local_source_is_copied_with_a_record(tmp_path, mode):
    origin = _dataset(tmp_path / "origin")
    for path in [*origin.rglob("*"), origin]:  # a write-protected shared copy
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    dest = tmp_path / "data" / "raw" / "mine"
    record = fetch_source("mine", LocalSource(kind="local", path="origin", mode=mode), dest, tmp_path)
    assert (dest / "images" / "Training" / "glioma" / "a.jpg").read_bytes() == b"\xff\xd8\xff one"
    assert record["file_count"] == 2 and record["class_root"] == "images"
    assert json.loads((dest / "source.json").read_text()) == record
    assert (dest / "images" / "Training").stat().st_mode & stat.S_IWUSR  # not read-only like the origin
    assert [p.name for p in dest.parent.iterdir()] == ["mine"]  # no staging folder left


def test_failed_fetch_keeps_the_previous_copy_and_leaves_no_staging(tmp_path):
    origin = _dataset(tmp_path / "origin")
    dest = tmp_path / "raw" / "mine"
    fetch_source("mine", LocalSource(kind="local", path=str(origin)), dest, tmp_path)
    before = (dest / "source.json").read_text()
    with pytest.raises(FileNotFoundError, match="subdir 'nope' is not in the download"):
        fetch_source("mine", LocalSource(kind="local", path=str(origin), subdir="nope"), dest, tmp_path)
    assert (dest / "source.json").read_text() == before
    assert [p.name for p in dest.parent.iterdir()] == ["mine"]


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        fetch_source("x", LocalSource(kind="local", path="absent"), tmp_path / "raw" / "x", tmp_path)


def test_kaggle_without_credentials_leaves_nothing(tmp_path, monkeypatch):
    from braintumor.data.kaggle import KaggleCredentialsError

    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    source = KaggleSource(kind="kaggle", slug="masoudnickparvar/brain-tumor-mri-dataset")
    with pytest.raises(KaggleCredentialsError, match="make demo"):
        fetch_source("nick", source, tmp_path / "raw" / "nick", tmp_path)
    assert list((tmp_path / "raw").iterdir()) == []
