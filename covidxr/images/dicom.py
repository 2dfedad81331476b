"""DICOM decoding for :func:`covidxr.images.reader.load_xray` (the only caller; read files through it).

Conventions: modality LUT / rescale, then the first VOI LUT or window (when present), else the nominal stored value
range (from Bits Stored and Pixel Representation, passed through the modality transform) is mapped onto ``[0, 1]``.
MONOCHROME1 is inverted. RGB and YBR colour DICOMs are converted to luminance (colour when the channels differ, as
:func:`covidxr.images.pixels.is_color` decides). Other photometric interpretations (PALETTE COLOR, ...) and multi-frame
files are refused. Only the non-identifying header fields of :data:`DICOM_HEADER_FIELDS` are read out.
"""

from __future__ import annotations

import io
import re
import typing

import numpy as np

from covidxr.images.pixels import is_color, luminance, read_error, unit_image

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
"""The non-identifying header fields a decoded DICOM carries (``Xray.header``); nothing else is read out."""


def is_dicom(data: bytes) -> bool:
    """Detect DICOM content: the ``DICM`` magic after a 128-byte preamble, or a preamble-less dataset.

    A preamble-less file is recognised when it starts with a little-endian group 0x0002 or 0x0008 tag (no raster
    format PIL reads starts that way).
    """
    if data[128:132] == b"DICM":
        return True
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00"


def decode_dicom(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, bool, dict[str, str]]:
    """Decode a single-frame DICOM image.

    Args:
        data: the file content.
        name: display name for messages.
        max_pixels: cap on rows * columns * frames, checked before the pixel data is decoded.

    Returns:
        ``(pixels, color, header)``: the ``(H, W)`` float32 image in ``[0, 1]`` (bone bright), whether it held real
        colour, and its fields of :data:`DICOM_HEADER_FIELDS`.

    Raises:
        ImageReadError: when the dataset has no (or unsupported) pixel data, several frames, or is too large.
    """
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    photometric = _check_dicom(dataset, name, max_pixels)
    arr = dataset.pixel_array
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        pixels = _monochrome(np.asarray(arr), dataset, invert=photometric == "MONOCHROME1")
        color = False
    else:
        rgb = np.asarray(arr)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise read_error(name, f"DICOM colour pixel data has unexpected shape {rgb.shape}")
        full_scale = float(2 ** int(dataset.BitsStored) - 1)
        pixels, color = luminance(rgb) / np.float32(full_scale), is_color(rgb, full_scale)
    if pixels.ndim != 2:
        raise read_error(name, f"DICOM pixel data has unexpected shape {pixels.shape}")
    return unit_image(pixels), color, _header(dataset)


def _check_dicom(dataset: typing.Any, name: str, max_pixels: int) -> str:
    """Refuse DICOM datasets we cannot or should not decode, before touching the pixel data.

    Returns:
        The photometric interpretation (upper case).

    Raises:
        ImageReadError: on missing pixel data, bad geometry, several frames, oversize, unsupported colour model or
            a non-numeric rescale.
    """
    if "PixelData" not in dataset:
        sop = dataset.get("SOPClassUID", None)
        kind = f" ({getattr(sop, 'name', sop)})" if sop else ""
        raise read_error(name, f"DICOM file has no pixel data{kind}; it is not an image")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or columns <= 0:
        raise read_error(name, f"DICOM image has an invalid size {rows}x{columns}")
    if rows * columns * max(frames, 1) > max_pixels:
        raise read_error(name, f"DICOM image is {rows}x{columns}x{frames} pixels, over the limit of {max_pixels} "
                               "pixels")
    if frames > 1:
        raise read_error(name, f"multi-frame DICOM ({frames} frames) is not supported; export a single frame")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    monochrome = photometric in ("MONOCHROME1", "MONOCHROME2")
    colour = photometric == "RGB" or photometric.startswith("YBR_")
    if not ((monochrome and samples == 1) or (colour and samples == 3)):
        raise read_error(name, f"unsupported DICOM photometric interpretation {photometric} with {samples} samples")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in dataset and _first_number(dataset.get(keyword, None)) is None:
            raise read_error(name, f"DICOM {keyword} is not a finite number")
    return photometric


def _header(dataset: typing.Any) -> dict[str, str]:
    """The present, non-empty fields of :data:`DICOM_HEADER_FIELDS`, as one-line strings."""
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


def _monochrome(arr: np.ndarray, dataset: typing.Any, *, invert: bool) -> np.ndarray:
    """Map decoded monochrome samples (``(rows, columns)`` stored values) to ``[0, 1]``, bone bright (before final
    clipping); ``invert`` for MONOCHROME1."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, dataset)
    scaled = _apply_voi(values, dataset)
    if scaled is None:
        low, high = _modality_range(dataset, values)
        scaled = _normalise(values, low, high)
    scaled = np.clip(scaled, 0.0, 1.0)
    return 1.0 - scaled if invert else scaled


def _normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map ``low`` to 0 and ``high`` to 1, as float64, not clipped (zeros when they coincide or are not
    finite)."""
    span = high - low
    if not np.isfinite(span) or span == 0:
        return np.zeros(np.shape(values), dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) - low) / span


def _apply_voi(values: np.ndarray, dataset: typing.Any) -> np.ndarray | None:
    """Apply the first VOI LUT or window to modality-transformed values and scale its output to ``[0, 1]``; None
    when the dataset has no usable VOI LUT or window.

    The output range is found by passing probe inputs through the same pydicom call: every LUT input for a VOI
    LUT, and two inputs far below and above the window for a window, so the scaling follows pydicom exactly.
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
    """Every input value a Modality or VOI LUT item maps (from its LUT Descriptor), as int64, to probe the LUT's
    output range; None when the item has no usable descriptor or data."""
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
    """The first ``(center, width)`` of Window Center / Window Width, if present and usable."""
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    center, width = _first_number(dataset.WindowCenter), _first_number(dataset.WindowWidth)
    if center is None or width is None or not width > 0:
        return None
    return center, width


def _first_number(value: typing.Any) -> float | None:
    """The first value of a (possibly multi-valued) numeric element, or None when it is not a finite number."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, bytes))):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _modality_range(dataset: typing.Any, values: np.ndarray) -> tuple[float, float]:
    """The nominal output range ``(low, high)`` of the modality transform, ``low`` the value that maps to black
    (before MONOCHROME1 inversion).

    With a Modality LUT Sequence the range is the LUT's; with Rescale Slope/Intercept it is the stored range from
    Bits Stored and Pixel Representation, rescaled; without Bits Stored it is the data's own minimum and maximum
    (``values``, the modality-transformed values).
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
