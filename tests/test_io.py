"""Tests of covidxr.images.reader.load_xray on synthetic files of every supported kind, the real data, and bad
inputs."""

from __future__ import annotations

import csv
import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from covidxr.errors import CovidxrError, ImageReadError
from covidxr.images import dicom as xdicom
from covidxr.images import reader as xio
from covidxr.images.dicom import DICOM_HEADER_FIELDS
from covidxr.images.reader import MAX_FILE_BYTES, MAX_PIXELS, Xray, load_xray

# The shared data, located like tests/conftest.py does: $COVIDXR_DATA (the cxr folder), else ../shared/data/cxr.
CXR = Path(os.environ.get("COVIDXR_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr")
DICOM_DIR = CXR.parent / "dicom"
REAL_DICOM = DICOM_DIR / "rsna_pneumonia_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_MONO1 = DICOM_DIR / "torchxrayvision_Fake_MONOHR1.dcm"
ATOL = 1e-6


# ------------------------------------------------------------------------------------------------------ helpers


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Save a PIL image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gray_ramp(height: int = 16, width: int = 16) -> np.ndarray:
    """A uint8 ramp covering 0..255."""
    return (np.arange(height * width) * 255 // (height * width - 1)).astype(np.uint8).reshape(height, width)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of an 8-bit RGB array, in [0, 1]."""
    rgb = rgb.astype(np.float64)
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


def colour_blocks() -> np.ndarray:
    """A 16x16 RGB image of saturated red, green, blue and white quadrants."""
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:8, :8] = (255, 0, 0)
    rgb[:8, 8:] = (0, 255, 0)
    rgb[8:, :8] = (0, 0, 255)
    rgb[8:, 8:] = (255, 255, 255)
    return rgb


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit grayscale pixels, followed by a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    preamble: bool = True,
    **attributes: object,
) -> FileDataset:
    """A minimal Explicit VR Little Endian secondary-capture dataset holding `pixels` (2-D, or 3-D for RGB/frames)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-42"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    colour = photometric == "RGB"
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    rows, columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.Rows, ds.Columns = int(rows), int(columns)
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """Serialise a dataset (as a DICOM file when it has a preamble, else as a preamble-less stream)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=ds.preamble is not None)
    return buffer.getvalue()


def assert_valid(xray: Xray, shape: tuple[int, int]) -> None:
    """Common output contract."""
    assert isinstance(xray, Xray)
    assert xray.pixels.shape == shape
    assert xray.pixels.dtype == np.float32
    assert np.isfinite(xray.pixels).all()
    assert xray.pixels.min() >= 0.0 and xray.pixels.max() <= 1.0


def assert_read_error(excinfo: pytest.ExceptionInfo[ImageReadError], name: str) -> None:
    """The error message is one line and names the file."""
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{name}: "), message
    assert isinstance(excinfo.value, CovidxrError)


# -------------------------------------------------------------------------------------------------- raster formats


def test_defaults() -> None:
    assert MAX_PIXELS == 60_000_000
    assert MAX_FILE_BYTES == 256 * 2**20


def test_png_8bit_gray_values_preserved() -> None:
    ramp = gray_ramp()
    xray = load_xray(encode(Image.fromarray(ramp, "L"), "PNG"))
    assert_valid(xray, ramp.shape)
    assert xray.format == "PNG" and xray.color is False and xray.header == {} and xray.name == "<bytes>"
    np.testing.assert_allclose(xray.pixels, ramp / 255.0, atol=ATOL)


def test_png_16bit_gray_ramp_maps_to_value_over_65535() -> None:
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    ramp[0, 0], ramp[0, 1] = 1, 65534
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    xray = load_xray(encode(image, "PNG"))
    assert_valid(xray, ramp.shape)
    np.testing.assert_allclose(xray.pixels, ramp / 65535.0, atol=ATOL)
    assert xray.pixels[0, 0] > 0 and xray.pixels[0, 1] < 1  # no 8-bit quantisation


