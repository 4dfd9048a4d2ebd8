"""The one place that loads and validates ``params.yaml``.

Every stage and the app call :func:`load_params`; nothing else parses the file. Each section is a
frozen pydantic model that forbids unknown keys, so a typo or a bad value fails at load time with
the dotted key and the allowed values (see :class:`ParamsError`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "no_tumor", "pituitary")
# The label of a source that only knows tumor / no tumor (e.g. Br35H's yes / no folders): such a source can only
# be external, and is scored as tumor vs no tumor.
TUMOR_LABEL = "tumor"


def labels_disagree(labels) -> bool:
    """Do these labels of one duplicate group contradict each other? ``tumor`` agrees with every tumor class."""
    distinct = set(labels)
    return len(distinct - {TUMOR_LABEL}) > 1 or {TUMOR_LABEL, "no_tumor"} <= distinct


class ParamsError(ValueError):
    """``params.yaml`` is missing, unreadable, or has a bad key or value."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- download


class _WithBoxes(_Section):
    """Tumor boxes of a downloaded or local source: ``yolo`` = a ``<image stem>.txt`` beside each image
    (``class x_centre y_centre width height``, normalised), ``csv`` = one file ``boxes_csv`` below the
    class root with columns path, x0, y0, x1, y1 (pixels); ``none``. Only ``csv`` takes ``boxes_csv``."""

    boxes: Literal["none", "yolo", "csv"] = Field(default="none", description="tumor bounding boxes")
    boxes_csv: str = ""

    @model_validator(mode="after")
    def _boxes_csv_named(self):
        if self.boxes == "csv" and not self.boxes_csv:
            raise ValueError("boxes: csv needs boxes_csv, the CSV's path below the folder holding the class folders")
        if self.boxes != "csv" and self.boxes_csv:
            raise ValueError(f"boxes_csv is only read with boxes: csv (boxes is {self.boxes!r})")
        return self


class KaggleSource(_WithBoxes):
    kind: Literal["kaggle"]
    slug: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/dataset on Kaggle")
    version: int | None = Field(default=None, ge=1, description="dataset version; None = latest")
    subdir: str = Field(default="", description="folder inside the download holding the class folders")


class LocalSource(_WithBoxes):
    kind: Literal["local"]
    path: str = Field(description="existing folder, relative to the project root or absolute")
    mode: Literal["copy", "hardlink"] = "copy"
    subdir: str = ""


class PhantomDuplicates(_Section):
    """How many planted copies of each kind the phantom source writes (ground truth for dedup)."""

    exact: int = Field(default=8, ge=0)
    resized: int = Field(default=8, ge=0)
    reencoded: int = Field(default=8, ge=0)
    grayscale_rgb: int = Field(default=8, ge=0)
    cropped: int = Field(default=8, ge=0)
    padded: int = Field(default=8, ge=0)
    rotated: int = Field(default=8, ge=0)
    flipped: int = Field(default=8, ge=0)
    rescaled: int = Field(default=8, ge=0)
    conflicting_label: int = Field(default=4, ge=0)
    # re-uploads the merge is not yet built for (see README): 0 unless asked for
    augmented: int = Field(default=0, ge=0, description="random affine, fill, brightness, contrast, gamma, JPEG 30-95")
    annotated: int = Field(default=0, ge=0, description="burnt-in text, arrows, rectangles, scale bars, watermarks")
    # not a copy: a distinct slice of the same head, to be kept and put in the original's split
    adjacent_slice: int = Field(default=0, ge=0, description="the neighbouring slice of the same head (a look-alike)")


class PhantomSource(_Section):
    kind: Literal["phantom"]
    images_per_class: int = Field(default=200, ge=1)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    image_size: int = Field(default=256, ge=32, le=1024)
    seed: int = 0
    duplicates: PhantomDuplicates = PhantomDuplicates()
    subdir: str = ""


Source = Annotated[Union[KaggleSource, LocalSource, PhantomSource], Field(discriminator="kind")]


