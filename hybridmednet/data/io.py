"""One image reader for every format: PNG/JPEG (8/16-bit, grey/RGB/RGBA) and DICOM, from a file or from
its bytes in memory (an upload).

Everything downstream (transforms, cache, predict) sees the same thing: a float32
[H, W] array in [0, 1], rows and columns as stored in the file (never transposed).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from hybridmednet.config import INTENSITY_MODES
from hybridmednet.errors import ImageReadError

DICOM_SUFFIXES = {'.dcm', '.dicom', '.dic'}
IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff'} | DICOM_SUFFIXES  # what read_image reads
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')  # Pillow's modes for 16-bit grey
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def read_image(path: str | Path, *, intensity: str | int = 'auto') -> np.ndarray:
    """Read one image as float32 [H, W] in [0, 1]; raise ImageReadError naming the file.

    `intensity` maps the stored values of PNG/JPEG/TIFF/BMP files to [0, 1]: 'auto' divides by
    2**n - 1 where a PNG sBIT chunk says n bits are significant, else by the format's full range;
    'minmax' stretches each image's own range; an int n divides by 2**n - 1 and clips (12-bit
    data in 16-bit files). DICOM files carry their own mapping (window, VOI LUT) and ignore it.
    """
    _check_intensity(intensity)
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f'{path}: file not found')
    if path.stat().st_size == 0:
        raise ImageReadError(f'{path}: file is empty')
    return _decode(path, str(path), is_dicom(path), intensity)


def decode_image(data: bytes, name: str, *, intensity: str | int = 'auto') -> np.ndarray:
    """`read_image` for a file held in memory (an upload, which is then never written to disk); `name`
    stands for the file in error messages. DICOM is told by its 'DICM' marker, as there is no suffix."""
    _check_intensity(intensity)
    if not data:
        raise ImageReadError(f'{name}: file is empty')
    return _decode(data, name, has_dicom_marker(data), intensity)


def _check_intensity(intensity: str | int) -> None:
    if not (intensity in INTENSITY_MODES or (type(intensity) is int and 1 <= intensity <= 16)):
        raise ValueError(
            f'intensity must be {", ".join(map(repr, INTENSITY_MODES))} or a bit depth '
            f'from 1 to 16 (an int), got {intensity!r}'
        )


def _decode(source: Path | bytes, name: str, dicom: bool, intensity: str | int) -> np.ndarray:
    """A file (Path) or its bytes -> float32 [H, W] in [0, 1]; every failure an ImageReadError naming `name`."""
    try:
        image = _read_dicom(source, name) if dicom else _read_pil(source, name, intensity)
    except ImageReadError:
        raise
    except Exception as exc:  # truncated or corrupt data surfaces as many exception types
        raise ImageReadError(f'{name}: cannot read image ({type(exc).__name__}: {exc})') from exc
    return np.ascontiguousarray(image, dtype=np.float32)


def _open(source: Path | bytes) -> BinaryIO:
    """The file, or the bytes as an in-memory file: what Pillow, pydicom and the PNG chunk walk read."""
    return open(source, 'rb') if isinstance(source, Path) else io.BytesIO(source)


def is_dicom(path: Path) -> bool:
    """DICOM by suffix or by the 'DICM' marker at byte 128 (many PACS exports have no suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, 'rb') as f:
        return has_dicom_marker(f.read(132))


def has_dicom_marker(head: bytes) -> bool:
    """The 'DICM' marker after the 128-byte preamble: how a file without a suffix, or an upload, is told DICOM
    (the server's sniffer asks the same, so its pixel limit reads a file as this reader does)."""
    return head[128:132] == b'DICM'


def stores_more_than_8_bits(path: str | Path) -> bool:
    """DICOM, 16-bit and float images, told from the header alone (False when unreadable)."""
    try:
        if is_dicom(Path(path)):
            return True
        with Image.open(path) as img:
            return img.mode in SIXTEEN_BIT_MODES or img.mode == 'F'
    except Exception:  # whatever is wrong with the file, read_image reports it
        return False


def _read_pil(source: Path | bytes, name: str, intensity: str | int) -> np.ndarray:
    try:
        with _open(source) as f, Image.open(f) as opened:
            opened.load()  # decode now: a truncated file fails here, not later in a worker
            img: Image.Image = opened
            if img.mode in SIXTEEN_BIT_MODES:
                full = 65535
            elif img.mode == 'F':
                full = None  # no nominal range
            else:
                full = 255
                if img.mode != 'L':
                    img = img.convert('L')  # RGB/RGBA/P/LA/1 -> luminance, alpha dropped
            arr = np.asarray(img, dtype=np.float32)
            significant = _png_significant_bits(f) if opened.format == 'PNG' else None  # convert() clears format
    except UnidentifiedImageError:
        raise ImageReadError(f'{name}: not a recognised image file') from None
    if intensity == 'minmax':
        return _minmax(arr)
    if isinstance(intensity, int):  # a bit depth (read_image checked the modes and the range)
        return np.clip(arr / (2**intensity - 1), 0.0, 1.0)
    if full is None:  # 'auto' on a float image: no nominal range
        return _minmax(arr)
    if significant and 2**significant - 1 < full and arr.max() < 2**significant:
        # The PNG standard scales n-bit samples up to the full depth and records n in sBIT; most
        # 12-bit exports store 0..4095 as they are. A maximum below 2**n tells those apart.
        full = 2**significant - 1
    return np.clip(arr / full, 0.0, 1.0)