def test_png_rgb_gray_content_is_not_colour() -> None:
    ramp = gray_ramp()
    xray = load_xray(encode(Image.fromarray(np.stack([ramp] * 3, axis=-1), "RGB"), "PNG"))
    assert_valid(xray, ramp.shape)
    assert xray.color is False
    np.testing.assert_allclose(xray.pixels, ramp / 255.0, atol=1e-5)


def test_png_rgb_colour_uses_luma() -> None:
    rgb = colour_blocks()
    xray = load_xray(encode(Image.fromarray(rgb, "RGB"), "PNG"))
    assert_valid(xray, (16, 16))
    assert xray.color is True
    np.testing.assert_allclose(xray.pixels, luma(rgb), atol=1e-5)


def test_rgb_with_small_coloured_annotation_is_not_colour() -> None:
    rgb = np.stack([gray_ramp(64, 64)] * 3, axis=-1)
    rgb[:4, :4] = (255, 0, 0)  # an arrow-sized red mark: 16 of 4096 pixels
    assert load_xray(encode(Image.fromarray(rgb, "RGB"), "PNG")).color is False


def test_png_rgba_composited_onto_black() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    rgba[2:, :, 3] = 51
    xray = load_xray(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert_valid(xray, (4, 4))
    assert xray.color is False
    np.testing.assert_allclose(xray.pixels[0], 0.0, atol=ATOL)
    np.testing.assert_allclose(xray.pixels[1], 200 / 255, atol=1e-5)
    np.testing.assert_allclose(xray.pixels[2:], 200 / 255 * 0.2, atol=1e-5)


def test_png_palette_gray_and_colour() -> None:
    ramp = gray_ramp()
    palette_gray = Image.fromarray(ramp, "L").convert("P")
    xray = load_xray(encode(palette_gray, "PNG"))
    assert_valid(xray, ramp.shape)
    assert xray.color is False
    np.testing.assert_allclose(xray.pixels, ramp / 255.0, atol=1e-5)

    palette_colour = Image.fromarray(colour_blocks(), "RGB").quantize(colors=4)
    assert palette_colour.mode == "P"
    xray = load_xray(encode(palette_colour, "PNG"))
    assert xray.color is True
    np.testing.assert_allclose(xray.pixels, luma(colour_blocks()), atol=1e-5)


def test_png_palette_with_transparency() -> None:
    image = Image.fromarray(np.full((4, 4), 255, dtype=np.uint8), "L").convert("P")
    index = image.getpixel((0, 0))
    xray = load_xray(encode(image, "PNG", transparency=index))
    np.testing.assert_allclose(xray.pixels, 0.0, atol=ATOL)  # fully transparent -> black


def test_png_la() -> None:
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0] = 100
    la[..., 1] = 255
    la[0, :, 1] = 0
    image = Image.fromarray(la, "LA")
    xray = load_xray(encode(image, "PNG"))
    assert_valid(xray, (4, 4))
    np.testing.assert_allclose(xray.pixels[0], 0.0, atol=ATOL)
    np.testing.assert_allclose(xray.pixels[1:], 100 / 255, atol=1e-5)


def test_constant_image_keeps_its_value() -> None:
    xray = load_xray(encode(Image.new("L", (8, 8), 128), "PNG"))
    np.testing.assert_allclose(xray.pixels, 128 / 255, atol=ATOL)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg(mode: str) -> None:
    ramp = gray_ramp(32, 32)
    image = Image.fromarray(ramp, "L").convert(mode)
    data = encode(image, "JPEG", quality=95)
    xray = load_xray(data)
    assert_valid(xray, (32, 32))
    assert xray.format == "JPEG" and xray.color is False
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_allclose(xray.pixels, decoded, atol=2 / 255)