class DownloadParams(_Section):
    use: tuple[str, ...] = Field(min_length=1, description="names of the sources to fetch and merge")
    sources: dict[str, Source]

    @model_validator(mode="after")
    def _used_sources_exist(self) -> "DownloadParams":
        for name in self.use:
            if name not in self.sources:
                raise ValueError(
                    f"download.use names {name!r}, which is not in download.sources "
                    f"(defined: {sorted(self.sources)})"
                )
        for name in self.sources:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"download.sources: name {name!r} must be letters, digits, '_' or '-'")
        if len(set(self.use)) != len(self.use):
            raise ValueError(f"download.use lists a source twice: {list(self.use)}")
        return self


# --------------------------------------------------------------------------- merge


class KeypointParams(_Section):
    """Keypoint search for the copies the head-box search misses: augmented and annotated re-uploads."""

    enabled: bool = True
    features: int = Field(default=300, ge=20, le=5000, description="ORB keypoints per image")
    words: int = Field(default=4096, ge=8, le=16384, description="visual words of the shortlist's vocabulary")
    neighbours: int = Field(default=20, ge=1, le=100, description="shortlist size per image")
    min_inliers: int = Field(default=15, ge=4, description="RANSAC inliers of the similarity transform")
    related_correlation: float = Field(default=0.7, ge=-1.0, le=1.0, description="after warping: a look-alike")
    copy_residual: float = Field(default=0.0, ge=0.0, le=1.0,
                                 description="a look-alike whose copy residual is at most this is a copy (0: none)")
    residual_correlation: float = Field(default=0.7, ge=-1.0, le=1.0, description=(
        "a match correlated at least this after warping has its copy residual measured, and is a copy at or "
        "under copy_residual even when it is no look-alike (burnt-in marks lower the correlation)"))
    agreement_correlation: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "a match correlated at least this after warping, under related_correlation, is a look-alike too when "
        "the head-box search scores the pair agreement_similarity or more: two weaker signals that agree (0: off)"))
    agreement_similarity: float = Field(default=0.9, ge=0.0, le=1.0,
                                        description="the head-box score that agreement_correlation needs")


class NearDuplicateParams(_Section):
    """Near-duplicate search: a k-nearest-neighbour shortlist confirmed by an aligned comparison."""

    enabled: bool = True
    neighbours: int = Field(default=10, ge=1, le=100, description="shortlist size per image")
    shortlist_similarity: float = Field(default=0.5, ge=-1.0, le=1.0)
    verify_similarity: float = Field(default=0.95, ge=0.0, le=1.0, description="copies of one slice")
    related_similarity: float = Field(default=0.93, ge=0.0, le=1.0, description="look-alike slices: same split")
    max_rotation_deg: float = Field(default=8.0, ge=0.0, le=45.0)
    rotation_step_deg: float = Field(default=2.0, gt=0.0, le=10.0)
    detail_similarity: float = Field(default=0.98, ge=0.0, le=1.0, description=(
        "a copy must also score this at 96 px after ECC registration, which tells it from the neighbouring "
        "slice of one series (then a look-alike: kept, same split); 0 = off"))
    keypoints: KeypointParams = KeypointParams()


    @model_validator(mode="after")
    def _related_below_verify(self) -> "NearDuplicateParams":
        if self.related_similarity > self.verify_similarity:
            raise ValueError(
                f"merge.near_duplicates.related_similarity ({self.related_similarity}) must not exceed "
                f"verify_similarity ({self.verify_similarity})"
            )
        return self


class MergeParams(_Section):
    label_map: dict[str, tuple[str, ...]]
    keep: Literal["largest", "first_source"] = "largest"
    max_colour_share: float = Field(default=0.06, ge=0.0, le=1.0, description="more coloured pixels: not an MRI slice")
    near_duplicates: NearDuplicateParams = NearDuplicateParams()
    workers: int = Field(default=0, ge=0, description="processes for decoding and hashing, threads for the keypoint verification; 0 = one per core")

    @model_validator(mode="after")
    def _labels_are_known_and_folders_unique(self) -> "MergeParams":
        unknown = sorted(set(self.label_map) - set(CLASS_NAMES) - {TUMOR_LABEL})
        if unknown:
            raise ValueError(f"merge.label_map: unknown label(s) {unknown}; allowed: {[*CLASS_NAMES, TUMOR_LABEL]} "
                             f"({TUMOR_LABEL!r}: a tumor of unknown class, for external sources only)")
        missing = sorted(set(CLASS_NAMES) - set(self.label_map))
        if missing:
            raise ValueError(f"merge.label_map: no folders given for label(s) {missing}")
        seen: dict[str, str] = {}
        for label, folders in self.label_map.items():
            for folder in folders:
                key = folder.lower()
                if key in seen and seen[key] != label:
                    raise ValueError(
                        f"merge.label_map: folder {folder!r} maps to both {seen[key]!r} and {label!r}"
                    )
                seen[key] = label
        return self

    def folder_to_label(self) -> dict[str, str]:
        """Lower-cased class-folder name -> canonical label."""
        return {f.lower(): label for label, folders in self.label_map.items() for f in folders}


