"""One image reader for every format: PNG/JPEG (8/16-bit, grey/RGB/RGBA) and DICOM.

Everything downstream (transforms, cache, predict) sees the same thing: a float32
[H, W] array in [0, 1], rows and columns as stored in the file (never transposed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {'.dcm', '.dicom', '.dic'}
IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff'} | DICOM_SUFFIXES  # what read_image reads


class ImageReadError(OSError):
    """A file that cannot be read as an image; the message names the file and why."""


def read_image(path: str | Path) -> np.ndarray:
    """Read one image as float32 [H, W] in [0, 1]; raise ImageReadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    try:
        image = _read_dicom(path) if is_dicom(path) else _read_pil(path)
    except ImageReadError:
        raise
    except Exception as exc:  # truncated or corrupt data surfaces as many exception types
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return np.ascontiguousarray(image, dtype=np.float32)


def is_dicom(path: Path) -> bool:
    """DICOM by suffix or by the 'DICM' marker at byte 128 (many PACS exports have no suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, 'rb') as f:
        f.seek(128)
        return f.read(4) == b'DICM'


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a worker
            if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
                return np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
            if img.mode == 'F':
                arr = np.asarray(img, dtype=np.float32)
                return _minmax(arr)
            if img.mode != 'L':
                img = img.convert('L')  # RGB/RGBA/P/LA/1 -> luminance, alpha dropped
            return np.asarray(img, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a recognised image file") from None


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from None
    if 'PixelData' not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    frames = int(ds.get('NumberOfFrames', 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; "
                             f"export a single frame")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get('TransferSyntaxUID')
        if syntax is not None and syntax.is_compressed:
            raise ImageReadError(f"{path}: compressed DICOM ({syntax.name}) needs the decoders: "
                                 f"pip install 'hybridmednet[dicom]'") from None
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data ({exc})") from None
    if arr.ndim == 3:  # colour DICOM (rare for X-rays): luminance
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    arr = apply_modality_lut(arr, ds)  # stored values -> physical (LUT or slope/intercept)
    if 'VOILUTSequence' in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        image = apply_voi(arr, ds).astype(np.float64) / (2 ** bits - 1)
    elif 'WindowCenter' in ds and 'WindowWidth' in ds:
        image = _window(arr.astype(np.float64), _first(ds.WindowCenter), _first(ds.WindowWidth),
                        str(ds.get('VOILUTFunction', 'LINEAR')).upper())
    else:
        image = _minmax(arr.astype(np.float64))
    if ds.get('PhotometricInterpretation') == 'MONOCHROME1':  # low values are white
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0)


def _first(value) -> float:
    """Window centre/width may be multi-valued; the first pair is the default view."""
    from pydicom.multival import MultiValue
    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window straight into [0, 1]."""
    if function == 'SIGMOID':
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if function == 'LINEAR_EXACT':
        return np.clip((arr - center) / width + 0.5, 0.0, 1.0)
    return np.clip((arr - (center - 0.5)) / max(width - 1.0, 1e-3) + 0.5, 0.0, 1.0)


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr, dtype=np.float64)
