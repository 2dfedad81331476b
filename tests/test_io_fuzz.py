"""Property-based fuzzing of covidxr.images.reader.load_xray.

The property, for any input whatsoever: load_xray returns an Xray whose pixels are a finite 2-D float32 array in
[0, 1], or raises ImageReadError with a one-line "NAME: reason" message. Any other exception is a bug.
Hypothesis runs derandomised (same examples on every run) and without an example database, so CI is deterministic.
"""

from __future__ import annotations

import io
import re
import struct
import typing
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from covidxr.errors import ImageReadError
from covidxr.images.reader import load_xray

NAME = "fuzz.bin"
# Corrupt input makes PIL and pydicom warn a lot; that is expected here (see the warnings-as-errors test below).
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",
    "ignore::DeprecationWarning",
    "ignore::RuntimeWarning",
    "ignore::PIL.Image.DecompressionBombWarning",
)
FUZZ = settings(
    max_examples=300,
    deadline=None,  # a shared, busy machine makes any per-example time limit flaky
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------- seeds (built once)


def _image_bytes(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _dicom_bytes(
    pixels: np.ndarray, *, bits_stored: int, rle: bool = False, preamble: bool = True, voi_lut: bool = False
) -> bytes:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.WindowCenter = 1000
    ds.WindowWidth = 2000
    ds.PixelData = pixels.tobytes()
    if voi_lut:
        item = Dataset()
        item.LUTDescriptor = [256, 100, 16]
        item.add_new("LUTData", "US", [int(v) for v in np.linspace(0, 65535, 256)])
        ds.VOILUTSequence = Sequence([item])
    if rle:
        ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def _build_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    gray = (np.add.outer(np.arange(24), np.arange(24)) * 5).astype(np.uint8)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    wide = (np.arange(16 * 16, dtype=np.uint16) * 250).reshape(16, 16)
    twelve = (np.arange(16 * 16, dtype=np.uint16) * 16).reshape(16, 16)
    return {
        "png_gray": _image_bytes(Image.fromarray(gray, "L"), "PNG"),
        "png_rgba": _image_bytes(Image.fromarray(rgb, "RGB").convert("RGBA"), "PNG"),
        "png_16": _image_bytes(Image.fromarray(wide), "PNG"),
        "png_palette": _image_bytes(Image.fromarray(rgb, "RGB").quantize(16), "PNG"),
        "jpeg_gray": _image_bytes(Image.fromarray(gray, "L"), "JPEG", quality=90),
        "jpeg_rgb": _image_bytes(Image.fromarray(rgb, "RGB"), "JPEG", quality=90),
        "bmp": _image_bytes(Image.fromarray(gray, "L"), "BMP"),
        "tiff_16": _image_bytes(Image.fromarray(wide), "TIFF"),
        "gif": _image_bytes(Image.fromarray(gray, "L"), "GIF"),
        "dicom": _dicom_bytes(twelve, bits_stored=12),
        "dicom_rle": _dicom_bytes(twelve, bits_stored=12, rle=True),
        "dicom_8_no_preamble": _dicom_bytes(gray, bits_stored=8, preamble=False),
        "dicom_voi_lut": _dicom_bytes(twelve, bits_stored=12, voi_lut=True),
    }


SEEDS = _build_seeds()
SEED_NAMES = sorted(SEEDS)
PNG_SEEDS = [name for name in SEED_NAMES if name.startswith("png")]
DICOM_SEEDS = [name for name in SEED_NAMES if name.startswith("dicom")]


def check(data: bytes, **kwargs: int) -> None:
    """The property: a valid Xray or an ImageReadError with a one-line message, nothing else."""
    try:
        xray = load_xray(data, name=NAME, **kwargs)
    except ImageReadError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, message
        assert message.startswith(f"{NAME}: "), message
        event("refused: " + re.sub(r"\d+", "N", message[len(NAME) + 2 :].split(" (")[0])[:60])  # FUZZDBG
        return
    event("decoded")
    pixels = xray.pixels
    assert isinstance(pixels, np.ndarray)
    assert pixels.ndim == 2 and pixels.size > 0
    assert pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert isinstance(xray.color, bool) and isinstance(xray.format, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in xray.header.items())


def test_seeds_are_valid() -> None:
    """Every seed decodes, so mutations start from real, deep-reaching input."""
    formats = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF", "dicom": "DICOM"}
    for name, data in SEEDS.items():
        xray = load_xray(data, name=name)
        assert xray.format == formats[name.split("_")[0]], name
        assert xray.pixels.ndim == 2 and xray.pixels.size > 0, name
        assert np.isfinite(xray.pixels).all() and 0.0 <= xray.pixels.min() <= xray.pixels.max() <= 1.0, name


# --------------------------------------------------------------------------------------------------- strategies

MAGICS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"\x02\x00"]
edits = st.lists(st.tuples(st.integers(min_value=0, max_value=2**20), st.integers(0, 7)), min_size=1, max_size=8)
overwrites = st.lists(
    st.tuples(st.integers(min_value=0, max_value=2**20), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4
)


@FUZZ
@given(prefix=st.sampled_from(MAGICS), body=st.binary(max_size=2048))
def test_random_bytes(prefix: bytes, body: bytes) -> None:
    check(prefix + body)


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element, encoded by hand so any value (valid or not) can be written."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB", b"OW") else b" "
    head = struct.pack("<HH", group, element) + vr
    if vr in (b"OB", b"OW", b"UN", b"SQ"):
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


TRANSFER_SYNTAXES = [
    b"1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    b"1.2.840.10008.1.2.5",  # RLE Lossless
    b"1.2.840.10008.1.2.4.50",  # JPEG Baseline
    b"1.2.840.10008.1.2.4.70",  # JPEG Lossless
    b"1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    b"1.2.840.10008.1.2",  # Implicit VR Little Endian (then our explicit encoding is wrong on purpose)
    b"9.9.9",  # unknown
]
PHOTOMETRICS = [b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"YBR_FULL", b"YBR_FULL_422", b"PALETTE COLOR", b"", b"X"]
DECIMALS = [b"0", b"1", b"-1", b"0.5", b"4095", b"-1024", b"1e308", b"-1e308", b"nan", b"inf", b"abc", b"1\\2", b""]
us = st.one_of(st.integers(0, 70), st.integers(0, 65535))
decimal_pair = st.tuples(st.sampled_from(DECIMALS), st.sampled_from(DECIMALS))

# A plausible pixel module, then up to three attributes replaced by absurd values.
plausible = st.fixed_dictionaries(
    {
        "syntax": st.just(TRANSFER_SYNTAXES[0]),
        "rows": st.integers(1, 40),
        "columns": st.integers(1, 40),
        "samples": st.just(1),
        "allocated_stored": st.sampled_from([(8, 8), (16, 12), (16, 16), (16, 10)]),
        "representation": st.integers(0, 1),
        "photometric": st.sampled_from(PHOTOMETRICS[:2]),
        "frames": st.none() | st.just(b"1"),
        "window": st.none() | st.tuples(st.sampled_from([b"100", b"2048", b"-50"]), st.sampled_from([b"1", b"400"])),
        "rescale": st.none() | st.tuples(st.sampled_from([b"0", b"-1024"]), st.sampled_from([b"1", b"2", b"-1"])),
        "pixel_length": st.none(),
        "preamble": st.booleans(),
    }
)
absurd = st.one_of(
    st.tuples(st.just("syntax"), st.sampled_from(TRANSFER_SYNTAXES)),
    st.tuples(st.just("rows"), us),
    st.tuples(st.just("columns"), us),
    st.tuples(st.just("samples"), st.integers(0, 4)),
    st.tuples(st.just("allocated_stored"), st.tuples(st.sampled_from([1, 8, 16, 32, 64]) | us, us)),
    st.tuples(st.just("representation"), st.integers(2, 65535)),
    st.tuples(st.just("photometric"), st.sampled_from(PHOTOMETRICS)),
    st.tuples(st.just("frames"), st.sampled_from([b"2", b"0", b"-1", b"x", b"99999999", b""])),
    st.tuples(st.just("window"), decimal_pair),
    st.tuples(st.just("rescale"), decimal_pair),
    st.tuples(st.just("pixel_length"), st.integers(0, 8192)),
)


def _pixel_module(config: dict[str, typing.Any], filler: int) -> bytes:
    """Encode a DICOM file from a pixel-module description (see `plausible`)."""
    allocated, stored = config["allocated_stored"]
    meta = _element(0x0002, 0x0010, b"UI", config["syntax"])
    body = [
        _element(0x0008, 0x0060, b"CS", b"CR"),
        _element(0x0028, 0x0002, b"US", struct.pack("<H", config["samples"])),
        _element(0x0028, 0x0004, b"CS", config["photometric"]),
    ]
    if config["frames"] is not None:
        body.append(_element(0x0028, 0x0008, b"IS", config["frames"]))
    for element, value in ((0x10, config["rows"]), (0x11, config["columns"]), (0x100, allocated), (0x101, stored)):
        body.append(_element(0x0028, element, b"US", struct.pack("<H", value)))
    body.append(_element(0x0028, 0x0103, b"US", struct.pack("<H", config["representation"])))
    if config["window"] is not None:
        body += [
            _element(0x0028, 0x1050, b"DS", config["window"][0]),
            _element(0x0028, 0x1051, b"DS", config["window"][1]),
        ]
    if config["rescale"] is not None:
        body += [
            _element(0x0028, 0x1052, b"DS", config["rescale"][0]),
            _element(0x0028, 0x1053, b"DS", config["rescale"][1]),
        ]
    length = config["pixel_length"]
    if length is None:  # exactly what the attributes ask for (capped)
        length = min(config["rows"] * config["columns"] * max(config["samples"], 1) * max(allocated, 1) // 8, 2**16)
    pixels = bytes((filler + 37 * i) % 256 for i in range(length))
    body.append(_element(0x7FE0, 0x0010, b"OW" if allocated > 8 else b"OB", pixels))
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta)))
    head = b"\0" * 128 + b"DICM" if config["preamble"] else b""
    return head + group_length + meta + b"".join(body)


