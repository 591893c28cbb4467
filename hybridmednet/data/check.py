"""`hybridmednet check-data`: scan a dataset before training on it.

Reports what would otherwise surface hours into a run: missing or unreadable
images, label counts and patients per split, and any patient found in two splits.
"""
from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ProcessPoolExecutor


from hybridmednet.config import ConfigError, load_config
from hybridmednet.data.datasets import DataError, DataIndex, build_index
from hybridmednet.data.io import ImageReadError, read_image
from hybridmednet.data.splits import SPLITS, patient_leaks


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


def report(index: DataIndex, leaks: dict[str, list[str]], missing: list[str], corrupt: list[str],
           warnings: list[str]) -> str:
    records = index.records
    lines = [f"dataset: {index.source}", f"images: {len(records)}"]
    splits = records['split'].to_numpy()
    header = f"{'':22s}" + ''.join(f"{s:>8s}" for s in SPLITS)
    lines += ['', header,
              f"{'images':22s}" + ''.join(f"{int((splits == s).sum()):8d}" for s in SPLITS),
              f"{'patients':22s}" + ''.join(f"{records['patient_id'][splits == s].nunique():8d}" for s in SPLITS)]
    for k, name in enumerate(index.class_names):
        counted = index.labels[:, k] * index.mask[:, k]
        lines.append(f"{name[:22]:22s}" + ''.join(f"{int(counted[splits == s].sum()):8d}" for s in SPLITS))
    left_out = int((splits == '').sum())
    if left_out:
        lines.append(f"left out of every split: {left_out} image(s)")
    lines += ['', f"patients in two splits: {len(leaks)}"]
    lines += [f"  patient {p}: {', '.join(s)}" for p, s in list(leaks.items())[:20]]
    lines += [f"missing files: {len(missing)}"] + [f"  {p}" for p in missing[:20]]
    lines += [f"unreadable files: {len(corrupt)}"] + [f"  {e}" for e in corrupt[:20]]
    lines += [f"warnings: {len(warnings)}"] + [f"  {w}" for w in warnings]
    return '\n'.join(lines)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='hybridmednet check-data',
                                     description='Scan a dataset: files, labels and patients per split.')
    parser.add_argument('--config', help='YAML config file')
    parser.add_argument('--no-decode', action='store_true', help='only check that files exist (fast)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='e.g. DATA.data_dir=/data/nih')
    args = parser.parse_args(argv)
    collect = _Collect()
    logger = logging.getLogger('hybridmednet.data')
    logger.addHandler(collect)
    try:
        config = load_config(args.config, args.overrides)
        index = build_index(config)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}")
        return 2
    finally:
        logger.removeHandler(collect)
    missing, corrupt = scan_files(list(index.records['path']), not args.no_decode, args.workers)
    leaks = patient_leaks(index.records['patient_id'], index.records['split'])
    print(report(index, leaks, missing, corrupt, collect.messages))
    return 1 if missing or corrupt or leaks else 0
