"""Where a backbone's weights come from: ``model.weights`` resolved to one file, in one place.

``model.weights: imagenet`` is looked up in this order, and the answer says which one it was (the
model card and the MLflow run record it):

1. a local file in the directory named by ``$BRAINTUMOR_WEIGHTS_DIR``: ``<backbone>_imagenet_notop.weights.h5``
   (Keras 3 weights, as ``backbone.save_weights`` writes them) or Keras's own download file name;
2. Keras's cache, ``$KERAS_HOME/models/`` (``~/.keras/models/``), where Keras's download keeps it;
3. Keras's download (``keras.utils.get_file`` with the URL and md5 that ``keras.applications`` uses),
   into that cache;
4. otherwise :class:`WeightsUnavailableError`, whose message says what was looked for, where, and how
   to supply it.

This module imports no TensorFlow unless it has to download: a preflight check (``make demo``) that
finds no weights offline fails in well under a second, before any pipeline stage runs.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR_ENV = "BRAINTUMOR_WEIGHTS_DIR"

_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications"


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for, none is on disk, and Keras could not download them."""


@dataclass(frozen=True)
class ImagenetFile:
    """A backbone's no-top ImageNet weights as ``keras.applications`` downloads them.

    Args:
        backbone: the ``model.backbone`` name.
        keras_file: the file name Keras downloads into ``<KERAS_HOME>/models/``.
        url: where Keras downloads it from.
        md5: its md5, as Keras checks it.
    """

    backbone: str
    keras_file: str
    url: str
    md5: str

    @property
    def local_names(self) -> tuple[str, str]:
        """File names accepted in the local weights directory, in order of preference."""
        return (f"{self.backbone}_imagenet_notop.weights.h5", self.keras_file)