def test_jpeg_cmyk() -> None:
    image = Image.fromarray(colour_blocks(), "RGB").convert("CMYK")
    xray = load_xray(encode(image, "JPEG", quality=95))
    assert_valid(xray, (16, 16))
    assert xray.color is True


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "1"])
def test_bmp(mode: str) -> None:
    ramp = gray_ramp()
    image = Image.fromarray(ramp, "L").convert(mode)
    xray = load_xray(encode(image, "BMP"))
    assert_valid(xray, ramp.shape)
    assert xray.format == "BMP"
    expected = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_allclose(xray.pixels, expected, atol=1e-5)


def test_tiff_8bit_and_16bit() -> None:
    ramp8 = gray_ramp()
    xray = load_xray(encode(Image.fromarray(ramp8, "L"), "TIFF"))
    assert xray.format == "TIFF"
    np.testing.assert_allclose(xray.pixels, ramp8 / 255.0, atol=ATOL)

    ramp16 = (np.arange(256, dtype=np.uint32) * 257 + 3).clip(0, 65535).astype(np.uint16).reshape(16, 16)
    xray = load_xray(encode(Image.fromarray(ramp16), "TIFF", compression="tiff_lzw"))
    assert_valid(xray, ramp16.shape)
    np.testing.assert_allclose(xray.pixels, ramp16 / 65535.0, atol=ATOL)


def test_tiff_big_endian_16bit() -> None:
    ramp16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    image = Image.frombytes("I;16B", (8, 8), ramp16.astype(">u2").tobytes())
    xray = load_xray(encode(image, "TIFF"))
    np.testing.assert_allclose(xray.pixels, ramp16 / 65535.0, atol=ATOL)


def test_tiff_int32_and_float_modes() -> None:
    wide = np.arange(64, dtype=np.int32).reshape(8, 8) * 1000  # fits in 16 bits -> divided by 65535
    xray = load_xray(encode(Image.fromarray(wide, "I"), "TIFF"))
    np.testing.assert_allclose(xray.pixels, wide / 65535.0, atol=ATOL)

    floats = np.linspace(-5.0, 5.0, 64, dtype=np.float32).reshape(8, 8)  # outside [0, 1] -> min-max
    xray = load_xray(encode(Image.fromarray(floats, "F"), "TIFF"))
    np.testing.assert_allclose(xray.pixels, (floats + 5.0) / 10.0, atol=1e-6)

    unit = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)  # inside [0, 1] -> unchanged
    np.testing.assert_allclose(load_xray(encode(Image.fromarray(unit, "F"), "TIFF")).pixels, unit, atol=ATOL)


def test_gif_and_webp() -> None:
    ramp = gray_ramp()
    xray = load_xray(encode(Image.fromarray(ramp, "L"), "GIF"))
    assert xray.format == "GIF"
    np.testing.assert_allclose(xray.pixels, ramp / 255.0, atol=1e-5)
    xray = load_xray(encode(Image.fromarray(ramp, "L").convert("RGB"), "WEBP", lossless=True))
    assert xray.format == "WEBP"
    assert_valid(xray, ramp.shape)


def test_multi_frame_reads_first_frame() -> None:
    first = Image.new("L", (8, 8), 10)
    second = Image.new("L", (8, 8), 240)
    gif = encode(first, "GIF", save_all=True, append_images=[second])
    np.testing.assert_allclose(load_xray(gif).pixels, 10 / 255, atol=1e-5)
    tiff = encode(first, "TIFF", save_all=True, append_images=[second])
    np.testing.assert_allclose(load_xray(tiff).pixels, 10 / 255, atol=ATOL)


def test_exif_orientation_6_transposes() -> None:
    stored = np.zeros((40, 20), dtype=np.uint8)  # 20 wide, 40 high as stored
    stored[:10, :10] = 255  # top-left block
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(stored, "L"), "JPEG", quality=95, exif=exif.tobytes())
    xray = load_xray(data)
    assert xray.pixels.shape == (20, 40)
    assert xray.pixels[:10, -10:].mean() > 0.9  # the stored top-left is displayed top-right
    assert xray.pixels[:10, :10].mean() < 0.1


