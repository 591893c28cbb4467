"""`hybridmednet predict` / `python predict.py`: score one image or a folder, optionally with heatmaps.

Uses the thresholds and temperatures stored with the model by `evaluate`; a file that cannot be
read is reported and skipped, the others are still scored.
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.evaluation.report import write_json


def list_images(path: str | Path) -> list[Path]:
    """One file, or every image under a folder (IMAGE_SUFFIXES; DICOM also without a suffix), sorted."""
    from hybridmednet.data.io import IMAGE_SUFFIXES, is_dicom
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return sorted(p for p in path.rglob('*') if p.is_file() and not p.name.startswith('.') and (
        p.suffix.lower() in IMAGE_SUFFIXES or (p.suffix == '' and is_dicom(p))))


@dataclass
class Prediction:
    path: str
    probabilities: dict[str, float]
    positive_findings: list[str]
    heatmaps: dict[str, str] = field(default_factory=dict)


@dataclass
class Predictions:
    images: list[Prediction]
    errors: list[dict[str, str]]     # {'path', 'error'} for every file that was skipped


def _heatmap_name(path: Path, root: Path, finding: str) -> str:
    """Unique per image even when two folders hold files of the same name."""
    rel = path.relative_to(root) if root in path.parents else Path(path.name)
    return '__'.join(rel.with_suffix('').parts) + f'_{finding}.png'


def predict_files(model: torch.nn.Module, config, op: OperatingPoint, files: Sequence[Path], root: Path,
                  batch_size: int = 16, device: str = 'cpu', tta: bool = False,
                  heatmap_dir: Path | None = None) -> Predictions:
    """Score `files` in batches; with `heatmap_dir`, one Grad-CAM overlay per positive finding."""
    from hybridmednet.data.io import ImageReadError, read_image
    from hybridmednet.data.transforms import build_transforms
    from hybridmednet.evaluation.gradcam import save_overlays
    from hybridmednet.evaluation.inference import batch_logits

    transform = build_transforms(config, train=False)
    names = op.class_names
    images, errors = [], []
    with tqdm(total=len(files), desc='predicting', unit='image', disable=len(files) < 2) as bar:
        for start in range(0, len(files), batch_size):
            loaded = []
            for path in files[start:start + batch_size]:
                try:
                    image = read_image(path)
                    loaded.append((path, image, transform(image)))
                except (ImageReadError, ValueError, RuntimeError) as exc:
                    errors.append({'path': str(path), 'error': str(exc)})
                    tqdm.write(f"skipped: {exc}", file=sys.stderr)   # the message names the file
            bar.update(len(files[start:start + batch_size]))
            if not loaded:
                continue
            x = torch.stack([t for _, _, t in loaded]).to(device)
            probs = op.probabilities(batch_logits(model, x, tta).cpu().numpy())
            for (path, image, tensor), p in zip(loaded, probs):
                positive = np.flatnonzero(op.positives(p))
                pred = Prediction(str(path), {n: round(float(v), 6) for n, v in zip(names, p)},
                                  [names[k] for k in positive])
                if heatmap_dir is not None and len(positive):
                    files_out = save_overlays(model, tensor.to(device), image, positive.tolist(),
                                              [f'{names[k]} p={p[k]:.2f}' for k in positive],
                                              [heatmap_dir / _heatmap_name(path, root, names[k]) for k in positive])
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
    write_json({'model': model_path, 'operating_point': op.to_meta(),
                'images': [vars(p) for p in result.images], 'errors': result.errors}, paths['json'])
    return paths


def main(argv: list[str] | None = None) -> int:
    """`hybridmednet predict --image_path FILE_OR_DIR --model_path PATH [--visualize] [--save_dir DIR]`."""
    from hybridmednet.engine.checkpoint import CheckpointError, load_model
    p = argparse.ArgumentParser(prog='hybridmednet predict', description=(
        'Probabilities and positive findings per image (PNG, JPEG, DICOM), at the thresholds stored with the model.'))
    p.add_argument('--image_path', required=True, help='an image file or a folder (searched recursively)')
    p.add_argument('--model_path', required=True, help='training checkpoint (.pth) or .safetensors export (+ .json)')
    p.add_argument('--visualize', action='store_true', help='Grad-CAM overlay per positive finding')
    p.add_argument('--save_dir', default='predictions', help='where predictions.csv/.json and heatmaps go')
    p.add_argument('--tta', action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation (default: the model config's EVAL.tta)")
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    try:
        model, config, meta = load_model(args.model_path, map_location=args.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', UserWarning)
            op = OperatingPoint.of_model(meta)
        files = list_images(args.image_path)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"hybridmednet predict: error: {exc}", file=sys.stderr)
        return 1
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if not files:
        print(f"hybridmednet predict: error: no PNG, JPEG or DICOM files in {args.image_path}", file=sys.stderr)
        return 1
    save_dir = Path(args.save_dir)
    root = Path(args.image_path) if Path(args.image_path).is_dir() else Path(args.image_path).parent
    tta = config.EVAL['tta'] if args.tta is None else args.tta
    result = predict_files(model, config, op, files, root, args.batch_size, args.device, tta,
                           save_dir / 'heatmaps' if args.visualize else None)
    written = write_predictions(result, op, args.model_path, save_dir)
    for pred in result.images[:20]:
        found = ', '.join(f'{n} ({pred.probabilities[n]:.2f})' for n in pred.positive_findings) or 'no finding'
        print(f"{pred.path}: {found}")
    if len(result.images) > 20:
        print(f"... and {len(result.images) - 20} more")
    print(f"{len(result.images)} image(s) scored, {len(result.errors)} skipped; "
          f"{written['csv']}, {written['json']}" + (f", heatmaps in {save_dir / 'heatmaps'}" if args.visualize else ''))
    if result.errors:
        print(f"skipped (unreadable): " + '; '.join(e['path'] for e in result.errors), file=sys.stderr)
    return 0 if result.images else 1


if __name__ == '__main__':
    sys.exit(main())
