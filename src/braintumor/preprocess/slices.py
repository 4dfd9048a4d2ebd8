"""The one preprocessing of an MRI slice, shared by the pipeline and the app, plus the cache writer.

:func:`preprocess_slice` is the whole transform: crop to the head -> pad to a square -> CLAHE ->
unsharp sharpening -> resize to (S, S). Each step is a pure function uint8 (H, W) -> uint8 (H', W')
with its parameters as plain arguments, so the app and the tests call exactly what the pipeline runs.

:func:`preprocess_to_array` runs it over many files in parallel and writes one memory-mappable
``.npy`` of shape (N, S, S) uint8 that the training stage reads without decoding JPEGs again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from braintumor.core import atomic
from braintumor.core.config import PreprocessParams
from braintumor.core.imageio import UnreadableImageError, read_grayscale, require_gray
from braintumor.data.head import head_bbox
from braintumor.core.parallel import map_in_workers, resolve_workers, single_threaded_opencv

# Rows a worker takes at a time. Small, so the slow tail (large images often sit together, one
# source after another) is shared by all workers; handing out a chunk costs well under a millisecond.
_CHUNK_ROWS = 16


class PreprocessError(RuntimeError):
    """A file of the batch could not be preprocessed; ``path`` names it.

    Picklable with its arguments, so the message survives the trip from a worker process.
    """

    def __init__(self, path: str | Path, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(f"cannot preprocess {path}: {detail}")

    def __reduce__(self):
        return type(self), (self.path, self.detail)


# --------------------------------------------------------------------------- geometry


def crop_to_head(gray: np.ndarray, threshold: int) -> np.ndarray:
    """The slice cropped to :func:`head_bbox` (a view of ``gray``, not a copy).

    Args:
        gray: uint8 (H, W) slice.
        threshold: grey level separating head from background (see :func:`head_bbox`).
    """
    y0, y1, x0, x1 = head_bbox(gray, threshold)
    return gray[y0:y1, x0:x1]


def square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) black borders that centre an (H, W) image in a max(H, W) square.

    When the difference is odd, the extra pixel goes after (bottom/right).
    """
    extra_y, extra_x = max(width - height, 0), max(height - width, 0)
    return extra_y // 2, extra_y - extra_y // 2, extra_x // 2, extra_x - extra_x // 2


def pad_to_square(gray: np.ndarray) -> np.ndarray:
    """Pad with black, centred, to a (L, L) square with L = max(H, W) (:func:`square_padding`); a square
    input is returned as is. Padding rather than stretching keeps the anatomy's aspect ratio through
    the later resize.

    Args:
        gray: uint8 (H, W) image.
    """
    require_gray(gray)
    height, width = gray.shape
    if height == width:
        return gray
    top, bottom, left, right = square_padding(height, width)
    return cv2.copyMakeBorder(gray, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)


@dataclass(frozen=True)
class SliceGeometry:
    """Where the raw slice's pixels go in the preprocessed (S, S) slice: crop, pad, resize."""

    crop: tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive, in the raw image: the head, or all of it
    side: int  # the padded square's side
    pad_top: int
    pad_left: int
    size: int  # S, the output side

    @property
    def head_box(self) -> tuple[int, int, int, int]:
        """The crop as a box (x0, y0, x1, y1) in raw pixels."""
        y0, y1, x0, x1 = self.crop
        return x0, y0, x1, y1


def slice_geometry(gray: np.ndarray, params: PreprocessParams) -> SliceGeometry:
    """The geometry :func:`preprocess_slice` applies to ``gray``: the same crop and padding functions."""
    require_gray(gray)
    height, width = gray.shape
    crop = head_bbox(gray, params.head_threshold) if params.crop_to_head else (0, height, 0, width)
    top, _, left, _ = square_padding(crop[1] - crop[0], crop[3] - crop[2])
    return SliceGeometry(crop=crop, side=max(crop[1] - crop[0], crop[3] - crop[2]), pad_top=top, pad_left=left,
                         size=params.image_size)