# --------------------------------------------------------------------------- preprocess


class PreprocessParams(_Section):
    image_size: int = Field(default=224, ge=32, le=1024)
    crop_to_head: bool = True
    head_threshold: int = Field(default=12, ge=0, le=254, description="grey level that separates head from background")
    clahe_clip_limit: float = Field(default=2.0, ge=0.0, description="0 disables CLAHE")
    clahe_tile_grid: int = Field(default=8, ge=1, le=64)
    sharpen_sigma: float = Field(default=1.0, gt=0.0)
    sharpen_amount: float = Field(default=0.5, ge=0.0, description="0 disables sharpening")
    workers: int = Field(default=0, ge=0, description="processes; 0 = one per core")


# --------------------------------------------------------------------------- split


class SplitParams(_Section):
    strategy: Literal["leak_free", "source_folders", "source_folders_clean"] = "leak_free"
    train: float = Field(default=0.7, gt=0.0, lt=1.0)
    val: float = Field(default=0.15, gt=0.0, lt=1.0)
    test: float = Field(default=0.15, gt=0.0, lt=1.0)
    seed: int = 42
    test_source: str = Field(default="", description="source_folders: the source whose folders are reproduced")
    test_folder: str = Field(default="Testing", description="source_folders: that source's test folder")
    train_copies: Literal["one", "all"] = Field(
        default="one", description="one image per training duplicate group, or all its members weighted 1/size")
    external: tuple[str, ...] = Field(
        default=(), description="sources held out of train/val/test and evaluated on their own (external validation)")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitParams":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1.0, got {total:.4f}")
        if self.strategy.startswith("source_folders") and not self.test_source:
            raise ValueError(f"split.test_source must name a source when split.strategy is {self.strategy!r}")
        if self.strategy.startswith("source_folders") and self.test_source in self.external:
            raise ValueError(f"split.test_source {self.test_source!r} cannot also be in split.external")
        if len(set(self.external)) != len(self.external):
            raise ValueError(f"split.external lists a source twice: {list(self.external)}")
        return self


# --------------------------------------------------------------------------- model and training

BACKBONES = ("resnet50", "xception", "efficientnetb0", "densenet121", "mobilenetv3small")


class ModelParams(_Section):
    """The classifier: a keras.applications backbone and the seed's head (shared by all model stages)."""

    backbone: Literal["resnet50", "xception", "efficientnetb0", "densenet121", "mobilenetv3small"] = "resnet50"
    weights: str = Field(default="imagenet", description="imagenet | none | path to a .weights.h5 / .h5 file")
    dense_units: tuple[int, int] = (512, 128)
    dropout: tuple[float, float] = (0.5, 0.3)

    @model_validator(mode="after")
    def _dropout_in_range(self) -> "ModelParams":
        if not all(0.0 <= rate < 1.0 for rate in self.dropout):
            raise ValueError(f"model.dropout rates must be in [0, 1), got {list(self.dropout)}")
        if not all(units >= 1 for units in self.dense_units):
            raise ValueError(f"model.dense_units must be positive, got {list(self.dense_units)}")
        return self


class AugmentParams(_Section):
    """Training-time augmentation, fused into one affine transform per image. 0 / false turns one off."""

    rotation_deg: float = Field(default=15.0, ge=0.0, le=180.0, description="uniform in [-r, r]")
    zoom: float = Field(default=0.1, ge=0.0, lt=1.0, description="scale uniform in [1 - z, 1 + z]")
    shift: float = Field(default=0.1, ge=0.0, lt=1.0, description="fraction of the image size, per axis")
    shear_deg: float = Field(default=5.0, ge=0.0, lt=45.0)
    horizontal_flip: bool = True


