"""Decode uploaded image bytes (PNG, JPEG, DICOM) into one grayscale pixel contract.

`decode_image` turns the bytes of one file into a `DecodedImage`: a 2-D float32 array in [0, 1] in
display orientation (bright bone, dark lungs), plus the source format, size and bit depth. Every
refusal is an `ImageDecodeError` subclass with a machine `code` and a sentence a person understands.

Limits are enforced before the expensive work: the byte count first, then the pixel count read from
the file's own header (PNG IHDR, JPEG SOF, DICOM Rows/Columns) before any pixel is decoded.

The format is sniffed from magic bytes only, never from a file name. The module changes no global
state (no Pillow or pydicom settings, no warning filters), logs nothing and never puts DICOM
header values that could identify a patient into a message.
"""

from __future__ import annotations

import io
import struct
import zlib
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
    "sniff_format",
]

FORMATS = ("png", "jpeg", "dicom")
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000

_ACCEPTED = "PNG, JPEG or DICOM"


# --------------------------------------------------------------------------- errors


class ImageDecodeError(ValueError):
    """Base of every refusal. `.code` is a short machine string; `str(err)` is a readable sentence."""

    code: ClassVar[str] = "undecodable_image"


class EmptyInput(ImageDecodeError):
    """The upload has no bytes at all."""

    code = "empty_file"


class TooManyBytes(ImageDecodeError):
    """The upload is larger than the byte limit."""

    code = "file_too_large"


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
    """

    array: npt.NDArray[np.float32]
    source_format: str
    original_size: tuple[int, int]
    bit_depth: int

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


def _describe_size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    if n_bytes < 1024 * 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / (1024 * 1024):.1f} MiB"


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

    Raises an `ImageDecodeError` subclass for anything that cannot be turned into an image.
    """
    if max_bytes <= 0 or max_pixels <= 0:
        raise ValueError("max_bytes and max_pixels must be positive")
    data = bytes(data)  # accept bytearray/memoryview; no copy for bytes
    if not data:
        raise EmptyInput("The file is empty; upload a PNG, JPEG or DICOM image.")
    if len(data) > max_bytes:
        raise TooManyBytes(
            f"The file is {_describe_size(len(data))}, more than the limit of {_describe_size(max_bytes)}."
        )
    source_format = sniff_format(data)
    if source_format is None:
        other = _describe_other_format(data)
        if other is not None:
            raise UnsupportedFormat(f"The file looks like {other}; only {_ACCEPTED} images are accepted.")
        raise UnsupportedFormat(f"The file is not a recognised image; only {_ACCEPTED} images are accepted.")
    if source_format == "dicom":
        return _decode_dicom(data, max_pixels)
    return _decode_raster(data, source_format, max_pixels)


def _finalise(values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Finite, clipped to [0, 1], float32, C-contiguous."""
    unit = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.clip(unit, 0.0, 1.0), dtype=np.float32)


def _min_max(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Stretch to [0, 1]; a constant image becomes all zeros instead of 0/0."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(np.min(values)), float(np.max(values))
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) / (high - low)


def _check_pixel_count(width: int, height: int, limit: int, what: str) -> None:
    if width * height > limit:
        raise TooManyPixels(
            f"The {what} declares {width} x {height} pixels ({width * height:,}), "
            f"more than the limit of {limit:,} pixels."
        )


# --------------------------------------------------------------------------- PNG / JPEG

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_DISPLAY_NAME = {"png": "PNG", "jpeg": "JPEG", "dicom": "DICOM"}

# What Pillow raises for bad input (UnidentifiedImageError is an OSError; "broken PNG" is a
# SyntaxError; zlib and struct errors escape some plugins unwrapped).
_PILLOW_INPUT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
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
                f"The PNG file is split into more than {_MAX_PNG_CHUNKS:,} chunks; "
                "it is refused as malformed."
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
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[source_format]]) as opened:
            _check_pixel_count(opened.width, opened.height, limit, f"{name} image")
            opened.load()
            # Viewers show JPEGs (and PNGs with an eXIf chunk) rotated by their EXIF Orientation.
            image = ImageOps.exif_transpose(opened)
            array = _pillow_to_unit(image)
            mode = image.mode
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise TooManyPixels(
            f"The {name} image has more pixels than the decoder allows ({limit:,}); it was not decoded."
        ) from err
    except _PILLOW_INPUT_ERRORS as err:
        if _looks_truncated(data, source_format, err):
            raise TruncatedImage(
                f"The {name} file ends before the image is complete; it is probably truncated."
            ) from err
        raise CorruptImage(
            f"The file starts like a {name} image but its contents cannot be decoded."
        ) from err

    bit_depth = header.bit_depth if header is not None else (16 if mode.startswith("I") else 8)
    height, width = array.shape
    return DecodedImage(_finalise(array), source_format, (width, height), bit_depth)


def _pillow_to_unit(image: Image.Image) -> npt.NDArray[np.float64]:
    """One gray channel in [0, 1] from any mode a PNG or JPEG opens as.

    Alpha is ignored, not composited: the colour channels are used as stored, so a transparent
    pixel keeps its gray value (flattening onto black or white would invent pixel values).
    Colour becomes gray with Pillow's ITU-R 601-2 luma; CMYK goes through Pillow's CMYK -> RGB,
    and Pillow already un-inverts Adobe CMYK JPEGs when it reads them.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.float64) / 65535.0
    if mode == "I":  # 16-bit grayscale PNG in older Pillow versions (32-bit container)
        return np.clip(np.asarray(image).astype(np.float64), 0, 65535) / 65535.0
    if mode == "F":
        return _min_max(np.asarray(image))
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
    return np.asarray(gray).astype(np.float64) / 255.0


