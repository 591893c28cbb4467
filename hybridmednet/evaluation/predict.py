"""Score images with a model (`hybridmednet predict`): one file or a folder, optionally with heatmaps.

Uses the thresholds and temperatures stored with the model by `evaluate`; a file that cannot be
read is reported and skipped, the others are still scored.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hybridmednet.config import Config
from hybridmednet.data.io import IMAGE_SUFFIXES, is_dicom, read_image
from hybridmednet.data.transforms import build_transforms
from hybridmednet.data.volumes import is_nifti, read_volume
from hybridmednet.errors import DataError, ImageReadError
from hybridmednet.evaluation.gradcam import save_overlays
from hybridmednet.evaluation.inference import batch_outputs
from hybridmednet.evaluation.ood import OodModel
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.evaluation.report import write_json


def list_images(path: str | Path, volumes: bool = False) -> list[Path]:
    """One file, or every image under a folder (IMAGE_SUFFIXES; DICOM also without a suffix), sorted.

    With `volumes`: NIfTI files and DICOM series, a series being a folder that holds DICOM files itself
    (`path` too, when it is one)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f'{path}: no such file or folder')
    if volumes:
        folders = [path, *(p for p in path.rglob('*') if p.is_dir())]
        series = [f for f in folders if any(_is_dicom_file(p) for p in f.iterdir())]
        if path in series:
            return [path]
        return sorted([*series, *(p for p in path.rglob('*') if p.is_file() and is_nifti(p))])
    return sorted(
        p for p in path.rglob('*') if _is_dicom_file(p) or (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    )


def _is_dicom_file(path: Path) -> bool:
    if not path.is_file() or path.name.startswith('.'):
        return False
    return path.suffix.lower() in ('.dcm', '.dicom') or (path.suffix == '' and is_dicom(path))


@dataclass
class Prediction:
    path: str
    probabilities: dict[str, float]
    positive_findings: list[str]
    heatmaps: dict[str, str] = field(default_factory=dict)
    ood: dict[str, Any] | None = None  # {'score', 'threshold', 'flagged'} when the model carries an OOD model


@dataclass
class Predictions:
    images: list[Prediction]
    errors: list[dict[str, str]]  # {'path', 'error'} for every file that was skipped


def _heatmap_name(path: Path, root: Path, finding: str) -> str:
    """Unique per image even when two folders hold files of the same name."""
    rel = path.relative_to(root) if root in path.parents else Path(path.name)
    if is_nifti(path):
        stem = rel.name[: -len('.nii.gz')] if rel.name.lower().endswith('.gz') else rel.name[: -len('.nii')]
    else:
        stem = rel.name if path.is_dir() else rel.stem  # a series folder's name may hold dots (UIDs)
    return '__'.join([*rel.parts[:-1], stem]) + f'_{finding}.png'


def predict_files(
    model: torch.nn.Module,
    config: Config,
    op: OperatingPoint,
    files: Sequence[Path],
    root: Path,
    batch_size: int = 16,
    device: str = 'cpu',
    tta: bool = False,
    heatmap_dir: Path | None = None,
    ood: OodModel | None = None,
) -> Predictions:
    """Score `files` in batches; with `heatmap_dir`, one heatmap overlay per positive finding; with `ood`
    (a HybridMedNet's stored OOD model), each image's out-of-distribution score and flag."""
    transform = build_transforms(config, train=False)
    volumes = config.DATA['spatial_dims'] == 3

    def read(path: Path) -> np.ndarray:  # as the datasets read their files
        if volumes:
            return read_volume(path, spacing=config.DATA['spacing'], window=config.DATA['intensity_window']).array
        return read_image(path, intensity=config.DATA['intensity'])

    names = op.class_names
    images, errors = [], []
    with tqdm(total=len(files), desc='predicting', unit='image', disable=len(files) < 2) as bar:
        for start in range(0, len(files), batch_size):
            loaded = []
            for path in files[start : start + batch_size]:
                try:
                    image = read(path)
                    loaded.append((path, image, transform(image)))
                except (ImageReadError, DataError, ValueError, RuntimeError) as exc:
                    errors.append({'path': str(path), 'error': str(exc)})
                    tqdm.write(f'skipped: {exc}', file=sys.stderr)  # the message names the file
            bar.update(len(files[start : start + batch_size]))
            if not loaded:
                continue
            x = torch.stack([t for _, _, t in loaded]).to(device)
            logits, features = batch_outputs(model, x, tta, ood is not None)
            probs = op.probabilities(logits.cpu().numpy())
            scores = ood.score(features) if ood is not None and features is not None else [None] * len(loaded)
            for (path, image, tensor), p, score in zip(loaded, probs, scores):
                positive = np.flatnonzero(op.positives(p))
                pred = Prediction(
                    str(path), {n: round(float(v), 6) for n, v in zip(names, p)}, [names[k] for k in positive]
                )
                if score is not None and ood is not None:
                    pred.ood = {
                        'score': float(score),
                        'threshold': ood.threshold,
                        'flagged': bool(score > ood.threshold),
                    }
                if heatmap_dir is not None and len(positive):
                    files_out = save_overlays(
                        model,
                        tensor.to(device),
                        image,
                        positive.tolist(),
                        [f'{names[k]} p={p[k]:.2f}' for k in positive],
                        [heatmap_dir / _heatmap_name(path, root, names[k]) for k in positive],
                    )
                    pred.heatmaps = {names[k]: str(f) for k, f in zip(positive, files_out)}
                images.append(pred)
    return Predictions(images, errors)


def write_predictions(result: Predictions, op: OperatingPoint, model_path: str, save_dir: Path) -> dict[str, Path]:
    """predictions.csv (one row per image) and predictions.json (with thresholds and skipped files)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    paths = {'csv': save_dir / 'predictions.csv', 'json': save_dir / 'predictions.json'}
    with open(paths['csv'], 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['path', *op.class_names, 'positive_findings'])
        for p in result.images:
            writer.writerow([p.path, *(p.probabilities[n] for n in op.class_names), ';'.join(p.positive_findings)])
    write_json(
        {
            'model': model_path,
            'operating_point': op.to_meta(),
            'images': [vars(p) for p in result.images],
            'errors': result.errors,
        },
        paths['json'],
    )
    return paths
