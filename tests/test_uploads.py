"""Decoding uploads: every accepted format gives the pipeline's pixels; every bad file a clear UploadError."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest

from braintumor.core.imageio import colour_pixel_share, read_grayscale
from braintumor.serve.uploads import REASONS, UploadError, decode_upload, is_dicom

MB = 2**20
LIMITS = {"max_bytes": 20 * MB, "max_pixels": 50_000_000}
PATIENT_NAME, PATIENT_ID = "Secret^Patient", "PID-987654"


def encode(image: np.ndarray, suffix: str) -> bytes:
    ok, data = cv2.imencode(suffix, image)
    assert ok
    return data.tobytes()


def slice_like(size: int = 64) -> np.ndarray:
    """A grey disc with a gradient: enough structure for JPEG and resizing to matter."""
    ys, xs = np.mgrid[:size, :size]
    disc = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 < (size / 3) ** 2
    return np.where(disc, 60 + xs * 2, 0).astype(np.uint8)


def expect_error(reason: str, data: bytes, **limits) -> UploadError:
    with pytest.raises(UploadError) as caught:
        decode_upload(data, **{**LIMITS, **limits})
    assert caught.value.reason == reason, (caught.value.reason, str(caught.value))
    assert str(caught.value)  # a message for the user
    return caught.value


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("variant", ["grey8.png", "grey16.png", "rgb.png", "rgba.png", "grey.jpg", "rgb.jpg"])
def test_images_decode_to_the_pipelines_pixels(tmp_path, variant):
    grey = slice_like()
    image = {
        "grey8.png": grey,
        "grey16.png": grey.astype(np.uint16) * 257 + 3,
        "rgb.png": cv2.merge([grey, grey // 2, grey]),
        "rgba.png": cv2.merge([grey, grey, grey, np.full_like(grey, 200)]),
        "grey.jpg": grey,
        "rgb.jpg": cv2.merge([grey, grey, grey]),
    }[variant]
    path = tmp_path / variant
    path.write_bytes(encode(image, path.suffix))
    decoded = decode_upload(path.read_bytes(), **LIMITS)
    assert decoded.gray.dtype == np.uint8 and decoded.gray.shape == grey.shape
    np.testing.assert_array_equal(decoded.gray, read_grayscale(path))  # the preprocess stage's decoder
    assert decoded.kind == "image" and "64 x 64 px" in decoded.description


def test_sixteen_bit_png_is_scaled_by_its_own_range():
    image = np.array([[1000, 2000], [3000, 3000]], np.uint16)
    decoded = decode_upload(encode(image, ".png"), **LIMITS)
    np.testing.assert_array_equal(decoded.gray, [[0, 128], [255, 255]])  # (v - 1000) * 255 / 2000, rounded
    assert "16-bit" in decoded.description


def test_colour_share_counts_coloured_pixels_only():
    grey = np.full((10, 10), 100, np.uint8)
    colour = cv2.merge([grey, grey, grey])
    colour[:3, :] = (0, 0, 255)  # 30 of 100 pixels red
    assert decode_upload(encode(colour, ".png"), **LIMITS).colour_share == pytest.approx(0.3)
    assert decode_upload(encode(cv2.merge([grey] * 3), ".png"), **LIMITS).colour_share == 0.0


def test_colour_share_counts_channel_spreads_above_the_limit_in_any_channel_order():
    pixels = np.array([[[10, 34, 20], [10, 35, 20], [250, 10, 10], [7, 7, 200]]], np.uint8)  # spread 24, 25, 240, 193
    assert colour_pixel_share(pixels) == 0.75  # 24 is not above the limit; no uint8 wrap-around
    assert colour_pixel_share(np.dstack([pixels, np.full((1, 4), 255, np.uint8)])) == 0.75  # alpha ignored
    assert colour_pixel_share(pixels[:, :, 0]) == 0.0 and colour_pixel_share(pixels[:, :, :1]) == 0.0


# --------------------------------------------------------------------------- bad files


def test_empty_file():
    expect_error("empty_file", b"")


def test_text_file_is_not_an_image():
    error = expect_error("not_an_image", b"Patient report\nno findings\n" * 10)
    assert "PNG or JPEG" in str(error) and "DICOM" in str(error)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_images(suffix):
    data = encode(slice_like(), suffix)
    expect_error("truncated", data[: len(data) // 2])


def test_file_larger_than_the_limit():
    data = encode(slice_like(), ".png")
    error = expect_error("file_too_large", data, max_bytes=len(data) - 1)
    assert "MB" in str(error)


def test_pixel_limit_is_checked():
    expect_error("too_many_pixels", encode(slice_like(64), ".png"), max_pixels=64 * 64 - 1)
    assert decode_upload(encode(slice_like(64), ".png"), **{**LIMITS, "max_pixels": 64 * 64}).gray.shape == (64, 64)


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims another size (a decompression bomb's header)."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8), ".png"))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("side", [10_000, 100_000])  # below and above Pillow's own bomb limit
def test_decompression_bomb_is_refused_from_its_header(side):
    error = expect_error("too_many_pixels", png_with_header_size(side, side))
    assert "50,000,000" in str(error)


def test_error_reasons_are_a_closed_set():
    with pytest.raises(ValueError, match="unknown upload error reason"):
        UploadError("something_else", "x")
    assert len(set(REASONS)) == len(REASONS)


# --------------------------------------------------------------------------- DICOM


def make_dicom(pixels: np.ndarray, *, modality: str = "MR", photometric: str = "MONOCHROME2",
               rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
               frames: int = 1, pixel_data: bool = True) -> bytes:
    """A DICOM Part 10 file with uncompressed 16-bit pixels and a patient name and id that must never be echoed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = modality, PATIENT_NAME, PATIENT_ID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames != 1:
        ds.NumberOfFrames = frames
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


