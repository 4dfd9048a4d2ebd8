"""The app preprocesses an uploaded file exactly as the pipeline cached it: the real data stages run on a
tiny phantom project, then every cached row is compared with the app's array for the same raw file."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from braintumor.core.config import load_params
from braintumor.serve.uploads import preprocess_upload
from conftest import REPO
from conftest import TINY, set_params

pytestmark = pytest.mark.slow


def test_app_array_equals_the_pipelines_cached_row(tmp_path, venv_env):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, {**TINY, "preprocess.image_size": 64, "preprocess.sharpen_amount": 0.7})
    env = {**venv_env, "BRAINTUMOR_ROOT": str(tmp_path)}
    for stage in (["download.py", "phantom"], ["merge.py"], ["preprocess.py"]):
        result = subprocess.run([sys.executable, str(REPO / "stages" / stage[0]), *stage[1:]], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"

    params = load_params(tmp_path / "params.yaml").preprocess
    images = np.load(tmp_path / "data/processed/images.npy", mmap_mode="r")
    index = pd.read_csv(tmp_path / "data/processed/index.csv")
    paths = pd.read_csv(tmp_path / "data/interim/manifest.csv", keep_default_na=False).set_index("id")["path"]
    assert len(index) == len(images) > 60 and images.shape[1:] == (64, 64)
    suffixes = set()
    for row, file_id in zip(index["row"], index["id"]):
        path = tmp_path / paths[file_id]
        suffixes.add(path.suffix.lower())
        _, array = preprocess_upload(path.read_bytes(), params, max_bytes=2**24, max_pixels=10**7)
        np.testing.assert_array_equal(array, images[row], err_msg=str(path))
    assert {".jpg", ".png"} <= suffixes  # both encodings of the phantom source were compared
