"""Decode uploaded image bytes (PNG, JPEG, DICOM) into one grayscale pixel contract.

`decode_image` turns the bytes of one file into a `DecodedImage`: a 2-D float32 array in [0, 1] in
display orientation (bright bone, dark lungs), plus the source format, size and bit depth. Every
refusal is an `ImageDecodeError` subclass with a machine `code` and a sentence a person understands.

Limits are enforced before the expensive work: the byte count first, then the pixel count read from
the file's own header (PNG IHDR, JPEG SOF, DICOM Rows/Columns) before any pixel is decoded, then the bytes the
decoded pixels would take (``DECODED_BYTES_PER_PIXEL`` per allowed pixel), and a deflated DICOM data set is
inflated only up to a bound. The pixels are float32 from the first conversion on (no float64 copies), so one
decode allocates a few times the image's float32 size at most.

The format is sniffed from magic bytes only, never from a file name. The module changes no global
state (no Pillow or pydicom settings, no warning filters), logs nothing and never puts DICOM
header values that could identify a patient into a message.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, NoReturn

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "CorruptImage",
    "DecodedImage",
    "DecodesTooLarge",
    "EmptyInput",
    "ImageDecodeError",
    "MultiFrameDicom",
    "NoPixelData",
    "TooManyBytes",
    "TooManyPixels",
    "TruncatedImage",
    "UnsupportedDicom",
    "UnsupportedFormat",
    "decode_image",
    "format_bytes",
    "sniff_format",
]

FORMATS = ("png", "jpeg", "dicom")
# The service's limits (its Settings default to these): 20 MiB is far above a chest X-ray PNG or DICOM,
# 36 MP above the largest detector (43 x 43 cm at 0.07 mm is about 6,100 x 6,100 pixels).
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 36_000_000
# What the decoded samples of an image may take, per allowed pixel: a 16-bit grayscale image at the pixel
# limit fits, a colour image (Pillow keeps 4 bytes a pixel) of half as many pixels does too.
DECODED_BYTES_PER_PIXEL = 2

_ACCEPTED = "PNG, JPEG or DICOM"


# --------------------------------------------------------------------------- errors


class ImageDecodeError(ValueError):
    """Base of every refusal. `.code` is a short machine string; `str(err)` is a readable sentence."""

    code: ClassVar[str] = "undecodable_image"


class EmptyInput(ImageDecodeError):
    """The upload has no bytes at all."""

    code = "empty_file"


class TooManyBytes(ImageDecodeError):
    """The upload is larger than the byte limit: the one refusal for that, however it is detected
    (the decoder, the CLI before reading a file, the service while the upload streams in)."""

    code = "file_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"The file is larger than the upload limit of {format_bytes(max_bytes)}.")
        self.max_bytes = max_bytes


class UnsupportedFormat(ImageDecodeError):
    """Not PNG, JPEG or DICOM (e.g. GIF, BMP, TIFF, WebP, PDF, text)."""

    code = "unsupported_format"


class TruncatedImage(ImageDecodeError):
    """The file stops before the image is complete."""

    code = "truncated_image"


class CorruptImage(ImageDecodeError):
    """Right magic bytes, unreadable content."""

    code = "corrupt_image"


class TooManyPixels(ImageDecodeError):
    """The header declares more pixels than allowed (decompression-bomb guard)."""

    code = "too_many_pixels"


class DecodesTooLarge(ImageDecodeError):
    """The image would take more memory to decode than allowed (a compression bomb), though its file is small."""

    code = "decodes_too_large"


class MultiFrameDicom(ImageDecodeError):
    """A DICOM with more than one frame (a cine loop or a volume, not one radiograph)."""

    code = "multiframe_dicom"


class NoPixelData(ImageDecodeError):
    """A DICOM object without an image (structured report, presentation state, ...)."""

    code = "dicom_without_pixels"


class UnsupportedDicom(ImageDecodeError):
    """A valid DICOM image this service cannot use (colour, float pixels, no decoder for its syntax)."""

    code = "unsupported_dicom"


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image in the service's pixel contract.

    array: 2-D float32, C-contiguous, finite, values in [0, 1], display orientation.
    source_format: "png", "jpeg" or "dicom".
    original_size: (width, height) of the decoded image, after EXIF rotation.
    bit_depth: bits per sample in the source (8 or 16 for PNG, 8 or 12 for JPEG, BitsStored for DICOM).
    modality, body_part: a DICOM file's Modality and BodyPartExamined (None when absent or not DICOM).
    levels: the 8-bit gray levels ``array`` was made from (``array == levels / 255``) when the source is exactly
        8-bit gray after Pillow's conversion (PNG and JPEG of up to 8 bits); None otherwise. The store keeps them
        as they are instead of re-deriving them from ``array`` (2 ms of a request at 1024 px).
    """

    array: npt.NDArray[np.float32]
    source_format: str
    original_size: tuple[int, int]
    bit_depth: int
    # DICOM only, for the chest X-ray gate: Modality and BodyPartExamined, upper case (None when absent).
    # Header values: never logged.
    modality: str | None = None
    body_part: str | None = None
    levels: npt.NDArray[np.uint8] | None = None

    @property
    def width(self) -> int:
        """Width in pixels (columns)."""
        return self.original_size[0]

    @property
    def height(self) -> int:
        """Height in pixels (rows)."""
        return self.original_size[1]