def test_path_bytes_file_object_agree(tmp_path: Path) -> None:
    data = encode(Image.fromarray(gray_ramp(), "L"), "PNG")
    path = tmp_path / "chest.png"
    path.write_bytes(data)
    from_path = load_xray(path)
    from_str = load_xray(str(path))
    from_bytes = load_xray(data)
    with open(path, "rb") as handle:
        from_file = load_xray(handle)
    from_buffer = load_xray(io.BytesIO(data))
    for other in (from_str, from_bytes, from_file, from_buffer):
        np.testing.assert_array_equal(other.pixels, from_path.pixels)
        assert other.format == from_path.format
    assert from_path.name == from_str.name == from_file.name == "chest.png"
    assert from_bytes.name == from_buffer.name == "<bytes>"
    assert load_xray(data, name="upload.png").name == "upload.png"
    assert load_xray(bytearray(data)).pixels.shape == (16, 16)
    assert load_xray(memoryview(data)).pixels.shape == (16, 16)


def test_format_from_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "looks_like.jpg"
    path.write_bytes(encode(Image.fromarray(gray_ramp(), "L"), "PNG"))
    assert load_xray(path).format == "PNG"


def test_no_global_pil_state_changed() -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    load_xray(encode(Image.fromarray(gray_ramp(), "L"), "PNG"))
    with pytest.raises(ImageReadError):
        load_xray(png_claiming(100_000, 100_000))
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before
    assert before[0] is False


# ---------------------------------------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_8bit() -> None:
    ramp = gray_ramp()
    xray = load_xray(dicom_bytes(make_dicom(ramp)))
    assert_valid(xray, ramp.shape)
    assert xray.format == "DICOM" and xray.color is False
    np.testing.assert_allclose(xray.pixels, ramp / 255.0, atol=ATOL)
    assert xray.header == {
        "Modality": "CR",
        "ViewPosition": "PA",
        "BodyPartExamined": "CHEST",
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": "16",
        "Columns": "16",
        "BitsStored": "8",
    }
    assert all("SECRET" not in value and "Doe" not in value for value in xray.header.values())


def test_dicom_monochrome1_is_inverted() -> None:
    stored = np.zeros((4, 4), dtype=np.uint8)
    stored[0, 0] = 255  # bright stored value in MONOCHROME1 = dark (air)
    xray = load_xray(dicom_bytes(make_dicom(stored, photometric="MONOCHROME1")))
    assert xray.pixels[0, 0] == pytest.approx(0.0, abs=ATOL)
    assert xray.pixels[1, 1] == pytest.approx(1.0, abs=ATOL)


def test_dicom_12bit_in_16_allocated() -> None:
    stored = (np.arange(64, dtype=np.uint16) * 65).reshape(8, 8)  # 0..4095
    xray = load_xray(dicom_bytes(make_dicom(stored, bits_stored=12)))
    np.testing.assert_allclose(xray.pixels, stored / 4095.0, atol=ATOL)
    assert xray.header["BitsStored"] == "12"


def test_dicom_rescale_slope_intercept_then_window() -> None:
    stored = np.array([[0, 250, 500], [750, 1000, 4095]], dtype=np.uint16)
    # modality values = 2 * stored - 1000 -> -1000, -500, 0, 500, 1000, 7190
    ds = make_dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1000)
    xray = load_xray(dicom_bytes(ds))
    expected = np.clip(((2.0 * stored - 1000) - (0 - 0.5)) / (1000 - 1) + 0.5, 0.0, 1.0)  # DICOM LINEAR window
    np.testing.assert_allclose(xray.pixels, expected, atol=1e-5)
    assert xray.pixels[0, 2] == pytest.approx(0.5, abs=1e-3)


def test_dicom_rescale_without_window_uses_rescaled_stored_range() -> None:
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    positive = load_xray(dicom_bytes(make_dicom(stored, bits_stored=12, RescaleSlope=3, RescaleIntercept=-1024)))
    np.testing.assert_allclose(positive.pixels, stored / 4095.0, atol=1e-6)
    negative = load_xray(dicom_bytes(make_dicom(stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=0)))
    np.testing.assert_allclose(negative.pixels, 1.0 - stored / 4095.0, atol=1e-6)


