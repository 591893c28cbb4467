"""The built-in 3D sample dataset: synthetic chest-CT-like volumes with four findings, NIfTI + a CSV.

A body (soft tissue, 40 HU) in air holds two lungs (-850 HU) with smooth texture and noise. Each
finding is drawn inside one lung, wherever the volume's labels say it is present:

- `sphere`: a solid nodule (+40 HU),
- `shell`: a cavity, a bright wall (+60 HU) around air,
- `tube`: a cylinder (+80 HU) along a random direction,
- `texture`: a ground-glass patch (-450 HU, fine-grained).

Sizes scale with the volume (at 48 voxels: radii 3 to 7). Patients have 1 to 3 volumes (follow-ups)
that share most findings, which is why splits must be by patient. Files: `volumes/P00001_0.nii.gz`
(int16 HU, 1.5 mm voxels, RAS), `labels.csv` (image, labels, patient_id: the layout `index_csv`
reads) and `sample_info.json`. Deterministic for (n, size, seed): volume i depends only on the
seed and i, and every random number is drawn whatever the labels, so a label changes only its finding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import zoom

from hybridmednet.data.synthetic import cache_root, generate_once
from hybridmednet.data.volumes import INSTALL_3D
from hybridmednet.errors import DataError

log = logging.getLogger(__name__)

VERSION = 1  # bump when the volumes change, so cached copies are regenerated
FINDINGS = ['sphere', 'shell', 'tube', 'texture']
PREVALENCE = 0.3
KEEP = 0.8  # chance that a follow-up keeps each of its patient's findings
VOXEL_MM = 1.5
LUNGS = ((0.0, 0.0, -0.42), (0.0, 0.0, 0.42))  # centres (D, H, W) in the [-1, 1] frame
LUNG_RADII = (0.7, 0.5, 0.32)


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1] with `cells` features along each side."""
    field = zoom(rng.standard_normal((cells + 1,) * 3).astype(np.float32), size / (cells + 1), order=1)
    return field[:size, :size, :size]


def _grid(size: int) -> np.ndarray:
    """Voxel centres in the [-1, 1] frame: float32 [3, size, size, size] (D, H, W)."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.stack(np.meshgrid(axis, axis, axis, indexing='ij'))


def _distance(grid: np.ndarray, centre: np.ndarray, radii: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Ellipsoidal distance: 1 on the surface of the ellipsoid with these radii."""
    return np.sqrt(sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))


