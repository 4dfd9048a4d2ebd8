"""The web app: upload a brain MRI slice, see the predicted class, its calibrated confidence and Grad-CAM.

Run ``make app`` or ``python -m braintumor.serve.app [--model models/finetuned.keras] [--host 127.0.0.1] [--port 7860]``
from inside the project; defaults come from params.yaml's ``app`` section. The model is loaded once at
start (:func:`braintumor.serve.bundle.load_bundle`); every upload goes through
:func:`braintumor.serve.bundle.predict_upload`, the same function the tests call.

API (``gradio_client``), endpoint ``/classify``, one input (the file), five outputs: the label
(class confidences, or None when flagged), the verdict in Markdown, the preprocessed input and the
Grad-CAM overlay (PNG files), and a details mapping (probabilities, out-of-distribution flags, image
statistics, model identity, seconds; for a file the app cannot use, ``details["error"]`` with a
``reason`` code and the message, and no other output)::

    from gradio_client import Client, handle_file
    label, verdict, preprocessed, overlay, details = Client("http://127.0.0.1:7860/").predict(
        handle_file("slice.png"), api_name="/classify")
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from braintumor.core.config import CLASS_NAMES, load_params
from braintumor.core.paths import find_project_root
from braintumor.core.scratch import exit_on_sigterm, process_scratch_folder
from braintumor.serve.bundle import (ModelBundle, ModelLoadError, ModelNotFoundError, PredictionResult, ServingSettings,
                                load_bundle, predict_upload)
from braintumor.core.tracking import resolve_tracking_uri
from braintumor.model.tta import TTA_DESCRIPTIONS
from braintumor.serve.uploads import UploadError

log = logging.getLogger("braintumor.serve.app")

API_NAME = "classify"
NOTICE = (
    "**Research tool, not a medical device.** It has not been validated for clinical use and must not be used "
    "for diagnosis or treatment decisions. Do not upload identifiable patient data."
)
# The model's input is small (64-300 px): show it enlarged, pixels kept sharp, instead of at its own size.
CSS = """
#preprocessed img, #gradcam img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""
SYNTHETIC_BANNER = (
    "⚠️ **This model was trained only on synthetic phantom slices** (the offline demo). Its predictions on "
    "real MRI scans mean nothing, whatever confidence it shows; train it on real data first (README, \"Real data\")."
)
EXAMPLE_SEED = 2024
EXAMPLE_SIZE = 256


# --------------------------------------------------------------------------- text for the page


def identity_markdown(bundle: ModelBundle | None, settings: ServingSettings) -> str:
    """The model panel: which model answers, how it was trained, how its outputs are calibrated."""
    if bundle is None:
        return "No model loaded."
    ident, cal = bundle.identity, bundle.calibration
    calibration = (f"temperature {cal.temperature:.3f} ({cal.source}); low-confidence check below the validation "
                   f"{settings.confidence_quantile} quantile = {cal.val_max_probability_quantiles[settings.confidence_quantile]:.3f}"
                   if cal.source else "none (raw softmax)")
    rows = [
        ("Model file", ident.model_file), ("MLflow run", ident.mlflow_run_id or "unknown"),
        ("Trained at", ident.trained_at or "unknown"), ("Git commit", ident.git_commit or "unknown"),
        ("DVC experiment", ident.dvc_experiment or "-"), ("Backbone", ident.backbone or "unknown"),
        ("Training data", ident.provenance().removeprefix("Trained on: ")),
        ("Input", f"{bundle.image_size} x {bundle.image_size} grey, classes {', '.join(bundle.class_names)}"),
        ("Preprocessing", f"from the model card {ident.card_file}" if ident.card_file
         else "**params.yaml's `preprocess` section (no model card)**"),
        ("Calibration", calibration),
        ("Prediction", TTA_DESCRIPTIONS[cal.tta]),
        ("Training-data check", f"Mahalanobis distance at `{bundle.feature_check.layer}` above "
                                f"{bundle.feature_check.threshold:.0f} (flags {bundle.feature_check.flag_share:.0%} of validation)"
         if bundle.feature_check else "off (no ood.npz)"),
        ("Grad-CAM layer", f"`{bundle.gradcam_layer}`" if bundle.gradcam_model is not None
         else "**none: an exported model without its Keras model beside it gives no Grad-CAM**"),
    ]
    listing = "\n".join(f"- **{key}:** {value}" for key, value in rows)
    notes = "".join(f"\n\n> **Note:** {note}" for note in bundle.notes)
    return listing + notes