# --------------------------------------------------------------------------- sniffing

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_DICOM_PREFIX_OFFSET = 128

# Formats we recognise only to name them in the refusal.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"8BPS", "a Photoshop document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)


def sniff_format(data: bytes) -> str | None:
    """Return "png", "jpeg" or "dicom" from the magic bytes of `data`, or None if none matches.

    DICOM means a Part 10 file: 128-byte preamble then "DICM". Nothing else is looked at.
    """
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    if data[_DICOM_PREFIX_OFFSET : _DICOM_PREFIX_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def _describe_other_format(data: bytes) -> str | None:
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    if data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":
        return "a BMP image"
    if data[4:8] == b"ftyp":
        return "a HEIF/AVIF or video file"
    # A bare DICOM data set (no preamble/"DICM") usually starts with group 0002 or 0008.
    if data[:2] in (b"\x02\x00", b"\x08\x00") and data[4:6].isalpha():
        return "a DICOM data set without the Part 10 file header (preamble and 'DICM')"
    return None


def format_bytes(n_bytes: int) -> str:
    """A byte count for people: ``512 bytes``, ``1.95 KiB``, ``20 MiB``, ``4.66 GiB`` (about three digits)."""
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    size, unit = n_bytes / 1024, "KiB"
    for larger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    # .3g would write 1000 KiB as "1e+03"; from 100 on, whole numbers carry three digits anyway.
    return f"{size:.3g} {unit}" if size < 100 else f"{size:.0f} {unit}"


# --------------------------------------------------------------------------- entry point


def decode_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode one uploaded file into a `DecodedImage`.

    data: the file's bytes; its format is taken from the bytes only (PNG, JPEG, DICOM Part 10).
    max_bytes: refuse larger inputs (`TooManyBytes`) before looking inside.
    max_pixels: refuse images whose header declares more than width*height pixels
        (`TooManyPixels`) before decoding them. For PNG/JPEG the effective limit is also capped at
        Pillow's `Image.MAX_IMAGE_PIXELS`, so Pillow never has to warn about a decompression bomb.
        Images whose decoded samples would take more than ``DECODED_BYTES_PER_PIXEL * max_pixels`` bytes,
        and deflated DICOM data sets that inflate past ``max_bytes`` plus that, are refused
        (`DecodesTooLarge`) before they are allocated.

    Raises an `ImageDecodeError` subclass for anything that cannot be turned into an image.
    """
    if max_bytes <= 0 or max_pixels <= 0:
        raise ValueError("max_bytes and max_pixels must be positive")
    data = bytes(data)  # accept bytearray/memoryview; no copy for bytes
    if not data:
        raise EmptyInput("The file is empty; upload a PNG, JPEG or DICOM image.")
    if len(data) > max_bytes:
        raise TooManyBytes(max_bytes)
    source_format = sniff_format(data)
    if source_format is None:
        other = _describe_other_format(data)
        if other is not None:
            raise UnsupportedFormat(f"The file looks like {other}; only {_ACCEPTED} images are accepted.")
        raise UnsupportedFormat(f"The file is not a recognised image; only {_ACCEPTED} images are accepted.")
    if source_format == "dicom":
        return _decode_dicom(data, max_bytes, max_pixels)
    return _decode_raster(data, source_format, max_pixels)


def _writable_float32(values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """``values`` as a float32 array this module may change in place (a copy only when it must)."""
    unit = np.asarray(values, dtype=np.float32)
    return unit if unit.flags.writeable and unit is not values else unit.copy()


def _finalise(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Finite, clipped to [0, 1], float32, C-contiguous; in place (``values`` is this module's own array)."""
    unit = np.asarray(values, dtype=np.float32)
    np.clip(unit, 0.0, 1.0, out=unit)  # -inf -> 0, +inf -> 1; NaN stays NaN
    # Not np.nan_to_num: it allocates five times the array in temporaries even with copy=False.
    nan = np.isnan(unit)
    if nan.any():
        unit[nan] = 0.0
    return np.ascontiguousarray(unit)


def _min_max(values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Stretch to [0, 1] (float32, in place when ``values`` is already a float32 of ours); a constant image
    becomes all zeros instead of 0/0."""
    unit = _writable_float32(values) if values.dtype != np.float32 else values
    low, high = float(np.min(unit)), float(np.max(unit))
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return np.zeros(unit.shape, dtype=np.float32)
    unit -= np.float32(low)
    unit *= np.float32(1.0 / (high - low))
    return unit


def _check_decoded_bytes(width: int, height: int, bytes_per_pixel: int, max_pixels: int, what: str) -> None:
    limit = DECODED_BYTES_PER_PIXEL * max_pixels
    needed = width * height * bytes_per_pixel
    if needed > limit:
        raise DecodesTooLarge(
            f"The {what} would take {format_bytes(needed)} to decode, more than the limit of "
            f"{format_bytes(limit)}; it was not decoded."
        )


def _check_pixel_count(width: int, height: int, limit: int, what: str) -> None:
    if width * height > limit:
        raise TooManyPixels(
            f"The {what} declares {width} x {height} pixels ({width * height:,}), "
            f"more than the limit of {limit:,} pixels."
        )


# --------------------------------------------------------------------------- PNG / JPEG

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_DISPLAY_NAME = {"png": "PNG", "jpeg": "JPEG", "dicom": "DICOM"}

# What Pillow raises for bad input: UnidentifiedImageError is an OSError, "broken PNG file" a SyntaxError
# (Image.open turns its plugins' IndexError/TypeError/KeyError into one), load() turns IndexError and
# struct.error into OSError; zlib and struct errors escape some plugins unwrapped. Only Pillow calls are
# guarded by this tuple: an error of this module's own code is a bug and must surface as one.
_PILLOW_INPUT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
)

# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD9)) | {0x01}  # RSTn, SOI, TEM: no length
# Structure caps far above real files (a PNG from a 32 MiB upload in 8 KiB IDATs has ~4,000 chunks;
# a JPEG has tens of segments before its first scan, ICC profiles split up to 255), far below
# what keeps Pillow's per-chunk Python loops busy for seconds.
_MAX_PNG_CHUNKS = 100_000
_MAX_JPEG_SEGMENTS = 5_000
_MAX_JPEG_JUNK_BYTES = 1024 * 1024


class _RasterHeader(NamedTuple):
    width: int
    height: int
    bit_depth: int


def _png_header(data: bytes) -> _RasterHeader | None:
    """Width, height and bit depth from IHDR, which the PNG spec requires to be the first chunk.

    Also refuses a PNG split into an absurd number of chunks: Pillow reads chunks one by one in
    Python, so millions of empty chunks would cost seconds of CPU before any pixel is decoded.
    """
    position, chunks = 8, 0
    while position + 8 <= len(data):
        chunks += 1
        if chunks > _MAX_PNG_CHUNKS:
            raise CorruptImage(
                f"The PNG file is split into more than {_MAX_PNG_CHUNKS:,} chunks; it is refused as malformed."
            )
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    # A palette PNG's bit depth counts index bits; its samples (palette entries) are 8-bit.
    return _RasterHeader(width, height, 8 if colour_type == 3 else bit_depth)


def _implausible_jpeg() -> CorruptImage:
    return CorruptImage(
        "The JPEG file has an implausible header (thousands of segments or megabytes of stray "
        "bytes before the image data); it is refused as malformed."
    )


def _jpeg_header(data: bytes) -> _RasterHeader | None:
    """Width, height and precision from the first SOFn segment, walking the markers up to SOS.

    Walks like Pillow does (skipping junk between segments) and refuses what would make Pillow's
    pure-Python marker loop spin for seconds: thousands of segments or megabytes of junk before
    the first scan. Returns None when no frame header is found (Pillow then has the last word).
    """
    position, end = 2, len(data)
    header: _RasterHeader | None = None
    segments = junk = 0
    while position + 4 <= end:
        if data[position] != 0xFF:
            next_marker = data.find(b"\xff", position)  # find(): no byte-by-byte Python loop
            junk += (end if next_marker < 0 else next_marker) - position
            if junk > _MAX_JPEG_JUNK_BYTES:
                raise _implausible_jpeg()
            if next_marker < 0:
                break
            position = next_marker
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD9, 0xDA):  # EOI, or SOS: the entropy-coded data that libjpeg reads in C
            break
        segments += 1
        if segments > _MAX_JPEG_SEGMENTS:
            raise _implausible_jpeg()
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker in _JPEG_SOF_MARKERS and header is None and position + 9 <= end:
            precision, height, width = struct.unpack(">BHH", data[position + 4 : position + 9])
            header = _RasterHeader(width, height, precision)
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return header


def _pixel_limit_for_pillow(max_pixels: int) -> int:
    # Pillow warns above MAX_IMAGE_PIXELS (and raises above twice that). Refusing at or below its
    # threshold ourselves keeps that warning from ever firing without touching Pillow's globals.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_limit is None else min(max_pixels, pillow_limit)


def _looks_truncated(data: bytes, source_format: str, err: Exception) -> bool:
    if isinstance(err, EOFError) or "truncated" in str(err).lower():
        return True
    if source_format == "png":
        return b"IEND" not in data
    return not data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _decode_raster(data: bytes, source_format: str, max_pixels: int) -> DecodedImage:
    name = _DISPLAY_NAME[source_format]
    limit = _pixel_limit_for_pillow(max_pixels)
    header = _png_header(data) if source_format == "png" else _jpeg_header(data)
    if header is not None:
        _check_pixel_count(header.width, header.height, limit, f"{name} header")
    image = _open_raster(data, source_format, limit)
    bit_depth = header.bit_depth if header is not None else (16 if image.mode.startswith("I") else 8)
    array, levels = _pillow_to_unit(image)
    del image  # Pillow's copy of the pixels goes before the float32 array is finalised
    height, width = array.shape
    return DecodedImage(_finalise(array), source_format, (width, height), bit_depth, levels=levels)


def _open_raster(data: bytes, source_format: str, limit: int) -> Image.Image:
    """Pillow's decode of the whole file, EXIF orientation applied; Pillow's input errors become refusals."""
    name = _DISPLAY_NAME[source_format]
    with _pillow_refusals(data, source_format, limit):
        opened = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[source_format]])
    with opened:
        _check_pixel_count(opened.width, opened.height, limit, f"{name} image")
        # Pillow keeps 1-bit, 8-bit and palette images in a byte a pixel, 16-bit in two, everything else in four.
        _check_decoded_bytes(opened.width, opened.height, _PILLOW_BYTES_PER_PIXEL.get(opened.mode, 4), limit, name)
        with _pillow_refusals(data, source_format, limit):
            opened.load()
            # Viewers show JPEGs (and PNGs with an eXIf chunk) rotated by their EXIF Orientation.
            return ImageOps.exif_transpose(opened)


@contextmanager
def _pillow_refusals(data: bytes, source_format: str, limit: int) -> Iterator[None]:
    """Turn what Pillow raises for bad input into a typed refusal; wrap Pillow calls only."""
    name = _DISPLAY_NAME[source_format]
    try:
        yield
    except Image.DecompressionBombError as err:
        raise TooManyPixels(
            f"The {name} image has more pixels than the decoder allows ({limit:,}); it was not decoded."
        ) from err
    except _PILLOW_INPUT_ERRORS as err:
        if _looks_truncated(data, source_format, err):
            raise TruncatedImage(
                f"The {name} file ends before the image is complete; it is probably truncated."
            ) from err
        raise CorruptImage(f"The file starts like a {name} image but its contents cannot be decoded.") from err


_PILLOW_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "PA": 4}


def _unit_from(image: Image.Image, scale: float) -> npt.NDArray[np.float32]:
    """Pillow's pixels as float32 times ``scale``: one float32 array, multiplied in place."""
    unit = np.asarray(image, dtype=np.float32)
    unit = unit if unit.flags.writeable else unit.copy()
    unit *= np.float32(scale)
    return unit


def _pillow_to_unit(image: Image.Image) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8] | None]:
    """One gray channel in [0, 1] from any mode a PNG or JPEG opens as, and its 8-bit levels when it has them.

    Alpha is ignored, not composited: the colour channels are used as stored, so a transparent
    pixel keeps its gray value (flattening onto black or white would invent pixel values).
    Colour becomes gray with Pillow's ITU-R 601-2 luma; CMYK goes through Pillow's CMYK -> RGB,
    and Pillow already un-inverts Adobe CMYK JPEGs when it reads them.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return _unit_from(image, 1.0 / 65535.0), None
    if mode == "I":  # 16-bit grayscale PNG in older Pillow versions (32-bit container)
        unit = _unit_from(image, 1.0 / 65535.0)
        return np.clip(unit, 0.0, 1.0, out=unit), None
    if mode == "F":
        return _min_max(np.asarray(image)), None
    if mode == "L":
        gray = image
    elif mode == "1":
        gray = image.convert("L")
    elif mode in ("LA", "La"):
        gray = image.getchannel("L")
    elif mode in ("P", "PA"):
        # Through RGBA: converting a palette with transparency straight to RGB/L makes Pillow warn.
        gray = image.convert("RGBA").convert("RGB").convert("L")
    else:  # RGB, RGBA, RGBX, CMYK, YCbCr, ...
        gray = image.convert("RGB").convert("L")
    levels = np.asarray(gray, dtype=np.uint8)
    return np.multiply(levels, np.float32(1.0 / 255.0), dtype=np.float32), levels


# --------------------------------------------------------------------------- DICOM

# What pydicom raises for a malformed file while reading it, besides its own InvalidDicomError and
# BytesLengthException (a value shorter than its VR needs) and EOFError/struct.error (a cut): an unknown
# VR is a NotImplementedError, an invalid value a ValueError, a sequence item without its tag an
# OSError ("No tag to read"), a broken deflated data set a zlib.error.
_DCMREAD_INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, NotImplementedError, OSError, zlib.error)
# pydicom converts element values on first access, so a malformed value (a VR nobody knows, a length
# that does not fit its VR, text where a number belongs) fails wherever it is first read: here, or
# inside pydicom's LUT functions (BytesLengthException is added where pydicom is imported).
_VALUE_INPUT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    OverflowError,
    NotImplementedError,
    struct.error,
)
# What pydicom's pixel decoders raise for pixel data that do not match the header or cannot be decoded:
# "all decoding plugins failed" is a RuntimeError, a required attribute that is missing an
# AttributeError, a value outside the pixel dtype an OverflowError, a cut fragment a struct.error.
_PIXEL_INPUT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    AttributeError,
    OverflowError,
    struct.error,
)
_GRAYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_KNOWN_PHOTOMETRICS = frozenset(
    {"PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"}
)
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# 128-byte preamble + "DICM" + the 12-byte file meta group length element itself, then the group.
_FILE_META_START = 132 + 12


class _DicomImageHeader(NamedTuple):
    """The image attributes of a DICOM data set, read once and checked (plain values, no pydicom)."""

    transfer_syntax: str
    rows: int
    columns: int
    photometric: str
    bits_allocated: int
    bits_stored: int


def _decode_dicom(data: bytes, max_bytes: int, max_pixels: int) -> DecodedImage:
    _refuse_deflate_bomb(data, max_bytes + DECODED_BYTES_PER_PIXEL * max_pixels)
    ds = _read_dicom(data)
    header = _dicom_image_header(ds, data, max_pixels)
    stored = _dicom_stored_pixels(ds, header)
    unit = _dicom_display_values(stored, ds, header)
    return DecodedImage(
        _finalise(unit),
        "dicom",
        (header.columns, header.rows),
        header.bits_stored,
        modality=_dicom_text(ds, "Modality") or None,
        body_part=_dicom_text(ds, "BodyPartExamined") or None,
    )


_DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"


def _refuse_deflate_bomb(data: bytes, limit: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian data set that inflates past ``limit`` bytes.

    pydicom inflates such a data set whole, without a bound, before anything else is read: a 1 MiB file can
    hold a gigabyte of zeros. So it is inflated here first, into at most ``limit + 1`` bytes, and dropped;
    pydicom then reads a file that is known to fit. Files with any other transfer syntax pass untouched.
    """
    from pydicom.errors import BytesLengthException, InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    unreadable: tuple[type[Exception], ...] = (
        InvalidDicomError,
        BytesLengthException,
        EOFError,
        struct.error,
        *_DCMREAD_INPUT_ERRORS,
    )
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, force=False)
        file_meta = _read_file_meta_info(stream)
        syntax = _dicom_text(file_meta, "TransferSyntaxUID")
    except unreadable:
        return  # a file meta that pydicom cannot read: _read_dicom refuses it with the right sentence
    if syntax != _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = len(inflater.decompress(data[stream.tell() :], limit + 1))
    except zlib.error as err:
        raise CorruptImage("The DICOM file's deflated data set is damaged and cannot be inflated.") from err
    if inflated > limit:
        raise DecodesTooLarge(
            f"The DICOM file's deflated data set inflates to more than {format_bytes(limit)}; "
            "it is refused as a compression bomb."
        )


