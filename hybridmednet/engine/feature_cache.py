"""Feature cache for frozen backbones (TRAIN.feature_cache): each image's 4 pyramid maps computed once.

With MODEL.finetune: linear and no random augmentation, the backbone maps an image to the same maps in
every epoch, so running it more than once is wasted work: the cache runs it once per image, keeps the maps
in a memory-mapped file, and training runs attention, fusion and head from them (`FromMaps`). Training
images are prepared as for evaluation (fit_square, normalise): no random crop or colour jitter.

An entry is keyed by its image file (absolute path, size, mtime); a cache folder by everything else the maps
depend on: backbone name, a hash of the backbone's weights, image size, normalisation, DATA.intensity, and
the image cache the pixels come from. Layout: `cache_root()/features/<backbone>-<key hash>/` holds
`meta.json` (the key spelled out, the map shapes and the names of the current `maps-<id>.npy`, [N, D]
float32, and `index-<id>.csv`). An entry whose file changed is computed again; a write makes a new
generation beside the old one and switches to it by replacing meta.json in one rename, so a killed write
leaves the old cache as it was (the next write removes its leftovers). One writer at a time per folder
(under DDP, rank 0).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from hybridmednet.checkpoint import weights_hash
from hybridmednet.config import Config
from hybridmednet.data.datasets import ChestXrayDataset
from hybridmednet.data.synthetic import cache_root
from hybridmednet.data.transforms import build_transforms, normalization
from hybridmednet.errors import ConfigError, DataError
from hybridmednet.models.hybrid import HybridMedNet

FORMAT = 1
AUGMENTATION_KEYS = ('use_albumentations', 'horizontal_flip')  # the DATA keys that ask for random augmentation
Shapes = list[tuple[int, ...]]


def check_config(config: Config) -> None:
    """TRAIN.feature_cache only where every epoch would see the same maps: one line naming the key otherwise."""
    if not config.TRAIN['feature_cache']:
        return
    data, mode = config.DATA, config.MODEL['finetune']
    if mode != 'linear':
        raise ConfigError(
            f'TRAIN.feature_cache = true needs MODEL.finetune = linear (a frozen backbone), not {mode}: '
            'a backbone that trains changes its maps every step'
        )
    for key in AUGMENTATION_KEYS:
        if data[key]:
            raise ConfigError(
                f'TRAIN.feature_cache = true trains without random augmentation, but DATA.{key} = true '
                'augments every epoch; set one of them false'
            )
    if data['skip_bad_images']:
        raise ConfigError(
            'TRAIN.feature_cache = true keys maps by image file, and DATA.skip_bad_images = true serves a '
            "neighbour's image for a bad one; find bad files with `hybridmednet check-data` and set it false"
        )
    if data.get('spatial_dims', 2) != 2:
        raise ConfigError('TRAIN.feature_cache = true caches 2D images; set it false for volumes (DATA.spatial_dims=3)')


class FromMaps(nn.Module):
    """A HybridMedNet run from its backbone's maps, flattened and concatenated per image as the cache stores them."""

    def __init__(self, model: HybridMedNet, shapes: Shapes):
        super().__init__()
        self.model = model
        self.shapes = shapes

    def forward_features(self, flat: torch.Tensor) -> list[torch.Tensor]:
        parts = flat.split([math.prod(s) for s in self.shapes], 1)
        return self.model.attention([p.reshape(-1, *s) for p, s in zip(parts, self.shapes)])

    def forward(self, flat: torch.Tensor, return_coarse: bool = False):
        return self.model.forward_head(self.forward_features(flat), return_coarse)


class CachedMaps(Dataset):
    """Items are (maps FloatTensor[D], target, mask): a dataset's images replaced by their cached maps."""

    def __init__(self, source: ChestXrayDataset, maps_file: Path, rows: np.ndarray):
        self.records, self.labels, self.mask = source.records, source.labels, source.mask
        self.source = source  # the images themselves, for passes the maps cannot serve (the heatmap reference)
        self.class_names = source.class_names
        self.maps_file, self.rows = maps_file, rows
        self._maps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        """DataLoader workers open the memory map themselves."""
        return {**self.__dict__, '_maps': None}

    def __getitem__(self, i: int):
        if self._maps is None:
            self._maps = np.load(self.maps_file, mmap_mode='r')
        maps = torch.from_numpy(np.array(self._maps[self.rows[i]]))
        return maps, torch.from_numpy(self.labels[i]), torch.from_numpy(self.mask[i])


