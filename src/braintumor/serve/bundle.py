"""Serving one trained model: load it with what it needs (model card, calibration, Grad-CAM), classify uploads.

Files, for a model ``models/<stem>.keras``::

    models/<stem>.json         the model card the training stage writes beside it: identity (MLflow run,
                               date, git commit) and its input contract (image size, class names, the
                               preprocess params it was trained with)
    models/calibration.json    written by the evaluate stage: {<stem>: {"temperature": T,
                               "val_max_probability_quantiles": {"0.01": q, "0.05": q, "0.10": q}}}
    models/ood.npz             written by the evaluate stage: per <stem>, the feature check (layer, class
                               means, precision, threshold; braintumor.evaluate.feature_check)

A model brings its own preprocessing: the card's ``preprocess`` section, not today's params.yaml. Without
a card the app uses params.yaml's section and says so on every result (:attr:`ModelBundle.notes`); without
a calibration entry it shows raw softmax probabilities, labelled uncalibrated, and cannot run the
confidence check; without an ood.npz entry the feature check is off, and each result says so.
Nothing is loaded from the network.

:func:`predict_upload` is what the app and the tests call: bytes (or a path) in, a
:class:`PredictionResult` out, an :class:`braintumor.serve.uploads.UploadError` for a bad file. It is
:func:`prepare_upload` (decoding, no model) followed by :func:`classify_prepared` (the model, on a batch):
batch prediction (:mod:`braintumor.predict`) runs the two halves side by side, so both give the same answer.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from braintumor.core.config import CLASS_NAMES, Params, PreprocessParams
from braintumor.core.scratch import process_scratch_folder
from braintumor.serve.ood import FeatureScore, ImageStats, OodLimits, Verdict, assess, image_stats
from braintumor.serve.uploads import DecodedUpload, UploadError, preprocess_upload

HOW_TO_GET_A_MODEL = (
    "Train one first: `make demo` (offline, on the built-in phantom data, about 5 minutes) or `dvc repro` "
    "(the real datasets; see the README), then start the app again. A model file from elsewhere: "
    "`python -m braintumor.serve.app --model path/to/model.keras`."
)


class ModelNotFoundError(FileNotFoundError):
    """No model file where the app was told to look; the message says how to get one."""


class ModelLoadError(RuntimeError):
    """The model, its card or its calibration exists but cannot be used; the message names the file and key."""


# --------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answers, shown beside every result."""

    model_file: str
    mlflow_run_id: str | None
    trained_at: str | None
    git_commit: str | None
    dvc_experiment: str | None
    backbone: str | None
    card_file: str | None  # None: no model card next to the model
    training_data: dict | None = None  # the card's provenance (model.train.training_data_record); None: unknown

    @property
    def synthetic_only(self) -> bool:
        """Trained on synthetic phantom slices alone: its answers on real scans mean nothing."""
        return bool(self.training_data and self.training_data.get("synthetic_only"))

    def provenance(self) -> str:
        """One line on what the model was trained on, for every result."""
        data = self.training_data
        if not data:
            return "Trained on: unknown (the model card does not say)"
        sources = ", ".join(f"{s['name']} ({'synthetic phantom' if s['kind'] == 'phantom' else s['kind']})"
                            for s in data["sources"])
        per_class = ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in data["train_images_per_class"].items())
        return (f"Trained on: {sources}; {data['images_per_split']['train']} training images ({per_class}), "
                f"{data['split_strategy']} split")


@dataclass(frozen=True)
class Calibration:
    """Temperature and validation quantiles of the top probability; ``source`` None = uncalibrated (T = 1)."""

    temperature: float
    val_max_probability_quantiles: dict[str, float]
    source: str | None
    tta: str = "none"  # the views whose softmax is averaged, as the evaluate stage did (braintumor.model.tta)