def box_to_slice(box: Sequence[float], geometry: SliceGeometry) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) in raw pixels, in the preprocessed slice's pixels; clipped to the slice
    (a box partly outside the head keeps only its part inside the crop)."""
    y0, _, x0, _ = geometry.crop
    scale = geometry.size / geometry.side
    xs = [(float(x) - x0 + geometry.pad_left) * scale for x in (box[0], box[2])]
    ys = [(float(y) - y0 + geometry.pad_top) * scale for y in (box[1], box[3])]
    limit = float(geometry.size)
    return (min(max(xs[0], 0.0), limit), min(max(ys[0], 0.0), limit),
            min(max(xs[1], 0.0), limit), min(max(ys[1], 0.0), limit))


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize to (size, size): area averaging when shrinking, bicubic (saturated to 0..255) when enlarging.

    Meant for the square output of :func:`pad_to_square`; a non-square input would be stretched.

    Args:
        gray: uint8 (H, W) image.
        size: output side in pixels (>= 1).
    """
    require_gray(gray)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if gray.shape == (size, size):
        return gray
    # INTER_AREA avoids aliasing when shrinking but is blocky when enlarging, where cubic is sharper;
    # OpenCV saturates cubic overshoot on uint8, so no explicit clip is needed.
    shrinking = max(gray.shape) > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(gray, (size, size), interpolation=interpolation)


# --------------------------------------------------------------------------- intensity