class FeatureCache:
    """One cache folder (module docstring): its current entries, and writing a new generation."""

    def __init__(self, root: Path, key: dict[str, Any]):
        self.root, self.key = root, key
        self.meta: dict[str, Any] = {}
        self.index: dict[tuple[str, int, int], int] = {}  # (path, size, mtime_ns) -> row
        self._load()

    def _load(self) -> None:
        """The entries meta.json describes; none when it is missing, of another key, or does not match its files."""
        try:
            meta = json.loads((self.root / 'meta.json').read_text())
            if meta.get('format') != FORMAT or meta.get('key') != self.key:
                return
            index = pd.read_csv(self.root / meta['index'], dtype={'path': str}, keep_default_na=False)
            maps = np.load(self.root / meta['maps'], mmap_mode='r')
        except (OSError, ValueError, KeyError):
            return
        if maps.shape != (meta['count'], meta['dim']) or maps.dtype != np.float32 or len(index) != meta['count']:
            return
        self.meta = meta
        self.index = {(p, int(s), int(t)): row for row, (p, s, t) in enumerate(index.itertuples(index=False))}

    @property
    def maps_file(self) -> Path:
        return self.root / self.meta['maps']

    @property
    def shapes(self) -> Shapes:
        return [tuple(s) for s in self.meta['shapes']]

    def update(
        self,
        paths: list[str],
        dataset: Dataset,
        backbone: nn.Module,
        device: torch.device,
        batch_size: int,
        workers: int,
    ) -> tuple[np.ndarray, int]:
        """(the cache row of each image, how many were computed now): the maps of images not cached, or changed
        since, are computed and written as a new generation. Item i of `dataset` is the image at paths[i]."""
        keys = [_file_key(p) for p in paths]
        missing = [i for i, k in enumerate(keys) if k not in self.index]
        if missing:
            self._write(keys, missing, dataset, backbone, device, batch_size, workers)
        return np.array([self.index[k] for k in keys], dtype=np.int64), len(missing)

    def _write(
        self,
        keys: list[tuple[str, int, int]],
        missing: list[int],
        dataset: Dataset,
        backbone: nn.Module,
        device: torch.device,
        batch_size: int,
        workers: int,
    ) -> None:
        current, paths = set(keys), {path for path, _, _ in keys}
        kept = [k for k in self.index if k in current or k[0] not in paths]  # a changed file's old entry goes
        new = list(dict.fromkeys(keys[i] for i in missing))
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one computation per file
        todo = [first[k] for k in new]
        self.root.mkdir(parents=True, exist_ok=True)
        tag = secrets.token_hex(4)
        maps_file, index_file, meta_file = (self.root / f'{n}-{tag}.{e}' for n, e in _GENERATION)
        loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, num_workers=workers)
        out: np.memmap | None = None
        shapes: list[list[int]] = []
        row = len(kept)
        backbone.eval()
        with torch.no_grad():
            for images, _, _ in loader:
                maps = backbone(images.to(device))
                flat = torch.cat([m.float().flatten(1) for m in maps], 1).cpu().numpy()
                if out is None:
                    shapes += [list(m.shape[1:]) for m in maps]  # the key fixes them: kept rows have the same
                    shape = (len(kept) + len(new), flat.shape[1])
                    out = np.lib.format.open_memmap(maps_file, mode='w+', dtype=np.float32, shape=shape)
                    if kept:
                        old = np.load(self.maps_file, mmap_mode='r')
                        for start in range(0, len(kept), 32):
                            chunk = kept[start : start + 32]
                            out[start : start + len(chunk)] = old[[self.index[k] for k in chunk]]
                        del old
                out[row : row + len(flat)] = flat
                row += len(flat)
        assert out is not None  # `missing` is not empty
        out.flush()
        del out
        entries = kept + new
        pd.DataFrame(entries, columns=['path', 'size', 'mtime_ns']).to_csv(index_file, index=False)
        meta = {
            'format': FORMAT,
            'key': self.key,
            'count': len(entries),
            'dim': sum(math.prod(s) for s in shapes),
            'shapes': shapes,
            'maps': maps_file.name,
            'index': index_file.name,
        }
        meta_file.write_text(json.dumps(meta, indent=1))
        os.replace(meta_file, self.root / 'meta.json')  # the one step that switches readers to the new generation
        for name, ext in _GENERATION:  # earlier generations and killed writes; mapped files stay readable
            for f in self.root.glob(f'{name}-*.{ext}'):
                if f.name not in (maps_file.name, index_file.name):
                    f.unlink(missing_ok=True)
        self.meta = meta
        self.index = {k: row for row, k in enumerate(entries)}


