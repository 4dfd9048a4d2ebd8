"""Where ``model.weights: imagenet`` comes from: the local directory, Keras's cache, Keras's download
(exercised at its client boundary, ``keras.utils.get_file``), or one clear error; and the fresh-machine
demo that stops before any stage when none of them is there."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from braintumor.model import weights
from braintumor.model.weights import (
    IMAGENET_FILES,
    WEIGHTS_DIR_ENV,
    ResolvedWeights,
    WeightsUnavailableError,
    resolve_weights,
    unreachable_reason,
)
from conftest import REPO, copy_repo

XCEPTION = IMAGENET_FILES["xception"]


@pytest.fixture
def empty_homes(tmp_path, monkeypatch) -> Path:
    """No weights anywhere: an empty Keras cache, no local directory."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    return tmp_path


def test_registry_names_the_files_keras_downloads():
    """The URLs and md5s are Keras's own; a Keras upgrade that moves them fails here."""
    from keras.src.applications import densenet, efficientnet, mobilenet_v3, resnet, xception

    from braintumor.model.backbones import BACKBONES

    modules = {"resnet50": resnet, "xception": xception, "efficientnetb0": efficientnet,
               "densenet121": densenet, "mobilenetv3small": mobilenet_v3}
    urls = {
        "resnet50": resnet.BASE_WEIGHTS_PATH + "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "xception": xception.WEIGHTS_PATH_NO_TOP,
        "efficientnetb0": efficientnet.BASE_WEIGHTS_PATH + "efficientnetb0_notop.h5",
        "densenet121": densenet.DENSENET121_WEIGHT_PATH_NO_TOP,
        "mobilenetv3small": mobilenet_v3.BASE_WEIGHT_PATH + "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    }
    assert set(IMAGENET_FILES) == set(BACKBONES)
    for name, spec in IMAGENET_FILES.items():
        assert spec.url == urls[name], name
        assert spec.url.endswith("/" + spec.keras_file), name
        assert spec.md5 in inspect.getsource(modules[name]), name
    assert XCEPTION.local_names == ("xception_imagenet_notop.weights.h5",
                                    "xception_weights_tf_dim_ordering_tf_kernels_notop.h5")


def test_the_weights_module_needs_no_tensorflow():
    """The demo's preflight imports it: a lookup or an offline failure must not wait for TensorFlow."""
    code = "import sys, braintumor.demo, braintumor.model.weights; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_local_directory_comes_first_then_keras_cache(empty_homes, monkeypatch, no_network):
    cache = empty_homes / "keras" / "models"
    cache.mkdir(parents=True)
    (cache / XCEPTION.keras_file).write_bytes(b"cached")
    # Only Keras's cache: used, and said so.
    found = resolve_weights("xception", "imagenet", empty_homes)
    assert found == ResolvedWeights("imagenet", cache / XCEPTION.keras_file, "keras_cache")
    # The directory of the setting, with Keras's download name: preferred over the cache.
    local = empty_homes / "weights"
    local.mkdir()
    (local / XCEPTION.keras_file).write_bytes(b"local legacy")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(local))
    assert resolve_weights("xception", "imagenet", empty_homes) == ResolvedWeights(
        "imagenet", local / XCEPTION.keras_file, "local_dir")
    # ... and the Keras 3 file name is preferred over the legacy one in the same directory.
    (local / "xception_imagenet_notop.weights.h5").write_bytes(b"local keras 3")
    chosen = resolve_weights("xception", "imagenet", empty_homes)
    assert chosen.path == local / "xception_imagenet_notop.weights.h5" and chosen.source == "local_dir"
    assert chosen.record() == {"setting": "imagenet", "source": "local_dir",
                               "file": str(local / "xception_imagenet_notop.weights.h5")}
    # Another backbone has no file there: the directory is per-file, not a blanket answer.
    (cache / IMAGENET_FILES["resnet50"].keras_file).write_bytes(b"cached resnet")
    assert resolve_weights("resnet50", "imagenet", empty_homes).source == "keras_cache"


def test_none_and_paths_resolve_without_lookup(empty_homes, no_network):
    assert resolve_weights("xception", "none", empty_homes) == ResolvedWeights("none", None, "none")
    (empty_homes / "w.h5").write_bytes(b"x")
    assert resolve_weights("xception", "w.h5", empty_homes) == ResolvedWeights("w.h5", empty_homes / "w.h5", "path")
    with pytest.raises(FileNotFoundError, match=str(empty_homes / "nope.h5")):
        resolve_weights("xception", "nope.h5", empty_homes)