class RuntimeParams(_Section):
    """How training runs: seeds, determinism, precision, compilation, devices (shared by both phases)."""

    seed: int = 42
    deterministic: bool = Field(default=True, description="op determinism: identical metrics for identical params on CPU")
    mixed_precision: Literal["auto", "on", "off"] = Field(default="auto", description="auto: on with a GPU")
    xla: Literal["auto", "on", "off"] = Field(default="auto", description="auto: on with a GPU")
    distribution: Literal["auto", "none", "mirrored", "multi_worker"] = Field(
        default="auto", description="auto: mirrored with >1 GPU; multi_worker: the cluster in TF_CONFIG")


class PhaseParams(_Section):
    """One training phase: optimiser schedule and callbacks on one validation number (``select_on``)."""

    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    epochs: int = Field(default=30, ge=1, description="maximum; early stopping may end sooner")
    early_stopping_patience: int = Field(default=5, ge=1)
    reduce_lr_factor: float = Field(default=0.2, gt=0.0, lt=1.0)
    reduce_lr_patience: int = Field(default=2, ge=1)
    min_lr: float = Field(default=1e-6, ge=0.0)
    schedule: Literal["plateau", "cosine"] = Field(
        default="plateau", description="plateau: reduce_lr_factor when select_on stalls; cosine: decay to min_lr over epochs")
    select_on: Literal["val_loss", "val_accuracy"] = Field(
        default="val_loss", description="the validation number that picks the best epoch (the earlier on a tie), "
        "stops early, reduces the rate on a plateau and decides whether the weight average is kept")
    class_weights: bool = Field(default=True, description="weight classes by inverse frequency")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="targets (1 - e) one-hot + e / classes")
    mixup: float = Field(default=0.0, ge=0.0, description="0 = off; a: each training item blended with another of its "
                         "batch, with the same blend of their labels and weights, the share ~ Beta(a, a)")
    average_weights_from: int = Field(
        default=0, ge=0, description="0 = off; N: the trainable weights at the end of epoch N and every later epoch "
        "are averaged, and the average replaces the best epoch's weights if it is better on select_on")


class TrainBaseParams(PhaseParams):
    feature_cache: bool = Field(default=True, description="run the frozen backbone once per image, train the head on features")
    feature_cache_copies: int = Field(default=2, ge=0, description="augmented copies per training image in the cache (plus the original)")


class FinetuneParams(PhaseParams):
    unfreeze: int | str = Field(default=30, description="the last N backbone layers, every layer from this name on, or all")
    activation_cache: bool = Field(default=True, description="run the frozen layers once per image and copy; train the unfrozen top on their outputs")
    cache_copies: int = Field(default=3, ge=0, description="augmented copies per training image in the activation cache (plus the original)")
    cache_dtype: Literal["float16", "float32"] = Field(default="float16", description="storage of the cached activations")
    learning_rate: float = Field(default=1e-5, gt=0.0)
    batch_size: int = Field(default=16, ge=1)
    epochs: int = Field(default=10, ge=1)
    early_stopping_patience: int = Field(default=3, ge=1)