@FUZZ
@given(base=plausible, changes=st.lists(absurd, max_size=3), filler=st.integers(0, 255))
def test_structured_dicom_with_absurd_attributes(
    base: dict[str, typing.Any], changes: list[tuple[str, typing.Any]], filler: int
) -> None:
    """Well-formed DICOM encoding, a plausible pixel module with up to three absurd attributes, any pixel bytes."""
    check(_pixel_module({**base, **dict(changes)}, filler))


@FUZZ
@given(preamble=st.binary(min_size=128, max_size=128), body=st.binary(max_size=1024))
def test_random_bytes_after_dicom_magic(preamble: bytes, body: bytes) -> None:
    check(preamble + b"DICM" + body)


@FUZZ
@given(seed=st.sampled_from(SEED_NAMES), cut=st.integers(min_value=0, max_value=2**20))
def test_truncated(seed: str, cut: int) -> None:
    data = SEEDS[seed]
    check(data[: cut % len(data)])


@FUZZ
@given(seed=st.sampled_from(SEED_NAMES), flips=edits)
def test_bit_flips(seed: str, flips: list[tuple[int, int]]) -> None:
    data = bytearray(SEEDS[seed])
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    check(bytes(data))


@FUZZ
@given(seed=st.sampled_from(SEED_NAMES), patches=overwrites, cut=st.none() | st.integers(0, 2**20))
def test_byte_overwrites(seed: str, patches: list[tuple[int, bytes]], cut: int | None) -> None:
    data = bytearray(SEEDS[seed])
    for position, payload in patches:
        start = position % len(data)
        data[start : start + len(payload)] = payload
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    check(bytes(data))


