"""The built-in sample dataset: synthetic chest X-ray phantoms in the NIH ChestX-ray14 layout.

A thorax phantom (body, lungs with vessel markings, heart, ribs, spine, diaphragm)
varies in position, size and exposure; each of the 14 findings adds its own
visual signature, some easy (enlarged heart, blunted lung base, a large mass),
some hard (a small nodule, pneumonia vs infiltration). Labels follow the NIH
prevalences and co-occurrences (a latent factor model), with each finding lifted
to at least min(5 %, 100 / n) so that every class has positives in a small
validation split. Findings are partly shared between a patient's follow-ups,
like real ones, which is why splits must be by patient. Each drawn lesion of NIH's
eight boxed findings gets a box in BBox_List_2017.csv, as NIH's 984 images have.

Deterministic for (n, size, seed): image i depends only on the seed and i.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import zoom
from scipy.stats import norm

from hybridmednet.config import NIH_FINDINGS
from hybridmednet.errors import DataError

log = logging.getLogger(__name__)

# Bump when the images change, so cached copies are regenerated. v2: nodules, the fibrotic net and
# pleural thickening drawn large enough to survive downsampling to the quickstart's 96 px (in v1 a
# nodule was 3 px across there, and those findings stayed near chance).
VERSION = 2

# NIH's BBox_List_2017.csv: its header `Image Index,Finding Label,Bbox [x,y,w,h],,,` read as columns,
# boxes in pixels of the image as stored, for these eight findings, Infiltration spelled 'Infiltrate'.
BOX_FILE = 'BBox_List_2017.csv'
BOX_COLUMNS = ['Image Index', 'Finding Label', 'Bbox [x', 'y', 'w', 'h]']
BOX_FINDINGS = tuple(NIH_FINDINGS[:8])  # Atelectasis ... Pneumothorax: NIH's first eight
NIH_BOX_SPELLING = {'Infiltration': 'Infiltrate'}

# NIH ChestX-ray14 (Data_Entry_2017, 112,120 images): share of images with each finding.
NIH_PREVALENCE = dict(
    zip(
        NIH_FINDINGS,
        [
            0.1031,
            0.0248,
            0.1188,
            0.1774,
            0.0516,
            0.0565,
            0.0128,
            0.0473,
            0.0416,
            0.0205,
            0.0224,
            0.0150,
            0.0302,
            0.0020,
        ],
    )
)

# Latent factors behind the co-occurrences seen in NIH: any disease, fluid (heart failure:
# effusion, edema, cardiomegaly), infection (infiltration, pneumonia, consolidation),
# focal lesions (mass, nodule), chronic lung disease (emphysema, fibrosis, pneumothorax, pleura).
LOADINGS = np.array(
    [  # general, fluid, infection, lesion, chronic
        [0.35, 0.35, 0.30, 0.00, 0.00],  # Atelectasis
        [0.30, 0.45, 0.00, 0.00, 0.00],  # Cardiomegaly
        [0.35, 0.50, 0.20, 0.00, 0.00],  # Effusion
        [0.35, 0.20, 0.45, 0.00, 0.00],  # Infiltration
        [0.30, 0.00, 0.00, 0.55, 0.00],  # Mass
        [0.30, 0.00, 0.00, 0.55, 0.00],  # Nodule
        [0.30, 0.00, 0.60, 0.00, 0.00],  # Pneumonia
        [0.30, 0.00, 0.00, 0.10, 0.45],  # Pneumothorax
        [0.35, 0.20, 0.50, 0.00, 0.00],  # Consolidation
        [0.30, 0.55, 0.25, 0.00, 0.00],  # Edema
        [0.30, 0.00, 0.00, 0.00, 0.55],  # Emphysema
        [0.30, 0.00, 0.00, 0.00, 0.50],  # Fibrosis
        [0.30, 0.15, 0.00, 0.20, 0.40],  # Pleural_Thickening
        [0.30, 0.00, 0.00, 0.00, 0.10],  # Hernia
    ]
)
PATIENT_SHARE = 0.5  # share of the latent variance shared by a patient's images


def prevalences(n: int) -> np.ndarray:
    """NIH prevalences, each lifted to at least min(5 %, 100 / n)."""
    floor = min(0.05, 100.0 / max(n, 1))
    return np.maximum(np.array([NIH_PREVALENCE[f] for f in NIH_FINDINGS]), floor)


def sample_labels(patient_of_image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multi-hot [n, 14] from a Gaussian factor model thresholded at the prevalences."""
    n, k = len(patient_of_image), len(NIH_FINDINGS)
    n_patients = int(patient_of_image.max()) + 1
    a, b = np.sqrt(PATIENT_SHARE), np.sqrt(1.0 - PATIENT_SHARE)
    factors = a * rng.standard_normal((n_patients, 5))[patient_of_image] + b * rng.standard_normal((n, 5))
    unique = a * rng.standard_normal((n_patients, k))[patient_of_image] + b * rng.standard_normal((n, k))
    latent = factors @ LOADINGS.T + unique * np.sqrt(1.0 - (LOADINGS**2).sum(axis=1))
    return latent > norm.isf(prevalences(n))