def render(labels: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One volume as int16 HU [D, H, W] and where each drawn finding lies (bool masks, present ones only)."""
    grid = _grid(size)
    # Every parameter is drawn before anything depends on the labels.
    params = []
    for _ in FINDINGS:
        lung = np.asarray(LUNGS[rng.integers(2)])
        centre = lung + rng.uniform(-0.45, 0.45, 3) * LUNG_RADII
        radius = rng.uniform(4.0, 7.0) * 2.0 / 48.0  # 4 to 7 voxels at 48, the same share at any size
        direction = rng.standard_normal(3)
        params.append((centre, radius, direction / np.linalg.norm(direction), rng.uniform(0.6, 1.0)))
    body_texture, lung_texture = _smooth(rng, size, 4), _smooth(rng, size, 6)
    fine = rng.standard_normal((size,) * 3).astype(np.float32)
    noise = rng.standard_normal((size,) * 3).astype(np.float32)

    hu = np.full((size,) * 3, -1000.0, np.float32)
    body = _distance(grid, np.zeros(3), (0.95, 0.75, 0.92)) <= 1.0
    hu[body] = 40.0 + 20.0 * body_texture[body]
    lungs = np.zeros_like(body)
    for lung_centre in LUNGS:
        lungs |= _distance(grid, np.asarray(lung_centre), LUNG_RADII) <= 1.0
    hu[lungs] = -850.0 + 40.0 * lung_texture[lungs]
    masks = {}
    for name, present, (centre, radius, direction, extent) in zip(FINDINGS, labels, params):
        if not present:
            continue
        d = _distance(grid, centre, (radius,) * 3)
        if name == 'sphere':
            mask = d <= 0.8
            hu[mask] = 40.0
        elif name == 'shell':
            mask = d <= 1.0
            hu[mask] = 60.0
            hu[d <= 0.55] = -1000.0
        elif name == 'tube':
            offset = grid - centre[:, None, None, None]
            along = np.clip(np.tensordot(direction, offset, axes=1), -2.5 * radius * extent, 2.5 * radius * extent)
            mask = np.linalg.norm(offset - along * direction[:, None, None, None], axis=0) <= 0.35 * radius
            hu[mask] = 80.0
        else:  # texture
            mask = d <= 1.2
            hu[mask] = -450.0 + 120.0 * fine[mask]
        masks[name] = mask
    hu += 15.0 * noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), masks


def _plan(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Patients (1 to 3 volumes each), file names and labels as bool [n, len(FINDINGS)]."""
    rng = np.random.default_rng([seed, 0])
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(min(1 + int(rng.binomial(2, 0.35)), n - sum(counts)))
    patient = np.repeat(np.arange(len(counts)), counts)
    follow_up = np.concatenate([np.arange(c) for c in counts])
    base = rng.random((len(counts), len(FINDINGS))) < PREVALENCE
    redrawn = rng.random((n, len(FINDINGS))) < PREVALENCE
    labels = np.where(rng.random((n, len(FINDINGS))) < KEEP, base[patient], redrawn)
    table = pd.DataFrame(
        {
            'image': [f'volumes/P{p + 1:05d}_{f}.nii.gz' for p, f in zip(patient, follow_up)],
            'labels': ['|'.join(np.array(FINDINGS)[row]) or 'No Finding' for row in labels],
            'patient_id': [f'P{p + 1:05d}' for p in patient],
        }
    )
    return table, labels


def generate_sample_volumes(out_dir: str | Path, n: int = 400, size: int = 48, seed: int = 0) -> Path:
    """Write the 3D sample dataset (CSV layout) into out_dir and return it."""
    try:
        import nibabel as nib
    except ImportError:
        raise DataError(f'the 3D sample dataset is written as NIfTI with nibabel: {INSTALL_3D}') from None
    if n < 10:
        raise DataError(f'sample dataset size n={n} is too small (need at least 10 volumes)')
    if size < 16:
        raise DataError(f'sample volume side {size} is too small (need at least 16 voxels)')
    out = Path(out_dir)
    (out / 'volumes').mkdir(parents=True, exist_ok=True)
    table, labels = _plan(n, seed)
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    for i, name in enumerate(table['image']):
        hu, _ = render(labels[i], np.random.default_rng([seed, 1, i]), size)
        nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), out / name)  # [D, H, W] -> RAS (x, y, z)
    table.to_csv(out / 'labels.csv', index=False)
    counts = dict(zip(FINDINGS, labels.sum(0).tolist()))
    counts['No Finding'] = int((labels.sum(1) == 0).sum())
    info = {
        'n': n,
        'size': size,
        'seed': seed,
        'version': VERSION,
        'patients': int(table['patient_id'].nunique()),
        'label_counts': counts,
    }
    (out / 'sample_info.json').write_text(json.dumps(info, indent=1))
    return out


def cached_sample_volumes(n: int = 400, size: int = 48, seed: int = 0) -> Path:
    """The 3D sample dataset in the cache folder, generated on first use (safe if two processes race)."""
    target = cache_root() / f'sample3d-v{VERSION}-n{n}-s{size}-seed{seed}'
    if (target / 'sample_info.json').is_file():
        return target
    log.info('generating the 3D sample dataset (%d volumes, %d voxels a side) into %s', n, size, target)
    return generate_once(target, lambda tmp: generate_sample_volumes(tmp, n, size, seed))