def test_online_path_calls_keras_download_with_the_backbones_file(empty_homes, monkeypatch):
    calls = []

    def fake_get_file(fname, origin, cache_dir, cache_subdir, file_hash):
        calls.append((fname, origin, cache_dir, cache_subdir, file_hash))
        target = Path(cache_dir) / cache_subdir / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"downloaded")
        return str(target)

    monkeypatch.setattr(weights, "unreachable_reason", lambda url, timeout: None)  # as if online
    monkeypatch.setattr("keras.utils.get_file", fake_get_file)
    spec = IMAGENET_FILES["densenet121"]
    resolved = resolve_weights("densenet121", "imagenet", empty_homes)
    cache = empty_homes / "keras"
    assert calls == [(spec.keras_file, spec.url, str(cache), "models", spec.md5)]
    assert resolved == ResolvedWeights("imagenet", cache / "models" / spec.keras_file, "download")
    # Downloaded once: the next lookup finds Keras's cache and downloads nothing.
    assert resolve_weights("densenet121", "imagenet", empty_homes).source == "keras_cache" and len(calls) == 1


def assert_names_what_to_do(message: str, spec, keras_home: Path) -> None:
    for part in [f"'{spec.backbone}'", *spec.local_names, str(keras_home / "models"), spec.url,
                 WEIGHTS_DIR_ENV, "model.weights: none", "model.weights: <path>"]:
        assert part in message, part


@pytest.mark.parametrize("failure", ["reachability probe", "keras download"])
def test_offline_fails_fast_with_one_message(empty_homes, monkeypatch, failure):
    spec = IMAGENET_FILES["resnet50"]
    if failure == "keras download":  # past the probe, Keras's own download fails
        monkeypatch.setattr(weights, "unreachable_reason", lambda url, timeout: None)

        def failing_get_file(*args, **kwargs):
            raise Exception(f"URL fetch failure on {spec.url}: None -- [Errno -3] Temporary failure in name resolution")

        monkeypatch.setattr("keras.utils.get_file", failing_get_file)
    elif unreachable_reason(spec.url, timeout=3.0) is None:
        pytest.skip("this machine reaches the weights host, so the offline failure cannot be exercised")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights("resnet50", "imagenet", empty_homes)
    assert time.monotonic() - start < 10
    assert_names_what_to_do(str(info.value), spec, empty_homes / "keras")
    assert "URL fetch failure" in str(info.value) if failure == "keras download" else "unreachable" in str(info.value)
    assert not (empty_homes / "keras" / "models" / spec.keras_file).exists()  # nothing half-written


def test_demo_on_a_fresh_offline_clone_stops_before_any_stage(tmp_path):
    """A new user's first command, without ../shared, HOME and KERAS_HOME empty, no network."""
    if unreachable_reason(XCEPTION.url, timeout=3.0) is None:
        pytest.skip("this machine reaches the weights host: the demo would download instead of stopping")
    clone = copy_repo(tmp_path / "clone")
    assert not (tmp_path / "shared").exists()
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key != WEIGHTS_DIR_ENV and key != "BRAINTUMOR_ROOT"}
    env.update(HOME=str(home), KERAS_HOME=str(home / ".keras"), PYTHONPATH=str(clone / "src"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "braintumor.demo"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert elapsed < 60, elapsed
    assert done.returncode == 2, done.stdout + done.stderr
    assert_names_what_to_do(done.stderr, XCEPTION, home / ".keras")
    assert done.stderr.startswith("make demo cannot start: ImageNet weights for backbone 'xception'")
    assert "Traceback" not in done.stdout + done.stderr
    assert "dvc exp run" not in done.stdout  # no stage ran
    assert not (clone / "models").exists() and not (clone / "data").exists()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout == ""


@pytest.mark.parametrize("overrides", ["demo.yaml", *sorted(p.name for p in (REPO / "experiments").glob("*.yaml"))])
def test_user_facing_override_files_are_valid_and_need_nothing_beside_the_repo(overrides):
    """What a user runs (the demo, the experiment files) validates against params.yaml and names no
    path outside the checkout: ../shared exists only on this project's machines."""
    from braintumor.demo import load_overrides, overridden_params

    path = REPO / overrides if overrides == "demo.yaml" else REPO / "experiments" / overrides
    values = load_overrides(path)
    params = overridden_params(REPO, values)
    assert params.model.weights in ("imagenet", "none")
    assert not [key for key, value in values.items() if ".." in str(value)], values
    assert "../shared" not in (REPO / "params.yaml").read_text()