class MlflowParams(_Section):
    """Where runs are logged. A relative sqlite path is resolved against the project's main root."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = Field(default="braintumor", min_length=1)
    registered_model: str = Field(default="braintumor-classifier", min_length=1)


# --------------------------------------------------------------------------- all


# --------------------------------------------------------------------------- evaluate, gradcam, app


class FeatureCheckParams(_Section):
    """The feature-space out-of-distribution check (braintumor.evaluate.feature_check), fitted by evaluate."""

    flag_share: float = Field(default=0.01, ge=0.0, lt=0.5,
                              description="share of the validation split the threshold flags (the false-alarm budget)")
    layer: str = Field(default="auto", min_length=1,
                       description="layer whose input, averaged over space, are the features; auto = the backbone's stride-16 stage")
    shifted_sets: dict[str, str] = Field(
        default_factory=dict,
        description="name -> folder of images unlike the training data (searched recursively); the report gives "
                    "the check's AUROC and flag rate on each. Relative folders resolve against the repo root.")

    @field_validator("shifted_sets")
    @classmethod
    def _set_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z0-9_-]+", name)]
        if bad:
            raise ValueError(f"shifted set names must be letters, digits, '_' or '-' (they become metric keys), got {bad}")
        return value


class ExportParams(_Section):
    """The fine-tuned model exported for deployment (braintumor.model.export)."""

    formats: tuple[Literal["tflite_float16", "tflite_int8", "onnx"], ...] = ("tflite_float16", "tflite_int8", "onnx")
    calibration_images: int = Field(default=200, ge=1, description="int8: training slices the converter calibrates on")
    int8_float_above: float = Field(
        default=2.0, ge=0, description="int8: a layer whose int8 output is off by more than this many quantization steps "
                                       "(RMSE / scale, on the calibration slices) stays float; 0 = every layer int8")
    seed: int = 0
    onnx_opset: int = Field(default=17, ge=13, le=21)

    @field_validator("formats")
    @classmethod
    def _no_repeats(cls, formats):
        if len(set(formats)) != len(formats):
            raise ValueError(f"export.formats lists a format twice: {list(formats)}")
        return formats


class EvaluateParams(_Section):
    """Test-split metrics of both models, bootstrap intervals, calibration (temperature scaling)."""

    batch_size: int = Field(default=32, ge=1)
    bootstrap_resamples: int = Field(default=1000, ge=10)
    bootstrap_seed: int = 0
    calibration_bins: int = Field(default=15, ge=2)
    errors_listed: int = Field(default=10, ge=0, description="most confident misclassifications shown in reports/evaluation.md")
    tta: Literal["none", "flip", "flip_shift"] = Field(
        default="none", description="test-time augmentation: flip = the mean of the slice's and its mirror image's "
                                    "probabilities; flip_shift = also of both moved left, right, up and down (10 views); "
                                    "recorded in models/calibration.json, so the app predicts the same way")
    feature_check: FeatureCheckParams = FeatureCheckParams()


class GradcamParams(_Section):
    """Grad-CAM report: which layer, how many test images per class, overlay look, sanity checks."""

    layer: str = Field(default="auto", description="conv layer name; auto = the backbone's last conv block")
    images_per_class: int = Field(default=4, ge=1)
    overlay_alpha: float = Field(default=0.4, ge=0.0, le=1.0)
    seed: int = 0
    sanity_images: int = Field(default=100, ge=2, description="test images for the sanity checks (with a tumor mask where there are masks)")
    randomise_top: int | str = Field(default=38, description="randomisation test: the model's last N layers (head = last 8), or from this layer name")
    max_rank_correlation: float = Field(default=0.5, ge=-1.0, le=1.0, description="randomisation test passes below this")
    pointing_tolerance_px: float = Field(default=15.0, ge=0.0, description="pointing game also counted within this distance of the mask")
    box_tolerance: float = Field(default=0.03, ge=0.0, le=0.5, description="tumor boxes: pointing game also counted within this share of the image side")
    box_examples: int = Field(default=12, ge=0, description="tumor-box overlays in the report")


class OodParams(_Section):
    """The app's out-of-distribution rule (see braintumor.serve.ood): an upload failing any check gets no label.

    The image checks were set on the 7,023 Nickparvar slices (none flagged) against colour photographs,
    blank images and rendered text; the colour check reuses ``merge.max_colour_share``.
    """

    min_contrast: float = Field(default=10.0, ge=0.0, description="grey-level standard deviation; MRI >= 20")
    max_flat_share: float = Field(default=0.75, gt=0.0, le=1.0,
                                  description="foreground share at one grey level (+-2); MRI <= 0.59, text >= 0.85")
    min_head_share: float = Field(default=0.75, ge=0.0, le=1.0,
                                  description="foreground share inside its largest region; MRI >= 0.83, text <= 0.15")
    confidence_quantile: Literal["0.01", "0.05", "0.10"] = Field(
        default="0.01", description="flag a top calibrated probability below this quantile of the validation split's")


class AppParams(_Section):
    """The Gradio app: where it listens, what it loads, what it accepts."""

    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=1, le=65535)
    model: str = Field(default="models/finetuned.keras", description="path or MLflow models:/ URI")
    max_upload_mb: float = Field(default=20.0, gt=0)
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="decompression-bomb guard")
    ood: OodParams = OodParams()


class Params(_Section):
    download: DownloadParams
    merge: MergeParams
    preprocess: PreprocessParams = PreprocessParams()
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    augment: AugmentParams = AugmentParams()
    runtime: RuntimeParams = RuntimeParams()
    train_base: TrainBaseParams = TrainBaseParams()
    finetune: FinetuneParams = FinetuneParams()
    mlflow: MlflowParams = MlflowParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    gradcam: GradcamParams = GradcamParams()
    app: AppParams = AppParams()

    @model_validator(mode="after")
    def _weight_averaging_and_mixup_run_on_one_process(self) -> "Params":
        if self.runtime.distribution != "multi_worker":
            return self
        averaged = [f"{name}.average_weights_from" for name in ("train_base", "finetune")
                    if getattr(self, name).average_weights_from]
        if averaged:
            # choosing between the average and the best epoch takes a validation pass of its own,
            # which the workers would have to take in step
            raise ValueError(f"{', '.join(averaged)} must be 0 with runtime.distribution multi_worker: "
                             "weight averaging runs on one process only")
        mixed = [f"{name}.mixup" for name in ("train_base", "finetune") if getattr(self, name).mixup]
        if mixed:  # the workers' own training step counts and scores integer labels only
            raise ValueError(f"{', '.join(mixed)} must be 0 with runtime.distribution multi_worker: "
                             "mixup runs on one process only")
        return self

    @model_validator(mode="after")
    def _split_source_is_used(self) -> "Params":
        if self.split.strategy == "source_folders" and self.split.test_source not in self.download.use:
            raise ValueError(
                f"split.test_source {self.split.test_source!r} is not in download.use {list(self.download.use)}"
            )
        unused = [name for name in self.split.external if name not in self.download.use]
        if unused:
            raise ValueError(f"split.external names {unused}, which download.use {list(self.download.use)} does not fetch")
        if self.split.external and set(self.split.external) >= set(self.download.use):
            raise ValueError(f"split.external {list(self.split.external)} leaves no source to train on: "
                             f"download.use is {list(self.download.use)}")
        return self


def _describe(error: dict[str, Any]) -> str:
    # pydantic puts the union member's tag in the location ("kaggle", "function-after[...]"); users
    # only know their own keys, so keep the parts that are keys or list indices.
    parts = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    key = ".".join(parts) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (check its spelling against params.yaml's documented keys)"
    return f"{key}: {message}"


def parse_params(raw: dict[str, Any], origin: str = "params") -> Params:
    """Validate an already-parsed params mapping; raise :class:`ParamsError` naming each bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ParamsError(f"invalid {origin}:\n  " + "\n  ".join(lines)) from None


