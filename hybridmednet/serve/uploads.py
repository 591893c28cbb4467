"""What an upload must pass before the model sees it: a size limit, a known format, a pixel count
read from the header, then the one image reader (`data.io.decode_image`) on the bytes in memory:
nothing of an upload is written to disk.

The format is told from the bytes, never from the file name or the client's content type. A PNG can
declare 100,000 x 100,000 pixels in 60 bytes: the declared size is checked before anything is
decoded. Of a DICOM header only Rows and Columns are read here; nothing a header says about the
patient is kept, returned or logged.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from hybridmednet.data.io import PNG_SIGNATURE, decode_image, has_dicom_marker
from hybridmednet.errors import ImageReadError
from hybridmednet.serve import ServeError

ACCEPTED = 'PNG, JPEG or DICOM'
MAX_PIXELS = 50_000_000  # more than any radiograph (a 4,300 x 3,500 detector is 15 M); decoded as float32
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
FIELD = 'file'
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class UploadError(ServeError):
    """An upload refused, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    kind: str  # 'png' | 'jpeg' | 'dicom'
    image: np.ndarray  # float32 [H, W] in [0, 1], as read_image gives it


def too_large(limit_bytes: int) -> UploadError:
    return UploadError(413, f'the upload is larger than this server accepts ({limit_bytes / 2**20:g} MB)')


def file_field(body: bytes, content_type: str) -> bytes:
    """The bytes of the `file` field of a multipart/form-data body, parsed in memory."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b'boundary')
    if kind != b'multipart/form-data' or not boundary:
        raise UploadError(415, f'send the image as multipart/form-data with a {FIELD!r} field ({ACCEPTED})')
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header = [b'', b'']  # the name and value of the part header being read

    def on_part_begin() -> None:
        parts.append(({}, bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1][0][header[0].lower()] = header[1]
        header[:] = [b'', b'']

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    callbacks = {
        'on_part_begin': on_part_begin,
        'on_header_field': on_header_field,
        'on_header_value': on_header_value,
        'on_header_end': on_header_end,
        'on_part_data': on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(422, f'the multipart/form-data body is malformed ({exc})') from None
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b'content-disposition', b''))
        if disposition.get(b'name') == FIELD.encode():
            return bytes(data)
    raise UploadError(422, f'the form has no {FIELD!r} field: send the image as the field {FIELD!r} ({ACCEPTED})')


def sniff(data: bytes) -> str | None:
    """'png', 'jpeg' or 'dicom' from the file's own signature; None for anything else. DICOM first, as the reader
    tells it: a PNG header hidden in a DICOM's 128-byte preamble must not pass the pixel limit as a PNG."""
    if has_dicom_marker(data):
        return 'dicom'
    if data.startswith(PNG_SIGNATURE):
        return 'png'
    if data.startswith(b'\xff\xd8\xff'):
        return 'jpeg'
    return None


def declared_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) as the header states it, before decoding; None when the header is unreadable
    (the reader then says what is wrong)."""
    if kind == 'png':  # IHDR is the first chunk: length, 'IHDR', width, height
        return struct.unpack('>II', data[16:24]) if data[12:16] == b'IHDR' and len(data) >= 24 else None
    if kind == 'jpeg':
        return _jpeg_size(data)
    return _dicom_size(data)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the marker segments up to the frame header (Pillow would too, but then also check its own limit)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        elif marker in JPEG_FRAME_MARKERS:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack('>HH', data[i + 5 : i + 9])
            return width, height
        else:
            i += 2 + struct.unpack('>H', data[i + 2 : i + 4])[0]
    return None


def _dicom_size(data: bytes) -> tuple[int, int] | None:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=['Rows', 'Columns'])
        return int(ds.Columns), int(ds.Rows)
    except Exception:  # whatever is wrong with the header, read_image reports it
        return None


def read_upload(data: bytes, intensity: str | int = 'auto') -> Upload:
    """Check and decode one uploaded file: 415 for other formats, 413 for too many pixels, 422 when unreadable."""
    kind = sniff(data)
    if kind is None:
        raise UploadError(415, f'not an image this server reads: send a {ACCEPTED} file')
    size = declared_size(data, kind)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise UploadError(
            413,
            f'the {kind.upper()} header declares {size[0]:,} x {size[1]:,} pixels, more than the '
            f'{MAX_PIXELS:,} this server decodes; refused before decoding',
        )
    try:
        image = decode_image(data, f'the uploaded {kind.upper()}', intensity=intensity)
    except ImageReadError as exc:
        raise UploadError(422, str(exc)) from None
    return Upload(kind, image)
