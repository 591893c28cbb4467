"""Scan a dataset before training on it (`hybridmednet check-data`).

Reports what would otherwise surface hours into a run: missing or unreadable
images, label counts and patients per split, and any patient found in two splits.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

from hybridmednet.data.datasets import DataIndex
from hybridmednet.data.io import read_image
from hybridmednet.data.splits import SPLITS
from hybridmednet.errors import ImageReadError


def _read_error(path: str) -> str | None:
    try:
        read_image(path)
    except ImageReadError as exc:
        return str(exc)
    return None


def scan_files(paths: list[str], decode: bool = True, workers: int = 1) -> tuple[list[str], list[str]]:
    """(missing paths, messages for files that exist but do not decode)."""
    exists = [os.path.exists(p) for p in paths]
    missing = [p for p, e in zip(paths, exists) if not e]
    present = [p for p, e in zip(paths, exists) if e] if decode else []
    if workers > 1 and present:
        with ProcessPoolExecutor(workers) as pool:
            errors = list(pool.map(_read_error, present, chunksize=64))
    else:
        errors = [_read_error(p) for p in present]
    return missing, [e for e in errors if e]


def report(
    index: DataIndex, leaks: dict[str, list[str]], missing: list[str], corrupt: list[str], warnings: list[str]
) -> str:
    records = index.records
    lines = [f'dataset: {index.source}', f'images: {len(records)}']
    splits = records['split'].to_numpy()
    header = f'{"":22s}' + ''.join(f'{s:>8s}' for s in SPLITS)
    lines += [
        '',
        header,
        f'{"images":22s}' + ''.join(f'{int((splits == s).sum()):8d}' for s in SPLITS),
        f'{"patients":22s}' + ''.join(f'{records["patient_id"][splits == s].nunique():8d}' for s in SPLITS),
    ]
    for k, name in enumerate(index.class_names):
        counted = index.labels[:, k] * index.mask[:, k]
        lines.append(f'{name[:22]:22s}' + ''.join(f'{int(counted[splits == s].sum()):8d}' for s in SPLITS))
    left_out = int((splits == '').sum())
    if left_out:
        lines.append(f'left out of every split: {left_out} image(s)')
    lines += ['', f'patients in two splits: {len(leaks)}']
    lines += [f'  patient {p}: {", ".join(s)}' for p, s in list(leaks.items())[:20]]
    lines += [f'missing files: {len(missing)}'] + [f'  {p}' for p in missing[:20]]
    lines += [f'unreadable files: {len(corrupt)}'] + [f'  {e}' for e in corrupt[:20]]
    lines += [f'warnings: {len(warnings)}'] + [f'  {w}' for w in warnings]
    return '\n'.join(lines)