# -- drawing ---------------------------------------------------------------------------
def _ellipse(X, Y, cx, cy, rx, ry, edge=0.02):
    """1 inside, 0 outside, a soft edge about `edge` wide (in the [-1, 1] frame)."""
    d = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    return np.clip((1.0 - d) * min(rx, ry) / edge + 0.5, 0.0, 1.0)


def _noise(rng, size, cells):
    """Smooth random field in about [-1, 1] with `cells` features across the image."""
    field = zoom(rng.standard_normal((cells + 1, cells + 1)).astype(np.float32), size / (cells + 1), order=1)
    return field[:size, :size]


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) in pixels of where `mask` exceeds 0.5 (None when nowhere)."""
    rows, cols = np.nonzero(mask > 0.5)
    if len(rows) == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def render(findings: np.ndarray, anatomy: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    """One phantom as uint8 [size, size]; `findings` is a bool[14] in NIH order."""
    return render_with_boxes(findings, anatomy, rng, size)[0]


def render_with_boxes(
    findings: np.ndarray, anatomy: dict, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, list[tuple[str, int, int, int, int]]]:
    """The phantom and a box (finding, x, y, w, h) around each lesion of BOX_FINDINGS it drew.

    A box bounds the pixels where the lesion's own mask (inside the lungs) exceeds one half:
    the ground truth that heatmaps are scored against (evaluation/localization.py).
    """
    has = dict(zip(NIH_FINDINGS, findings))
    boxes: list[tuple[str, int, int, int, int]] = []

    def add(finding: str, mask: np.ndarray) -> None:
        box = _box(mask)
        if box is not None:
            boxes.append((finding, *box))

    g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    scale = anatomy['scale'] * rng.uniform(0.96, 1.04)
    X = (g[None, :] - rng.uniform(-0.05, 0.05)) / scale
    Y = (g[:, None] - rng.uniform(-0.05, 0.05)) / scale
    X, Y = np.broadcast_arrays(X, Y)

    body = _ellipse(X, Y, 0.0, 0.15, anatomy['body_w'], 1.1, edge=0.04)
    spine = np.clip(1.0 - np.abs(X) / 0.08, 0.0, 1.0) * body
    ry = 0.56 * (1.12 if has['Emphysema'] else 1.0)
    lungs, fill, lost = np.zeros_like(X), np.zeros_like(X), np.zeros_like(X)
    sides = []
    for side in (-1, 1):  # image left = patient right
        cx, cy, rx = side * 0.34, -0.08 + (ry - 0.56) * 0.8, 0.25 * anatomy['lung_w']
        dome = (0.28 if side < 0 else 0.32) + (ry - 0.56) * 1.6 + 0.16 * ((X - cx) / rx) ** 2
        raised = 0.09 if has['Atelectasis'] and side == anatomy['side'] else 0.0  # volume loss raises the dome
        outline = _ellipse(X, Y, cx, cy, rx, ry)
        lung = outline * np.clip((dome - raised - Y) / 0.02 + 0.5, 0.0, 1.0)
        if raised:
            lost = outline * np.clip((dome - Y) / 0.02 + 0.5, 0.0, 1.0) - lung  # the lung base given up
        dome = dome - raised
        lungs = np.maximum(lungs, lung)
        sides.append((cx, cy, rx, lung, dome))
    heart_w = anatomy['heart'] * (rng.uniform(1.35, 1.55) if has['Cardiomegaly'] else 1.0)
    heart_w *= 1.06 if anatomy['view'] == 'AP' else 1.0
    heart = _ellipse(X, Y, 0.1, 0.17, heart_w, heart_w * 0.72, edge=0.03)
    if has['Cardiomegaly']:
        add('Cardiomegaly', heart)

    vessels = np.abs(_noise(rng, size, 40)) * np.clip(1.2 - np.hypot(np.abs(X) - 0.18, Y) / 0.6, 0.15, 1.0)
    air = 0.32 * (1.12 if has['Emphysema'] else 1.0) - vessels * (0.03 if has['Emphysema'] else 0.08)

    def lung_of(side):
        return sides[0 if side < 0 else 1]

    def in_lung(rng, low=-0.3, high=0.3):
        cx, cy, rx, _, _ = lung_of(rng.choice((-1, 1)))
        return cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(low, high)

    if has['Effusion']:  # fluid fills the lung base, meniscus rising laterally
        for side in (-1, 1) if rng.random() < 0.4 else (anatomy['side'],):
            cx, cy, rx, lung, dome = lung_of(side)
            level = 0.42 - rng.uniform(0.16, 0.28) - 0.12 * np.clip(side * (X - cx) / rx, 0, 1)
            fluid = np.clip((Y - level) / 0.03, 0, 1) * (lung > 0)
            fill = np.maximum(fill, fluid * 0.95)
            add('Effusion', fluid * lung)
    if has['Atelectasis']:  # plate-like band above the raised hemidiaphragm
        cx, cy, rx, _, _ = lung_of(anatomy['side'])
        tilt, y0 = rng.uniform(-0.2, 0.2), 0.12 + rng.uniform(-0.06, 0.04)
        band = np.clip(1 - np.abs(Y - y0 - tilt * (X - cx)) / 0.035, 0, 1) * (np.abs(X - cx) < 0.8 * rx)
        fill = np.maximum(fill, band * 0.85)
        add('Atelectasis', np.maximum(band * lungs, lost))
    if has['Consolidation']:  # dense, homogeneous, sharp lobar edge
        x, y = in_lung(rng, 0.0, 0.3)
        fill = np.maximum(fill, _ellipse(X, Y, x, y, rng.uniform(0.13, 0.18), rng.uniform(0.16, 0.24), 0.01) * 0.9)
    if has['Infiltration']:  # several faint patchy blotches
        patches = np.clip(_noise(rng, size, 6) - 0.2, 0, 1) * 0.9
        fill = np.maximum(fill, patches * rng.uniform(0.7, 1.0))
        for _, _, _, lung, _ in sides:  # one box per lung: where the patches are denser than 0.25
            add('Infiltration', 2 * patches * lung)
    if has['Pneumonia']:  # one hazy, soft-edged area (like a large infiltration patch)
        x, y = in_lung(rng, 0.0, 0.35)
        haze = _ellipse(X, Y, x, y, rng.uniform(0.12, 0.17), rng.uniform(0.12, 0.17), 0.08)
        fill = np.maximum(fill, haze * (0.6 + 0.2 * np.clip(_noise(rng, size, 12), 0, 1)))
        add('Pneumonia', haze * lungs)
    if has['Edema']:  # bilateral perihilar haze plus Kerley B lines at the periphery
        hilar = np.exp(-((np.abs(X) - 0.22) ** 2 + (Y - 0.05) ** 2) / (2 * 0.16**2))
        kerley = (np.cos(Y * 90) > 0.85) * (np.abs(X) > 0.45) * (Y > 0.1)
        fill = np.maximum(fill, hilar * 0.6 + kerley * 0.5)
    if has['Mass']:
        x, y = in_lung(rng)
        mass = _ellipse(X, Y, x, y, r := rng.uniform(0.08, 0.12), r, 0.01)
        fill = np.maximum(fill, mass * 0.9)
        add('Mass', mass * lungs)
    if has['Nodule']:
        for _ in range(rng.integers(1, 3)):
            x, y = in_lung(rng)
            nodule = _ellipse(X, Y, x, y, r := rng.uniform(0.04, 0.06), r, 0.008)
            fill = np.maximum(fill, nodule * 0.8)
            add('Nodule', nodule * lungs)
    if has['Fibrosis']:  # reticular net in the lower and outer lung
        net = (np.abs(_noise(rng, size, 28)) < 0.15) * np.clip((Y + 0.1) / 0.4, 0, 1)
        fill = np.maximum(fill, net * 0.6)
    fill *= lungs
    lung_air = lungs * air * (1.0 - fill) * (1.0 - heart)
    if has['Pneumothorax']:  # apical lucency without lung markings, edged by the pleural line
        cx, cy, rx, lung, _ = lung_of(anatomy['side'] * -1)
        collapsed = _ellipse(X, Y, cx - 0.1 * np.sign(cx), cy + 0.12, rx * 0.7, 0.5, 0.01)
        gap = lung * (1.0 - collapsed) * (Y < 0.2)
        line = np.clip(1 - np.abs(collapsed - 0.5) / 0.5, 0, 1) * (Y < 0.2) * lung
        lung_air = lung_air * (1 - gap) + gap * 0.4 - line * 0.08
        add('Pneumothorax', gap)
    image = 0.05 + body * 0.5 + spine * 0.12 + heart * 0.06 - lung_air
    ribs = np.clip((np.cos((Y + 0.35 * X**2) * 2 * np.pi / 0.16) - 0.55) * 2.2, 0, 1)
    image += ribs * lungs * 0.07
    if has['Pleural_Thickening']:  # band along the lateral chest wall
        cx, cy, rx, lung, _ = lung_of(anatomy['side'])
        wall = _ellipse(X, Y, cx, cy, rx, ry, 0.01) - _ellipse(X, Y, cx, cy, rx - 0.08, ry - 0.05, 0.01)
        image += np.clip(wall, 0, 1) * (Y < 0.25) * 0.22
    if has['Hernia']:  # retrocardiac gas bubble with an air-fluid level
        y0 = 0.2 + rng.uniform(-0.04, 0.04)
        bubble = _ellipse(X, Y, 0.02, y0, r := rng.uniform(0.09, 0.12), r * 0.8, 0.01)
        image += bubble * np.where(Y < y0 + 0.02, -0.22, 0.08)
    gamma, gain = rng.uniform(0.8, 1.25) * anatomy['gamma'], rng.uniform(0.9, 1.1)
    image = gain * np.clip(image, 0, 1) ** gamma + rng.uniform(-0.04, 0.04)
    image += rng.normal(0.0, rng.uniform(0.01, 0.03), image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), boxes


# -- the dataset on disk -------------------------------------------------------------------
def _plan(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Patients, follow-ups, demographics, views and labels for n images: the Data_Entry table and
    the labels as bool [n, 14]."""
    rng = np.random.default_rng([seed, 0])
    counts, total = [], 0
    while total < n:  # 1 to 8 images per patient, most with few
        counts.append(int(min(rng.geometric(0.45), 8)))
        total += counts[-1]
    counts[-1] -= total - n
    patient = np.repeat(np.arange(len(counts)), counts)
    follow_up = np.concatenate([np.arange(c) for c in counts])
    labels = sample_labels(patient, rng)
    age = np.clip(rng.normal(47, 16, len(counts)), 2, 94).astype(int)[patient] + follow_up // 3
    sex = np.where(rng.random(len(counts)) < 0.56, 'M', 'F')[patient]
    view = np.where(rng.random(n) < 0.6, 'PA', 'AP')
    names = [f'{p + 1:08d}_{f:03d}.png' for p, f in zip(patient, follow_up)]
    findings = ['|'.join(np.array(NIH_FINDINGS)[row]) or 'No Finding' for row in labels]
    return pd.DataFrame(
        {
            'Image Index': names,
            'Finding Labels': findings,
            'Follow-up #': follow_up,
            'Patient ID': patient + 1,
            'Patient Age': age,
            'Patient Gender': sex,
            'View Position': view,
        }
    ), labels