STORED = np.tile(np.array([0, 50, 100, 150, 200, 250], np.uint16), (4, 1))  # (4, 6)


def test_dicom_applies_the_modality_lut_then_the_voi_window():
    # Modality LUT: 2 * stored - 100 -> [-100, 0, 100, 200, 300, 400]. Window centre 150, width 201
    # (DICOM linear): <= 49.5 -> bottom, > 249.5 -> top, else (x - 149.5) / 200 + 0.5 of the range:
    # 100 -> 0.2525, 200 -> 0.7525; scaled to 0..255 -> 64, 192. (The window applied to the stored
    # values first would give 0, 1, 64, 128, 192, 255.)
    data = make_dicom(STORED, rescale=(2.0, -100.0), window=(150.0, 201.0))
    assert is_dicom(data)
    decoded = decode_upload(data, **LIMITS)
    np.testing.assert_array_equal(decoded.gray, np.tile([0, 0, 64, 192, 255, 255], (4, 1)))
    assert decoded.kind == "dicom" and decoded.colour_share == 0.0
    assert "DICOM MR" in decoded.description and "12-bit" in decoded.description


def test_dicom_without_a_window_is_scaled_by_its_range():
    decoded = decode_upload(make_dicom(STORED), **LIMITS)
    np.testing.assert_array_equal(decoded.gray[0], [0, 51, 102, 153, 204, 255])


def test_monochrome1_is_inverted():
    decoded = decode_upload(make_dicom(STORED, photometric="MONOCHROME1"), **LIMITS)
    np.testing.assert_array_equal(decoded.gray[0], [255, 204, 153, 102, 51, 0])


def assert_no_patient_data(error: UploadError) -> None:
    text = str(error) + repr(error.args)
    assert PATIENT_NAME not in text and "Secret" not in text and PATIENT_ID not in text


def test_dicom_of_another_modality_is_refused_without_patient_data():
    error = expect_error("not_mr", make_dicom(STORED, modality="CT"))
    assert "'CT'" in str(error) and "MR" in str(error)
    assert_no_patient_data(error)


@pytest.mark.parametrize("case, detail", [
    ("no_pixels", "no pixel data"),
    ("multi_frame", "3 frames"),
    ("rgb", "photometric interpretation 'RGB'"),
    ("truncated", "damaged or truncated"),
])
def test_unsupported_dicom(case, detail):
    data = {
        "no_pixels": lambda: make_dicom(STORED, pixel_data=False),
        "multi_frame": lambda: make_dicom(np.stack([STORED] * 3), frames=3),
        "rgb": lambda: make_dicom(STORED, photometric="RGB"),
        "truncated": lambda: make_dicom(STORED)[:-20],
    }[case]()
    error = expect_error("unsupported_dicom", data)
    assert str(error).startswith("Unsupported DICOM file") and detail in str(error)
    assert_no_patient_data(error)


def test_dicom_pixel_limit_is_checked_before_decoding():
    error = expect_error("too_many_pixels", make_dicom(STORED), max_pixels=STORED.size - 1)
    assert_no_patient_data(error)


def test_compressed_dicom_without_a_decoder_is_refused():
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = dcmread(io.BytesIO(make_dicom(STORED)))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # a codestream start, then nothing valid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    error = expect_error("unsupported_dicom", buffer.getvalue())
    assert "could not be decoded" in str(error) and "JPEG 2000" in str(error)
    assert_no_patient_data(error)