def apply_clahe(gray: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV's CLAHE).

    Args:
        gray: uint8 (H, W) image.
        clip_limit: histogram clip limit, relative to a flat histogram; 0 returns ``gray`` unchanged.
        tile_grid: the image is split into tile_grid x tile_grid tiles (>= 1).
    """
    require_gray(gray)
    if clip_limit < 0:
        raise ValueError(f"clip_limit must be >= 0 (0 disables CLAHE), got {clip_limit}")
    if tile_grid < 1:
        raise ValueError(f"tile_grid must be >= 1, got {tile_grid}")
    if clip_limit == 0:
        return gray
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid)).apply(gray)


def unsharp_mask(gray: np.ndarray, sigma: float, amount: float) -> np.ndarray:
    """Unsharp masking: clip(round(img + amount * (img - GaussianBlur(img, sigma)))) as uint8.

    Args:
        gray: uint8 (H, W) image.
        sigma: standard deviation of the Gaussian blur in pixels (> 0); the kernel is OpenCV's default
            for that sigma (7x7 at sigma 1).
        amount: how much of the detail (img - blur) to add back; 0 returns ``gray`` unchanged.
    """
    require_gray(gray)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if amount < 0:
        raise ValueError(f"amount must be >= 0 (0 disables sharpening), got {amount}")
    if amount == 0:
        return gray
    blurred = cv2.GaussianBlur(gray, (0, 0), sigmaX=float(sigma))
    # img + a*(img - blur) == (1+a)*img - a*blur; addWeighted computes it in float, rounds and
    # saturates to uint8 in one pass, without float32 temporaries.
    return cv2.addWeighted(gray, 1.0 + amount, blurred, -float(amount), 0.0)


# --------------------------------------------------------------------------- the pipeline


def preprocess_slice(gray: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """The shared preprocessing: crop to head -> pad to square -> CLAHE -> sharpen -> resize.

    Args:
        gray: uint8 (H, W) slice, as :func:`braintumor.core.imageio.read_grayscale` returns it.
        params: the ``preprocess`` section of params.yaml.

    Returns:
        A new uint8 (S, S) array, S = ``params.image_size``.
    """
    require_gray(gray)
    image = crop_to_head(gray, params.head_threshold) if params.crop_to_head else gray
    image = pad_to_square(image)
    image = apply_clahe(image, params.clahe_clip_limit, params.clahe_tile_grid)
    image = unsharp_mask(image, params.sharpen_sigma, params.sharpen_amount)
    image = resize_square(image, params.image_size)
    # With every step a no-op the result would alias the caller's array.
    return image.copy() if np.may_share_memory(image, gray) else image


def preprocess_file(path: str | Path, params: PreprocessParams) -> np.ndarray:
    """:func:`preprocess_slice` of a decoded file; raises UnreadableImageError naming the path."""
    return preprocess_slice(read_grayscale(path), params)


# --------------------------------------------------------------------------- the cache writer


def _fill_chunk(job: tuple[str, Sequence[str | Path], PreprocessParams, int]) -> None:
    """Worker: preprocess ``paths`` into rows ``start..`` of the memory-mapped ``.npy`` at ``array_path``.

    Rows go straight into the shared map, so no image travels back to the parent. No flush (msync):
    the rows are already in the page cache that the parent's os.replace publishes.
    """
    array_path, paths, params, start = job
    out = np.lib.format.open_memmap(array_path, mode="r+")
    try:
        for i, path in enumerate(paths, start):
            try:
                out[i] = preprocess_file(path, params)
            except UnreadableImageError as exc:
                raise PreprocessError(path, f"{exc.reason}: {exc}") from exc
            except Exception as exc:
                raise PreprocessError(path, f"{type(exc).__name__}: {exc}") from exc
    finally:
        del out  # unmap before os.replace (required on Windows)


def _fill(array_path: str, paths: Sequence[str | Path], params: PreprocessParams, workers: int) -> None:
    # Chunks of _CHUNK_ROWS rows, each job carrying only its own paths. OpenCV runs on one thread in
    # the serial case too, so that workers=1 is a fair baseline for workers=N.
    paths = list(paths)
    jobs = [(array_path, paths[i : i + _CHUNK_ROWS], params, i) for i in range(0, len(paths), _CHUNK_ROWS)]
    with single_threaded_opencv():
        map_in_workers(_fill_chunk, jobs, workers)


def preprocess_to_array(
    paths: Sequence[str | Path], params: PreprocessParams, out_path: Path, workers: int | None = None
) -> dict:
    """Preprocess every file into one (N, S, S) uint8 ``.npy``; row i is ``preprocess_file(paths[i])``.

    The array is written through a memory map by worker processes, each taking chunks of contiguous rows,
    into a temporary file next to ``out_path`` that is renamed to it only once complete. An existing
    ``out_path`` is deleted first, so an interrupted or failed run leaves neither a partial file nor a
    stale one that looks finished. Load the result with ``np.load(out_path, mmap_mode="r")``.

    Args:
        paths: image files, in the order of the output rows.
        params: the ``preprocess`` section of params.yaml.
        out_path: the ``.npy`` to write (its folder is created if missing).
        workers: processes; None = ``params.workers``, 0 = one per CPU core, 1 = in this process.

    Returns:
        {"images": N, "seconds": wall time, "images_per_second": ..., "workers": processes used}.

    Raises:
        PreprocessError: naming the first file that could not be decoded or processed.
    """
    started = time.perf_counter()
    out_path = Path(out_path)
    count, size = len(paths), params.image_size
    workers = resolve_workers(params.workers if workers is None else workers, count)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.unlink(missing_ok=True)
    with atomic.atomic_path(out_path) as array_path:
        # Creating the map writes the .npy header and sizes the (sparse) file; the map itself is
        # dropped at once, as the fillers open their own.
        np.lib.format.open_memmap(str(array_path), mode="w+", dtype=np.uint8, shape=(count, size, size))
        _fill(str(array_path), paths, params, workers)
    seconds = time.perf_counter() - started
    return {
        "images": count,
        "seconds": round(seconds, 4),
        "images_per_second": round(count / seconds, 1) if seconds > 0 else float("inf"),
        "workers": workers,
    }
