"""Batch prediction: classify every MRI slice in files and folders with one model, as the app would, into a CSV.

    python -m braintumor.predict PATH... --out predictions.csv [--model MODEL] [--gradcam-dir DIR] [--workers N]
    make predict ARGS="data/some/folder --out predictions.csv"

Every file goes through :mod:`braintumor.serve.bundle` exactly as an upload to the app does: the same
decoding (images and DICOM MR), preprocessing, calibration and out-of-distribution rule
(:func:`~braintumor.serve.bundle.prepare_upload`, then :func:`~braintumor.serve.bundle.classify_prepared`).
``--model`` takes what the app takes (a ``.keras`` path relative to the project root, or ``models:/name/version``);
the default is params.yaml's ``app.model``.

Inputs: files, and folders walked recursively (hidden and system entries such as ``.ipynb_checkpoints/``
skipped and counted); every other file is tried, so a DICOM file without a suffix is read and a stray
text file gets an error row. Files are taken in sorted order, each once. A file that cannot be used gets
a row with its error and the run goes on; the exit status is 0 once the CSV is written.

The CSV (written atomically at the end), one row per file: ``path``, ``status`` (ok / error),
``predicted_class`` (empty when the out-of-distribution rule flagged the file, as the app gives no label),
``top_class`` (the model's top class, for reference), ``p_<class>`` (calibrated probabilities), ``calibrated``,
``ood``, ``ood_reasons`` (the failed checks, ``;``-separated), ``model_id``, ``gradcam`` (the PNG written, if
any), ``error_reason`` and ``error``. ``--gradcam-dir`` writes the app's Grad-CAM overlay of each ok file that
passed the image checks, at ``DIR/<the file's path>.gradcam.png`` (its folders mirrored, so same-named files
in different folders never collide).

Threads decode and preprocess files ahead while the main thread runs the model on batches. The command
reruns itself as a child process through :mod:`braintumor.core.quiet`, so TensorFlow's start-up chatter
never reaches the terminal; progress and the summary go to stdout, notes and errors to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:  # the parent process never imports them: it only starts the child
    from braintumor.serve.bundle import ModelBundle, ModelIdentity, PredictionResult, PreparedUpload, ServingSettings

BATCH_SIZE = 16  # slices per model call; grad_cam_with_features' own batch


@dataclass(frozen=True)
class FileError:
    """Why one file got no prediction: ``reason`` is an UploadError reason, "unreadable" or "failed"."""

    reason: str
    message: str


@dataclass(frozen=True)
class BatchSummary:
    """What a run did: counts of files, outcomes and predicted classes, and its wall time."""

    files: int
    ok: int
    errors: int
    ood_flagged: int
    skipped: int  # hidden or system entries in the folders, not read
    per_class: dict[str, int]
    errors_by_reason: dict[str, int]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- inputs and names


def list_input_files(paths: Iterable[str | Path]) -> tuple[list[Path], int]:
    """The files named by ``paths`` (folders walked recursively, hidden and system entries skipped), each once,
    sorted; and how many entries were skipped.

    Raises:
        FileNotFoundError: a path that does not exist (all of them are named).
    """
    from braintumor.core.imageio import is_system_entry

    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    files: dict[str, Path] = {}  # absolute, normalised path -> the path as the user spelt it
    skipped = 0
    for path in paths:
        if not path.is_dir():  # a file named on the command line is read even if hidden
            files.setdefault(os.path.abspath(path), path)
            continue
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if is_system_entry(PurePosixPath(file.relative_to(path).as_posix())):
                skipped += 1
            else:
                files.setdefault(os.path.abspath(file), file)
    return sorted(files.values(), key=str), skipped


def gradcam_png_path(gradcam_dir: Path, path: Path) -> Path:
    """``<gradcam_dir>/<path>.gradcam.png``: the input's folders mirrored (relative to the current folder when
    below it, else from the filesystem root), so files of the same name in different folders never collide."""
    absolute = Path(os.path.abspath(path))  # ".." resolved, so the PNG cannot land outside gradcam_dir
    try:
        relative = absolute.relative_to(Path.cwd())
    except ValueError:
        relative = absolute.relative_to(absolute.anchor)
    return gradcam_dir / relative.parent / f"{relative.name}.gradcam.png"


def model_id(identity: ModelIdentity) -> str:
    """Which model wrote a row: its file (or registry version) and its MLflow run when the card names one."""
    run = identity.mlflow_run_id
    return f"{identity.model_file} (MLflow run {run})" if run else identity.model_file


# --------------------------------------------------------------------------- rows


def csv_columns(class_names: Iterable[str]) -> list[str]:
    return ["path", "status", "predicted_class", "top_class", *(f"p_{name}" for name in class_names), "calibrated",
            "ood", "ood_reasons", "model_id", "gradcam", "error_reason", "error"]


def ok_row(path: Path, result: PredictionResult, bundle: ModelBundle, gradcam: Path | None) -> dict:
    """The CSV row of a :class:`~braintumor.serve.bundle.PredictionResult`."""
    probabilities = result.probabilities
    return {"path": str(path), "status": "ok", "predicted_class": result.label,
            "top_class": max(probabilities, key=probabilities.get),
            **{f"p_{name}": probabilities[name] for name in bundle.class_names},
            "calibrated": bundle.calibration.source is not None, "ood": not result.verdict.in_distribution,
            "ood_reasons": ";".join(flag.check for flag in result.verdict.flags), "model_id": model_id(bundle.identity),
            "gradcam": str(gradcam) if gradcam else None}


def error_row(path: Path, error: FileError, bundle: ModelBundle) -> dict:
    return {"path": str(path), "status": "error", "model_id": model_id(bundle.identity),
            "error_reason": error.reason, "error": error.message}


# --------------------------------------------------------------------------- the loop


def prepare_file(bundle: ModelBundle, settings: ServingSettings, path: Path) -> PreparedUpload | FileError:
    """:func:`~braintumor.serve.bundle.prepare_upload` of one file, or a :class:`FileError` saying why not."""
    from braintumor.serve.bundle import prepare_upload
    from braintumor.serve.uploads import UploadError

    try:
        return prepare_upload(bundle, path, settings)
    except UploadError as exc:
        return FileError(exc.reason, str(exc))
    except OSError as exc:
        return FileError("unreadable", f"cannot read the file: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001  one odd file must not end a run over thousands: its row says what
        return FileError("failed", f"{type(exc).__name__}: {exc}")


def prepared_in_order(files: list[Path], prepare: Callable, workers: int, lookahead: int) -> Iterator[tuple[Path, object]]:
    """``(path, prepare(path))`` for every file, in order; ``workers`` threads keep up to ``lookahead`` files
    prepared ahead of the caller, so decoding goes on while the caller runs the model."""
    queue = iter(files)
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending = deque((path, pool.submit(prepare, path)) for path in islice(queue, lookahead))
        while pending:
            path, future = pending.popleft()
            pending.extend((nxt, pool.submit(prepare, nxt)) for nxt in islice(queue, 1))
            yield path, future.result()


def write_gradcam_png(path: Path, overlay) -> Path:
    """Write an RGB uint8 overlay as PNG, atomically."""
    import cv2

    from braintumor.core.atomic import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)):
            raise OSError(f"OpenCV could not write {path}")
    return path


def predict_files(bundle: ModelBundle, settings: ServingSettings, files: list[Path], workers: int = 0,
                  gradcam_dir: Path | None = None, progress: Callable[[int], None] = lambda done: None) -> list[dict]:
    """One CSV row per file, in order (see the module docstring); ``progress`` is called with each file count done.

    Args:
        bundle: from :func:`braintumor.serve.bundle.load_bundle`.
        settings: the app's :class:`~braintumor.serve.bundle.ServingSettings`.
        workers: decoding threads (0 = one per available core).
        gradcam_dir: where to write the Grad-CAM PNGs, or None for none.
    """
    from braintumor.core.parallel import resolve_workers
    from braintumor.serve.bundle import classify_prepared

    rows: list[dict | None] = []
    batch: list[tuple[int, Path, PreparedUpload]] = []  # (row, path, prepared file)

    def run_model() -> None:
        for (row, path, _), result in zip(batch, classify_prepared(bundle, [item for *_, item in batch], settings)):
            png = (write_gradcam_png(gradcam_png_path(gradcam_dir, path), result.overlay)
                   if gradcam_dir is not None and result.overlay is not None else None)
            rows[row] = ok_row(path, result, bundle, png)
        progress(len(batch))
        batch.clear()

    prepare = partial(prepare_file, bundle, settings)
    for path, outcome in prepared_in_order(files, prepare, resolve_workers(workers, len(files)), 2 * BATCH_SIZE):
        rows.append(None)
        if isinstance(outcome, FileError):
            rows[-1] = error_row(path, outcome, bundle)
            progress(1)
            continue
        batch.append((len(rows) - 1, path, outcome))
        if len(batch) == BATCH_SIZE:
            run_model()
    if batch:
        run_model()
    return rows


def summarise(rows: list[dict], skipped: int, seconds: float) -> BatchSummary:
    """Counts over the rows of :func:`predict_files`."""
    ok = [row for row in rows if row["status"] == "ok"]
    errors = [row for row in rows if row["status"] == "error"]
    return BatchSummary(
        files=len(rows), ok=len(ok), errors=len(errors), ood_flagged=sum(row["ood"] for row in ok), skipped=skipped,
        per_class=dict(sorted(Counter(row["predicted_class"] for row in ok if row["predicted_class"]).items())),
        errors_by_reason=dict(sorted(Counter(row["error_reason"] for row in errors).items())),
        seconds=seconds)


def summary_text(summary: BatchSummary, out: Path) -> str:
    classes = ", ".join(f"{name} {n}" for name, n in summary.per_class.items()) or "none"
    reasons = f" ({', '.join(f'{r} {n}' for r, n in summary.errors_by_reason.items())})" if summary.errors else ""
    return (f"{summary.files} files: {summary.ok} ok, {summary.errors} errors{reasons}, "
            f"{summary.ood_flagged} flagged out-of-distribution (no class); {summary.skipped} hidden/system entries skipped\n"
            f"predicted: {classes}\n"
            f"{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s; wrote {out}")


def write_predictions(out: Path, rows: list[dict], class_names: Iterable[str]) -> None:
    import pandas as pd

    from braintumor.core.atomic import write_csv

    write_csv(out, pd.DataFrame(rows, columns=csv_columns(class_names)))


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None, default_model: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m braintumor.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image or DICOM files, or folders (walked recursively)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write (one row per file)")
    parser.add_argument("--model", default=default_model,
                        help=".keras file, relative to the project root, or an MLflow registry URI such as "
                             f"models:/braintumor-classifier/3 (default: app.model, {default_model})")
    parser.add_argument("--gradcam-dir", type=Path, help="also write each file's Grad-CAM overlay as a PNG here")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (default: 0 = one per core)")
    parser.add_argument("--export-only", action="store_true",
                        help="with an exported model (.tflite, .onnx): use it alone, not the Keras model beside it: "
                             "fastest, but no Grad-CAM and no check that a file is like the training data")
    args = parser.parse_args(argv)
    if args.export_only and Path(args.model).suffix not in (".tflite", ".onnx"):
        parser.error(f"--export-only needs an exported model (.tflite or .onnx), got --model {args.model}")
    if args.export_only and args.gradcam_dir:
        parser.error("--export-only gives no Grad-CAM: drop --gradcam-dir or --export-only")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (0 = one per core), got {args.workers}")
    return args


def load_serving(model: str, root: Path, params, export_only: bool = False) -> tuple[ModelBundle, ServingSettings]:
    """(bundle, settings): the app's own loader and settings for ``model`` (see braintumor.serve.app)."""
    from braintumor.core.tracking import resolve_tracking_uri
    from braintumor.serve.bundle import ServingSettings, load_bundle

    settings = ServingSettings.from_params(params)
    bundle = load_bundle(model, root, params.preprocess, settings.gradcam_layer,
                         tracking_uri=resolve_tracking_uri(params.mlflow.tracking_uri, root), export_only=export_only)
    return bundle, settings


