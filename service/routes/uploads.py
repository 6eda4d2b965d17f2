"""Reading an uploaded file under the byte limit and decoding it under the pixel limit."""

from __future__ import annotations

from fastapi import UploadFile

from service.model.imaging import DecodedImage, TooManyBytes, decode_image
from service.settings import Settings

CHUNK_BYTES = 1 << 20


async def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The file's bytes, read in chunks; raises TooManyBytes as soon as more than ``max_bytes`` arrive."""
    if file.size is not None and file.size > max_bytes:
        raise TooManyBytes(max_bytes)
    chunks: list[bytes] = []
    total = 0
    while chunk := await file.read(min(CHUNK_BYTES, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            raise TooManyBytes(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_upload(data: bytes, settings: Settings) -> DecodedImage:
    """Decode PNG/JPEG/DICOM bytes (format sniffed from the bytes, never the file name) within the limits."""
    return decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
