"""The project's single image reader: PNG, JPEG, BMP, TIFF, GIF, WebP, JPEG 2000 and DICOM chest X-rays.

Everything that reads an image in covidxr goes through :func:`load_xray`. It detects the format from the content
(never from the file name), refuses oversized or malformed input *before* decoding where possible, and returns a
single-channel float32 image in ``[0, 1]`` in the MONOCHROME2 convention (bone and body bright, air dark).

Conventions (decided once, here):

* Colour input (RGB, CMYK, YCbCr, palette, colour DICOM) is converted to luminance with the ITU-R 601-2 weights
  that PIL's own ``convert("L")`` uses (0.299 R + 0.587 G + 0.114 B), computed in floating point.
  :attr:`Xray.color` is True when at least :data:`COLOR_MIN_FRACTION` of the pixels have channels that differ by
  more than :data:`COLOR_MIN_SPREAD` of the full range. A colour-tinted scan therefore counts as colour, JPEG chroma
  noise and a small coloured arrow or logo do not.
* Alpha (RGBA, LA, PA, transparent palettes) is composited onto **black**: a fully transparent pixel reads 0.
* 8-bit samples are divided by 255 and 16-bit samples (PIL modes ``I;16*``) by 65535, so stored values are preserved.
  32-bit integer mode ``I`` is divided by 65535 when all values fit in ``[0, 65535]`` (16-bit data that PIL widened),
  otherwise min-max scaled over the image. Float mode ``F`` is kept when it lies in ``[0, 1]``, otherwise min-max
  scaled. A constant image is therefore returned as its constant (min-max scaling of a constant gives zeros).
* Multi-frame files (animated GIF/WebP, multi-page TIFF): only the first frame is read. Multi-frame DICOM is refused.
* EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`).
* DICOM: modality LUT / rescale, then the first VOI LUT or window (when present), else the nominal stored value range
  (from Bits Stored and Pixel Representation, passed through the modality transform) is mapped onto ``[0, 1]``.
  MONOCHROME1 is inverted. RGB and YBR colour DICOMs are converted to luminance (``color=True`` when the channels
  differ as above). Other photometric interpretations (PALETTE COLOR, ...) are refused.
* Every failure raises :class:`~covidxr.errors.ImageReadError` with a one-line ``"NAME: reason"`` message.

Nothing here changes global state: PIL's ``LOAD_TRUNCATED_IMAGES`` and ``MAX_IMAGE_PIXELS`` and the warning filters
are left alone; our own pixel cap is checked from the header before decoding.
"""

from __future__ import annotations

import io
import os
import re
import typing
from dataclasses import dataclass

import numpy as np

from covidxr.errors import ImageReadError

__all__ = ["MAX_FILE_BYTES", "MAX_PIXELS", "Xray", "load_xray"]

MAX_PIXELS: int = 60_000_000
"""Default cap on width * height (and DICOM rows * columns * frames)."""

MAX_FILE_BYTES: int = 256 * 2**20
"""Default cap on the input size in bytes."""

COLOR_MIN_SPREAD: float = 32 / 255
"""A pixel is coloured when max(channel) - min(channel) exceeds this fraction of the full range."""

COLOR_MIN_FRACTION: float = 0.05
"""An image is colour when at least this fraction of its pixels is coloured."""

# Formats PIL may open. Restricting the list keeps formats with weak or no magic bytes (TGA, DIB, ...) from claiming
# random input. A multi-picture JPEG is opened through "JPEG" and reports format "MPO".
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "JPEG2000")
DICOM_HEADER_FIELDS: tuple[str, ...] = (
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsStored",
    "Manufacturer",
)
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
_LUMA = (0.299, 0.587, 0.114)
_MAX_MESSAGE = 300
_READ_CHUNK = 2**20