# --------------------------------------------------------------------------- DICOM

# What pydicom raises for malformed headers or pixel data beyond its own InvalidDicomError.
_PYDICOM_INPUT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RuntimeError,  # includes NotImplementedError; "all decoding plugins failed" is a RuntimeError
    OverflowError,
    OSError,
    struct.error,
    zlib.error,
)
_GRAYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_KNOWN_PHOTOMETRICS = frozenset(
    {"PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"}
)
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    from pydicom.errors import BytesLengthException, InvalidDicomError

    # pydicom converts element values lazily, so a malformed value can surface on first access.
    input_errors: tuple[type[Exception], ...] = (
        *_PYDICOM_INPUT_ERRORS,
        BytesLengthException,
        InvalidDicomError,
    )
    ds = _read_dicom(data)
    try:
        rows, columns = _check_dicom_header(ds, data, max_pixels)
        stored = _dicom_stored_pixels(ds, rows, columns)
        unit = _dicom_display_values(stored, ds)
        bit_depth = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
    except ImageDecodeError:
        raise
    except input_errors as err:
        raise CorruptImage(
            "The DICOM file's image attributes or pixel data are malformed and cannot be decoded."
        ) from err
    return DecodedImage(_finalise(unit), "dicom", (columns, rows), bit_depth)


def _read_dicom(data: bytes) -> Dataset:
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as err:
        raise CorruptImage("The file has a DICOM marker but is not a readable DICOM file.") from err
    except BytesLengthException as err:
        # A value shorter than its VR needs: a cut inside the file header, or a malformed element.
        if len(data) < 132 + 12:
            raise TruncatedImage(
                "The DICOM file ends inside its file header; it is probably truncated."
            ) from err
        raise CorruptImage("The DICOM file's header is malformed and cannot be read.") from err
    except (EOFError, struct.error) as err:
        raise TruncatedImage(
            "The DICOM file ends in the middle of its header; it is probably truncated."
        ) from err
    except _PYDICOM_INPUT_ERRORS as err:
        raise CorruptImage("The DICOM file's header is malformed and cannot be read.") from err


def _file_meta_is_cut_short(ds: Dataset, data: bytes) -> bool:
    # 128-byte preamble + "DICM" + the 12-byte group length element itself, then the group.
    header_start = 132 + 12
    if len(data) < header_start:
        return True
    try:
        group_length = int(ds.file_meta.get("FileMetaInformationGroupLength") or 0)
    except (TypeError, ValueError):
        return False
    return header_start + group_length > len(data)


