"""Do the heatmaps point at the finding? Heatmaps scored against boxes in NIH's BBox_List_2017.csv layout.

Per finding, over the images of the split with a box for it:

- pointing game (Zhang et al. 2016, no tolerance): the share of (image, finding) pairs whose heatmap
  peaks inside one of that finding's boxes on the image;
- IoBB accuracy (Wang et al. 2017, ChestX-ray8): the heatmap is thresholded at `threshold` times its
  maximum, each connected region's bounding box is a detected box, and a true box's IoBB is the largest
  area(detected box ∩ true box) / area(detected box) over the detected boxes (intersection over the
  detected box: a precision, not an IoU); reported as the share of true boxes with IoBB above each of
  `iobb_thresholds`.

Each comes with the same numbers for the class-blind map, the mean of every class's map: a heatmap that
only shows "something is abnormal here" scores that well, so a class-discriminative one must beat it.

Boxes are in pixels of the stored image; the model sees the image letterboxed into a square
(transforms.fit_square), so boxes are mapped into that square with transforms.square_box and scored
on the heatmap, which covers the square.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from hybridmednet.data.datasets import ChestXrayDataset
from hybridmednet.data.io import read_image
from hybridmednet.data.synthetic import BOX_COLUMNS, NIH_BOX_SPELLING
from hybridmednet.data.transforms import square_box
from hybridmednet.errors import DataError
from hybridmednet.evaluation.gradcam import grad_cam

IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75)
CAM_THRESHOLD = 0.7  # Wang et al. keep heatmap values above 180 of 255
OUR_SPELLING = {nih: ours for ours, nih in NIH_BOX_SPELLING.items()}


def read_boxes(path: str | Path) -> pd.DataFrame:
    """NIH's BBox_List_2017.csv as columns image, finding, x, y, w, h (pixels of the stored image).

    NIH spells Infiltration 'Infiltrate' there; it comes back as the class name.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f'box file not found: {path}')
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f'{path}: not a readable CSV file ({exc})') from None
    columns = [c.strip() for c in frame.columns]
    if columns[:6] != BOX_COLUMNS or any(not c.startswith('Unnamed:') for c in columns[6:]):
        raise DataError(
            f'{path}: expected the NIH header "Image Index,Finding Label,Bbox [x,y,w,h]" '
            f'(trailing empty columns allowed), found {",".join(columns)!r}'
        )
    names = frame.iloc[:, :2].apply(lambda column: column.str.strip())
    coords = frame.iloc[:, 2:6].apply(pd.to_numeric, errors='coerce').to_numpy(dtype=np.float64)
    bad = (names == '').any(axis=1).to_numpy() | ~np.isfinite(coords).all(axis=1) | (coords[:, 2:] <= 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f'{path}: line {row + 2}: a box needs an image name, a finding, finite x and y and positive '
            f'w and h; found {",".join(frame.iloc[row, :6])!r}'
        )
    return pd.DataFrame(
        {
            'image': names.iloc[:, 0],
            'finding': names.iloc[:, 1].replace(OUR_SPELLING),
            'x': coords[:, 0],
            'y': coords[:, 1],
            'w': coords[:, 2],
            'h': coords[:, 3],
        }
    )