@dataclass
class ModelBundle:
    """Everything needed to classify an upload with one model, loaded once."""

    model: Any  # keras.Model
    gradcam_model: Any  # from braintumor.explain.gradcam.make_gradcam_model
    gradcam_layer: str
    identity: ModelIdentity
    preprocess: PreprocessParams
    class_names: tuple[str, ...]
    image_size: int
    calibration: Calibration
    notes: tuple[str, ...] = field(default=())  # what is missing or assumed, shown with every result
    feature_check: Any = None  # braintumor.evaluate.feature_check.FeatureCheck, or None: no models/ood.npz entry
    # An exported model (braintumor.model.export) that gives the probabilities; the Keras model it came from,
    # when it is beside it, still gives Grad-CAM and the feature check (``model`` and ``gradcam_model`` None: not).
    exported: Any = None


@dataclass(frozen=True)
class ServingSettings:
    """The params that shape serving (from params.yaml's ``app``, ``merge`` and ``gradcam`` sections)."""

    max_upload_bytes: int
    max_image_pixels: int
    ood: OodLimits
    confidence_quantile: str
    overlay_alpha: float
    gradcam_layer: str

    @classmethod
    def from_params(cls, params: Params) -> "ServingSettings":
        ood = params.app.ood
        return cls(
            max_upload_bytes=int(params.app.max_upload_mb * 2**20),
            max_image_pixels=params.app.max_image_pixels,
            ood=OodLimits(params.merge.max_colour_share, ood.min_contrast, ood.max_flat_share, ood.min_head_share),
            confidence_quantile=ood.confidence_quantile,
            overlay_alpha=params.gradcam.overlay_alpha,
            gradcam_layer=params.gradcam.layer,
        )


def card_path(model_path: Path) -> Path:
    """``models/<stem>.json`` beside ``models/<stem>.keras``."""
    return model_path.with_suffix(".json")


def calibration_path(model_path: Path) -> Path:
    """``models/calibration.json`` in the model's folder."""
    return model_path.parent / "calibration.json"


REGISTRY_PREFIX = "models:/"


def resolve_model_file(spec: str | Path, root: Path, tracking_uri: str | None = None) -> Path:
    """The ``.keras`` file named by ``app.model`` / ``--model``: a path, relative ones against ``root``, or
    an MLflow registry URI (``models:/<name>/<version>`` or ``models:/<name>@<alias>``), fetched first.

    Raises:
        ModelNotFoundError: no such file, or no such registered model (the message says how to get one).
        ModelLoadError: a registry URI without a tracking URI to look it up in.
    """
    text = str(spec)
    if text.startswith(REGISTRY_PREFIX):
        if tracking_uri is None:
            raise ModelLoadError(f"cannot load {text!r}: no MLflow tracking URI to look it up in")
        return fetch_registered_model(text, tracking_uri, process_scratch_folder("braintumor-model-"))
    path = Path(text).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ModelNotFoundError(f"No trained model at {path}. {HOW_TO_GET_A_MODEL}")
    return path


def _registered_version(client, uri: str):
    """The ModelVersion a ``models:/name/version`` or ``models:/name@alias`` URI points to."""
    from mlflow.exceptions import MlflowException

    reference = uri[len(REGISTRY_PREFIX):]
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = reference.partition("/")
        if not version.isdigit():
            raise ModelLoadError(f"{uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no registered model {uri!r} in {client.tracking_uri}: {exc.message}. "
                                 "List them with `mlflow ui` (Models tab) or train one with `dvc repro`.") from None