_GENERATION = (('maps', 'npy'), ('index', 'csv'), ('meta', 'json'))


def _file_key(path: str) -> tuple[str, int, int]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise DataError(f'{path}: {exc.strerror}') from None
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def cache_key(config: Config, weights: str, dataset: ChestXrayDataset) -> dict[str, Any]:
    """Everything an image's maps depend on besides the image file; `weights`: the backbone's weights_hash."""
    image_cache = dataset._cache  # the pixels' source: the image cache (resampled, quantised) or the files
    mean, std = normalization(config)
    return {
        'backbone': config.MODEL['backbone'],
        'weights': weights,
        'image_size': config.DATA['image_size'],
        'mean': mean,
        'std': std,
        'intensity': config.DATA['intensity'],
        'image_cache': None if image_cache is None else str(image_cache.root / image_cache.meta['images']),
    }


def cache_features(
    config: Config,
    model: nn.Module,
    datasets: dict[str, Dataset],
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[dict[str, Dataset], Shapes]:
    """The train and val datasets with their images replaced by cached backbone maps, and the maps' shapes.

    Computing the maps draws nothing from the random streams, so a run with the cache draws its dropout
    masks exactly as one without."""
    if not isinstance(model, HybridMedNet):
        raise ConfigError(f'TRAIN.feature_cache needs a HybridMedNet, not a {type(model).__name__}')
    cached = dict(datasets)
    sources: dict[str, ChestXrayDataset] = {}
    groups: dict[str, list[str]] = {}  # the splits by cache key
    weights = weights_hash(model.backbone.state_dict())
    for split in ('train', 'val'):
        given = datasets[split]
        if not isinstance(given, ChestXrayDataset):
            raise ConfigError(
                f'TRAIN.feature_cache needs image datasets read from files, not a {type(given).__name__} ({split})'
            )
        source = copy.copy(given)
        source.transform, source.epoch_seed = build_transforms(config, train=False), None
        sources[split] = source
        groups.setdefault(json.dumps(cache_key(config, weights, source), sort_keys=True), []).append(split)
    for text, splits in groups.items():  # one write per cache folder: a second would unlink the first's files
        key = json.loads(text)
        cache = FeatureCache(
            cache_root() / 'features' / f'{key["backbone"]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}', key
        )
        parts = [sources[s] for s in splits]
        with torch.random.fork_rng(devices=[]):  # the DataLoader draws a seed from torch's stream
            rows, computed = cache.update(
                [p for part in parts for p in part.records['path']],
                ConcatDataset(parts),
                model.backbone,
                device,
                config.TRAIN['batch_size'],
                config.DATA['num_workers'],
            )
        log(
            f'feature cache ({" + ".join(splits)}): {len(rows) - computed} of {len(rows)} images cached, '
            f'{computed} computed, {cache.meta["dim"] * 4 / 2**20:.2f} MiB each, in {cache.root}'
        )
        for split, part in zip(splits, np.split(rows, np.cumsum([len(p) for p in parts])[:-1])):
            cached[split] = CachedMaps(sources[split], cache.maps_file, part)
    return cached, cache.shapes