def _anatomy(seed: int, patient_id: int, view: str) -> dict:
    rng = np.random.default_rng([seed, 1, patient_id])
    return {
        'body_w': rng.uniform(0.8, 0.92),
        'lung_w': rng.uniform(0.92, 1.08),
        'heart': rng.uniform(0.2, 0.23),
        'scale': rng.uniform(0.92, 1.05),
        'gamma': rng.uniform(0.9, 1.1),
        'side': int(rng.choice((-1, 1))),
        'view': view,
    }


def _render_rows(args: tuple) -> list[tuple[int, str, int, int, int, int]]:
    """Render `rows`, saving the images unless `out` is None; their boxes as (row, finding, x, y, w, h)."""
    out, seed, size, rows = args
    boxes = []
    for i, name, pid, view, findings in rows:
        rng = np.random.default_rng([seed, 2, i])
        image, drawn = render_with_boxes(findings, _anatomy(seed, pid, view), rng, size)
        if out is not None:
            Image.fromarray(image).save(out / 'images' / name, compress_level=1)
        boxes += [(i, *box) for box in drawn]
    return boxes


def _render_all(
    out: Path | None, n: int, size: int, seed: int, workers: int | None
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """The Data_Entry table, the labels and the box table (BBox_List_2017 layout); the images are
    written unless `out` is None."""
    table, labels = _plan(n, seed)
    rows = list(zip(range(n), table['Image Index'], table['Patient ID'], table['View Position'], labels))
    workers = workers or min(4, os.cpu_count() or 1)
    chunks = [(out, seed, size, rows[k :: workers * 4]) for k in range(workers * 4)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            drawn = [box for chunk in pool.map(_render_rows, chunks) for box in chunk]
    else:
        drawn = [box for chunk in chunks for box in _render_rows(chunk)]
    drawn.sort(key=lambda box: box[0])  # image order, whatever the number of workers
    boxes = pd.DataFrame(
        [(table['Image Index'].iat[i], NIH_BOX_SPELLING.get(f, f), x, y, w, h) for i, f, x, y, w, h in drawn],
        columns=BOX_COLUMNS,
    )
    return table, labels, boxes


def _write_boxes(boxes: pd.DataFrame, path: Path) -> None:
    """Atomic write, so a reader never sees half a file (two processes may fill one cache)."""
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    boxes.to_csv(tmp, index=False)
    os.replace(tmp, path)


def generate_sample_dataset(
    out_dir: str | Path, n: int = 2000, size: int = 256, seed: int = 0, workers: int | None = None
) -> Path:
    """Write the sample dataset (NIH layout, BBox_List_2017.csv included) into out_dir and return it."""
    if n < 10:
        raise DataError(f'sample dataset size n={n} is too small (need at least 10 images)')
    out = Path(out_dir)
    (out / 'images').mkdir(parents=True, exist_ok=True)
    table, labels, boxes = _render_all(out, n, size, seed, workers)
    table['OriginalImage[Width'] = size
    table['Height]'] = size
    table.to_csv(out / 'Data_Entry_2017.csv', index=False)
    _write_boxes(boxes, out / BOX_FILE)
    # Official-style lists: about 20 % of patients (all their images) in test_list.
    patients = np.random.default_rng([seed, 3]).permutation(table['Patient ID'].unique())
    test_patients = set(patients[: max(1, round(0.2 * len(patients)))])
    in_test = table['Patient ID'].isin(test_patients)
    (out / 'test_list.txt').write_text('\n'.join(table['Image Index'][in_test]) + '\n')
    (out / 'train_val_list.txt').write_text('\n'.join(table['Image Index'][~in_test]) + '\n')
    counts = dict(zip(NIH_FINDINGS, labels.sum(0).tolist()))
    counts['No Finding'] = int((labels.sum(1) == 0).sum())
    (out / 'sample_info.json').write_text(
        json.dumps(
            {
                'n': n,
                'size': size,
                'seed': seed,
                'version': VERSION,
                'patients': int(table['Patient ID'].nunique()),
                'label_counts': counts,
            },
            indent=1,
        )
    )
    return out


def cache_root() -> Path:
    """$HYBRIDMEDNET_CACHE, else $XDG_CACHE_HOME/hybridmednet, else ~/.cache/hybridmednet."""
    if os.environ.get('HYBRIDMEDNET_CACHE'):
        return Path(os.environ['HYBRIDMEDNET_CACHE'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'hybridmednet'


def cached_sample_dataset(n: int = 2000, size: int = 256, seed: int = 0) -> Path:
    """The sample dataset in the cache folder, generated on first use (safe if two processes race)."""
    target = cache_root() / f'sample-v{VERSION}-n{n}-s{size}-seed{seed}'
    if (target / 'sample_info.json').is_file():
        if not (target / BOX_FILE).is_file():  # cached before the boxes were written: same pixels, add them
            log.info('writing the lesion boxes of the cached sample dataset %s', target)
            _write_boxes(_render_all(None, n, size, seed, None)[2], target / BOX_FILE)
        return target
    log.info('generating the sample dataset (%d images, %d px) into %s', n, size, target)
    return generate_once(target, lambda tmp: generate_sample_dataset(tmp, n, size, seed))


def generate_once(target: Path, generate: Callable[[Path], Any]) -> Path:
    """Fill a temporary folder beside `target` with `generate`, then rename it into place: a crash leaves no
    half dataset, and when two processes race, the one that loses keeps the winner's (the same files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + '.tmp', dir=target.parent))
    try:
        generate(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / 'sample_info.json').is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
