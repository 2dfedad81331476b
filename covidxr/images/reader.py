"""The project's single image reader: PNG, JPEG, BMP, TIFF, GIF, WebP, JPEG 2000 and DICOM chest X-rays.

Everything that reads an image in covidxr goes through :func:`load_xray`. It detects the format from the content
(never from the file name), refuses oversized or malformed input *before* decoding where possible, and returns a
single-channel float32 image in ``[0, 1]`` in the MONOCHROME2 convention (bone and body bright, air dark).

Conventions (decided once, here):

* Colour input (RGB, CMYK, YCbCr, palette, colour DICOM) is converted to luminance with the ITU-R 601-2 weights
  that PIL's own ``convert("L")`` uses (0.299 R + 0.587 G + 0.114 B), computed in floating point.
  :attr:`Xray.color` is True when at least :data:`~covidxr.images.pixels.COLOR_MIN_FRACTION` of the pixels have channels
  that differ by more than :data:`~covidxr.images.pixels.COLOR_MIN_SPREAD` of the full range. A colour-tinted scan
  therefore counts as colour, JPEG chroma noise and a small coloured arrow or logo do not.
* Alpha (RGBA, LA, PA, transparent palettes) is composited onto **black**: a fully transparent pixel reads 0.
* 8-bit samples are divided by 255 and 16-bit samples (PIL modes ``I;16*``) by 65535, so stored values are preserved.
  32-bit integer mode ``I`` is divided by 65535 when all values fit in ``[0, 65535]`` (16-bit data that PIL widened),
  otherwise min-max scaled over the image. Float mode ``F`` is kept when it lies in ``[0, 1]``, otherwise min-max
  scaled. A constant image is therefore returned as its constant (min-max scaling of a constant gives zeros).
* Multi-frame files (animated GIF/WebP, multi-page TIFF): only the first frame is read. Multi-frame DICOM is refused.
* EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`).
* DICOM is decoded by :mod:`covidxr.images.dicom` (windowing, MONOCHROME1, colour DICOM, the header fields kept).
* Every failure raises :class:`~covidxr.errors.ImageReadError` with a one-line ``"NAME: reason"`` message.

Nothing here changes global state: PIL's ``LOAD_TRUNCATED_IMAGES`` and ``MAX_IMAGE_PIXELS`` and the warning filters
are left alone; our own pixel cap is checked from the header before decoding.
"""

from __future__ import annotations

import io
import os
import typing
from dataclasses import dataclass

import numpy as np

from covidxr.errors import ImageReadError
from covidxr.images.dicom import decode_dicom, is_dicom
from covidxr.images.pixels import clean_text, is_color, luminance, read_error, unit_image

__all__ = ["MAX_FILE_BYTES", "MAX_PIXELS", "Xray", "load_xray"]

MAX_PIXELS: int = 60_000_000
"""Default cap on width * height (and DICOM rows * columns * frames)."""

MAX_FILE_BYTES: int = 256 * 2**20
"""Default cap on the input size in bytes."""

# Formats PIL may open. Restricting the list keeps formats with weak or no magic bytes (TGA, DIB, ...) from claiming
# random input. A multi-picture JPEG is opened through "JPEG" and reports format "MPO".
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "JPEG2000")
_NOT_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or .docx/.xlsx/.pptx)"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"{\\rtf", "an RTF document"),
)
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_READ_CHUNK = 2**20


@dataclass(frozen=True)
class Xray:
    """A decoded chest X-ray.

    Attributes:
        pixels: ``(H, W)`` float32 array in ``[0, 1]``, bone/body bright (MONOCHROME2 convention), always finite.
        format: PIL format name (``"PNG"``, ``"JPEG"``, ``"BMP"``, ``"TIFF"``, ...) or ``"DICOM"``.
        color: True when the input held real colour (channels differ materially), e.g. a photo or a tinted scan.
        header: DICOM only: the non-identifying fields of :data:`covidxr.images.dicom.DICOM_HEADER_FIELDS` (Modality,
            ViewPosition, BodyPartExamined, PhotometricInterpretation, Rows, Columns, BitsStored, Manufacturer) as
            strings, missing or empty ones omitted; ``{}`` for other formats.
        name: the file name used in messages.
    """

    pixels: np.ndarray
    format: str
    color: bool
    header: dict[str, str]
    name: str