def test_dicom_window_clips_outside_values() -> None:
    stored = np.array([[0, 99, 100, 150], [200, 201, 255, 125]], dtype=np.uint8)
    xray = load_xray(dicom_bytes(make_dicom(stored, WindowCenter=150, WindowWidth=101)))
    assert xray.pixels[0, 0] == 0.0 and xray.pixels[0, 1] == 0.0  # below the window
    assert xray.pixels[1, 1] == 1.0 and xray.pixels[1, 2] == 1.0  # above the window
    assert xray.pixels[0, 3] == pytest.approx(0.5, abs=0.01)  # the centre
    assert 0.0 < xray.pixels[1, 3] < 0.5


def test_dicom_monochrome1_windowed_is_inverted_after_window() -> None:
    stored = np.array([[0, 150, 255]], dtype=np.uint8)
    xray = load_xray(dicom_bytes(make_dicom(stored, photometric="MONOCHROME1", WindowCenter=150, WindowWidth=101)))
    np.testing.assert_allclose(xray.pixels[0, [0, 2]], [1.0, 0.0], atol=ATOL)
    assert xray.pixels[0, 1] == pytest.approx(0.5, abs=0.01)


def test_dicom_voi_lut_sequence() -> None:
    stored = np.array([[0, 1, 2, 3, 4, 255]], dtype=np.uint8)
    item = Dataset()
    item.LUTDescriptor = [4, 1, 8]  # 4 entries for inputs 1..4; inputs outside map to the first/last entry
    item.add_new("LUTData", "US", [10, 20, 30, 110])
    ds = make_dicom(stored, WindowCenter=1, WindowWidth=1)  # the LUT takes precedence over the window
    ds.VOILUTSequence = Sequence([item])
    xray = load_xray(dicom_bytes(ds))
    np.testing.assert_allclose(xray.pixels[0], [0.0, 0.0, 0.1, 0.2, 1.0, 1.0], atol=1e-6)

    rescaled = make_dicom(np.array([[0, 1, 2, 3, 4, 255]], dtype=np.uint16), RescaleSlope=300, RescaleIntercept=1)
    rescaled.VOILUTSequence = Sequence([item])  # modality values 1, 301, ... : LUT applies after the rescale
    np.testing.assert_allclose(load_xray(dicom_bytes(rescaled)).pixels[0], [0, 1, 1, 1, 1, 1], atol=1e-6)