def fetch_registered_model(uri: str, tracking_uri: str, dest: Path) -> Path:
    """Download a registered model version into ``dest`` as ``finetuned.keras`` with its card
    (``finetuned.json``, from the logged model's metadata) and, when the evaluate stage tagged the
    version, its ``calibration.json`` and ``ood.npz``: the same files a local model has, so one loader
    serves both.
    """
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    # The URI comes resolved from core.tracking.resolve_tracking_uri; it is passed, never set globally.
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = _registered_version(client, uri)
    # The version's own artifact URI, not models:/...: MLflow resolves those with the global registry URI.
    source = client.get_model_version_download_uri(version.name, version.version)
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest / "download"),
                                                          tracking_uri=tracking_uri))
    keras_files = sorted(downloaded.rglob("*.keras"))
    if len(keras_files) != 1:
        raise ModelLoadError(f"{uri!r}: expected one .keras file in the registered model, found {len(keras_files)}")
    model_path = dest / "finetuned.keras"
    shutil.move(str(keras_files[0]), model_path)
    card = (Model.load(str(downloaded)).metadata or {}).get("card")
    if card:
        card = {**card, "model_file": f"{version.name} version {version.version} ({uri})"}
        model_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    if calibration := version.tags.get("calibration"):
        (dest / "calibration.json").write_text(json.dumps({"finetuned": json.loads(calibration)}, indent=2))
    if evaluate_run := version.tags.get("evaluate_run_id"):
        # Too large for a tag: the feature check is an artifact of the evaluate run that tagged the version.
        mlflow.artifacts.download_artifacts(run_id=evaluate_run, artifact_path="ood.npz", dst_path=str(dest),
                                            tracking_uri=tracking_uri)
    return model_path


def read_model_card(model_path: Path) -> dict | None:
    """The model card beside the model, or None if there is none; ModelLoadError if it is unreadable."""
    path = card_path(model_path)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model card {path} is not readable JSON: {exc}") from None
    if not isinstance(card, dict):
        raise ModelLoadError(f"model card {path} must hold a JSON object, got {type(card).__name__}")
    return card


def _card_field(card: dict, key: str, path: Path) -> Any:
    if key not in card:
        raise ModelLoadError(f"model card {path} has no {key!r} key (keys: {sorted(card)})")
    return card[key]


def _input_contract(card: dict | None, model_path: Path, fallback: PreprocessParams) -> tuple[PreprocessParams, tuple[str, ...], list[str]]:
    """(preprocess params, class names, notes) from the card, or params.yaml's, said in a note."""
    if card is None:
        return fallback, CLASS_NAMES, [
            f"No model card ({card_path(model_path).name}) beside the model: its training run is unknown, and "
            "the preprocessing is params.yaml's `preprocess` section, which may differ from what it was trained with.",
        ]
    path = card_path(model_path)
    try:
        preprocess = PreprocessParams.model_validate(_card_field(card, "preprocess", path))
    except ValidationError as exc:
        raise ModelLoadError(f"model card {path}: invalid 'preprocess' section: {exc}") from None
    names = _card_field(card, "class_names", path)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"model card {path}: 'class_names' must be a non-empty list of strings, got {names!r}")
    size = card.get("image_size", preprocess.image_size)
    if size != preprocess.image_size:
        raise ModelLoadError(f"model card {path}: image_size {size} differs from preprocess.image_size {preprocess.image_size}")
    return preprocess, tuple(names), []


