"""A memory-mapped image cache: every image fitted once into [S, S] (transforms.fit_square) in one .npy file.

Decoding a 1024 px PNG costs far more than the training step wants to wait for;
reading a 256 px slice from a memory map costs almost nothing. Datasets use the cache
when it holds an image and read the file otherwise. Pixels are uint16 when any source
holds more than 8 bits (DICOM, 16-bit PNG: a 12-bit image keeps its 4096 grey levels),
else uint8, half the size.

Layout of the cache folder: `meta.json` (size, count, dtype, DATA.intensity, and the names
of the current `images-<id>.npy`, [N, S, S], and `index-<id>.csv`: the path of each row
relative to the data folder, with the file's size and mtime when it was cached, so that a
file changed since is read again instead of served stale). A rebuild writes new files
beside the old ones and then replaces meta.json in one rename: a rebuild that fails leaves
the old cache as it was, and jobs that have the old files memory-mapped keep reading them
(they are unlinked, never rewritten). One writer at a time per cache folder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hybridmednet.config import Config
from hybridmednet.data.io import read_image, stores_more_than_8_bits
from hybridmednet.data.transforms import fit_square
from hybridmednet.errors import DataError, ImageReadError

log = logging.getLogger(__name__)

FORMAT = 2  # meta.json 'format'; 1 (unversioned) rewrote images.npy in place
REBUILD = 'rebuild it with `hybridmednet cache`'


def cache_dir(config: Config, data_dir: Path) -> Path:
    """DATA['cache_dir'], else `.cache` inside the data folder."""
    return Path(config.DATA['cache_dir']) if config.DATA['cache_dir'] else data_dir / '.cache'


class ImageCache:
    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data_dir = root, data_dir
        meta_file = root / 'meta.json'
        try:
            self.meta = json.loads(meta_file.read_text())
        except ValueError:
            raise DataError(f'{meta_file}: not valid JSON; {REBUILD}') from None
        if self.meta.get('format') != FORMAT:
            raise DataError(f'{meta_file}: cache written by an older version of hybridmednet; {REBUILD}')
        self.size = int(self.meta['size'])
        self.images = self._open_images()
        index_file = root / self.meta['index']
        index = pd.read_csv(
            index_file, dtype={'path': str, 'size': np.int64, 'mtime_ns': np.int64}, keep_default_na=False
        )
        if len(index) != self.meta['count']:
            raise DataError(
                f'{index_file}: {len(index)} rows, but {meta_file} says {self.meta["count"]} images; {REBUILD}'
            )
        changed = self._changed(index)
        if changed.any():
            log.warning(
                '%d of %d cached images changed since the cache %s was written: reading those files instead (%s)',
                changed.sum(),
                len(index),
                root,
                REBUILD,
            )
        self._row = {k: i for i, k in enumerate(index['path']) if not changed[i]}

    def _changed(self, index: pd.DataFrame) -> np.ndarray:
        """True where the file's size or mtime differs from when it was cached (a missing file is not changed)."""
        changed = np.zeros(len(index), dtype=bool)
        for i, (key, size, mtime_ns) in enumerate(index[['path', 'size', 'mtime_ns']].itertuples(index=False)):
            try:
                stat = os.stat(os.path.join(self.data_dir, key))
            except OSError:
                continue
            changed[i] = stat.st_size != size or stat.st_mtime_ns != mtime_ns
        return changed

    def _open_images(self) -> np.ndarray:
        """The memory map, checked against meta.json: a mismatched file would serve the wrong rows."""
        images_file = self.root / self.meta['images']
        try:
            images = np.load(images_file, mmap_mode='r')
        except FileNotFoundError:
            raise DataError(
                f'{images_file} is missing (was the cache rebuilt or removed while this job ran?); {REBUILD}'
            ) from None
        expected = (self.meta['count'], self.size, self.size)
        if images.shape != expected or images.dtype != self.meta['dtype']:
            raise DataError(
                f'{images_file}: holds {images.dtype} {images.shape}, but {self.root / "meta.json"} '
                f'says {self.meta["dtype"]} {expected}; {REBUILD}'
            )
        return images

    def __getstate__(self) -> dict:
        """DataLoader workers started by spawn (macOS, Windows) reopen the map instead of copying it."""
        return {**self.__dict__, 'images': None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = self._open_images()

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Cache row of each image path, -1 where the cache does not hold it or the file changed since."""
        return np.array([self._row.get(os.path.relpath(p, self.data_dir), -1) for p in paths], dtype=np.int64)

    def image(self, row: int) -> np.ndarray:
        return self.images[row].astype(np.float32) / np.iinfo(self.images.dtype).max


def open_cache(config: Config, data_dir: Path) -> ImageCache | None:
    """The cache for this data folder when one exists, is at least DATA['image_size'] wide and was
    written with this DATA['intensity']."""
    root = cache_dir(config, data_dir)
    if not (root / 'meta.json').is_file():
        return None
    cache = ImageCache(root, data_dir)
    if cache.size < config.DATA['image_size']:
        log.warning(
            'image cache %s holds %d px images, smaller than DATA.image_size %d: reading files instead',
            root,
            cache.size,
            config.DATA['image_size'],
        )
        return None
    if cache.meta['intensity'] != config.DATA['intensity']:
        log.warning(
            'image cache %s was written with DATA.intensity=%s, not %s: reading files instead (%s)',
            root,
            cache.meta['intensity'],
            config.DATA['intensity'],
            REBUILD,
        )
        return None
    return cache


def _resize(args: tuple[str, int, str | int, type]) -> tuple[os.stat_result, np.ndarray] | str:
    """(the file's stat, the resized image as `dtype`), or the error message; stat first, so a
    file rewritten while it is read looks changed afterwards rather than cached as new."""
    path, size, intensity, dtype = args
    try:
        stat = os.stat(path)
        image = read_image(path, intensity=intensity)
    except ImageReadError as exc:
        return str(exc)
    except OSError as exc:  # from os.stat: missing or not accessible
        return f'{path}: {exc.strerror}'
    return stat, (np.clip(fit_square(image, size), 0.0, 1.0) * np.iinfo(dtype).max + 0.5).astype(dtype)


def write_cache(
    paths: Sequence[str],
    data_dir: Path,
    root: Path,
    size: int,
    workers: int = 1,
    skip_bad_images: bool = False,
    intensity: str | int = 'auto',
) -> Path:
    """Resize each image in `paths` into the cache folder `root`; bad files stop it unless skip_bad_images.

    `intensity` is read_image's. Nothing in `root` is touched until the new cache is complete:
    see the module docstring.
    """
    paths = list(dict.fromkeys(paths))
    root.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    images_file, index_file = root / f'images-{tag}.npy', root / f'index-{tag}.csv'
    meta_file = root / f'meta-{tag}.json'
    # One torch thread per worker process: `workers` processes already fill the cores.
    pool = ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
    try:
        run = partial(pool.map, chunksize=64) if pool else map
        dtype = np.uint16 if any(run(stores_more_than_8_bits, paths)) else np.uint8
        index, skipped = _write_images(paths, data_dir, images_file, size, dtype, intensity, skip_bad_images, run)
        index.to_csv(index_file, index=False)
        meta_file.write_text(
            json.dumps(
                {
                    'format': FORMAT,
                    'size': size,
                    'count': len(index),
                    'skipped': skipped,
                    'dtype': np.dtype(dtype).name,
                    'intensity': intensity,
                    'images': images_file.name,
                    'index': index_file.name,
                }
            )
        )
        os.replace(meta_file, root / 'meta.json')  # the one step that switches readers to the new cache
    except BaseException:
        _remove([images_file, index_file, meta_file])
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    old = [*root.glob('images-*.npy'), *root.glob('index-*.csv'), root / 'images.npy', root / 'index.csv']
    _remove([f for f in old if f.name not in (images_file.name, index_file.name)])  # earlier and killed rebuilds
    return root


def _write_images(
    paths: list[str],
    data_dir: Path,
    images_file: Path,
    size: int,
    dtype: type,
    intensity: str | int,
    skip_bad_images: bool,
    run: Callable,
) -> tuple[pd.DataFrame, int]:
    """Fill `images_file`; (the index: path relative to data_dir, size, mtime_ns; unreadable files skipped)."""
    images = np.lib.format.open_memmap(images_file, mode='w+', dtype=dtype, shape=(len(paths), size, size))
    kept: list[tuple[str, int, int]] = []  # (path relative to data_dir, size, mtime_ns)
    bad: list[str] = []
    for path, result in zip(paths, run(_resize, ((p, size, intensity, dtype) for p in paths))):
        if isinstance(result, str):
            if not skip_bad_images:
                raise ImageReadError(result)
            bad.append(result)
            continue
        stat, image = result
        images[len(kept)] = image
        kept.append((os.path.relpath(path, data_dir), stat.st_size, stat.st_mtime_ns))
    images.flush()
    del images
    if bad:  # shrink the file to the images kept
        shrunk = images_file.with_suffix('.kept.npy')
        full = np.load(images_file, mmap_mode='r')
        np.save(shrunk, full[: len(kept)])
        del full
        os.replace(shrunk, images_file)
        log.warning('skipped %d unreadable image(s), e.g. %s', len(bad), bad[0])
    return pd.DataFrame(kept, columns=['path', 'size', 'mtime_ns']), len(bad)


def _remove(files: list[Path]) -> None:
    """Unlink cache files; jobs that have one memory-mapped keep reading it."""
    for name in files:
        try:
            name.unlink(missing_ok=True)
        except OSError as exc:  # Windows refuses to unlink a file that is mapped
            log.warning('could not remove the cache file %s (%s); delete it by hand', name, exc)
