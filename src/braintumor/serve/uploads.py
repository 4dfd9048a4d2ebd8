"""Decoding an uploaded file into the grey slice the shared preprocessing takes, with guards.

Accepted: the image formats :mod:`braintumor.core.imageio` reads (PNG and JPEG above all; 8 or 16 bit; grey,
RGB or RGBA; any size up to a pixel limit) and DICOM MR images. Images go through the pipeline's own
decoder (:func:`braintumor.core.imageio.decode_image_bytes`, then :func:`~braintumor.core.imageio.to_grayscale`),
so an uploaded file gives exactly the pixels the preprocess stage read from the same file.

DICOM: the file must carry the standard "DICM" preamble, be one MR frame with pixel data in a transfer
syntax pydicom decodes on its own; the stored values go through the modality LUT (rescale slope and
intercept), then the VOI LUT (or window centre and width), then are scaled to 0..255 by their own range
(as a 16-bit PNG is); MONOCHROME1 is inverted so that bright means high signal, as in MONOCHROME2.
Patient fields are never read into messages or results.

Every refusal is an :class:`UploadError` whose ``reason`` is one of :data:`REASONS` and whose message
says what to do; nothing else escapes for a bad file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from braintumor.core.config import PreprocessParams
from braintumor.core.imageio import UnreadableImageError, colour_pixel_share, decode_image_bytes, to_grayscale, to_uint8
from braintumor.preprocess.slices import preprocess_slice

REASONS = (
    "empty_file", "file_too_large", "too_many_pixels", "not_an_image", "truncated", "decode_failed",
    "unsupported_dicom", "not_mr",
)

# What to tell the user for each reason (DICOM messages add the detail that applies).
_ADVICE = {
    "empty_file": "The file is empty.",
    "file_too_large": "The file is larger than the {limit} MB this app accepts.",
    "too_many_pixels": "The image has {pixels:,} pixels; this app accepts at most {limit:,} "
                       "(a guard against decompression bombs). Resize it first.",
    "not_an_image": "This is not an image file this app reads: upload a PNG or JPEG slice (8 or 16 bit, "
                    "grey, RGB or RGBA) or a DICOM MR file.",
    "truncated": "The image file is truncated (incomplete download or copy?).",
    "decode_failed": "The image could not be decoded; the file may be damaged.",
}

DICOM_MAGIC_OFFSET = 128  # a DICOM Part 10 file: 128-byte preamble, then b"DICM"


class UploadError(ValueError):
    """An upload the app cannot use; ``reason`` is one of :data:`REASONS`, the message is for the user."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown upload error reason {reason!r}; allowed: {list(REASONS)}")
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class DecodedUpload:
    """One uploaded slice, decoded.

    Attributes:
        gray: uint8 (H, W), what :func:`braintumor.preprocess.slices.preprocess_slice` takes.
        colour_share: share of coloured pixels in the decoded file (0 for grey and DICOM MONOCHROME).
        kind: "image" or "dicom".
        description: format, size and bit depth in words, for the result panel (never patient data).
    """

    gray: np.ndarray
    colour_share: float
    kind: str
    description: str


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` is a DICOM Part 10 file (the "DICM" magic after the 128-byte preamble)."""
    return data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _check_pixel_count(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise UploadError("too_many_pixels", _ADVICE["too_many_pixels"].format(pixels=height * width, limit=max_pixels))


def _header_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) read from the image header without decoding the pixels; None if Pillow can't tell."""
    from PIL import Image

    # Pillow warns above its own MAX_IMAGE_PIXELS and refuses above twice that; the limit that
    # counts is ours, checked by the caller, so the warning is silenced and the refusal translated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Image.DecompressionBombError:
            raise UploadError("too_many_pixels", _ADVICE["too_many_pixels"].format(
                pixels=2 * (Image.MAX_IMAGE_PIXELS or 0), limit=max_pixels).replace("has ", "has more than ", 1)) from None
        except Exception:  # noqa: BLE001  unidentified or damaged header: the decoder below names the reason
            return None
    return height, width


def decode_image_upload(data: bytes, max_pixels: int) -> DecodedUpload:
    """A PNG/JPEG (or other :mod:`braintumor.core.imageio` format) upload, decoded exactly as the pipeline decodes files.

    The pixel count is checked from the header before decoding, so a decompression bomb costs nothing.
    """
    size = _header_size(data, max_pixels)
    if size is not None:
        _check_pixel_count(*size, max_pixels)
    try:
        image = decode_image_bytes(data, "upload")
    except UnreadableImageError as exc:
        raise UploadError(exc.reason if exc.reason in _ADVICE else "decode_failed", _ADVICE.get(exc.reason, str(exc))) from None
    # Only reached for a header Pillow could not read but OpenCV could decode; check after the fact.
    _check_pixel_count(image.shape[0], image.shape[1], max_pixels)
    channels = 1 if image.ndim == 2 else image.shape[2]
    bits = 16 if image.dtype == np.uint16 else 8 * image.dtype.itemsize
    description = f"{image.shape[1]} x {image.shape[0]} px, {channels} channel(s), {bits}-bit"
    return DecodedUpload(to_grayscale(image), colour_pixel_share(to_uint8(image)), "image", description)


def _dicom_error(reason: str, detail: str) -> UploadError:
    return UploadError(reason, f"Unsupported DICOM file: {detail}")


def _read_dicom(data: bytes):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise _dicom_error("unsupported_dicom", f"it could not be parsed ({type(exc).__name__}); "
                                               "the file may be damaged or truncated.") from None


def _check_dicom_image(ds, max_pixels: int) -> None:
    """The header checks, before any pixel is decoded. Messages name technical fields only."""
    modality = str(ds.get("Modality", "") or "").strip()
    if modality != "MR":
        raise _dicom_error("not_mr", f"modality is {modality or 'missing'!r}; this model reads MR brain slices only.")
    if "PixelData" not in ds:
        raise _dicom_error("unsupported_dicom", "it holds no pixel data (a report or structured document?).")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise _dicom_error("unsupported_dicom", f"it holds {frames} frames; export the one slice to classify.")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _dicom_error("unsupported_dicom", f"photometric interpretation {photometric or 'missing'!r}; "
                                                "MONOCHROME1 or MONOCHROME2 is expected for MR.")
    _check_pixel_count(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), max_pixels)


def _dicom_pixels(ds) -> np.ndarray:
    """Stored values -> modality LUT -> VOI LUT, as float64 (H, W); MONOCHROME1 negated (bright = high signal)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001  pydicom raises many types for codecs it lacks or damaged data
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if syntax is not None and syntax.is_compressed:
            advice = f"transfer syntax {syntax.name} ({type(exc).__name__}); export it uncompressed."
        else:
            advice = f"the pixel data is damaged or truncated ({type(exc).__name__})."
        raise _dicom_error("unsupported_dicom", f"its pixel data could not be decoded: {advice}") from None
    if stored.ndim != 2:
        raise _dicom_error("unsupported_dicom", f"pixel array of shape {stored.shape}; one grey frame is expected.")
    values = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        values = -values
    return values


def decode_dicom_upload(data: bytes, max_pixels: int) -> DecodedUpload:
    """A DICOM MR upload -> grey uint8 slice (see the module docstring for the LUT order)."""
    ds = _read_dicom(data)
    _check_dicom_image(ds, max_pixels)
    gray = to_uint8(_dicom_pixels(ds))
    bits = int(ds.get("BitsStored", 0) or 0)
    description = f"DICOM MR, {gray.shape[1]} x {gray.shape[0]} px, {bits}-bit stored, {ds.PhotometricInterpretation}"
    return DecodedUpload(gray, 0.0, "dicom", description)


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> DecodedUpload:
    """Any accepted upload -> :class:`DecodedUpload`; an :class:`UploadError` for anything else.

    Args:
        data: the uploaded file's bytes.
        max_bytes: largest accepted file.
        max_pixels: largest accepted image (height x width), checked before decoding.
    """
    if len(data) == 0:
        raise UploadError("empty_file", _ADVICE["empty_file"])
    if len(data) > max_bytes:
        raise UploadError("file_too_large", _ADVICE["file_too_large"].format(limit=round(max_bytes / 2**20, 1)))
    if is_dicom(data):
        return decode_dicom_upload(data, max_pixels)
    return decode_image_upload(data, max_pixels)


def preprocess_upload(data: bytes, preprocess: PreprocessParams, max_bytes: int, max_pixels: int) -> tuple[DecodedUpload, np.ndarray]:
    """(decoded upload, preprocessed (S, S) uint8): the pipeline's own decode and :func:`preprocess_slice`."""
    decoded = decode_upload(data, max_bytes, max_pixels)
    return decoded, preprocess_slice(decoded.gray, preprocess)
