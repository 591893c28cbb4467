"""One reader for volumes: NIfTI files and DICOM series (a folder of slices); MedMNIST-3D .npz files.

Every volume comes out the same way, whatever the file: float32 [D, H, W] in [0, 1], turned to RAS
(nibabel's closest canonical orientation) and laid out with the RAS axes reversed:

- D runs inferior -> superior (axial slices),
- H runs posterior -> anterior,
- W runs the patient's left -> right.

So `volume[d]` is an axial slice; shown as radiologists do (anterior up, the patient's right on the
viewer's left) it is `volume[d, ::-1, ::-1]`. A DICOM series is checked before it is stacked (one series,
one orientation, evenly spaced slices with none missing) and sorted along the slice normal by
ImagePositionPatient, never by file name or InstanceNumber, which PACS exports do not keep in order.

nibabel and MONAI are the `3d` extra, imported where used.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch

from hybridmednet.errors import ConfigError, DataError, ImageReadError

NIFTI_SUFFIXES = ('.nii', '.nii.gz')
INSTALL_3D = "pip install 'hybridmednet[3d]'"
MEDMNIST_SPLITS = ('train', 'val', 'test')
SPACING_TOLERANCE = 0.01  # slice steps may differ by 1 % (scanners round positions), no more
DEFAULT_PERCENTILES = (0.5, 99.5)  # no DATA.intensity_window: this range of the volume's values -> [0, 1]


class Volume(NamedTuple):
    array: np.ndarray  # float32 [D, H, W] in [0, 1]
    spacing: tuple[float, float, float]  # voxel size in mm along D, H, W


def require_3d() -> None:
    """DATA.spatial_dims=3 reads with nibabel and transforms with MONAI: say so once, before any file."""
    for name in ('nibabel', 'monai'):
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f'DATA.spatial_dims=3 needs {name}: {INSTALL_3D}')


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f'reading volumes needs {name.split(".")[0]}: {INSTALL_3D}') from None


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_volume(
    path: str | Path,
    *,
    spacing: tuple[float, float, float] | list[float] | None = None,
    window: tuple[float, float] | list[float] | None = None,
) -> Volume:
    """Read a NIfTI file or a DICOM series folder as float32 [D, H, W] in [0, 1] (axes: module docstring).

    `spacing` (mm along D, H, W, as DATA.spacing): resample to it (trilinear, anti-aliased).
    `window` ([low, high] in the file's units, HU for CT, as DATA.intensity_window): low -> 0, high -> 1,
    clipped. Without one, the volume's own 0.5th..99.5th percentiles are stretched to [0, 1], robust to
    a few extreme voxels (metal, MRI's bright spots). Unreadable files raise ImageReadError; series that
    do not form a volume DataError; both name the file.
    """
    nib = _import('nibabel')
    path = Path(path)
    if path.is_dir():
        image = _dicom_series(path, nib)
    elif not path.is_file():
        raise ImageReadError(f'{path}: file or folder not found')
    elif is_nifti(path):
        image = _nifti(path, nib)
    elif path.suffix.lower() == '.npz':
        raise DataError(f'{path}: a .npz holds a whole MedMNIST dataset, not one volume; use DATA.dataset=medmnist3d')
    else:
        raise ImageReadError(f'{path}: not a volume: expected a .nii / .nii.gz file or a folder of DICOM slices')
    canonical = nib.as_closest_canonical(image)
    array = np.asarray(canonical.get_fdata(dtype=np.float32)).transpose(2, 1, 0)
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3][::-1])
    if spacing is not None:
        target = tuple(float(s) for s in spacing)
        shape = [max(1, round(n * z / s)) for n, z, s in zip(array.shape, zooms, target)]
        array = resize_volume(torch.from_numpy(np.ascontiguousarray(array))[None], shape)[0].numpy()
        zooms = target
    return Volume(apply_window(array, window), (zooms[0], zooms[1], zooms[2]))


def apply_window(array: np.ndarray, window: tuple[float, float] | list[float] | None) -> np.ndarray:
    """[low, high] -> [0, 1], clipped; None: the volume's 0.5th..99.5th percentiles (a flat volume gives 0)."""
    low, high = (float(v) for v in (window if window is not None else np.percentile(array, DEFAULT_PERCENTILES)))
    if high <= low:
        return np.zeros(array.shape, np.float32)
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def resize_volume(volume: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """[C, D, H, W] -> [C, *shape], trilinear; smoothed first where it shrinks (MONAI's anti-aliasing),
    so a 512-pixel CT slice brought to 64 does not alias."""
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    transforms = _import('monai.transforms')
    utils = _import('monai.utils')
    resized = transforms.Resize(tuple(shape), mode='trilinear', anti_aliasing=True)(volume)
    return utils.convert_to_tensor(resized, track_meta=False).float()


def _nifti(path: Path, nib: Any) -> Any:
    try:
        image = nib.load(path)
        shape = image.shape
    except Exception as exc:  # nibabel reports truncated or foreign files with several exception types
        raise ImageReadError(f'{path}: cannot read NIfTI ({type(exc).__name__}: {exc})') from None
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    elif len(shape) != 3:
        raise ImageReadError(f'{path}: a volume has 3 dimensions, this NIfTI has shape {tuple(shape)}')
    return image


def _dicom_series(folder: Path, nib: Any) -> Any:
    """The slices of one series as a NIfTI image in RAS world coordinates (DICOM's are LPS)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith('.') and f.name != 'DICOMDIR')
    if not files:
        raise DataError(f'{folder}: no DICOM slices in this folder')
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError) as exc:
            raise DataError(f'{folder}: slice file {f.name} is not a readable DICOM file ({exc})') from None
        for tag in ('SeriesInstanceUID', 'ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing'):
            if tag not in ds:
                raise DataError(f'{folder}: slice file {f.name} has no {tag}, so it cannot be placed in a volume')
        if int(ds.get('NumberOfFrames', 1) or 1) > 1:
            raise DataError(f'{folder}: slice file {f.name} is multi-frame; export the series as single slices')
        slices.append((f.name, ds))
    series: dict[str, list[str]] = {}
    for name, ds in slices:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(name)
    if len(series) > 1:
        (first_uid, _), (uid, names) = list(series.items())[:2]
        counts = ', '.join(f'{u}: {len(n)} files' for u, n in series.items())
        raise DataError(
            f'{folder}: {len(series)} series in one folder ({counts}); slice file {names[0]} is of series '
            f'{uid}, {series[first_uid][0]} of {first_uid}: put each series in its own folder'
        )
    first_name, first = slices[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    pixel_spacing = np.asarray(first.PixelSpacing, dtype=float)
    for name, ds in slices[1:]:
        other = np.asarray(ds.ImageOrientationPatient, dtype=float)
        if not np.allclose(other, orientation, atol=1e-3):
            raise DataError(
                f'{folder}: mixed orientations: slice file {name} has ImageOrientationPatient {other.tolist()}, '
                f'{first_name} has {orientation.tolist()}'
            )
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns) or not np.allclose(
            np.asarray(ds.PixelSpacing, dtype=float), pixel_spacing
        ):
            raise DataError(
                f'{folder}: slice file {name} is {ds.Rows}x{ds.Columns} at {list(ds.PixelSpacing)} mm, '
                f'{first_name} {first.Rows}x{first.Columns} at {pixel_spacing.tolist()} mm'
            )
    if len(slices) < 2:
        raise DataError(f'{folder}: one slice ({first_name}) is not a volume')
    along_row, along_column = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_column)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in slices])
    order = np.argsort(positions @ normal, kind='stable')
    names = [slices[k][0] for k in order]
    depth = positions[order] @ normal
    steps = np.diff(depth)
    step = float(np.median(steps))
    _check_steps(folder, names, steps, step)
    shift = positions[order] - positions[order[0]]
    in_plane = np.linalg.norm(shift - np.outer(shift @ normal, normal), axis=1)
    if in_plane.max() > max(SPACING_TOLERANCE * step, 1e-3):
        k = int(in_plane.argmax())
        raise DataError(
            f'{folder}: slice file {names[k]} is shifted {in_plane[k]:.3g} mm within the slice plane from '
            f'{names[0]} (a tilted gantry or a sheared series); resample it to an orthogonal grid first'
        )
    try:
        array = np.stack([apply_modality_lut(slices[k][1].pixel_array, slices[k][1]) for k in order]).astype(np.float32)
    except Exception as exc:  # compressed syntaxes without their decoders, truncated pixel data
        raise ImageReadError(f'{folder}: cannot decode the pixel data ({type(exc).__name__}: {exc})') from None
    lps = np.eye(4)
    # Voxel axes (slice, row, column) -> LPS mm: along the normal, down a column, along a row.
    lps[:3, 0] = normal * step
    lps[:3, 1] = along_column * pixel_spacing[0]
    lps[:3, 2] = along_row * pixel_spacing[1]
    lps[:3, 3] = positions[order[0]]
    return nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)


def _check_steps(folder: Path, names: list[str], steps: np.ndarray, step: float) -> None:
    """Evenly spaced slices: a duplicate position, a missing slice or an uneven step names the two files."""
    tolerance = max(SPACING_TOLERANCE * step, 1e-3)
    for k in np.flatnonzero(np.abs(steps - step) > tolerance):
        a, b, gap = names[k], names[k + 1], float(steps[k])
        if gap < tolerance:
            raise DataError(f'{folder}: slice files {a} and {b} lie at the same position (a duplicate slice?)')
        ratio = gap / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            raise DataError(
                f'{folder}: {round(ratio) - 1} slice(s) missing between slice files {a} and {b} '
                f'({gap:.3g} mm apart, the slices are {step:.3g} mm apart)'
            )
        raise DataError(
            f'{folder}: inconsistent slice spacing: slice files {a} and {b} are {gap:.3g} mm apart, '
            f'the others {step:.3g} mm'
        )


@lru_cache(maxsize=2)
def read_medmnist(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A MedMNIST-3D .npz as published: {split: (uint8 images [N, D, H, W], int labels [N, L])}.

    Labels are [N, 1] class numbers (OrganMNIST3D, NoduleMNIST3D, ...) or [N, K] 0/1 columns. Kept per
    process (the last two files), so a dataset's items are rows of arrays already in memory.
    """
    path = Path(path)
    try:
        with np.load(path) as data:
            missing = [f'{s}_{k}' for s in MEDMNIST_SPLITS for k in ('images', 'labels') if f'{s}_{k}' not in data]
            if missing:
                raise DataError(
                    f'{path}: missing array(s) {", ".join(missing)}; a MedMNIST .npz holds '
                    f'train_images, train_labels, val_images, val_labels, test_images, test_labels'
                )
            arrays = {s: (data[f'{s}_images'], data[f'{s}_labels']) for s in MEDMNIST_SPLITS}
    except DataError:
        raise
    except Exception as exc:  # not a zip, truncated, a pickle
        raise DataError(f'{path}: not a readable .npz file ({type(exc).__name__}: {exc})') from None
    for split, (images, labels) in arrays.items():
        if images.ndim != 4:
            raise DataError(
                f'{path}: {split}_images has shape {images.shape}; MedMNIST-3D volumes are [N, D, H, W] '
                f'(a 2D MedMNIST file has [N, H, W])'
            )
        if images.dtype != np.uint8:
            raise DataError(f'{path}: {split}_images is {images.dtype}; MedMNIST publishes uint8 volumes')
        if labels.ndim != 2 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f'{path}: {split}_labels has shape {labels.shape} ({labels.dtype}) for {len(images)} volumes; '
                f'expected integers [N, 1] (class numbers) or [N, K] (0/1 per class)'
            )
    return arrays