def _png_significant_bits(f: BinaryIO) -> int | None:
    """The bits the PNG sBIT chunk of the open file `f` marks significant (grey, or the most of R, G, B); None
    without one. Pillow reads the chunk but does not expose it, so the chunks before the image data are walked
    here, from the start of the file Pillow has read.
    """
    f.seek(0)
    if f.read(8) != PNG_SIGNATURE:
        return None
    while len(head := f.read(8)) == 8:
        length, kind = struct.unpack('>I4s', head)
        if kind == b'sBIT':
            bits = f.read(length)
            return max(bits[:3] if length >= 3 else bits[:1], default=0) or None  # alpha left out
        if kind in (b'PLTE', b'IDAT'):  # sBIT comes before both
            return None
        f.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC
    return None


def _read_dicom(source: Path | bytes, name: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        with _open(source) as f:
            ds = pydicom.dcmread(f)  # reads everything, pixel data included
    except Exception as exc:
        raise ImageReadError(f'{name}: not a readable DICOM file ({exc})') from None
    if 'PixelData' not in ds:
        raise ImageReadError(f'{name}: DICOM file has no pixel data')
    frames = int(ds.get('NumberOfFrames', 1) or 1)
    if frames > 1:
        raise ImageReadError(f'{name}: multi-frame DICOM ({frames} frames) is not supported; export a single frame')
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get('TransferSyntaxUID')
        if syntax is not None and syntax.is_compressed:
            raise ImageReadError(
                f"{name}: compressed DICOM ({syntax.name}) needs the decoders: pip install 'hybridmednet[dicom]'"
            ) from None
        raise ImageReadError(f'{name}: cannot decode DICOM pixel data ({exc})') from None
    padding = _padding(arr, ds)
    if arr.ndim == 3:  # colour DICOM (rare for X-rays): luminance
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    arr = apply_modality_lut(arr, ds)  # stored values -> physical (LUT or slope/intercept)
    image = _voi(arr, ds, padding)
    if ds.get('PhotometricInterpretation') == 'MONOCHROME1':  # low values are white
        image = 1.0 - image
    if padding is not None:
        image[padding] = 0.0  # outside the body: black, whichever way the body is shown
    return np.clip(image, 0.0, 1.0)


def _padding(arr: np.ndarray, ds) -> np.ndarray | None:
    """Padding pixels (outside the body): the stored PixelPaddingValue, or the values from it
    to PixelPaddingRangeLimit; None when the file declares none."""
    value = ds.get('PixelPaddingValue')
    if value is None or arr.ndim != 2:
        return None
    low, high = sorted((int(value), int(ds.get('PixelPaddingRangeLimit', value))))
    return (arr >= low) & (arr <= high)


def _voi(arr: np.ndarray, ds, padding: np.ndarray | None) -> np.ndarray:
    """Modality values -> [0, 1] by the first the file gives usably: VOI LUT, window, else min-max
    of the body (padding left out, or its value would set the range)."""
    item = (ds.get('VOILUTSequence') or [None])[0]
    if item is not None and item.get('LUTDescriptor') and item.get('LUTData'):
        return _apply_voi_lut(arr, ds, item)
    center, width = _first(ds.get('WindowCenter')), _first(ds.get('WindowWidth'))
    if center is not None and width is not None and width > 0:
        return _window(arr.astype(np.float64), center, width, str(ds.get('VOILUTFunction') or 'LINEAR').upper())
    return _minmax(arr.astype(np.float64), None if padding is None else ~padding)


def _apply_voi_lut(arr: np.ndarray, ds, item) -> np.ndarray:
    from pydicom.pixels import apply_voi

    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16  # 0 stands for 65536
    if entries > 256 and bits <= 8:
        # pydicom 3.0 (3.0.2 at least) indexes an 8-bit table with uint8 indices, which wrap past
        # 256 entries: a 4096-entry table peaks at 15/255. Look such tables up here instead.
        if isinstance(item.LUTData, bytes):  # OW: one entry per 16-bit word
            table = np.frombuffer(item.LUTData, '<u2' if ds.original_encoding[1] else '>u2', count=entries)
        else:
            table = np.asarray(item.LUTData).reshape(-1)
        out = table[np.clip(np.rint(arr) - first, 0, len(table) - 1).astype(np.intp)]
    else:
        out = apply_voi(arr, ds)
    return out.astype(np.float64) / (2**bits - 1)


def _first(value) -> float | None:
    """Window centre/width may be multi-valued: the first is the default view. None when empty."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    return None if value is None or value == '' else float(value)


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window straight into [0, 1]."""
    if function == 'SIGMOID':
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if function == 'LINEAR_EXACT':
        return np.clip((arr - center) / width + 0.5, 0.0, 1.0)
    return np.clip((arr - (center - 0.5)) / max(width - 1.0, 1e-3) + 0.5, 0.0, 1.0)


def _minmax(arr: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Stretch to [0, 1] by the range of the pixels in `keep` (all by default)."""
    values = arr if keep is None else arr[keep]
    if values.size == 0:
        return np.zeros_like(arr, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr, dtype=np.float64)