def _refuse_dicom_without_pixels(ds: Dataset) -> NoReturn:
    """Tell a DICOM object that has no image apart from an image file that was cut short.

    pydicom stops silently at the end of the data: a file cut inside the header keeps only the
    elements before the cut, and one cut inside encapsulated pixel data comes back with no elements
    at all. So an empty data set, image attributes without pixels, or an image SOP class without
    pixels all mean truncation; anything else is a genuine non-image object (SR, presentation state).
    """
    from pydicom.uid import UID

    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedDicom(
            "The DICOM object holds floating-point pixel data (a parametric map), not a radiograph."
        )
    # The file meta copy of the SOP class survives a cut anywhere after the file header.
    sop_class = UID(str(ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or ""))
    sop_name = sop_class.name if sop_class.name != str(sop_class) else ""
    has_image_attributes = any(k in ds for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"))
    if len(ds) == 0 or has_image_attributes or "Image Storage" in sop_name:
        raise TruncatedImage(
            "The DICOM file ends before its pixel data are complete; it is probably truncated."
        )
    kind = f" (a '{sop_name}' object)" if sop_name else ""
    raise NoPixelData(f"The DICOM file contains no image{kind}, so there is nothing to analyse.")


def _check_dicom_header(ds: Dataset, data: bytes, max_pixels: int) -> tuple[int, int]:
    """Refuse what we cannot or should not decode, from the header alone; return (rows, columns)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is None:
        if _file_meta_is_cut_short(ds, data):
            raise TruncatedImage("The DICOM file ends inside its file header; it is probably truncated.")
        raise CorruptImage(
            "The DICOM file header does not say how its data are encoded (no transfer syntax)."
        )

    if "PixelData" not in ds:
        _refuse_dicom_without_pixels(ds)

    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise MultiFrameDicom(
            f"The DICOM file holds {frames} frames; only single-frame images (one radiograph) are supported."
        )

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1 or photometric not in _GRAYSCALE_PHOTOMETRICS:
        # Only echo known DICOM terms: a header value is never copied into a message verbatim.
        described = photometric if photometric in _KNOWN_PHOTOMETRICS else "non-grayscale"
        raise UnsupportedDicom(
            f"The DICOM image is {described} with {samples} sample(s) per pixel; "
            "only grayscale (MONOCHROME1 or MONOCHROME2) images are supported."
        )

    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise CorruptImage("The DICOM file has pixel data but no valid image size (Rows and Columns).")
    _check_pixel_count(columns, rows, max_pixels, "DICOM header")

    syntax = UID(str(transfer_syntax))
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
    return rows, columns


def _dicom_stored_pixels(ds: Dataset, rows: int, columns: int) -> npt.NDArray[Any]:
    """The stored values as an integer array (pixel data decompressed if needed)."""
    from pydicom.uid import UID

    if not UID(str(ds.file_meta.TransferSyntaxUID)).is_encapsulated:
        bits_allocated = int(ds.get("BitsAllocated") or 0)
        expected = (
            (rows * columns + 7) // 8 if bits_allocated == 1 else rows * columns * (bits_allocated // 8)
        )
        if len(ds.PixelData) < expected:
            raise TruncatedImage(
                "The DICOM file has less pixel data than its header promises; it is probably truncated."
            )
    try:
        pixels = ds.pixel_array
    except (RuntimeError, ValueError) as err:
        raise CorruptImage(
            "The DICOM pixel data cannot be decoded; they are damaged or do not match the header."
        ) from err
    if pixels.ndim != 2 or pixels.shape != (rows, columns):
        raise CorruptImage("The DICOM pixel data do not match the image size in its header.")
    return pixels


def _dicom_display_values(stored: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.float64]:
    """Stored values -> modality LUT (rescale) -> VOI LUT or window -> [0, 1] display orientation."""
    from pydicom.pixels import apply_modality_lut

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    unit = _apply_voi_table(values, ds)
    if unit is None:
        unit = _apply_window(values, ds)
    if unit is None:
        unit = _min_max(values)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1: low values are bright; flip to display orientation
    return unit


def _apply_voi_table(values: npt.NDArray[np.float64], ds: Dataset) -> npt.NDArray[np.float64] | None:
    """Apply the first VOI LUT Sequence item, scaled to [0, 1] by the LUT's bit depth.

    Done here rather than with pydicom.pixels.apply_voi_lut: pydicom 3.0 indexes through an array of
    the LUT's entry dtype, so an 8-bit LUT with more than 256 entries (the usual 12-bit -> 8-bit
    display LUT) wraps its indices and returns garbage. Returns None when there is no usable LUT.
    """
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    if "LUTDescriptor" not in item or "LUTData" not in item:
        return None
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3 or not 1 <= descriptor[2] <= 16:
        return None
    entries, first_mapped, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
    lut_data = item["LUTData"]
    if isinstance(lut_data.value, bytes | bytearray):  # VR OW: raw 16-bit words in the file's byte order
        big_endian = str(ds.file_meta.TransferSyntaxUID) == _EXPLICIT_VR_BIG_ENDIAN
        table = np.frombuffer(lut_data.value, dtype=">u2" if big_endian else "<u2")
    else:  # VR US: already numbers (one number when VM is 1)
        table = np.atleast_1d(np.asarray(lut_data.value, dtype=np.int64))
    if table.size < entries:
        return None
    index = np.clip(np.rint(values) - first_mapped, 0, entries - 1).astype(np.intp)
    return table[:entries][index].astype(np.float64) / float(2**bits - 1)


def _apply_window(values: npt.NDArray[np.float64], ds: Dataset) -> npt.NDArray[np.float64] | None:
    """Apply the first Window Center/Width with pydicom, scaled to [0, 1]; None when there is none."""
    from pydicom.pixels import apply_voi_lut

    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        windowed = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        # pydicom maps the window onto the range of the stored values (from BitsStored and the
        # rescale); ask it where -inf and +inf land instead of re-deriving that range here.
        low, high = apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0, prefer_lut=False)
    except (ValueError, TypeError, IndexError, KeyError):
        # An unusable window (width < 1, unknown VOI function, ...) is advice we cannot follow;
        # the image itself is fine, so fall back to the full range.
        return None
    if not (np.isfinite(low) and np.isfinite(high)) or low == high:
        return None
    return (np.asarray(windowed, dtype=np.float64) - low) / (high - low)