def read_yaml(text: str) -> Any:
    """Parse YAML 1.2, as DVC does: a bare ``no`` is the string "no" (YAML 1.1 would make it false).

    ``dvc exp run -S`` rewrites params.yaml with a YAML 1.2 writer, which drops the quotes that
    YAML 1.1 readers need, so reading it any other way would disagree with DVC.
    """
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def dump_yaml(value: Any, *, flow: bool = False) -> str:
    """YAML text of ``value`` that :func:`read_yaml` (YAML 1.2) and YAML 1.1 readers both read back equal.

    Written by PyYAML's safe dumper: it quotes every scalar a YAML 1.1 reader would take for another
    type (``'no'``, ``'on'``), which YAML 1.2 reads as the same string, whereas a YAML 1.2 writer
    leaves them bare. Keys keep their order.

    Args:
        value: plain data (dicts, lists, strings, numbers, booleans, None).
        flow: one line in flow style (``[phantom]``, ``{a: 1}``, ``0.5``), as ``dvc exp run -S
            key=value`` takes it; otherwise block style, as params.yaml is written.
    """
    import yaml

    if not flow:
        return yaml.safe_dump(value, sort_keys=False)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").strip()  # a bare scalar ends its document with "..."


def write_yaml(path: str | Path, value: Any) -> None:
    """Write ``value`` to ``path`` as block-style YAML (:func:`dump_yaml`)."""
    Path(path).write_text(dump_yaml(value))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    from ruamel.yaml import YAMLError

    path = Path(path)
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, origin=str(path))
