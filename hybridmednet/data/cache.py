"""A memory-mapped image cache: every image resized once to uint8 [S, S] in one .npy file.

Decoding a 1024 px PNG costs far more than the training step wants to wait for;
reading a 256 px uint8 slice from a memory map costs almost nothing. Datasets use
the cache when it holds an image and read the file otherwise.

Layout of the cache folder: `images.npy` (uint8 [N, S, S]), `index.csv` (path of each
row, relative to the data folder), `meta.json` (size, count), written last.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from hybridmednet.config import Config, load_config
from hybridmednet.data.io import read_image
from hybridmednet.errors import ImageReadError

log = logging.getLogger(__name__)


def cache_dir(config: Config, data_dir: Path) -> Path:
    """DATA['cache_dir'], else `.cache` inside the data folder."""
    return Path(config.DATA['cache_dir']) if config.DATA['cache_dir'] else data_dir / '.cache'


class ImageCache:
    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        self.meta = json.loads((root / 'meta.json').read_text())
        self.size = int(self.meta['size'])
        self.images = np.load(root / 'images.npy', mmap_mode='r')
        keys = pd.read_csv(root / 'index.csv', dtype=str, keep_default_na=False)['path']
        self._row = {k: i for i, k in enumerate(keys)}

    def __getstate__(self) -> dict:
        """DataLoader workers started by spawn (macOS, Windows) reopen the map instead of copying it."""
        return {**self.__dict__, 'images': None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = np.load(self.root / 'images.npy', mmap_mode='r')

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Cache row of each image path, -1 where the cache does not hold it."""
        return np.array([self._row.get(os.path.relpath(p, self.data_dir), -1) for p in paths], dtype=np.int64)

    def image(self, row: int) -> np.ndarray:
        return self.images[row].astype(np.float32) / 255.0


def open_cache(config: Config, data_dir: Path) -> ImageCache | None:
    """The cache for this data folder when one exists and is at least DATA['image_size'] wide."""
    root = cache_dir(config, data_dir)
    if not (root / 'meta.json').is_file():
        return None
    cache = ImageCache(root, data_dir)
    if cache.size < config.DATA['image_size']:
        log.warning("image cache %s holds %d px images, smaller than DATA.image_size %d: reading files instead",
                    root, cache.size, config.DATA['image_size'])
        return None
    return cache


def _resize(args: tuple[str, int]) -> np.ndarray | str:
    path, size = args
    try:
        image = read_image(path)
    except ImageReadError as exc:
        return str(exc)
    u8 = Image.fromarray((image * 255.0 + 0.5).astype(np.uint8))
    return np.asarray(u8.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))


def write_cache(paths: Sequence[str], data_dir: Path, root: Path, size: int, workers: int = 1,
                skip_bad_images: bool = False) -> Path:
    """Resize each image in `paths` into the cache folder `root`; bad files stop it unless skip_bad_images."""
    paths = list(dict.fromkeys(paths))
    root.mkdir(parents=True, exist_ok=True)
    (root / 'meta.json').unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    images = np.lib.format.open_memmap(root / 'images.npy', mode='w+', dtype=np.uint8, shape=(len(paths), size, size))
    kept, bad = [], []
    jobs = ((p, size) for p in paths)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for path, result in zip(paths, pool.map(_resize, jobs, chunksize=64) if pool else map(_resize, jobs)):
            if isinstance(result, str):
                if not skip_bad_images:
                    raise ImageReadError(result)
                bad.append(result)
                continue
            images[len(kept)] = result
            kept.append(os.path.relpath(path, data_dir))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    images.flush()
    del images
    if bad:  # shrink the file to the images kept
        full = np.load(root / 'images.npy', mmap_mode='r')
        np.save(root / 'images.tmp.npy', full[:len(kept)])
        del full
        os.replace(root / 'images.tmp.npy', root / 'images.npy')
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0])
    pd.DataFrame({'path': kept}).to_csv(root / 'index.csv', index=False)
    (root / 'meta.json').write_text(json.dumps({'size': size, 'count': len(kept), 'skipped': len(bad)}))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='hybridmednet cache',
                                     description='Write the memory-mapped image cache for a dataset.')
    parser.add_argument('--config', help='YAML config file')
    parser.add_argument('--size', type=int, default=256, help='cached image side in pixels (default 256)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='e.g. DATA.data_dir=/data/nih')
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    from hybridmednet.data.datasets import build_index, resolve_data_dir  # main() moves to the commands package
    data_dir = resolve_data_dir(config)
    root = write_cache(build_index(config).records['path'], data_dir, cache_dir(config, data_dir), args.size,
                       args.workers, config.DATA['skip_bad_images'])
    meta = json.loads((root / 'meta.json').read_text())
    print(f"cached {meta['count']} images at {args.size} px in {root}"
          + (f" ({meta['skipped']} unreadable skipped)" if meta['skipped'] else ''))
    return 0