def load_xray(
    source: str | os.PathLike | bytes | typing.BinaryIO,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_FILE_BYTES,
) -> Xray:
    """Read a chest X-ray from a path, raw bytes or a binary file object.

    Args:
        source: a file path, the file's bytes (``bytes``/``bytearray``/``memoryview``), or a binary file object
            (read from its current position).
        name: the name to use in messages and in :attr:`Xray.name`. Defaults to the file's base name, the file
            object's ``name`` attribute, or ``"<bytes>"``.
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).
        max_bytes: refuse inputs larger than this many bytes (checked before reading where possible).

    Returns:
        The decoded image, see :class:`Xray`.

    Raises:
        ImageReadError: for every failure (unreadable, empty, unknown format, too large, truncated, corrupt,
            unsupported DICOM). The message is one line, ``"NAME: reason"``.
    """
    label = clean_text(name) if name is not None else _default_name(source)
    data = _read_source(source, label, max_bytes)
    if not data:
        raise read_error(label, "empty input (0 bytes)")
    try:
        if is_dicom(data):
            pixels, color, header = decode_dicom(data, label, max_pixels)
            return Xray(pixels=pixels, format="DICOM", color=color, header=header, name=label)
        return _load_pil(data, label, max_pixels)
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise read_error(label, "not enough memory to decode the image") from exc
    except Exception as exc:  # any decoder failure becomes our error, by contract
        raise read_error(label, f"could not decode the image ({_detail(exc)})") from exc
    except BaseException as exc:
        # Rust decoders built with pyo3 (pylibjpeg-rle, ...) turn a panic on corrupt data into
        # pyo3_runtime.PanicException, which derives from BaseException. Only that one is converted here;
        # KeyboardInterrupt, SystemExit and friends propagate untouched.
        if type(exc).__name__ != "PanicException":
            raise
        raise read_error(label, f"the decoder crashed on corrupt data ({_detail(exc)})") from exc


def _detail(exc: BaseException) -> str:
    """What went wrong, in the decoder's words, without its exception class: a clinician reads these lines (the
    class is kept in the chained exception for the server log)."""
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    return text or "no detail given"


# --------------------------------------------------------------------------------------------------------- input


def _default_name(source: object) -> str:
    """Pick the display name of a source when the caller gave none.

    Returns:
        The base name of a path or of a file object's ``name``, else ``"<bytes>"``.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            return clean_text(os.path.basename(os.fsdecode(source))) or clean_text(os.fsdecode(source))
        except (TypeError, ValueError):
            return "<path>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    file_name = getattr(source, "name", None)
    if isinstance(file_name, (str, bytes)) and file_name:
        return clean_text(os.path.basename(os.fsdecode(file_name))) or "<file>"
    return "<bytes>" if file_name is None else "<file>"


def _read_source(source: object, name: str, max_bytes: int) -> bytes:
    """Get the raw bytes of a source, refusing anything over ``max_bytes``.

    Returns:
        The content.

    Raises:
        ImageReadError: when the source cannot be read, is not binary, or is too large.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_path(source, name, max_bytes)
    elif hasattr(source, "read"):
        data = _read_file_object(typing.cast(typing.BinaryIO, source), name, max_bytes)
    else:
        raise read_error(name, f"cannot read an image from a {type(source).__name__}")
    if len(data) > max_bytes:
        raise read_error(name, f"input is {len(data)} bytes, over the limit of {max_bytes}")
    return data


def _read_path(path: str | os.PathLike, name: str, max_bytes: int) -> bytes:
    """Read a file, checking its size first.

    Returns:
        The file's bytes (at most ``max_bytes + 1`` of them).

    Raises:
        ImageReadError: when the file is missing, unreadable or too large.
    """
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise read_error(name, f"file is {size} bytes, over the limit of {max_bytes}")
        with open(path, "rb") as handle:
            return _read_capped(handle, max_bytes + 1)
    except FileNotFoundError as exc:
        raise read_error(name, "file not found") from exc
    except IsADirectoryError as exc:
        raise read_error(name, "is a directory, not a file") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise read_error(name, f"cannot read file ({_detail(exc)})") from exc


def _read_file_object(handle: typing.BinaryIO, name: str, max_bytes: int) -> bytes:
    """Read a binary file object from its current position, at most ``max_bytes + 1`` bytes.

    Returns:
        The bytes read.

    Raises:
        ImageReadError: when reading fails or the object is in text mode.
    """
    try:
        return _read_capped(handle, max_bytes + 1)
    except TypeError as exc:
        raise read_error(name, "file object must be opened in binary mode") from exc
    except Exception as exc:  # arbitrary file-like objects may raise anything
        raise read_error(name, f"cannot read file object ({_detail(exc)})") from exc