def _read_dicom(data: bytes) -> Dataset:
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as err:
        raise CorruptImage("The file has a DICOM marker but is not a readable DICOM file.") from err
    except BytesLengthException as err:
        # A value shorter than its VR needs: a cut inside the file header, or a malformed element.
        if len(data) < _FILE_META_START:
            raise TruncatedImage("The DICOM file ends inside its file header; it is probably truncated.") from err
        raise CorruptImage("The DICOM file's header is malformed and cannot be read.") from err
    except (EOFError, struct.error) as err:
        raise TruncatedImage("The DICOM file ends in the middle of its header; it is probably truncated.") from err
    except _DCMREAD_INPUT_ERRORS as err:
        raise CorruptImage("The DICOM file's header is malformed and cannot be read.") from err


def _malformed(keyword: str) -> CorruptImage:
    # The attribute's keyword is a DICOM term; its value is never quoted (it could identify a patient).
    return CorruptImage(f"The DICOM attribute {keyword} is malformed, so the image cannot be decoded.")


def _value_errors() -> tuple[type[Exception], ...]:
    from pydicom.errors import BytesLengthException

    return (*_VALUE_INPUT_ERRORS, BytesLengthException)


def _dicom_value(dataset: Dataset, keyword: str) -> Any:
    """An element's value (None when absent); a value pydicom cannot convert is malformed input."""
    try:
        return dataset.get(keyword)
    except _value_errors() as err:
        raise _malformed(keyword) from err