@dataclass(frozen=True)
class Xray:
    """A decoded chest X-ray.

    Attributes:
        pixels: ``(H, W)`` float32 array in ``[0, 1]``, bone/body bright (MONOCHROME2 convention), always finite.
        format: PIL format name (``"PNG"``, ``"JPEG"``, ``"BMP"``, ``"TIFF"``, ...) or ``"DICOM"``.
        color: True when the input held real colour (channels differ materially), e.g. a photo or a tinted scan.
        header: DICOM only: the non-identifying fields Modality, ViewPosition, BodyPartExamined,
            PhotometricInterpretation, Rows, Columns, BitsStored and Manufacturer as strings (missing or empty ones
            omitted); ``{}`` for other formats.
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
    label = _clean(name) if name is not None else _default_name(source)
    data = _read_source(source, label, max_bytes)
    if not data:
        raise _fail(label, "empty input (0 bytes)")
    try:
        if _is_dicom(data):
            return _load_dicom(data, label, max_pixels)
        return _load_pil(data, label, max_pixels)
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise _fail(label, "not enough memory to decode the image") from exc
    except Exception as exc:  # any decoder failure becomes our error, by contract
        raise _fail(label, f"could not decode the image ({type(exc).__name__}: {exc})") from exc
    except BaseException as exc:
        # Rust decoders built with pyo3 (pylibjpeg-rle, ...) turn a panic on corrupt data into
        # pyo3_runtime.PanicException, which derives from BaseException. Only that one is converted here;
        # KeyboardInterrupt, SystemExit and friends propagate untouched.
        if type(exc).__name__ != "PanicException":
            raise
        raise _fail(label, f"the decoder crashed on corrupt data (PanicException: {exc})") from exc


# --------------------------------------------------------------------------------------------------------- input


def _clean(text: str) -> str:
    """Collapse whitespace and control characters so a message stays on one line.

    Args:
        text: any text.

    Returns:
        The text on one line, cut to a reasonable length.
    """
    one_line = re.sub(r"[\s\x00-\x1f\x7f]+", " ", str(text)).strip()
    if len(one_line) > _MAX_MESSAGE:
        one_line = one_line[: _MAX_MESSAGE - 3] + "..."
    return one_line or "<unnamed>"


def _fail(name: str, reason: str) -> ImageReadError:
    """Build the project's one-line read error.

    Args:
        name: file name for the message.
        reason: what went wrong.

    Returns:
        An :class:`ImageReadError` with message ``"NAME: reason"``.
    """
    return ImageReadError(f"{_clean(name)}: {_clean(reason)}")


def _default_name(source: object) -> str:
    """Pick the display name of a source when the caller gave none.

    Args:
        source: the argument given to :func:`load_xray`.

    Returns:
        The base name of a path or of a file object's ``name``, else ``"<bytes>"``.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            return _clean(os.path.basename(os.fsdecode(source))) or _clean(os.fsdecode(source))
        except (TypeError, ValueError):
            return "<path>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    file_name = getattr(source, "name", None)
    if isinstance(file_name, (str, bytes)) and file_name:
        return _clean(os.path.basename(os.fsdecode(file_name))) or "<file>"
    return "<bytes>" if file_name is None else "<file>"