def verdict_markdown(result: PredictionResult, calibrated: bool, identity=None) -> str:
    """The headline of one result: the class and its confidence, or why there is no label; then what
    the model was trained on (``identity``, a :class:`~braintumor.serve.bundle.ModelIdentity`), with the
    synthetic-data warning when it knows only phantoms."""
    top = max(result.probabilities, key=result.probabilities.get)
    kind = "calibrated" if calibrated else "uncalibrated"
    if result.verdict.in_distribution:
        text = f"### {top.replace('_', ' ')}: {result.probabilities[top]:.0%} ({kind} confidence)"
        if not result.verdict.confidence_checked:
            text += "\n\nThe low-confidence check is off: this model has no calibration entry."
        if not result.verdict.features_checked:
            text += "\n\nThe training-data similarity check is off: this model has no `ood.npz` entry."
    else:
        headline = ("Not classified: this does not look like a brain MRI slice" if not result.verdict.looks_like_mri
                    else "Not classified: this image is unlike the model's training data" if result.verdict.unlike_training
                    else "Not classified: the model is unsure")
        reasons = "\n".join(f"- {flag.message}" for flag in result.verdict.flags)
        text = (f"### ⚠️ {headline}\n\n{reasons}\n\nFor reference only, the model's top class was "
                f"{top.replace('_', ' ')} ({result.probabilities[top]:.0%}, {kind}).")
    if identity is not None:
        text += f"\n\n{identity.provenance()}."
        if identity.synthetic_only:
            text += f"\n\n> {SYNTHETIC_BANNER}"
    return text + f"\n\n<small>Upload: {result.upload}; {result.seconds * 1000:.0f} ms.</small>"


def result_details(result: PredictionResult, bundle: ModelBundle) -> dict:
    """Everything about one result, for the API and the details panel (no patient data is ever read)."""
    return {
        "label": result.label,
        "probabilities": result.probabilities,
        "calibrated": bundle.calibration.source is not None,
        "in_distribution": result.verdict.in_distribution,
        "flags": [asdict(flag) for flag in result.verdict.flags],
        "confidence_checked": result.verdict.confidence_checked,
        "features_checked": result.verdict.features_checked,
        "feature_score": result.feature_score,
        "image_stats": asdict(result.stats),
        "upload": result.upload,
        "model": asdict(bundle.identity),
        "notes": list(bundle.notes),
        "seconds": round(result.seconds, 4),
    }


# --------------------------------------------------------------------------- examples


def write_examples(folder: Path, size: int = EXAMPLE_SIZE, seed: int = EXAMPLE_SEED) -> list[tuple[Path, str]]:
    """One synthetic phantom slice per class as PNG (never patient data): [(path, caption)]."""
    from braintumor.data.phantom.source import render_slice

    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index, label in enumerate(CLASS_NAMES):
        image, _ = render_slice(np.random.default_rng([seed, index]), label, size)
        path = folder / f"phantom_{label}.png"
        cv2.imwrite(str(path), image)
        examples.append((path, f"phantom {label.replace('_', ' ')}"))
    return examples


# --------------------------------------------------------------------------- the page


def refusal(reason: str, title: str, message: str) -> tuple:
    """The outputs for an upload that gets no result: the message in place of the verdict, nothing else."""
    return None, f"### ⛔ {title}\n\n{message}", None, None, {"label": None, "error": {"reason": reason, "message": message}}


def make_classify(bundle: ModelBundle | None, settings: ServingSettings, missing_model: str | None):
    """The event handler: file path -> (label, verdict, preprocessed, overlay, details).

    A file the app cannot use is answered, not raised: the page shows why where the result would be,
    and API callers find ``details["error"]`` = {"reason": one of braintumor.serve.uploads.REASONS, "message"}.
    """
    empty = (None, "", None, None, None)

    def classify(file_path: str | None):
        if file_path is None:
            return empty
        if bundle is None:
            return refusal("no_model", "No trained model", missing_model or "No model is loaded.")
        try:
            result = predict_upload(bundle, file_path, settings)
        except UploadError as exc:
            log.info("upload refused (%s)", exc.reason)  # the reason code only: messages never hold patient data
            return refusal(exc.reason, "Cannot use this file", str(exc))
        label = result.probabilities if result.label is not None else None
        return (label, verdict_markdown(result, bundle.calibration.source is not None, bundle.identity), result.preprocessed,
                result.overlay, result_details(result, bundle))

    return classify