def _dicom_int(dataset: Dataset, keyword: str, default: int = 0) -> int:
    """An integer attribute, ``default`` when absent or empty; anything but one number is malformed input."""
    value = _dicom_value(dataset, keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as err:  # several values, or text that is no number
        raise _malformed(keyword) from err


def _dicom_text(dataset: Dataset, keyword: str) -> str:
    """A text attribute, upper case without padding ("" when absent)."""
    value = _dicom_value(dataset, keyword)
    return "" if value is None else str(value).strip().upper()


def _file_meta_is_cut_short(ds: Dataset, data: bytes) -> bool:
    if len(data) < _FILE_META_START:
        return True
    return _FILE_META_START + _dicom_int(ds.file_meta, "FileMetaInformationGroupLength") > len(data)


def _read_to_the_end(ds: Dataset, data: bytes) -> bool | None:
    """Whether the data set's last element ends where the file ends (None: cannot tell, e.g. deflated data or
    an element of undefined length). pydicom drops a cut final element silently; this is how to notice."""
    if _dicom_text(ds.file_meta, "TransferSyntaxUID") == _DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return None  # element offsets are in the inflated stream
    end = 0
    for tag in list(ds.keys()):  # the raw elements: nothing is converted
        raw = ds.get_item(tag)
        length, offset = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if not isinstance(length, int) or not isinstance(offset, int) or length == 0xFFFFFFFF:
            return None
        end = max(end, offset + length)
    return end == len(data)


def _refuse_dicom_without_pixels(ds: Dataset, data: bytes) -> NoReturn:
    """Tell a DICOM object that has no image apart from an image file that was cut short.

    pydicom stops silently at the end of the data: a file cut inside the header keeps only the
    elements before the cut, and one cut inside encapsulated pixel data comes back with no elements
    at all. So an empty data set means truncation, and so do image attributes or an image SOP class
    without pixels unless the data set is read to the very end of the file (then the file is whole and
    simply has no pixels); anything else is a genuine non-image object (SR, presentation state).
    """
    from pydicom.uid import UID

    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedDicom("The DICOM object holds floating-point pixel data (a parametric map), not a radiograph.")
    # The file meta copy of the SOP class survives a cut anywhere after the file header.
    sop_class = UID(_dicom_text(ds.file_meta, "MediaStorageSOPClassUID") or _dicom_text(ds, "SOPClassUID"))
    sop_name = sop_class.name if sop_class.name != str(sop_class) else ""
    has_image_attributes = any(k in ds for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"))
    if len(ds) == 0:
        raise TruncatedImage("The DICOM file ends before its pixel data are complete; it is probably truncated.")
    if has_image_attributes or "Image Storage" in sop_name:
        if _read_to_the_end(ds, data):
            raise NoPixelData(
                "The DICOM file describes an image but holds no pixel data, so there is nothing to analyse."
            )
        raise TruncatedImage("The DICOM file ends before its pixel data are complete; it is probably truncated.")
    kind = f" (a '{sop_name}' object)" if sop_name else ""
    raise NoPixelData(f"The DICOM file contains no image{kind}, so there is nothing to analyse.")


def _dicom_image_header(ds: Dataset, data: bytes, max_pixels: int) -> _DicomImageHeader:
    """Read the image attributes and refuse, from the header alone, what we cannot or should not decode."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    transfer_syntax = _dicom_text(ds.file_meta, "TransferSyntaxUID")
    if not transfer_syntax:
        if _file_meta_is_cut_short(ds, data):
            raise TruncatedImage("The DICOM file ends inside its file header; it is probably truncated.")
        raise CorruptImage("The DICOM file header does not say how its data are encoded (no transfer syntax).")

    if "PixelData" not in ds:
        _refuse_dicom_without_pixels(ds, data)

    frames = _dicom_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise MultiFrameDicom(
            f"The DICOM file holds {frames} frames; only single-frame images (one radiograph) are supported."
        )

    photometric = _dicom_text(ds, "PhotometricInterpretation")
    samples = _dicom_int(ds, "SamplesPerPixel", default=1)
    if samples != 1 or photometric not in _GRAYSCALE_PHOTOMETRICS:
        # Only echo known DICOM terms: a header value is never copied into a message verbatim.
        described = photometric if photometric in _KNOWN_PHOTOMETRICS else "non-grayscale"
        raise UnsupportedDicom(
            f"The DICOM image is {described} with {samples} sample(s) per pixel; "
            "only grayscale (MONOCHROME1 or MONOCHROME2) images are supported."
        )

    rows, columns = _dicom_int(ds, "Rows"), _dicom_int(ds, "Columns")
    if rows <= 0 or columns <= 0:
        raise CorruptImage("The DICOM file has pixel data but no valid image size (Rows and Columns).")
    _check_pixel_count(columns, rows, max_pixels, "DICOM header")
    bits_allocated = _dicom_int(ds, "BitsAllocated")
    # pydicom unpacks 1-bit pixels into a byte each; larger ones keep their allocated size.
    _check_decoded_bytes(columns, rows, max(1, bits_allocated // 8), max_pixels, "DICOM image")

    syntax = UID(transfer_syntax)
    syntax_name = syntax.name if syntax.name != str(syntax) else "an unknown transfer syntax"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise UnsupportedDicom(
            f"The DICOM pixel data are encoded as {syntax_name}, which this service cannot decode."
        ) from err
    if not decoder.is_available:
        raise UnsupportedDicom(
            f"The DICOM pixel data are encoded as {syntax_name}, but no decoder for it is installed."
        )
    bits_stored = _dicom_int(ds, "BitsStored") or bits_allocated
    return _DicomImageHeader(transfer_syntax, rows, columns, photometric, bits_allocated, bits_stored)


def _dicom_stored_pixels(ds: Dataset, header: _DicomImageHeader) -> npt.NDArray[Any]:
    """The stored values as an integer array (pixel data decompressed if needed)."""
    from pydicom.uid import UID

    rows, columns = header.rows, header.columns
    if not UID(header.transfer_syntax).is_encapsulated:
        bits = header.bits_allocated
        expected = (rows * columns + 7) // 8 if bits == 1 else rows * columns * (bits // 8)
        pixel_data = _dicom_value(ds, "PixelData")
        if not isinstance(pixel_data, bytes | bytearray):
            raise _malformed("PixelData")
        if len(pixel_data) < expected:
            raise TruncatedImage(
                "The DICOM file has less pixel data than its header promises; it is probably truncated."
            )
    try:
        pixels = ds.pixel_array
    except _PIXEL_INPUT_ERRORS as err:
        raise CorruptImage(
            "The DICOM pixel data cannot be decoded; they are damaged or do not match the header."
        ) from err
    if pixels.ndim != 2 or pixels.shape != (rows, columns):
        raise CorruptImage("The DICOM pixel data do not match the image size in its header.")
    return pixels


def _dicom_display_values(stored: npt.NDArray[Any], ds: Dataset, header: _DicomImageHeader) -> npt.NDArray[np.float32]:
    """Stored values -> modality LUT (rescale) -> VOI LUT or window -> [0, 1] display orientation, in float32."""
    values = _modality_values(stored, ds)
    unit = _apply_voi_table(values, ds)
    if unit is None:
        unit = _apply_window(values, ds)
    if unit is None:
        unit = _min_max(values)
    if header.photometric == "MONOCHROME1":
        np.subtract(1.0, unit, out=unit)  # MONOCHROME1: low values are bright; flip to display orientation
    return unit


def _modality_values(stored: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.float32]:
    """The modality LUT: Rescale Slope/Intercept applied in float32 in place (pydicom's works in float64,
    twice the memory); a Modality LUT Sequence (rare in radiographs) through pydicom."""
    from pydicom.pixels import apply_modality_lut

    malformed = CorruptImage(
        "The DICOM rescale (modality LUT) attributes are malformed, so the image cannot be decoded."
    )
    if "ModalityLUTSequence" in ds:
        try:
            return _writable_float32(apply_modality_lut(stored, ds))
        except _value_errors() as err:
            raise malformed from err
    try:
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        # pydicom rescales only when both are present; so do we.
        scale = (float(slope), float(intercept)) if slope is not None and intercept is not None else None
    except _value_errors() as err:
        raise malformed from err
    values = _writable_float32(stored)
    if scale is not None:
        values *= np.float32(scale[0])
        values += np.float32(scale[1])
    return values


def _apply_voi_table(values: npt.NDArray[np.float32], ds: Dataset) -> npt.NDArray[np.float32] | None:
    """Apply the first VOI LUT Sequence item, scaled to [0, 1] by the LUT's bit depth.

    Done here rather than with pydicom.pixels.apply_voi_lut: pydicom 3.0 indexes through an array of
    the LUT's entry dtype, so an 8-bit LUT with more than 256 entries (the usual 12-bit -> 8-bit
    display LUT) wraps its indices and returns garbage. Returns None when there is no usable LUT.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    sequence = _dicom_value(ds, "VOILUTSequence")
    if not isinstance(sequence, DicomSequence) or not sequence or not isinstance(sequence[0], Dataset):
        return None
    item = sequence[0]
    descriptor = _dicom_value(item, "LUTDescriptor")
    lut_data = _dicom_value(item, "LUTData")
    if not isinstance(descriptor, Sequence) or len(descriptor) != 3:
        return None
    if not all(isinstance(v, int) for v in descriptor):
        return None
    entries, first_mapped, bits = int(descriptor[0]) or 65536, int(descriptor[1]), int(descriptor[2])
    if entries < 0 or not 1 <= bits <= 16:
        return None
    if isinstance(lut_data, bytes | bytearray):  # VR OW: raw 16-bit words in the file's byte order
        big_endian = _dicom_text(ds.file_meta, "TransferSyntaxUID") == _EXPLICIT_VR_BIG_ENDIAN
        table = np.frombuffer(lut_data, dtype=">u2" if big_endian else "<u2", count=len(lut_data) // 2)
    elif isinstance(lut_data, int):  # VR US with one value
        table = np.array([lut_data], dtype=np.int64)
    elif isinstance(lut_data, Sequence) and all(isinstance(v, int) for v in lut_data):  # VR US
        table = np.asarray(lut_data, dtype=np.int64)
    else:
        return None
    if table.size < entries:
        return None
    index = np.rint(values)
    index -= np.float32(first_mapped)
    np.clip(index, 0, entries - 1, out=index)
    scaled = table[:entries].astype(np.float32) / np.float32(2**bits - 1)
    return scaled[index.astype(np.int32)]


def _apply_window(values: npt.NDArray[np.float32], ds: Dataset) -> npt.NDArray[np.float32] | None:
    """Apply the first Window Center/Width (PS3.3 C.11.2.1.2), in [0, 1]; None when there is no usable window.

    pydicom's ``apply_voi_lut`` does the same in float64 and maps onto the stored values' range, which a
    [0, 1] result divides out again; here the unit result is computed directly, in float32, in place.
    An unusable window (width below the function's minimum, an unknown function, text where a number
    belongs, a zero rescale slope) is advice we cannot follow: the image is fine, so its full range is used.
    """
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    unusable: tuple[type[Exception], ...] = (*_value_errors(), IndexError)
    try:
        center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        slope = ds.get("RescaleSlope")
        if slope is not None and ds.get("RescaleIntercept") is not None and float(slope) == 0.0:
            return None  # pydicom's output range would be empty
    except unusable:
        return None
    if not (np.isfinite(center) and np.isfinite(width)):
        return None
    unit = values.copy()  # the full-range fallback still needs the values
    if function == "SIGMOID":
        if width <= 0:
            return None
        unit -= np.float32(center)
        unit *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):
            np.exp(unit, out=unit)
        unit += np.float32(1.0)
        return np.reciprocal(unit, out=unit)
    if function == "LINEAR":
        if width < 1:
            return None
        center, width = center - 0.5, width - 1.0
    elif function != "LINEAR_EXACT" or width <= 0:
        return None
    if width == 0:  # LINEAR with width 1: a step at the centre
        return np.greater(values, np.float32(center)).astype(np.float32)
    unit -= np.float32(center)
    unit *= np.float32(1.0 / width)
    unit += np.float32(0.5)
    return np.clip(unit, 0.0, 1.0, out=unit)


def _first_number(ds: Dataset, keyword: str) -> float:
    """The first value of a (possibly multi-valued) numeric attribute."""
    value = ds.get(keyword)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)
