"""Data loading speed, per CPU core (one process, one thread), at 224 px training transforms.

(a) decode a full-size (1024 px) 8-bit PNG + resize + augment, as without the cache;
(b) read the 256 px memory-mapped cache + augment;
plus the time to index a 112,120-row NIH Data_Entry file (labels and patient-level split).

    .venv/bin/python benchmarks/bench_data.py [--n 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hybridmednet.config import NIH_FINDINGS, Config
from hybridmednet.data.cache import cache_dir, write_cache
from hybridmednet.data.datasets import build_datasets, build_index
from hybridmednet.data.synthetic import _anatomy, render, sample_labels


def rate(dataset, repeats: int) -> float:
    """Images per second over `repeats` passes (best pass, to damp other load on a shared machine)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        best = max(best, len(dataset) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--n', type=int, default=64, help='full-size images to write (default 64)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / 'images').mkdir()
        rng = np.random.default_rng(0)
        names = [f'{i:08d}_000.png' for i in range(args.n)]
        for i, name in enumerate(names):
            Image.fromarray(render(np.zeros(14, bool), _anatomy(0, i, 'PA'), rng, 1024)).save(root / 'images' / name)
        pd.DataFrame({'Image Index': names, 'Finding Labels': 'No Finding', 'Patient ID': range(args.n)}).to_csv(
            root / 'Data_Entry_2017.csv', index=False
        )
        config = Config()
        config.DATA.update(data_dir=str(root), image_size=224, train_split=1.0, val_split=0.0, test_split=0.0)
        files = rate(build_datasets(config)['train'], args.repeats)
        index = build_index(config)
        write_cache(
            index.records['path'],
            index.data_dir,
            cache_dir(config, index.data_dir),
            256,
            intensity=config.DATA['intensity'],
        )
        cached = rate(build_datasets(config)['train'], args.repeats)

        n = 112_120  # the full NIH file, labels drawn like the sample dataset's
        patients = np.sort(np.random.default_rng(1).integers(0, 30_805, n))
        labels = sample_labels(patients, np.random.default_rng(2))
        pd.DataFrame(
            {
                'Image Index': [f'{p:08d}_{i:03d}.png' for i, p in enumerate(patients)],
                'Finding Labels': ['|'.join(np.array(NIH_FINDINGS)[r]) or 'No Finding' for r in labels],
                'Follow-up #': 0,
                'Patient ID': patients + 1,
                'Patient Age': 50,
                'Patient Gender': 'M',
                'View Position': 'PA',
            }
        ).to_csv(root / 'Data_Entry_2017.csv', index=False)
        config.DATA.update(train_split=0.7, val_split=0.1, test_split=0.2)
        start = time.perf_counter()
        index = build_index(config)
        seconds = time.perf_counter() - start
    print(f'(a) PNG 1024 px decode + resize + augment: {files:7.0f} images/s per core')
    print(f'(b) cache 256 px + augment:                {cached:7.0f} images/s per core  ({cached / files:.1f}x)')
    print(f'index {len(index.records):,} NIH rows (labels + patient split): {seconds:.1f} s')


if __name__ == '__main__':
    main()