def build_app(bundle: ModelBundle | None, settings: ServingSettings, missing_model: str | None,
              examples: list[tuple[Path, str]]):
    """The Gradio Blocks page; ``bundle`` None shows ``missing_model`` (how to get a model) instead of results."""
    import gradio as gr

    # Uploads and result images live in Gradio's temp folder: delete them after an hour, and all at restart.
    with gr.Blocks(title="Brain tumor MRI classifier", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown("# Brain tumor MRI classifier\nGlioma, meningioma, pituitary tumor or no tumor, "
                    "from one 2D MRI slice, with Grad-CAM showing where the model looked.")
        gr.Markdown(NOTICE, elem_id="notice")
        if bundle is None:
            gr.Markdown(f"## No trained model\n\n{missing_model}", elem_id="no-model")
        elif bundle.identity.synthetic_only:
            gr.Markdown(SYNTHETIC_BANNER, elem_id="synthetic-banner")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="MRI slice: PNG or JPEG (8/16-bit, grey/RGB/RGBA) or DICOM MR",
                                 type="filepath", elem_id="upload")
                gr.Examples([[str(path)] for path, _ in examples], inputs=[upload],
                            example_labels=[caption for _, caption in examples],
                            label="Examples (synthetic phantom slices, not patient data)")
            with gr.Column(scale=2):
                verdict = gr.Markdown(elem_id="verdict")
                label = gr.Label(label="Prediction (class-wise confidence)", num_top_classes=len(CLASS_NAMES),
                                 elem_id="prediction")
                with gr.Row():
                    preprocessed = gr.Image(label="Preprocessed input (what the model sees)", format="png",
                                            type="numpy", interactive=False, height=320, elem_id="preprocessed")
                    overlay = gr.Image(label="Grad-CAM (predicted class)", format="png", type="numpy",
                                       interactive=False, height=320, elem_id="gradcam")
                with gr.Accordion("Details", open=False):
                    details = gr.JSON(label="Details", elem_id="details")
        with gr.Accordion("Model", open=True):
            gr.Markdown(identity_markdown(bundle, settings), elem_id="identity")
        upload.change(make_classify(bundle, settings, missing_model), inputs=[upload],
                      outputs=[label, verdict, preprocessed, overlay, details], api_name=API_NAME)
    return app


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None, defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m braintumor.serve.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=defaults.model,
                        help=".keras file, relative to the project root, or an MLflow registry URI such as "
                             f"models:/braintumor-classifier/3 or models:/braintumor-classifier@champion (default: {defaults.model})")
    parser.add_argument("--host", default=defaults.host, help=f"address to bind (default: {defaults.host})")
    parser.add_argument("--port", type=int, default=defaults.port, help=f"port (default: {defaults.port})")
    return parser.parse_args(argv)


def _load(model: str, root: Path, params, settings: ServingSettings) -> tuple[ModelBundle | None, str | None]:
    try:
        return load_bundle(model, root, params.preprocess, settings.gradcam_layer,
                           tracking_uri=resolve_tracking_uri(params.mlflow.tracking_uri, root)), None
    except ModelNotFoundError as exc:
        log.warning("%s", exc)
        return None, str(exc)


def main(argv: list[str] | None = None) -> None:
    """Load params and the model, then serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines; nothing to report
    exit_on_sigterm()  # a stopped server removes its scratch folders (the examples, a fetched model)
    root = find_project_root()
    params = load_params(root / "params.yaml")
    args = parse_args(argv, params.app)
    settings = ServingSettings.from_params(params)
    try:
        bundle, missing = _load(args.model, root, params, settings)
    except ModelLoadError as exc:
        sys.exit(f"error: {exc}")
    examples_dir = process_scratch_folder("braintumor-app-examples-")
    app = build_app(bundle, settings, missing, write_examples(examples_dir))
    app.queue(default_concurrency_limit=1)  # one model, two cores: requests run one at a time
    app.launch(server_name=args.host, server_port=args.port, max_file_size=settings.max_upload_bytes,
               allowed_paths=[str(examples_dir)], show_error=True, footer_links=["api"], ssr_mode=False, css=CSS)


if __name__ == "__main__":
    main()