def boxes_in_square(boxes: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Boxes [N, 4] (x, y, w, h) in pixels of a height x width image -> the same boxes in its
    fit_square(size) output, where the model and its heatmaps live."""
    top, left, new_h, new_w = square_box(height, width, size)
    sx, sy = new_w / width, new_h / height
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.column_stack([left + boxes[:, 0] * sx, top + boxes[:, 1] * sy, boxes[:, 2] * sx, boxes[:, 3] * sy])


def detected_boxes(cam: np.ndarray, threshold: float = CAM_THRESHOLD) -> np.ndarray:
    """Boxes [N, 4] (x, y, w, h, pixel edges) around the 8-connected regions at or above
    `threshold` times the map's maximum; none for an all-zero map."""
    peak = float(cam.max())
    if peak <= 0:
        return np.zeros((0, 4))
    regions, _ = ndimage.label(cam >= threshold * peak, structure=np.ones((3, 3)))
    return np.array(
        [(c.start, r.start, c.stop - c.start, r.stop - r.start) for r, c in ndimage.find_objects(regions)],
        dtype=np.float64,
    ).reshape(-1, 4)


def iobb(detected: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """area(detected ∩ truth) / area(detected) for boxes [N, 4] against one box [4] (x, y, w, h)."""
    detected = np.asarray(detected, dtype=np.float64).reshape(-1, 4)
    x, y, w, h = truth
    across = np.clip(np.minimum(detected[:, 0] + detected[:, 2], x + w) - np.maximum(detected[:, 0], x), 0, None)
    down = np.clip(np.minimum(detected[:, 1] + detected[:, 3], y + h) - np.maximum(detected[:, 1], y), 0, None)
    return across * down / (detected[:, 2] * detected[:, 3])


def score_heatmap(cam: np.ndarray, boxes: np.ndarray, threshold: float = CAM_THRESHOLD) -> tuple[bool, np.ndarray]:
    """(pointing-game hit, IoBB of each box) for one finding's heatmap [S, S] and its boxes [N, 4] in
    heatmap pixels. The peak is a hit when its pixel's centre lies in a box; an all-zero map misses."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    x, y = col + 0.5, row + 0.5
    inside = (
        (boxes[:, 0] <= x) & (x <= boxes[:, 0] + boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 1] + boxes[:, 3])
    )
    detected = detected_boxes(cam, threshold)
    best = np.array([iobb(detected, box).max(initial=0.0) for box in boxes])
    return bool(cam.max() > 0 and inside.any()), best


def _rates(hits: list[bool], iobbs: list[float], thresholds: Sequence[float]) -> dict:
    values = np.asarray(iobbs)
    return {
        'pointing_game': float(np.mean(hits)),
        'iobb': {f'{t:g}': float((values > t).mean()) for t in thresholds},
    }


def localization_scores(
    model: torch.nn.Module,
    dataset: ChestXrayDataset,
    boxes: pd.DataFrame | str | Path,
    class_names: Sequence[str] | None = None,
    cam: Callable[[torch.nn.Module, torch.Tensor, Sequence[int]], np.ndarray] = grad_cam,
    threshold: float = CAM_THRESHOLD,
    iobb_thresholds: Sequence[float] = IOBB_THRESHOLDS,
) -> dict:
    """Pointing game and IoBB accuracy per finding on `dataset`'s images that have boxes, beside the
    class-blind map's. `boxes`: read_boxes' table or the file; boxes of other images or of findings the
    model does not score are left out. `cam(model, image, classes)` gives maps [len(classes), S, S];
    the model should be in eval mode. Returns {'n_images', 'threshold', 'findings': {finding: {...}},
    'all': {...}}, each with n_images, n_boxes, pointing_game, iobb {threshold: share} and the same
    under 'class_blind'; 'all' pools every (image, finding) pair.
    """
    boxes = boxes if isinstance(boxes, pd.DataFrame) else read_boxes(boxes)
    class_names = list(class_names or dataset.class_names)
    row_of = {Path(p).name: i for i, p in enumerate(dataset.records['path'])}
    boxes = boxes[boxes['image'].isin(row_of) & boxes['finding'].isin(class_names)]
    device = next(model.parameters()).device
    tally: dict[str, dict[str, list]] = {}
    for name, group in boxes.groupby('image', sort=False):
        i = row_of[name]
        height, width = read_image(dataset.records['path'].iat[i], intensity=dataset.intensity).shape
        maps = cam(model, dataset[i][0].to(device), range(len(class_names)))
        blind = maps.mean(0)
        for finding, rows in group.groupby('finding', sort=False):
            where = boxes_in_square(rows[['x', 'y', 'w', 'h']].to_numpy(), height, width, maps.shape[-1])
            t = tally.setdefault(finding, {'hits': [], 'iobb': [], 'blind_hits': [], 'blind_iobb': []})
            for prefix, heatmap in (('', maps[class_names.index(finding)]), ('blind_', blind)):
                hit, best = score_heatmap(heatmap, where, threshold)
                t[prefix + 'hits'].append(hit)
                t[prefix + 'iobb'].extend(best.tolist())

    def summary(parts: list[dict]) -> dict:
        hits, found = [h for p in parts for h in p['hits']], [v for p in parts for v in p['iobb']]
        blind_hits, blind_found = (
            [h for p in parts for h in p['blind_hits']],
            [v for p in parts for v in p['blind_iobb']],
        )
        return {
            'n_images': len(hits),
            'n_boxes': len(found),
            **_rates(hits, found, iobb_thresholds),
            'class_blind': _rates(blind_hits, blind_found, iobb_thresholds),
        }

    findings = {f: summary([tally[f]]) for f in class_names if f in tally}
    return {
        'n_images': int(boxes['image'].nunique()),
        'threshold': threshold,
        'findings': findings,
        'all': summary(list(tally.values())) if tally else {},
    }


def localization_rows(scores: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the scores: per finding and for all, pointing game and IoBB accuracy, the class-blind
    map's in brackets; the report's table and `localization_table` both show these."""
    thresholds = list(next(iter(scores['findings'].values()))['iobb']) if scores['findings'] else []
    head = ['Finding', 'Images', 'Boxes', 'Pointing game', *[f'IoBB > {t}' for t in thresholds]]
    rows = []
    for name, row in [*scores['findings'].items(), *([('All', scores['all'])] if scores['all'] else [])]:
        blind = row['class_blind']
        rows.append(
            [
                name,
                str(row['n_images']),
                str(row['n_boxes']),
                f'{row["pointing_game"]:.2f} ({blind["pointing_game"]:.2f})',
                *[f'{row["iobb"][t]:.2f} ({blind["iobb"][t]:.2f})' for t in thresholds],
            ]
        )
    return head, rows


def localization_table(scores: dict) -> str:
    """The scores as a Markdown table (benchmarks/bench_localization.py prints it)."""
    head, rows = localization_rows(scores)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    return '\n'.join(lines + ['| ' + ' | '.join(cells) + ' |' for cells in rows])