IMAGENET_FILES: dict[str, ImagenetFile] = {f.backbone: f for f in (
    ImagenetFile("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 f"{_KERAS_APPS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "4d473c1dd8becc155b73f8504c6f6626"),
    ImagenetFile("xception", "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 f"{_KERAS_APPS}/xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "b0042744bf5b25fce3cb969f33bebb97"),
    ImagenetFile("efficientnetb0", "efficientnetb0_notop.h5",
                 "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
                 "50bc09e76180e00e4465e1a485ddc09d"),
    ImagenetFile("densenet121", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 f"{_KERAS_APPS}/densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "30ee3e1110167f948a6b9946edeeb738"),
    ImagenetFile("mobilenetv3small", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                 f"{_KERAS_APPS}/mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                 "d3e8ec802a04aa4fc771ee12a9a9b836"),
)}


@dataclass(frozen=True)
class ResolvedWeights:
    """What ``model.weights`` turned into.

    Args:
        setting: ``model.weights`` as written ("imagenet", "none" or a path).
        path: the file to load, or None for a random initialisation.
        source: "none", "path", "local_dir" (``$BRAINTUMOR_WEIGHTS_DIR``), "keras_cache" or "download".
    """

    setting: str
    path: Path | None
    source: str

    def record(self) -> dict[str, str | None]:
        """The JSON-ready record for the model card and the MLflow run."""
        return {"setting": self.setting, "source": self.source, "file": None if self.path is None else str(self.path)}


def keras_home() -> Path:
    """Keras's cache root, as Keras computes it: ``$KERAS_HOME``, else ``~/.keras`` (``/tmp/.keras`` if ~ is read-only).

    Read at call time (Keras reads it once at import), and passed to ``get_file`` so both agree.
    """
    if env := os.environ.get("KERAS_HOME"):
        return Path(env).expanduser()
    home = Path.home()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def local_weights_dir() -> Path | None:
    """The directory named by ``$BRAINTUMOR_WEIGHTS_DIR``, or None when the variable is unset or empty."""
    value = os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None


def search_locations(spec: ImagenetFile) -> list[tuple[Path, str]]:
    """Every (file, source) that counts as a local copy of ``spec``, in the order they are tried."""
    candidates = []
    if (directory := local_weights_dir()) is not None:
        candidates += [(directory / name, "local_dir") for name in spec.local_names]
    cache = keras_home() / "models"
    candidates += [(cache / name, "keras_cache") for name in (spec.keras_file, spec.local_names[0])]
    return candidates


def find_local_imagenet_file(spec: ImagenetFile) -> tuple[Path, str] | None:
    """The first existing local copy of ``spec`` and its source, or None."""
    return next(((path, source) for path, source in search_locations(spec) if path.is_file()), None)


def unreachable_reason(url: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to ``url``'s host (or the HTTPS proxy) fails, or None if it opens.

    Keras's download has no timeout, and a name lookup may hang on a firewalled machine, so the
    probe runs in a daemon thread that is abandoned after ``timeout`` seconds.
    """
    target = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or url)
    address = (target.hostname, target.port or (443 if target.scheme == "https" else 80))
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{address[0]}:{address[1]} unreachable ({exc})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{address[0]}:{address[1]} did not answer within {timeout:g} s"


def unavailable_message(spec: ImagenetFile, reason: str) -> str:
    """The one message for missing ImageNet weights: what, where it looked, how to supply it."""
    looked = "\n".join(f"    {path}" for path, _ in search_locations(spec))
    directory = local_weights_dir()
    return (
        f"ImageNet weights for backbone {spec.backbone!r} are not available.\n"
        f"  Looked for {' or '.join(spec.local_names)} in:\n{looked}\n"
        f"  {WEIGHTS_DIR_ENV} is {'set to ' + str(directory) if directory else 'not set'}.\n"
        f"  Keras could not download {spec.url}: {reason}.\n"
        f"Either:\n"
        f"  - connect to the internet once (Keras caches the file in {keras_home() / 'models'}), or\n"
        f"  - put the file in a directory and point {WEIGHTS_DIR_ENV} at it "
        f"(export {WEIGHTS_DIR_ENV}=/path/to/weights), or\n"
        f"  - set `model.weights: <path>` to a weights file for this backbone, or\n"
        f"  - set `model.weights: none` to train from a random initialisation (much lower accuracy)."
    )


def download_imagenet_file(spec: ImagenetFile, timeout: float = 5.0) -> Path:
    """Keras's download of ``spec`` into its cache; WeightsUnavailableError, fast, when offline."""
    if reason := unreachable_reason(spec.url, timeout):
        raise WeightsUnavailableError(unavailable_message(spec, reason))
    import keras  # only here: a lookup that finds a file, or fails offline, needs no TensorFlow

    try:
        path = keras.utils.get_file(spec.keras_file, spec.url, cache_dir=str(keras_home()),
                                    cache_subdir="models", file_hash=spec.md5)
    except Exception as exc:  # get_file raises a bare Exception("URL fetch failure ...")
        raise WeightsUnavailableError(unavailable_message(spec, str(exc))) from exc
    return Path(path)


def resolve_weights(backbone: str, setting: str, root: Path) -> ResolvedWeights:
    """``model.weights`` as a file to load (or none), with where it came from.

    Args:
        backbone: ``model.backbone``.
        setting: ``model.weights``: "imagenet", "none", or a path (relative paths against ``root``).
        root: the project root.

    Raises:
        WeightsUnavailableError: "imagenet" with no local copy and no download possible.
        FileNotFoundError: a path that does not exist.
    """
    if setting == "none":
        return ResolvedWeights(setting, None, "none")
    if setting == "imagenet":
        spec = IMAGENET_FILES[backbone]
        if found := find_local_imagenet_file(spec):
            return ResolvedWeights(setting, *found)
        return ResolvedWeights(setting, download_imagenet_file(spec), "download")
    path = Path(setting).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(
            f"model.weights: weights file {path} does not exist (from {setting!r}, relative paths are "
            f"resolved against {root}); use 'imagenet', 'none' or the path of a {backbone} weights file"
        )
    return ResolvedWeights(setting, path, "path")