def _identity(card: dict | None, model_path: Path) -> ModelIdentity:
    if card is None:
        modified = datetime.fromtimestamp(model_path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        return ModelIdentity(model_path.name, None, f"unknown (file modified {modified})", None, None, None, None)
    return ModelIdentity(
        model_file=model_path.name, mlflow_run_id=card.get("mlflow_run_id"), trained_at=card.get("trained_at"),
        git_commit=card.get("git_commit"), dvc_experiment=card.get("dvc_experiment"), backbone=card.get("backbone"),
        card_file=card_path(model_path).name, training_data=card.get("training_data"),
    )


def load_model_calibration(model_path: Path) -> tuple[Calibration, list[str]]:
    """The model's entry of ``calibration.json`` (key = the model's stem), or an uncalibrated one with a note."""
    from braintumor.evaluate.calibration import load_calibration

    path = calibration_path(model_path)
    uncalibrated = Calibration(1.0, {}, None)
    if not path.is_file():
        return uncalibrated, [f"No {path.name} beside the model (run `dvc repro evaluate`): probabilities are the "
                              "raw softmax, uncalibrated, and the low-confidence check is off."]
    try:
        entries = load_calibration(path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    entry = entries.get(model_path.stem)
    if entry is None:
        return uncalibrated, [f"{path.name} has no entry {model_path.stem!r} (it has {sorted(entries)}): probabilities "
                              "are uncalibrated and the low-confidence check is off."]
    return Calibration(float(entry["temperature"]), dict(entry["val_max_probability_quantiles"]), path.name,
                       entry.get("tta", "none")), []


def ood_path(model_path: Path) -> Path:
    """``models/ood.npz`` in the model's folder."""
    return model_path.parent / "ood.npz"


def load_model_feature_check(model_path: Path) -> tuple[Any, list[str]]:
    """The model's entry of ``ood.npz`` (key = the model's stem), or None with a note saying the check is off."""
    from braintumor.evaluate.feature_check import load_feature_checks

    path = ood_path(model_path)
    if not path.is_file():
        return None, [f"No {path.name} beside the model (run `dvc repro evaluate`): the check that an upload is like "
                      "the training data is off."]
    try:
        checks = load_feature_checks(path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if model_path.stem not in checks:
        return None, [f"{path.name} has no entry {model_path.stem!r} (it has {sorted(checks)}): the check that an "
                      "upload is like the training data is off."]
    return checks[model_path.stem], []


def _load_keras_model(model_path: Path):
    import keras

    import braintumor.model.backbones  # noqa: F401  registers the custom layers, so safe mode can rebuild them

    try:
        return keras.saving.load_model(model_path, safe_mode=True)
    except Exception as exc:  # noqa: BLE001  Keras raises many types for a bad archive; say which file
        raise ModelLoadError(f"cannot load {model_path} with Keras (safe mode): {type(exc).__name__}: {exc}") from exc


def _check_model_shapes(model, model_path: Path, image_size: int, class_names: tuple[str, ...]) -> None:
    _, height, width, channels = model.input_shape
    if (height, width, channels) != (image_size, image_size, 1):
        raise ModelLoadError(f"{model_path.name} takes input {(height, width, channels)}, but its preprocessing makes "
                             f"({image_size}, {image_size}, 1) slices: the card (or params.yaml) does not belong to this model")
    outputs = model.output_shape[-1]
    if outputs != len(class_names):
        raise ModelLoadError(f"{model_path.name} has {outputs} outputs but {len(class_names)} class names {list(class_names)}")


def load_bundle(model: str | Path, root: Path, fallback_preprocess: PreprocessParams, gradcam_layer: str = "auto",
                tracking_uri: str | None = None, export_only: bool = False) -> ModelBundle:
    """Load a model once with its card, calibration and Grad-CAM model, and warm it up.

    Args:
        model: ``app.model`` / ``--model``: a ``.keras`` path (relative to ``root``) or a registry URI.
        root: the project root.
        fallback_preprocess: params.yaml's preprocess section, used (and said so) only without a model card.
        gradcam_layer: ``gradcam.layer`` ("auto" = the backbone's last conv block).
        tracking_uri: the MLflow store that registry URIs are looked up in.
        export_only: an export (.tflite, .onnx) alone, without the Keras model beside it (no Grad-CAM, no feature check).

    Raises:
        ModelNotFoundError: no model file. ModelLoadError: a file that is there but unusable.
    """
    from braintumor.explain.gradcam import gradcam_layer_name, grad_cam, make_gradcam_model
    from braintumor.model.backbones import feature_check_tensor

    model_path = resolve_model_file(model, root, tracking_uri)
    if model_path.suffix in EXPORT_SUFFIXES:
        return _load_export_bundle(model_path, fallback_preprocess, gradcam_layer, export_only)
    card = read_model_card(model_path)
    preprocess, class_names, notes = _input_contract(card, model_path, fallback_preprocess)
    calibration, calibration_notes = load_model_calibration(model_path)
    feature_check, feature_notes = load_model_feature_check(model_path)
    keras_model = _load_keras_model(model_path)
    _check_model_shapes(keras_model, model_path, preprocess.image_size, class_names)
    if feature_check is not None:
        try:
            width = int(feature_check_tensor(keras_model, feature_check.layer).shape[-1])
        except ValueError as exc:
            raise ModelLoadError(f"{ood_path(model_path).name} does not belong to {model_path.name}: {exc}") from None
        if width != feature_check.dimension:
            raise ModelLoadError(f"{ood_path(model_path).name} was fitted on {feature_check.dimension} features of "
                                 f"{feature_check.layer!r}, but {model_path.name} has {width} there: rerun `dvc repro evaluate`")
    try:
        layer = gradcam_layer_name(keras_model, gradcam_layer)
        gradcam_model = make_gradcam_model(keras_model, layer, feature_check.layer if feature_check else None)
    except ValueError as exc:  # not a build_model classifier, or gradcam.layer names no conv layer of it
        raise ModelLoadError(f"{model_path.name}: no Grad-CAM: {exc}") from None
    # The first call traces the TensorFlow graph (seconds); do it now rather than in the first request.
    grad_cam(gradcam_model, np.zeros((1, preprocess.image_size, preprocess.image_size), np.uint8))
    return ModelBundle(keras_model, gradcam_model, layer, _identity(card, model_path), preprocess, class_names,
                       preprocess.image_size, calibration, tuple(notes + calibration_notes + feature_notes),
                       feature_check)


EXPORT_SUFFIXES = (".tflite", ".onnx")


def exported_from(export_path: Path) -> Path:
    """The ``.keras`` file an export was made from: named in the ``exports.json`` beside it, one folder up
    (``models/exports/finetuned_int8.tflite`` -> ``models/finetuned.keras``)."""
    from braintumor.model.export import EXPORTS_CARD

    card = export_path.parent / EXPORTS_CARD
    name = json.loads(card.read_text()).get("model", "finetuned.keras") if card.is_file() else "finetuned.keras"
    return export_path.parent.parent / name


def _load_export_bundle(export_path: Path, fallback_preprocess: PreprocessParams, gradcam_layer: str,
                        export_only: bool = False) -> ModelBundle:
    """A bundle whose probabilities come from an export; card, calibration and feature check are the Keras
    model's (the export is its copy), and so is Grad-CAM when the ``.keras`` file is beside it."""
    from braintumor.model.export import load_exported

    try:
        exported = load_exported(export_path)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"cannot load the export {export_path}: {type(exc).__name__}: {exc}") from exc
    keras_path = exported_from(export_path)
    if keras_path.is_file() and not export_only:
        bundle = load_bundle(keras_path, keras_path.parent, fallback_preprocess, gradcam_layer)
        bundle.exported = exported
        identity = bundle.identity
        bundle.identity = ModelIdentity(f"{export_path.name} (exported from {keras_path.name})", identity.mlflow_run_id,
                                        identity.trained_at, identity.git_commit, identity.dvc_experiment,
                                        identity.backbone, identity.card_file, identity.training_data)
        bundle.notes = (*bundle.notes, f"Probabilities from the export {export_path.name}; Grad-CAM and the check that "
                                       f"an upload is like the training data from {keras_path.name}, the model it was exported from.")
    else:
        card = read_model_card(keras_path)
        preprocess, class_names, notes = _input_contract(card, keras_path, fallback_preprocess)
        calibration, calibration_notes = load_model_calibration(keras_path)
        identity = _identity(card, keras_path) if card else ModelIdentity(export_path.name, None, None, None, None, None, None)
        identity = ModelIdentity(export_path.name, identity.mlflow_run_id, identity.trained_at, identity.git_commit,
                                 identity.dvc_experiment, identity.backbone, identity.card_file, identity.training_data)
        bundle = ModelBundle(None, None, "", identity, preprocess, class_names, preprocess.image_size, calibration,
                             tuple(notes + calibration_notes + [
                                 f"No Grad-CAM: an exported model ({export_path.name}) has no gradients to give, and "
                                 f"{keras_path.name}, the model it came from, is "
                                 f"{'not used (export only)' if export_only else 'not beside it'}. The check that an "
                                 "upload is like the training data is off for the same reason."]), None, exported)
    if bundle.exported.image_size != bundle.preprocess.image_size:
        raise ModelLoadError(f"{export_path.name} takes {bundle.exported.image_size} px slices, but its preprocessing "
                             f"makes {bundle.preprocess.image_size} px: it does not belong to this model card")
    return bundle


# --------------------------------------------------------------------------- one upload


@dataclass(frozen=True)
class PredictionResult:
    """The answer for one upload.

    Attributes:
        label: the predicted class, or None when the out-of-distribution rule flagged the upload.
        probabilities: class -> calibrated probability (raw softmax if the model is uncalibrated).
        verdict: the out-of-distribution rule's outcome.
        stats: the image statistics the rule looked at.
        preprocessed: uint8 (S, S), exactly what the model saw.
        overlay: RGB uint8 (S, S, 3) Grad-CAM of the predicted class, or None when the image checks failed.
        feature_score: the feature check's distance, or None when the model has no feature check.
        upload: what was decoded, in words (format, size, bit depth).
        seconds: wall time from bytes to result.
    """

    label: str | None
    probabilities: dict[str, float]
    verdict: Verdict
    stats: ImageStats
    preprocessed: np.ndarray
    overlay: np.ndarray | None
    upload: str
    seconds: float
    feature_score: float | None = None


def read_upload(upload: bytes | str | os.PathLike, max_bytes: int) -> bytes:
    """The upload's bytes; a path larger than ``max_bytes`` is refused before it is read."""
    if isinstance(upload, (bytes, bytearray, memoryview)):
        return bytes(upload)
    path = Path(upload)
    if path.stat().st_size > max_bytes:
        raise UploadError("file_too_large", f"The file is larger than the {round(max_bytes / 2**20, 1)} MB this app accepts.")
    return path.read_bytes()


def predict_with_gradcam(bundle: ModelBundle, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """((N, S, S) Grad-CAM, (N, C) softmax, (N, F) feature-check features) of (N, S, S) preprocessed slices, the
    way the evaluate stage predicted (``calibration.tta``): each softmax is the mean over the views of
    :func:`braintumor.model.tta.tta_views` ("flip": the slice's and its mirror image's); the heatmaps and
    the features are the slices' own, for the class of that mean. Only the slice itself is differentiated;
    the other views are plain forward passes, in one batch."""
    from braintumor.explain.gradcam import grad_cam_with_features, predict_probabilities
    from braintumor.model.tta import mean_of_views, tta_views

    if bundle.exported is not None:
        return _predict_exported(bundle, images)
    views = tta_views(images, bundle.calibration.tta)
    heatmaps, raw, features = grad_cam_with_features(bundle.gradcam_model, images)
    if len(views) == 1:
        return heatmaps, raw, features
    others = predict_probabilities(bundle.model, np.concatenate(views[1:]))
    averaged = mean_of_views([raw, *np.split(others, len(views) - 1)])
    # Explain the class the mean predicts, not the slice's own top class, where the two differ.
    changed = np.flatnonzero(averaged.argmax(axis=1) != raw.argmax(axis=1))
    if changed.size:
        heatmaps[changed] = grad_cam_with_features(bundle.gradcam_model, images[changed], averaged[changed].argmax(axis=1))[0]
    return heatmaps, averaged, features


def _predict_exported(bundle: ModelBundle, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """The export's probabilities (averaged over the views like the evaluate stage's); Grad-CAM of the class
    they predict and the features from the Keras model when the bundle has it, else None."""
    from braintumor.explain.gradcam import grad_cam_with_features
    from braintumor.model.export import predict_with_tta

    probabilities = predict_with_tta(bundle.exported, images, bundle.calibration.tta, batch_size=len(images))
    if bundle.gradcam_model is None:
        return None, probabilities, None
    heatmaps, _, features = grad_cam_with_features(bundle.gradcam_model, images, probabilities.argmax(axis=1))
    return heatmaps, probabilities, features


@dataclass(frozen=True)
class PreparedUpload:
    """One upload decoded and preprocessed, not yet seen by the model (the first half of :func:`predict_upload`).

    Attributes:
        decoded: what was decoded.
        image: uint8 (S, S), what the model will see.
        stats: the image statistics the out-of-distribution rule looks at.
        seconds: wall time from bytes to here.
    """

    decoded: DecodedUpload
    image: np.ndarray
    stats: ImageStats
    seconds: float


def prepare_upload(bundle: ModelBundle, upload: bytes | str | os.PathLike, settings: ServingSettings) -> PreparedUpload:
    """Read, decode and preprocess one upload and measure its image statistics: everything before the model.

    It makes no Keras call, so batch prediction (:mod:`braintumor.predict`) runs it in threads while the model
    works on other files.

    Raises:
        UploadError: the file is not an image or DICOM MR slice this app accepts (the message says why).
    """
    started = time.perf_counter()
    data = read_upload(upload, settings.max_upload_bytes)
    decoded, image = preprocess_upload(data, bundle.preprocess, settings.max_upload_bytes, settings.max_image_pixels)
    stats = image_stats(decoded.gray, decoded.colour_share, bundle.preprocess.head_threshold)
    return PreparedUpload(decoded, image, stats, time.perf_counter() - started)


def classify_prepared(bundle: ModelBundle, prepared: list[PreparedUpload], settings: ServingSettings) -> list[PredictionResult]:
    """The second half of :func:`predict_upload`, for a batch: predict with Grad-CAM, calibrate, apply the OOD rule.

    Each result's ``seconds`` is its own preparation time plus an equal share of the batch's model time.
    """
    from braintumor.evaluate.calibration import apply_temperature

    if not prepared:
        return []
    started = time.perf_counter()
    heatmaps, raw, features = predict_with_gradcam(bundle, np.stack([item.image for item in prepared]))
    probabilities = apply_temperature(raw, bundle.calibration.temperature)
    check = bundle.feature_check
    scores = check.scores(features) if check is not None and features is not None else [None] * len(prepared)
    heatmaps = heatmaps if heatmaps is not None else [None] * len(prepared)  # an export without its Keras model
    share = (time.perf_counter() - started) / len(prepared)
    return [_prediction_result(bundle, settings, item, heatmap, p, score, item.seconds + share)
            for item, heatmap, p, score in zip(prepared, heatmaps, probabilities, scores)]


def _prediction_result(bundle: ModelBundle, settings: ServingSettings, prepared: PreparedUpload, heatmap: np.ndarray,
                       probabilities: np.ndarray, feature_score: float | None, seconds: float) -> PredictionResult:
    """One slice's result from its (S, S) heatmap, (C,) calibrated probabilities and feature-check distance."""
    from braintumor.explain.gradcam import overlay

    threshold = bundle.calibration.val_max_probability_quantiles.get(settings.confidence_quantile)
    check = bundle.feature_check
    feature = (FeatureScore(float(feature_score), check.threshold, check.flag_share)
               if check is not None else None)
    verdict = assess(prepared.stats, settings.ood, float(probabilities.max()), threshold, settings.confidence_quantile, feature)
    return PredictionResult(
        label=bundle.class_names[int(probabilities.argmax())] if verdict.in_distribution else None,
        probabilities={name: float(p) for name, p in zip(bundle.class_names, probabilities)},
        verdict=verdict,
        stats=prepared.stats,
        preprocessed=prepared.image,
        overlay=overlay(prepared.image, heatmap, settings.overlay_alpha) if verdict.looks_like_mri and heatmap is not None else None,
        upload=prepared.decoded.description,
        seconds=seconds,
        feature_score=feature.score if feature else None,
    )


def predict_upload(bundle: ModelBundle, upload: bytes | str | os.PathLike, settings: ServingSettings) -> PredictionResult:
    """Classify one uploaded file: decode, preprocess, predict with Grad-CAM, calibrate, apply the OOD rule
    (:func:`prepare_upload`, then :func:`classify_prepared` on a batch of one).

    Raises:
        UploadError: the file is not an image or DICOM MR slice this app accepts (the message says why).
    """
    return classify_prepared(bundle, [prepare_upload(bundle, upload, settings)], settings)[0]