def test_dicom_signed_16bit() -> None:
    stored = np.array([[-2048, 0], [1024, 2047]], dtype=np.int16)
    xray = load_xray(dicom_bytes(make_dicom(stored, bits_stored=12, signed=True)))
    np.testing.assert_allclose(xray.pixels, (stored + 2048) / 4095.0, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_dicom_compressed_equals_uncompressed(syntax: str) -> None:
    """RLE goes through pylibjpeg-rle (or pydicom's own decoder), JPEG 2000 through pylibjpeg-openjpeg."""
    stored = (np.arange(64 * 48, dtype=np.uint16) * 5 % 4096).reshape(64, 48)
    plain = make_dicom(stored, bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    expected = load_xray(dicom_bytes(plain))
    plain.compress(syntax)
    assert plain.file_meta.TransferSyntaxUID == syntax
    compressed = load_xray(dicom_bytes(plain))
    np.testing.assert_array_equal(compressed.pixels, expected.pixels)


def test_dicom_rgb_is_colour_luma() -> None:
    rgb = colour_blocks()
    xray = load_xray(dicom_bytes(make_dicom(rgb, photometric="RGB")))
    assert_valid(xray, (16, 16))
    assert xray.color is True
    np.testing.assert_allclose(xray.pixels, luma(rgb), atol=1e-5)


def test_dicom_ybr_full_is_converted_to_rgb_then_luma() -> None:
    rgb = colour_blocks()
    ds = make_dicom(convert_color_space(rgb, "RGB", "YBR_FULL"), photometric="RGB")
    ds.PhotometricInterpretation = "YBR_FULL"
    xray = load_xray(dicom_bytes(ds))
    assert xray.color is True
    np.testing.assert_allclose(xray.pixels, luma(rgb), atol=3 / 255)  # YBR round trip is 8-bit lossy


def test_dicom_without_preamble() -> None:
    ramp = gray_ramp()
    data = dicom_bytes(make_dicom(ramp, preamble=False))
    assert data[128:132] != b"DICM"
    xray = load_xray(data)
    assert xray.format == "DICOM"
    np.testing.assert_allclose(xray.pixels, ramp / 255.0, atol=ATOL)


def test_dicom_named_png_is_read_as_dicom(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(dicom_bytes(make_dicom(gray_ramp())))
    xray = load_xray(path)
    assert xray.format == "DICOM" and xray.name == "scan.png"


def test_dicom_multiframe_refused() -> None:
    frames = np.zeros((3, 8, 8), dtype=np.uint8)
    ds = make_dicom(frames, NumberOfFrames=3)
    with pytest.raises(ImageReadError, match="multi-frame") as excinfo:
        load_xray(dicom_bytes(ds), name="cine.dcm")
    assert_read_error(excinfo, "cine.dcm")


def test_dicom_without_pixel_data_refused() -> None:
    ds = make_dicom(np.zeros((2, 2), dtype=np.uint8))
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    with pytest.raises(ImageReadError, match="no pixel data") as excinfo:
        load_xray(dicom_bytes(ds), name="report.dcm")
    assert_read_error(excinfo, "report.dcm")


def test_dicom_over_max_pixels_refused_before_decoding() -> None:
    ds = make_dicom(np.zeros((2, 2), dtype=np.uint8))
    ds.Rows = ds.Columns = 60_000  # 3.6e9 pixels claimed, 4 bytes present
    with pytest.raises(ImageReadError, match="over the limit") as excinfo:
        load_xray(dicom_bytes(ds), name="huge.dcm")
    assert_read_error(excinfo, "huge.dcm")
    with pytest.raises(ImageReadError, match="over the limit"):
        load_xray(dicom_bytes(make_dicom(gray_ramp())), max_pixels=100)


def test_dicom_palette_colour_refused() -> None:
    ds = make_dicom(np.zeros((2, 2), dtype=np.uint8), photometric="PALETTE COLOR")
    with pytest.raises(ImageReadError, match="photometric") as excinfo:
        load_xray(dicom_bytes(ds), name="p.dcm")
    assert_read_error(excinfo, "p.dcm")


# ------------------------------------------------------------------------------------------------------ real data


def require(*paths: Path) -> None:
    """Fail (not skip) when the shared data is missing, as the rest of the test suite does."""
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        pytest.fail(f"shared data not found: {', '.join(missing)} (set COVIDXR_DATA, see data/README.md)")


def test_real_dicoms_load_with_safe_header() -> None:
    require(REAL_DICOM, FAKE_MONO1)
    for path, photometric in ((REAL_DICOM, "MONOCHROME2"), (FAKE_MONO1, "MONOCHROME1")):
        xray = load_xray(path)
        assert_valid(xray, (1024, 1024))
        assert xray.format == "DICOM" and xray.color is False
        assert xray.header["Modality"] == "CR"
        assert xray.header["PhotometricInterpretation"] == photometric
        assert set(xray.header) <= set(DICOM_HEADER_FIELDS)
        assert not any(key.startswith("Patient") for key in xray.header)
        patient_id = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
        assert all(patient_id not in value for value in xray.header.values())
        assert xray.pixels.std() > 0.1  # a real image, not a constant


def test_real_fake_monochrome1_is_relabelled_not_inverted() -> None:
    """The torchxrayvision fake holds the *same stored pixels* as the original, only relabelled MONOCHROME1.

    A correct reader therefore shows it as the negative of the original: after our MONOCHROME1 inversion the two
    outputs sum to one, and it is the un-inverted stored data that matches the original.
    """
    require(REAL_DICOM, FAKE_MONO1)
    original = pydicom.dcmread(REAL_DICOM)
    fake = pydicom.dcmread(FAKE_MONO1)
    assert original.PixelData == fake.PixelData
    assert (original.PhotometricInterpretation, fake.PhotometricInterpretation) == ("MONOCHROME2", "MONOCHROME1")

    mono2, mono1 = load_xray(REAL_DICOM), load_xray(FAKE_MONO1)
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    np.testing.assert_allclose(mono2.pixels, original.pixel_array / 255.0, atol=1e-6)
    # The original is a normal MONOCHROME2 chest film: the mediastinum (centre) is brighter than the lung fields.
    centre = mono2.pixels[300:700, 462:562].mean()
    lungs = np.concatenate([mono2.pixels[300:600, 200:350], mono2.pixels[300:600, 674:824]]).mean()
    assert centre > lungs + 0.1


def real_images_by_mode() -> dict[str, dict[str, str]]:
    """One metadata row per wanted kind: an L JPEG, an RGB file, an RGBA PNG and the P file."""
    with open(CXR / "metadata.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
    wanted = {
        "L-JPEG": lambda r: r["mode"] == "L" and r["path"].lower().endswith((".jpg", ".jpeg")),
        "RGB": lambda r: r["mode"] == "RGB",
        "RGBA-PNG": lambda r: r["mode"] == "RGBA" and r["path"].lower().endswith(".png"),
        "P": lambda r: r["mode"] == "P",
    }
    return {kind: next(row for row in rows if test(row)) for kind, test in wanted.items()}


def test_real_images_by_mode() -> None:
    require(CXR / "metadata.csv")
    for kind, row in real_images_by_mode().items():
        xray = load_xray(CXR / row["path"])
        assert_valid(xray, (int(row["height"]), int(row["width"])))
        assert xray.format in ("PNG", "JPEG", "MPO"), kind
        assert xray.pixels.std() > 0.02, kind


# ------------------------------------------------------------------------------------------------------ bad inputs

MINIMAL_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


def bad_inputs() -> dict[str, bytes]:
    png = encode(Image.fromarray(gray_ramp(64, 64), "L"), "PNG")
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)), "JPEG")
    return {
        "zero.png": b"",
        "half.png": png[: len(png) // 2],
        "header_only.png": png[:33],
        "half.jpg": jpeg[: len(jpeg) // 2],
        "no_eoi.jpg": jpeg[:-200],
        "report.png": MINIMAL_PDF,
        "notes.png": b"This is just some text, not an X-ray.\n" * 20,
        "noise.bin": bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        "archive.png": b"PK\x03\x04" + b"\0" * 100,
    }


@pytest.mark.parametrize("file_name", list(bad_inputs()))
def test_bad_file_raises_one_line_error(tmp_path: Path, file_name: str) -> None:
    path = tmp_path / file_name
    path.write_bytes(bad_inputs()[file_name])
    with pytest.raises(ImageReadError) as excinfo:
        load_xray(path)
    assert_read_error(excinfo, file_name)
    with pytest.raises(ImageReadError) as excinfo:
        load_xray(path.read_bytes())
    assert_read_error(excinfo, "<bytes>")


def test_pdf_and_text_messages_say_what_they_are() -> None:
    with pytest.raises(ImageReadError, match="PDF"):
        load_xray(MINIMAL_PDF, name="x.png")
    with pytest.raises(ImageReadError, match="text"):
        load_xray(b"hello world\n", name="x.png")


def test_empty_bytes() -> None:
    with pytest.raises(ImageReadError, match="empty") as excinfo:
        load_xray(b"", name="upload.png")
    assert_read_error(excinfo, "upload.png")


def test_over_max_pixels_small_png() -> None:
    with pytest.raises(ImageReadError, match="over the limit") as excinfo:
        load_xray(encode(Image.fromarray(gray_ramp(), "L"), "PNG"), name="small.png", max_pixels=100)
    assert_read_error(excinfo, "small.png")
    assert load_xray(encode(Image.fromarray(gray_ramp(), "L"), "PNG"), max_pixels=256).pixels.shape == (16, 16)


@pytest.mark.parametrize(
    ("width", "height", "max_pixels", "reason"),
    [
        (100_000, 100_000, MAX_PIXELS, "too large|over the limit"),  # PIL's own bomb guard fires inside Image.open
        (100_000, 100_000, 10**12, "too large"),  # our cap allows it, PIL's guard still refuses
        (10_000, 8_000, MAX_PIXELS, "over the limit"),  # below PIL's guard: our header check refuses it
    ],
)
def test_png_bomb_header_refused_without_allocating(
    tmp_path: Path, width: int, height: int, max_pixels: int, reason: str
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(width, height))
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match=reason) as excinfo:
            load_xray(path, max_pixels=max_pixels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_read_error(excinfo, "bomb.png")
    assert peak < 20 * 2**20  # Python-side allocations; an 80-megapixel decode would need far more


def test_header_only_png_says_corrupt() -> None:
    png = encode(Image.fromarray(gray_ramp(), "L"), "PNG")
    with pytest.raises(ImageReadError, match="corrupt or truncated PNG"):
        load_xray(png[:33], name="x.png")


def test_over_max_bytes(tmp_path: Path) -> None:
    data = encode(Image.fromarray(gray_ramp(), "L"), "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    limit = len(data) - 1
    for source, name in ((path, "big.png"), (data, "<bytes>"), (io.BytesIO(data), "<bytes>")):
        with pytest.raises(ImageReadError, match="over the limit") as excinfo:
            load_xray(source, max_bytes=limit)
        assert_read_error(excinfo, name)
    assert load_xray(data, max_bytes=len(data)).pixels.shape == (16, 16)


def test_missing_file_directory_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found") as excinfo:
        load_xray(tmp_path / "missing.png")
    assert_read_error(excinfo, "missing.png")
    with pytest.raises(ImageReadError):
        load_xray(tmp_path)
    with pytest.raises(ImageReadError, match="binary mode"):
        load_xray(io.StringIO("text"), name="t.png")
    with pytest.raises(ImageReadError):
        load_xray(12345)  # type: ignore[arg-type]


def test_name_with_newline_stays_one_line() -> None:
    with pytest.raises(ImageReadError) as excinfo:
        load_xray(b"junk", name="evil\nname.png")
    assert "\n" not in str(excinfo.value)
    assert str(excinfo.value).startswith("evil name.png: ")


@pytest.mark.parametrize("exception", [MemoryError(), ValueError("bad"), struct.error("unpack"), KeyError("k")])
def test_unexpected_decoder_exceptions_become_read_errors(
    monkeypatch: pytest.MonkeyPatch, exception: Exception
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise exception

    monkeypatch.setattr(xio, "_pil_to_gray", explode)
    with pytest.raises(ImageReadError) as excinfo:
        load_xray(encode(Image.fromarray(gray_ramp(), "L"), "PNG"), name="a.png")
    assert_read_error(excinfo, "a.png")
    monkeypatch.setattr(xdicom, "_monochrome", explode)
    with pytest.raises(ImageReadError) as excinfo:
        load_xray(dicom_bytes(make_dicom(gray_ramp())), name="a.dcm")
    assert_read_error(excinfo, "a.dcm")


def test_corrupt_dicom_pixel_data_refused() -> None:
    ds = make_dicom(gray_ramp())
    ds.PixelData = ds.PixelData[:10]  # far fewer bytes than 16x16
    with pytest.raises(ImageReadError) as excinfo:
        load_xray(dicom_bytes(ds), name="short.dcm")
    assert_read_error(excinfo, "short.dcm")