@FUZZ
@pytest.mark.filterwarnings("error")
@given(seed=st.sampled_from(SEED_NAMES), flips=edits)
def test_bit_flips_with_warnings_as_errors(seed: str, flips: list[tuple[int, int]]) -> None:
    """With ``-W error`` library warnings are raised inside the decoders; they must still surface as our error."""
    data = bytearray(SEEDS[seed])
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    check(bytes(data))


def _set_ihdr(png: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    """Overwrite the IHDR width and height of a PNG (bytes 16..24), optionally recomputing the chunk CRC."""
    data = bytearray(png)
    data[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


huge_side = st.one_of(st.integers(0, 2**31 - 1), st.integers(2**14, 2**17), st.integers(0, 64))


@FUZZ
@given(seed=st.sampled_from(PNG_SEEDS), width=huge_side, height=huge_side, fix_crc=st.booleans())
def test_png_absurd_header_size(seed: str, width: int, height: int, fix_crc: bool) -> None:
    check(_set_ihdr(SEEDS[seed], width, height, fix_crc))


def _set_us(data: bytes, element: int, value: int) -> bytes:
    """Overwrite the value of an Explicit VR Little Endian US element (0028,element) wherever it occurs."""
    tag = struct.pack("<HH", 0x0028, element) + b"US" + struct.pack("<H", 2)
    out = bytearray(data)
    start = out.find(tag)
    while start >= 0:
        out[start + 8 : start + 10] = struct.pack("<H", value)
        start = out.find(tag, start + 1)
    return bytes(out)


@FUZZ
@given(
    seed=st.sampled_from(DICOM_SEEDS),
    rows=st.integers(0, 65535),
    columns=st.integers(0, 65535),
    bits=st.none() | st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
)
def test_dicom_absurd_header_size(seed: str, rows: int, columns: int, bits: tuple[int, int] | None) -> None:
    data = _set_us(_set_us(SEEDS[seed], 0x0010, rows), 0x0011, columns)
    if bits is not None:
        data = _set_us(_set_us(data, 0x0100, bits[0]), 0x0101, bits[1])  # BitsAllocated, BitsStored
    check(data)


@FUZZ
@given(seed=st.sampled_from(SEED_NAMES), max_pixels=st.integers(0, 1000), max_bytes=st.integers(0, 5000))
def test_small_limits(seed: str, max_pixels: int, max_bytes: int) -> None:
    check(SEEDS[seed], max_pixels=max_pixels, max_bytes=max_bytes)