def _read_capped(handle: typing.BinaryIO, limit: int) -> bytes:
    """Read until end of file or until ``limit`` bytes, in chunks (``read(limit)`` would allocate ``limit`` bytes).

    Returns:
        The bytes read.

    Raises:
        TypeError: when ``read`` returns something other than bytes (a text-mode file).
    """
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = handle.read(min(_READ_CHUNK, limit - total))
        if not chunk:
            break
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"read() returned {type(chunk).__name__}, not bytes")
        chunks.append(bytes(chunk))
        total += len(chunk)
    return b"".join(chunks)


def _describe_non_image(data: bytes) -> str:
    """Explain why bytes no decoder accepted are not an image.

    Returns:
        A short reason for the error message.
    """
    for magic, what in _NOT_IMAGES:
        if data.startswith(magic):
            return f"not an image: the content is {what}"
    for magic, fmt in _IMAGE_MAGIC:
        if data.startswith(magic):
            return f"corrupt or truncated {fmt} file (its header could not be parsed)"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "corrupt or truncated WebP file (its header could not be parsed)"
    head = data[:512]
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "not an image: the content is text"
    return "unrecognised image format (supported: PNG, JPEG, BMP, TIFF, GIF, WebP, JPEG 2000, DICOM)"


# ----------------------------------------------------------------------------------------------------- PIL path


def _load_pil(data: bytes, name: str, max_pixels: int) -> Xray:
    """Decode a raster image with PIL.

    Returns:
        The decoded image.

    Raises:
        ImageReadError: on unknown format, oversize, truncation or corruption.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError as exc:
        raise read_error(name, _describe_non_image(data)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise read_error(name, f"image too large (decompression-bomb guard: {exc})") from exc
    with image:
        fmt = str(image.format or "unknown")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise read_error(name, f"{fmt} header gives an empty size {width}x{height}")
        if width * height > max_pixels:
            raise read_error(name, f"{fmt} image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise read_error(name, f"corrupt or truncated {fmt} file ({_detail(exc)})") from exc
        ImageOps.exif_transpose(image, in_place=True)  # no copy of a large film without an orientation tag
        pixels, color = _pil_to_gray(image)
        # 8- and 16-bit grey samples divided by their maximum are finite and in [0, 1] already: a 5,000 px film
        # skips two passes over 20 million values (the result is the same array either way)
        unit = pixels if image.mode in _UNIT_MODES else unit_image(pixels)
    return Xray(pixels=unit, format=fmt, color=color, header={}, name=name)


_UNIT_MODES = frozenset({"1", "L", "I;16", "I;16L", "I;16B", "I;16N"})
_LUT_8 = np.arange(256, dtype=np.float32) / np.float32(255.0)


def _pil_to_gray(image: typing.Any) -> tuple[np.ndarray, bool]:
    """Convert a loaded PIL image of any mode to grayscale in ``[0, 1]``.

    Returns:
        ``(pixels, color)``: float32 ``(H, W)`` array and whether the image held real colour.
    """
    mode = image.mode
    if mode in ("1", "L"):  # a table of the 256 values: the same floats as dividing each sample, in a third of the time
        return _LUT_8[np.asarray(image if mode == "L" else image.convert("L"))], False
    if mode.startswith("I;16"):
        return np.ascontiguousarray(np.asarray(image).astype(np.float32) / np.float32(65535.0)), False
    if mode == "I":
        return _scale_wide(np.asarray(image), 65535.0), False
    if mode == "F":
        return _scale_wide(np.asarray(image), 1.0), False
    if mode == "LA":
        arr = np.asarray(image)
        return arr[..., 0].astype(np.float32) * arr[..., 1].astype(np.float32) / (255.0 * 255.0), False
    if mode == "RGB":
        rgb = np.asarray(image)
        return luminance(rgb) / 255.0, is_color(rgb, 255)
    if mode == "RGBA":
        rgba = np.asarray(image)
        alpha = rgba[..., 3].astype(np.float32) / 255.0
        return luminance(rgba[..., :3]) / 255.0 * alpha, is_color(rgba[..., :3], 255)
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return _pil_to_gray(image.convert("RGBA" if has_alpha else "RGB"))


def _scale_wide(arr: np.ndarray, nominal_max: float) -> np.ndarray:
    """Scale integer or float samples that may not have a fixed range.

    Values inside ``[0, nominal_max]`` are divided by ``nominal_max``; anything else is min-max scaled over the
    finite values (a constant image then becomes zeros). Non-finite values become 0.

    Returns:
        float32 array in ``[0, 1]``.
    """
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.float32)
    low, high = float(values[finite].min()), float(values[finite].max())
    if low >= 0.0 and high <= nominal_max:
        scaled = values / nominal_max
    elif high > low:
        scaled = (values - low) / (high - low)
    else:
        scaled = np.zeros_like(values)
    return np.where(finite, scaled, 0.0).astype(np.float32)
