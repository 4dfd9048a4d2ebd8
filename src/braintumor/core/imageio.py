"""Decoding image files, with a specific reason when a file cannot be used.

The merge stage quarantines files by the reason this module gives; preprocessing and the app decode
through the same :func:`read_grayscale`, so the pipeline and the app see identical pixels.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

# Magic numbers of the formats above. A file whose bytes start with none of them is not an image,
# whatever its name says.
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",  # WebP (RIFF....WEBP)
)


class UnreadableImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` is a short machine-friendly code."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def _is_truncated_jpeg(data: bytes) -> bool:
    # libjpeg pads a truncated stream with grey and only warns, so check the end-of-image marker;
    # some encoders append padding after it, hence the search in the tail rather than endswith.
    return data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-64:]


def _is_truncated_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-32:]


def decode_image_bytes(data: bytes, path: str | Path = "<bytes>", flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode bytes to an array (H, W) or (H, W, C), raising :class:`UnreadableImageError`.

    Args:
        data: the file's bytes.
        path: used in error messages only.
        flags: OpenCV imread flags (``IMREAD_GRAYSCALE`` decodes straight to one channel).
    """
    if len(data) == 0:
        raise UnreadableImageError(path, "empty_file")
    if not data.startswith(_SIGNATURES):
        raise UnreadableImageError(path, "not_an_image", "unknown file signature")
    if _is_truncated_jpeg(data) or _is_truncated_png(data):
        raise UnreadableImageError(path, "truncated")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.size == 0:
        raise UnreadableImageError(path, "decode_failed")
    return image


def read_image(path: str | Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Read and decode an image file (see :func:`decode_image_bytes`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableImageError(path, "unreadable_file", exc.strerror or str(exc)) from exc
    return decode_image_bytes(data, path, flags)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale 16-bit or float images to uint8 by their own range; uint8 passes through."""
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, np.uint8)
    return np.round((image - low) * (255.0 / (high - low))).astype(np.uint8)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """One uint8 channel from a decoded image (grey, BGR or BGRA as OpenCV decodes them)."""
    image = to_uint8(image)
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"cannot convert an image of shape {image.shape} to grayscale")


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode a file to one uint8 channel: the first step of the shared preprocessing."""
    return to_grayscale(read_image(path))


def collapse_equal_channels(image: np.ndarray) -> np.ndarray:
    """Drop colour channels that carry no information (B == G == R).

    An RGB file whose channels are identical holds the same pixels as a greyscale file; exact-duplicate
    hashing uses this so the two count as the same decoded image.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        b, g, r = image[:, :, 0], image[:, :, 1], image[:, :, 2]
        if np.array_equal(b, g) and np.array_equal(g, r):
            return b
    return image


def colour_pixel_share(image: np.ndarray, min_difference: int = 24) -> float:
    """Share of pixels whose colour channels differ by more than ``min_difference`` grey levels.

    MRI slices are grey; a watermark or a coloured annotation touches a few percent of the pixels
    at most (under 5% in the 7,023 Nickparvar images), while a colour photograph colours most of them.
    """
    if image.ndim == 2 or image.shape[2] < 3:
        return 0.0
    # Channel by channel, not a reduction over the last axis: NumPy reduces a 3-long axis element by
    # element, and that was half of the merge's decoding time (large SARTAJ slices).
    b, g, r = image[:, :, 0], image[:, :, 1], image[:, :, 2]
    spread = np.maximum(np.maximum(b, g), r) - np.minimum(np.minimum(b, g), r)  # >= 0: no uint8 wrap-around
    return float(np.count_nonzero(spread > min_difference) / spread.size)


def require_gray(gray: np.ndarray) -> None:
    """Raise a ValueError naming the shape and dtype unless ``gray`` is a non-empty uint8 (H, W) array."""
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        shape = getattr(gray, "shape", None)
        dtype = getattr(gray, "dtype", type(gray).__name__)
        raise ValueError(f"expected a non-empty 2-D uint8 image (H, W), got shape {shape} dtype {dtype}")


def encode_image(image: np.ndarray, suffix: str, quality: int = 95) -> bytes:
    """Encode an image as ``.jpg`` (at ``quality``) or ``.png`` bytes with OpenCV."""
    if suffix == ".jpg":
        ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif suffix == ".png":
        ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    else:
        raise ValueError(f"unsupported suffix {suffix!r}; allowed: '.jpg', '.png'")
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} {image.dtype} image as {suffix}")
    return buffer.tobytes()


# Entries that operating systems, notebooks and archivers leave inside dataset folders; never images of a class.
SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", "ehthumbs.db"})


def is_system_entry(relpath: PurePosixPath) -> bool:
    """A hidden or system file, or a file inside such a folder (``.ipynb_checkpoints/``, ``.DS_Store``,
    ``__MACOSX/``, ``Thumbs.db``)."""
    return any(part.startswith(".") or part.lower() in SYSTEM_NAMES for part in relpath.parts)