def _read_source(source: object, name: str, max_bytes: int) -> bytes:
    """Get the raw bytes of a source, refusing anything over ``max_bytes``.

    Args:
        source: a path, bytes-like object or binary file object.
        name: display name for messages.
        max_bytes: the size cap.

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
        raise _fail(name, f"cannot read an image from a {type(source).__name__}")
    if len(data) > max_bytes:
        raise _fail(name, f"input is {len(data)} bytes, over the limit of {max_bytes}")
    return data


def _read_path(path: str | os.PathLike, name: str, max_bytes: int) -> bytes:
    """Read a file, checking its size first.

    Args:
        path: file path.
        name: display name for messages.
        max_bytes: the size cap.

    Returns:
        The file's bytes (at most ``max_bytes + 1`` of them).

    Raises:
        ImageReadError: when the file is missing, unreadable or too large.
    """
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise _fail(name, f"file is {size} bytes, over the limit of {max_bytes}")
        with open(path, "rb") as handle:
            return _read_capped(handle, max_bytes + 1)
    except FileNotFoundError as exc:
        raise _fail(name, "file not found") from exc
    except IsADirectoryError as exc:
        raise _fail(name, "is a directory, not a file") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise _fail(name, f"cannot read file ({type(exc).__name__}: {exc})") from exc


def _read_file_object(handle: typing.BinaryIO, name: str, max_bytes: int) -> bytes:
    """Read a binary file object from its current position, at most ``max_bytes + 1`` bytes.

    Args:
        handle: an object with ``read``.
        name: display name for messages.
        max_bytes: the size cap.

    Returns:
        The bytes read.

    Raises:
        ImageReadError: when reading fails or the object is in text mode.
    """
    try:
        return _read_capped(handle, max_bytes + 1)
    except TypeError as exc:
        raise _fail(name, "file object must be opened in binary mode") from exc
    except Exception as exc:  # arbitrary file-like objects may raise anything
        raise _fail(name, f"cannot read file object ({type(exc).__name__}: {exc})") from exc


def _read_capped(handle: typing.BinaryIO, limit: int) -> bytes:
    """Read until end of file or until ``limit`` bytes, in chunks (``read(limit)`` would allocate ``limit`` bytes).

    Args:
        handle: a binary file object.
        limit: the most bytes to read.

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

    Args:
        data: the content.

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

    Args:
        data: the file content.
        name: display name for messages.
        max_pixels: pixel cap, checked from the header before decoding.

    Returns:
        The decoded image.

    Raises:
        ImageReadError: on unknown format, oversize, truncation or corruption.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError as exc:
        raise _fail(name, _describe_non_image(data)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(name, f"image too large (decompression-bomb guard: {exc})") from exc
    with image:
        fmt = str(image.format or "unknown")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise _fail(name, f"{fmt} header gives an empty size {width}x{height}")
        if width * height > max_pixels:
            raise _fail(name, f"{fmt} image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _fail(name, f"corrupt or truncated {fmt} file ({type(exc).__name__}: {exc})") from exc
        upright = ImageOps.exif_transpose(image)
        pixels, color = _pil_to_gray(upright)
    return Xray(pixels=_finish(pixels), format=fmt, color=color, header={}, name=name)


def _pil_to_gray(image: typing.Any) -> tuple[np.ndarray, bool]:
    """Convert a loaded PIL image of any mode to grayscale in ``[0, 1]``.

    Args:
        image: a loaded :class:`PIL.Image.Image`.

    Returns:
        ``(pixels, color)``: float32 ``(H, W)`` array and whether the image held real colour.
    """
    mode = image.mode
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0, False
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.float32) / 65535.0, False
    if mode == "I":
        return _scale_wide(np.asarray(image), 65535.0), False
    if mode == "F":
        return _scale_wide(np.asarray(image), 1.0), False
    if mode == "LA":
        arr = np.asarray(image)
        return arr[..., 0].astype(np.float32) * arr[..., 1].astype(np.float32) / (255.0 * 255.0), False
    if mode == "RGB":
        rgb = np.asarray(image)
        return _luminance(rgb) / 255.0, _is_color(rgb, 255)
    if mode == "RGBA":
        rgba = np.asarray(image)
        alpha = rgba[..., 3].astype(np.float32) / 255.0
        return _luminance(rgba[..., :3]) / 255.0 * alpha, _is_color(rgba[..., :3], 255)
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return _pil_to_gray(image.convert("RGBA" if has_alpha else "RGB"))


def _scale_wide(arr: np.ndarray, nominal_max: float) -> np.ndarray:
    """Scale integer or float samples that may not have a fixed range.

    Values inside ``[0, nominal_max]`` are divided by ``nominal_max``; anything else is min-max scaled over the
    finite values (a constant image then becomes zeros). Non-finite values become 0.

    Args:
        arr: 2-D numeric array.
        nominal_max: the full-scale value when the data fits.

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


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of an ``(H, W, 3)`` array, in the input's units.

    Args:
        rgb: red, green and blue in the last axis.

    Returns:
        float32 ``(H, W)`` array.
    """
    out = rgb[..., 0].astype(np.float32) * np.float32(_LUMA[0])
    out += rgb[..., 1].astype(np.float32) * np.float32(_LUMA[1])  # one channel at a time keeps the peak memory low
    out += rgb[..., 2].astype(np.float32) * np.float32(_LUMA[2])
    return out


def _is_color(rgb: np.ndarray, full_scale: float) -> bool:
    """Whether the channels differ materially (see :data:`COLOR_MIN_SPREAD` and :data:`COLOR_MIN_FRACTION`).

    Args:
        rgb: ``(H, W, 3)`` integer or float array.
        full_scale: the value of full intensity (255 for 8-bit).

    Returns:
        True for a colour image.
    """
    if rgb.size == 0:
        return False
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    if np.issubdtype(high.dtype, np.unsignedinteger):
        spread = high - low  # cannot wrap: high >= low
    else:
        spread = high.astype(np.float64) - low
    coloured = np.count_nonzero(spread > COLOR_MIN_SPREAD * full_scale)
    return bool(coloured >= COLOR_MIN_FRACTION * spread.size)


def _finish(pixels: np.ndarray) -> np.ndarray:
    """Make the final output: 2-D, float32, finite, clipped to ``[0, 1]`` and contiguous.

    Args:
        pixels: a 2-D array of roughly ``[0, 1]`` values.

    Returns:
        The cleaned array.
    """
    out = np.nan_to_num(np.asarray(pixels, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


# --------------------------------------------------------------------------------------------------- DICOM path


def _is_dicom(data: bytes) -> bool:
    """Detect DICOM content: the ``DICM`` magic after a 128-byte preamble, or a preamble-less dataset.

    A preamble-less file is recognised when it starts with a little-endian group 0x0002 or 0x0008 tag (no raster
    format PIL reads starts that way).

    Args:
        data: the file content.

    Returns:
        True when the content should be parsed as DICOM.
    """
    if data[128:132] == b"DICM":
        return True
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00"


def _load_dicom(data: bytes, name: str, max_pixels: int) -> Xray:
    """Decode a single-frame DICOM image.

    Args:
        data: the file content.
        name: display name for messages.
        max_pixels: cap on rows * columns * frames, checked before the pixel data is decoded.

    Returns:
        The decoded image with its non-identifying header fields.

    Raises:
        ImageReadError: when the dataset has no (or unsupported) pixel data, several frames, or is too large.
    """
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    photometric = _check_dicom(dataset, name, max_pixels)
    arr = dataset.pixel_array
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        pixels = _dicom_monochrome(np.asarray(arr), dataset, invert=photometric == "MONOCHROME1")
        color = False
    else:
        rgb = np.asarray(arr)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise _fail(name, f"DICOM colour pixel data has unexpected shape {rgb.shape}")
        full_scale = float(2 ** int(dataset.BitsStored) - 1)
        pixels, color = _luminance(rgb) / np.float32(full_scale), _is_color(rgb, full_scale)
    if pixels.ndim != 2:
        raise _fail(name, f"DICOM pixel data has unexpected shape {pixels.shape}")
    return Xray(pixels=_finish(pixels), format="DICOM", color=color, header=_dicom_header(dataset), name=name)


def _check_dicom(dataset: typing.Any, name: str, max_pixels: int) -> str:
    """Refuse DICOM datasets we cannot or should not decode, before touching the pixel data.

    Args:
        dataset: a parsed :class:`pydicom.dataset.Dataset`.
        name: display name for messages.
        max_pixels: cap on rows * columns * frames.

    Returns:
        The photometric interpretation (upper case).

    Raises:
        ImageReadError: on missing pixel data, bad geometry, several frames, oversize, unsupported colour model or
            a non-numeric rescale.
    """
    if "PixelData" not in dataset:
        sop = dataset.get("SOPClassUID", None)
        kind = f" ({getattr(sop, 'name', sop)})" if sop else ""
        raise _fail(name, f"DICOM file has no pixel data{kind}; it is not an image")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or columns <= 0:
        raise _fail(name, f"DICOM image has an invalid size {rows}x{columns}")
    if rows * columns * max(frames, 1) > max_pixels:
        raise _fail(name, f"DICOM image is {rows}x{columns}x{frames} pixels, over the limit of {max_pixels} pixels")
    if frames > 1:
        raise _fail(name, f"multi-frame DICOM ({frames} frames) is not supported; export a single frame")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    monochrome = photometric in ("MONOCHROME1", "MONOCHROME2")
    colour = photometric == "RGB" or photometric.startswith("YBR_")
    if not ((monochrome and samples == 1) or (colour and samples == 3)):
        raise _fail(name, f"unsupported DICOM photometric interpretation {photometric} with {samples} samples")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in dataset and _first_number(dataset.get(keyword, None)) is None:
            raise _fail(name, f"DICOM {keyword} is not a finite number")
    return photometric


def _dicom_header(dataset: typing.Any) -> dict[str, str]:
    """The non-identifying header fields of a DICOM dataset, as one-line strings.

    Args:
        dataset: a parsed :class:`pydicom.dataset.Dataset`.

    Returns:
        Present, non-empty fields of :data:`DICOM_HEADER_FIELDS`.
    """
    header: dict[str, str] = {}
    for keyword in DICOM_HEADER_FIELDS:
        try:
            value = dataset.get(keyword, None)
        except Exception:  # a malformed element just stays out of the header
            continue
        text = "" if value is None else re.sub(r"[\s\x00-\x1f\x7f]+", " ", str(value)).strip()[:64]
        if text:
            header[keyword] = text
    return header


def _dicom_monochrome(arr: np.ndarray, dataset: typing.Any, *, invert: bool) -> np.ndarray:
    """Map decoded monochrome DICOM samples to ``[0, 1]``, bone bright.

    Args:
        arr: the stored values, ``(rows, columns)``.
        dataset: the dataset (modality LUT, VOI LUT/window and bit depth attributes).
        invert: True for MONOCHROME1.

    Returns:
        float array in ``[0, 1]`` (before final clipping).
    """
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, dataset)
    scaled = _apply_voi(values, dataset)
    if scaled is None:
        low, high = _modality_range(dataset, values)
        scaled = _normalise(values, low, high)
    scaled = np.clip(scaled, 0.0, 1.0)
    return 1.0 - scaled if invert else scaled


def _normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map ``low`` to 0 and ``high`` to 1 (zeros when they coincide or are not finite).

    Args:
        values: numeric array.
        low: value mapped to 0.
        high: value mapped to 1.

    Returns:
        float64 array (not clipped).
    """
    span = high - low
    if not np.isfinite(span) or span == 0:
        return np.zeros(np.shape(values), dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) - low) / span


def _apply_voi(values: np.ndarray, dataset: typing.Any) -> np.ndarray | None:
    """Apply the first VOI LUT or window of the dataset and scale its output to ``[0, 1]``.

    The output range is found by passing probe inputs through the same pydicom call: every LUT input for a VOI
    LUT, and two inputs far below and above the window for a window, so the scaling follows pydicom exactly.

    Args:
        values: modality-transformed values.
        dataset: the dataset.

    Returns:
        The scaled array, or None when the dataset has no usable VOI LUT or window.
    """
    from pydicom.pixels import apply_voi_lut

    sequence = dataset.get("VOILUTSequence", None)
    probe = _lut_inputs(sequence[0]) if sequence else None
    if probe is not None:
        # Clip (and round) to the LUT's input range first: the standard maps inputs outside it to the first/last
        # entry, and pydicom's integer index arithmetic can wrap for inputs far outside it.
        inputs = np.clip(np.rint(values), probe[0], probe[-1]).astype(np.int64)
        out = apply_voi_lut(inputs, dataset, index=0, prefer_lut=True)
        ends = apply_voi_lut(probe, dataset, index=0, prefer_lut=True)
        return _normalise(out, float(np.min(ends)), float(np.max(ends)))
    window = _first_window(dataset)
    if window is None:
        return None
    center, width = window
    probe = np.array([center - 100 * width - 10, center + 100 * width + 10], dtype=np.float64)
    out = apply_voi_lut(np.asarray(values, dtype=np.float64), dataset, index=0, prefer_lut=False)
    low, high = apply_voi_lut(probe, dataset, index=0, prefer_lut=False)
    return _normalise(out, float(low), float(high))


def _lut_inputs(item: typing.Any) -> np.ndarray | None:
    """Every input value a LUT item maps (from its LUT Descriptor), to probe the LUT's output range.

    Args:
        item: a Modality or VOI LUT Sequence item.

    Returns:
        An int64 array of inputs, or None when the item has no usable descriptor or data.
    """
    if "LUTData" not in item or "LUTDescriptor" not in item:
        return None
    descriptor = item.LUTDescriptor
    if len(descriptor) != 3:
        return None
    # LUT Descriptor: number of entries (0 means 65536), first input value mapped, bits per entry.
    entries = int(descriptor[0]) or 2**16
    first = int(descriptor[1])
    return np.arange(first, first + entries, dtype=np.int64)


def _first_window(dataset: typing.Any) -> tuple[float, float] | None:
    """The first Window Center / Window Width pair, if present and usable.

    Args:
        dataset: the dataset.

    Returns:
        ``(center, width)`` or None.
    """
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    center, width = _first_number(dataset.WindowCenter), _first_number(dataset.WindowWidth)
    if center is None or width is None or not width > 0:
        return None
    return center, width


def _first_number(value: typing.Any) -> float | None:
    """The first value of a (possibly multi-valued) numeric element, or None when it is not a finite number.

    Args:
        value: an element value.

    Returns:
        The number or None.
    """
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, bytes))):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _modality_range(dataset: typing.Any, values: np.ndarray) -> tuple[float, float]:
    """The nominal output range of the modality transform (the stored range, rescaled).

    With a Modality LUT Sequence the range is the LUT's; with Rescale Slope/Intercept it is the stored range from
    Bits Stored and Pixel Representation, rescaled; without Bits Stored it is the data's own minimum and maximum.

    Args:
        dataset: the dataset.
        values: the modality-transformed values (used only as a last resort).

    Returns:
        ``(low, high)`` with ``low`` the value that maps to black (before MONOCHROME1 inversion).
    """
    from pydicom.pixels import apply_modality_lut

    modality_lut = dataset.get("ModalityLUTSequence", None)
    probe = _lut_inputs(modality_lut[0]) if modality_lut else None
    if probe is not None:
        outputs = apply_modality_lut(probe, dataset)
        return float(np.min(outputs)), float(np.max(outputs))
    bits = int(dataset.get("BitsStored", 0) or 0)
    if not 1 <= bits <= 32:
        data = np.asarray(values, dtype=np.float64)
        return float(np.nanmin(data)), float(np.nanmax(data))
    if int(dataset.get("PixelRepresentation", 0) or 0) == 1:
        stored_low, stored_high = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        stored_low, stored_high = 0.0, 2.0**bits - 1
    slope = _first_number(dataset.get("RescaleSlope", None))
    intercept = _first_number(dataset.get("RescaleIntercept", None))
    if slope is not None and "RescaleIntercept" in dataset:
        offset = intercept if intercept is not None else 0.0
        ends = sorted((stored_low * slope + offset, stored_high * slope + offset))
        return ends[0], ends[1]
    return stored_low, stored_high