def run(argv: list[str] | None = None) -> int:
    """The command's work: list the files, load the model, predict, write the CSV, print the summary."""
    from tqdm import tqdm

    from braintumor.core.config import ParamsError, load_params
    from braintumor.core.paths import find_project_root
    from braintumor.serve.bundle import ModelLoadError

    try:
        root = find_project_root()
        params = load_params(root / "params.yaml")
    except (FileNotFoundError, ParamsError) as exc:
        sys.exit(f"error: {exc}")
    args = parse_args(argv, params.app.model)
    try:
        if args.out.is_dir():
            raise IsADirectoryError(f"--out {args.out} is a folder: name the CSV file to write")
        files, skipped = list_input_files(args.paths)
        if not files:
            raise FileNotFoundError(f"no files in {', '.join(args.paths)} ({skipped} hidden or system entries skipped)")
        bundle, settings = load_serving(args.model, root, params, args.export_only)
    except (OSError, ModelLoadError) as exc:  # OSError: a missing path or model (ModelNotFoundError), a folder we may not read
        sys.exit(f"error: {exc}")
    print(f"model: {model_id(bundle.identity)}; {bundle.identity.provenance()}", flush=True)
    for note in bundle.notes + (("this model was trained only on synthetic phantom slices: its predictions on real "
                                 "scans mean nothing",) if bundle.identity.synthetic_only else ()):
        print(f"note: {note}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with tqdm(total=len(files), unit="file", file=sys.stdout, disable=None, dynamic_ncols=True) as bar:
        rows = predict_files(bundle, settings, files, args.workers, args.gradcam_dir, bar.update)
    write_predictions(args.out, rows, bundle.class_names)
    print(summary_text(summarise(rows, skipped, time.perf_counter() - started), args.out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor.predict``: rerun as a child whose stderr is filtered by :mod:`braintumor.core.quiet`,
    which does the work (:func:`run`)."""
    from braintumor.core import quiet

    argv = sys.argv[1:] if argv is None else argv
    try:
        status = quiet.rerun_filtered(["-m", "braintumor.predict", *argv])
    except KeyboardInterrupt:  # the child got the same signal and says so itself
        return 130
    if status is not None:
        return status
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("interrupted: no CSV written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
