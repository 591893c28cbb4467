"""Datasets: NIH ChestX-ray14, CheXpert, a generic CSV, folder-per-class and MedMNIST-3D, one Dataset class.

Each format has one `index_*` function turning the files as published into a
`DataIndex` (records, labels, mask, class names, split per row). `ChestXrayDataset`
then serves `(image [3, S, S], target [K], mask [K])` for any of them; `VolumeDataset`
is the same class reading volumes (DATA.spatial_dims=3: the CSV layout with a NIfTI file or
DICOM series folder per row, or MedMNIST-3D) and serves `(volume [1, D, H, W], target, mask)`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from hybridmednet.config import NIH_FINDINGS, SAMPLE_DATA_DIRS, Config
from hybridmednet.data.cache import ImageCache, open_cache
from hybridmednet.data.io import IMAGE_SUFFIXES, read_image
from hybridmednet.data.splits import SPLITS, official_split, patient_leaks, patient_split
from hybridmednet.data.synthetic import cached_sample_dataset
from hybridmednet.data.synthetic_volumes import cached_sample_volumes
from hybridmednet.data.transforms import build_transforms
from hybridmednet.data.volumes import read_medmnist, read_volume, require_3d
from hybridmednet.errors import DataError, ImageReadError

log = logging.getLogger(__name__)

CHEXPERT_OBSERVATIONS = [
    'No Finding',
    'Enlarged Cardiomediastinum',
    'Cardiomegaly',
    'Lung Opacity',
    'Lung Lesion',
    'Edema',
    'Consolidation',
    'Pneumonia',
    'Atelectasis',
    'Pneumothorax',
    'Pleural Effusion',
    'Pleural Other',
    'Fracture',
    'Support Devices',
]
NIH_CSV_NAMES = ('Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv')
NO_FINDING = 'No Finding'


@dataclass
class DataIndex:
    """A dataset as indexed: one row per image, `split` in train/val/test ('' = left out)."""

    records: pd.DataFrame  # path, patient_id, split, [view, sex, age]
    labels: np.ndarray  # float32 [N, K]
    mask: np.ndarray  # float32 [N, K], 0 = label unknown (ignored by the loss)
    class_names: list[str]
    source: str  # the file the labels came from, for messages
    data_dir: Path  # the data folder, resolved once (the sample dataset's cache folder too)

    def subset(self, keep: np.ndarray) -> DataIndex:
        return DataIndex(
            self.records[keep].reset_index(drop=True),
            self.labels[keep],
            self.mask[keep],
            self.class_names,
            self.source,
            self.data_dir,
        )


# -- labels ------------------------------------------------------------------------
def parse_labels(texts: pd.Series, class_names: Sequence[str], source: str, ignore: Sequence[str] = ()) -> np.ndarray:
    """'|'-joined label strings -> multi-hot [N, K]. 'No Finding' or blank = all zero.

    A label neither in `class_names` nor in `ignore` is an error naming it and its line.
    """
    position = {name: i for i, name in enumerate(class_names)}
    exploded = texts.reset_index(drop=True).fillna('').astype(str).str.split('|').explode().str.strip()
    exploded = exploded[(exploded != '') & (exploded != NO_FINDING) & ~exploded.isin(list(ignore))]
    codes = exploded.map(position)
    unknown = exploded[codes.isna()]
    if len(unknown):
        raise DataError(
            f'{source}: line {int(unknown.index[0]) + 2}: unknown label {unknown.iloc[0]!r}; '
            f'class names are: {", ".join(class_names)}'
        )
    labels = np.zeros((len(texts), len(class_names)), dtype=np.float32)
    labels[codes.index.to_numpy(dtype=np.int64), codes.to_numpy(dtype=np.int64)] = 1.0
    return labels


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f'labels file not found: {path}')
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f'{path}: missing column(s) {", ".join(map(repr, missing))}; found {", ".join(map(repr, frame.columns))}'
        )
    return frame


def _labels_file(config: Config, data_dir: Path, defaults: Sequence[str]) -> Path:
    name = config.DATA['labels_file']
    if name:
        path = Path(name)
        return path if path.is_absolute() else data_dir / path
    for default in defaults:
        if (data_dir / default).is_file():
            return data_dir / default
    raise DataError(
        f'no labels file in {data_dir}: expected {" or ".join(defaults)} '
        f'(or set DATA.labels_file){_layout_hint(config, data_dir)}'
    )


def guess_dataset_kind(data_dir: Path) -> str | None:
    """The DATA.dataset a folder's layout looks like, from the files the indexers read."""
    if any((data_dir / name).is_file() for name in NIH_CSV_NAMES):
        return 'nih'
    if (data_dir / 'train.csv').is_file() and (data_dir / 'valid.csv').is_file():
        return 'chexpert'
    if (data_dir / 'labels.csv').is_file():
        return 'csv'
    if any(
        d.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())
        for d in data_dir.iterdir()
        if not d.name.startswith('.')
    ):
        return 'folder'
    return None


def _layout_hint(config: Config, data_dir: Path) -> str:
    kind = guess_dataset_kind(data_dir)
    if kind is None or kind == config.DATA['dataset']:
        return ''
    return f'; {data_dir} looks like a {kind!r} layout: set DATA.dataset={kind} (docs/datasets.md)'


def _fractions(config: Config) -> tuple[float, float, float]:
    train, val, test = (float(config.DATA[k]) for k in ('train_split', 'val_split', 'test_split'))
    return train, val, test


def _age(values: pd.Series) -> np.ndarray:
    """'58', '058Y' (early NIH releases) or '' -> float years (NaN when absent)."""
    return pd.to_numeric(values.astype(str).str.extract(r'(\d+(?:\.\d+)?)')[0], errors='coerce').to_numpy()


# -- NIH ChestX-ray14 ------------------------------------------------------------------
def _nih_image_paths(data_dir: Path, names: pd.Series) -> np.ndarray:
    """Find each image under images/ or images_001/images/ ... images_012/images/ (one listing per folder)."""
    folders = [data_dir / 'images'] + sorted(data_dir.glob('images_*/images'))
    where: dict[str, str] = {}
    for folder in folders:
        if folder.is_dir():
            for entry in os.scandir(folder):
                where.setdefault(entry.name, entry.path)
    default = str(data_dir / 'images')
    return np.array([where.get(n, os.path.join(default, n)) for n in names], dtype=object)


def index_nih(config: Config, data_dir: Path) -> DataIndex:
    csv = _labels_file(config, data_dir, NIH_CSV_NAMES)
    try:
        frame = _read_csv(csv, ['Image Index', 'Finding Labels', 'Patient ID'])
    except DataError as exc:
        raise DataError(f'{exc}{_layout_hint(config, data_dir)}') from None
    class_names = config.class_names
    labels = parse_labels(
        frame['Finding Labels'], class_names, str(csv), ignore=[n for n in NIH_FINDINGS if n not in class_names]
    )
    records = pd.DataFrame(
        {
            'path': _nih_image_paths(data_dir, frame['Image Index']),
            'patient_id': frame['Patient ID'].str.strip().to_numpy(),
        }
    )
    if 'View Position' in frame:
        records['view'] = frame['View Position'].str.strip().to_numpy()
    if 'Patient Gender' in frame:
        records['sex'] = frame['Patient Gender'].str.strip().to_numpy()
    if 'Patient Age' in frame:
        records['age'] = _age(frame['Patient Age'])
    lists = [csv.parent / 'train_val_list.txt', csv.parent / 'test_list.txt']
    if all(p.is_file() for p in lists):
        train_val, test = ({line.strip() for line in p.read_text().splitlines() if line.strip()} for p in lists)
        train, val, _ = _fractions(config)
        records['split'] = official_split(
            frame['Image Index'],
            records['patient_id'],
            train_val,
            test,
            val / (train + val) if train + val > 0 else 0.0,
            config.DATA['split_seed'],
        )
    else:
        records['split'] = patient_split(records['patient_id'], _fractions(config), config.DATA['split_seed'])
    return DataIndex(records, labels, np.ones_like(labels), class_names, str(csv), data_dir)


# -- CheXpert ------------------------------------------------------------------------
def index_chexpert(config: Config, data_dir: Path) -> DataIndex:
    """train.csv is split by patient into train/val; the official valid.csv is the test set."""
    class_names = list(config.DATA['class_names'] or CHEXPERT_OBSERVATIONS)
    policy = config.DATA['uncertainty']
    parts = []
    for name in ('train.csv', 'valid.csv'):
        csv = data_dir / name
        frame = _read_csv(csv, ['Path', *class_names])
        values = frame[class_names].apply(lambda c: c.str.strip())
        known = values.isin(['1', '0', '-1', '1.0', '0.0', '-1.0', ''])
        if not known.to_numpy().all():
            row, col = np.argwhere(~known.to_numpy())[0]
            raise DataError(
                f'{csv}: line {row + 2}, column {class_names[col]!r}: value '
                f'{values.iat[row, col]!r} is not 1, 0, -1 or blank'
            )
        raw = values.replace('', '0').astype(float).to_numpy(dtype=np.float32)
        mask = np.ones_like(raw)
        uncertain = raw == -1
        raw[uncertain] = 1.0 if policy == 'ones' else 0.0
        if policy == 'ignore':
            mask[uncertain] = 0.0
        paths = frame['Path'].str.strip()
        # Paths start with the release folder (CheXpert-v1.0-small/train/...): resolve from its parent.
        prefix = paths.iloc[0].split('/')[0] if len(paths) else ''
        root = data_dir.parent if prefix == data_dir.name else data_dir
        records = pd.DataFrame(
            {
                'path': [os.path.join(root, p) for p in paths],
                'patient_id': paths.str.extract(r'(patient\d+)')[0].fillna(paths).to_numpy(),
            }
        )
        if 'AP/PA' in frame:
            records['view'] = frame['AP/PA'].str.strip().to_numpy()
        if 'Frontal/Lateral' in frame:
            records['frontal'] = (frame['Frontal/Lateral'].str.strip() == 'Frontal').to_numpy()
        if 'Sex' in frame:
            records['sex'] = frame['Sex'].str.strip().to_numpy()
        if 'Age' in frame:
            records['age'] = _age(frame['Age'])
        if name == 'train.csv':
            train, val, _ = _fractions(config)
            records['split'] = patient_split(records['patient_id'], (train, val, 0.0), config.DATA['split_seed'])
        else:
            records['split'] = 'test'
        parts.append((records, raw, mask))
    index = DataIndex(
        pd.concat([p[0] for p in parts], ignore_index=True),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
        class_names,
        str(data_dir / 'train.csv'),
        data_dir,
    )
    if config.DATA['frontal_only']:
        if 'frontal' not in index.records:
            raise DataError(f"DATA.frontal_only is set but {index.source} has no 'Frontal/Lateral' column")
        index = index.subset(index.records['frontal'].to_numpy(dtype=bool))
    return index


# -- generic CSV ---------------------------------------------------------------------
def index_csv(config: Config, data_dir: Path) -> DataIndex:
    """`image,labels[,patient_id][,split][,view,sex,age]`; image paths relative to data_dir."""
    csv = _labels_file(config, data_dir, ('labels.csv',))
    frame = _read_csv(csv, ['image', 'labels'])
    class_names = config.DATA['class_names']
    if not class_names:
        seen = frame['labels'].str.split('|').explode().str.strip()
        class_names = sorted(set(seen) - {'', NO_FINDING})
    labels = parse_labels(frame['labels'], class_names, str(csv))
    records = pd.DataFrame({'path': [os.path.join(data_dir, p.strip()) for p in frame['image']]})
    if 'patient_id' in frame:
        records['patient_id'] = frame['patient_id'].str.strip().to_numpy()
    else:
        log.warning('%s has no patient_id column: each image is treated as its own patient', csv)
        records['patient_id'] = frame['image'].str.strip().to_numpy()
    for column in ('view', 'sex'):
        if column in frame:
            records[column] = frame[column].str.strip().to_numpy()
    if 'age' in frame:
        records['age'] = _age(frame['age'])
    if 'split' in frame:
        split = frame['split'].str.strip()
        bad = ~split.isin(SPLITS)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f'{csv}: line {row + 2}: split {split.iat[row]!r} is not one of train, val, test')
        records['split'] = split.to_numpy()
    else:
        records['split'] = patient_split(records['patient_id'], _fractions(config), config.DATA['split_seed'])
    return DataIndex(records, labels, np.ones_like(labels), list(class_names), str(csv), data_dir)


# -- folder per class ----------------------------------------------------------------
def index_folder(config: Config, data_dir: Path) -> DataIndex:
    """data_dir/<class>/<image> (single label), or data_dir/{train,val,test}/<class>/<image>."""
    given = [s for s in SPLITS if (data_dir / s).is_dir()]
    roots = [(data_dir / s, s) for s in given] if 'train' in given else [(data_dir, '')]
    class_names = config.DATA['class_names'] or sorted(
        {d.name for root, _ in roots for d in root.iterdir() if d.is_dir()}
    )
    position = {name: i for i, name in enumerate(class_names)}
    paths, codes, splits = [], [], []
    for root, split in roots:
        for folder in sorted(d for d in root.iterdir() if d.is_dir()):
            if folder.name not in position:
                raise DataError(
                    f'{folder}: folder {folder.name!r} is not a class name; class names are: {", ".join(class_names)}'
                )
            files = sorted(f for f in folder.rglob('*') if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += [str(f) for f in files]
            codes += [position[folder.name]] * len(files)
            splits += [split] * len(files)
    if not paths:
        raise DataError(f'{data_dir}: no images found in class folders')
    labels = np.zeros((len(paths), len(class_names)), dtype=np.float32)
    labels[np.arange(len(paths)), codes] = 1.0
    records = pd.DataFrame({'path': paths, 'patient_id': paths, 'split': splits})
    if roots[0][1] == '':
        log.warning(
            '%s: class folders carry no patient IDs: each image is treated as its own patient, so '
            'images of one patient may land in two splits (use DATA.dataset=csv with a patient_id '
            'column to split by patient)',
            data_dir,
        )
        records['split'] = patient_split(records['patient_id'], _fractions(config), config.DATA['split_seed'])
    return DataIndex(records, labels, np.ones_like(labels), list(class_names), str(data_dir), data_dir)


# -- MedMNIST-3D -----------------------------------------------------------------------
def index_medmnist3d(config: Config, data_dir: Path) -> DataIndex:
    """A MedMNIST-3D .npz (DATA.labels_file, else the one .npz in data_dir) with its published
    train/val/test splits. Class numbers become one column per class; MedMNIST publishes no patient
    IDs, so each volume is its own patient (the published splits are kept as they are)."""
    if config.DATA['labels_file']:
        npz = _labels_file(config, data_dir, ())
    else:
        found = sorted(data_dir.glob('*.npz'))
        if len(found) != 1:
            names = f' ({", ".join(f.name for f in found)})' if found else ''
            raise DataError(
                f'{data_dir}: expected one MedMNIST .npz file, found {len(found)}{names}; set DATA.labels_file'
            )
        npz = found[0]
    arrays = read_medmnist(str(npz))
    given = config.DATA['class_names']
    multi_hot = arrays['train'][1].shape[1] > 1  # [N, K] 0/1 columns, else [N, 1] class numbers
    if multi_hot:
        k = arrays['train'][1].shape[1]
    else:
        k = len(given) if given else 1 + max(int(raw.max()) for _, raw in arrays.values())
    parts = []
    for split, (_, raw) in arrays.items():
        valid = raw.shape[1] == k and np.isin(raw, (0, 1)).all() if multi_hot else ((raw >= 0) & (raw < k)).all()
        if not valid:
            raise DataError(
                f'{npz}: {split}_labels hold values other than {"0/1" if multi_hot else f"0..{k - 1}"} '
                f'({k} classes{", as DATA.class_names names" if given else ""})'
            )
        labels = raw.astype(np.float32) if multi_hot else np.eye(k, dtype=np.float32)[raw[:, 0]]
        rows = np.arange(len(raw))
        records = pd.DataFrame(
            {'path': str(npz), 'row': rows, 'split': split, 'patient_id': [f'{split}-{r}' for r in rows]}
        )
        parts.append((records, labels))
    class_names = list(given or [str(c) for c in range(k)])
    if len(class_names) != k:
        raise DataError(f'{npz}: the labels have {k} classes but DATA.class_names has {len(class_names)} names')
    labels = np.concatenate([p[1] for p in parts])
    return DataIndex(
        pd.concat([p[0] for p in parts], ignore_index=True),
        labels,
        np.ones_like(labels),
        class_names,
        str(npz),
        data_dir,
    )


INDEXERS: dict[str, Callable[[Config, Path], DataIndex]] = {
    'nih': index_nih,
    'chexpert': index_chexpert,
    'csv': index_csv,
    'folder': index_folder,
    'medmnist3d': index_medmnist3d,
}


def is_sample(config: Config) -> bool:
    return config.DATA['data_dir'] in SAMPLE_DATA_DIRS


# Keys only some kinds read, with the kinds that read them; set for another kind they are refused.
KIND_KEYS = {
    'labels_file': ('nih', 'csv', 'medmnist3d'),
    'frontal_only': ('chexpert',),
    'uncertainty': ('chexpert',),
}


def resolve_data_dir(config: Config) -> Path:
    """DATA['data_dir'], or the built-in sample dataset of images or volumes (DATA.spatial_dims),
    generated into a cache folder on first use."""
    if not is_sample(config):
        path = Path(config.DATA['data_dir'])
        if not path.is_dir():
            raise DataError(f'DATA.data_dir {str(path)!r} is not a directory')
        return path
    n, side = config.DATA['sample_size'], config.DATA['sample_image_size']
    if config.DATA['spatial_dims'] == 3:
        return cached_sample_volumes(n or 400, side or 48)
    return cached_sample_dataset(n or 2000, side or 256)


def _check_kind_keys(config: Config, dataset: str) -> None:
    """A key the dataset kind would not read is an error, not silently ignored."""
    for key, kinds in KIND_KEYS.items():
        if dataset not in kinds and config.DATA[key] != Config.DATA[key]:
            raise DataError(
                f'DATA.{key} is set to {config.DATA[key]!r} but DATA.dataset={dataset} does not use '
                f'it (only {", ".join(kinds)} do); remove it from the config'
            )


def build_index(config: Config) -> DataIndex:
    """Index the configured dataset: labels, masks, patient-level splits, view filter applied."""
    data_dir = resolve_data_dir(config)
    sample_kind = 'csv' if config.DATA['spatial_dims'] == 3 else 'nih'  # the layouts the sample datasets use
    dataset = sample_kind if is_sample(config) else config.DATA['dataset']
    _check_kind_keys(config, dataset)
    index = INDEXERS[dataset](config, data_dir)
    views = config.DATA['view_positions']
    if views:
        if 'view' not in index.records:
            raise DataError(f'DATA.view_positions is set but {index.source} has no view column')
        index = index.subset(index.records['view'].isin(views).to_numpy())
    return index


# -- the Dataset ---------------------------------------------------------------------
class ChestXrayDataset(Dataset):
    """Items are (image FloatTensor[3, S, S], target FloatTensor[K], mask FloatTensor[K])."""

    read_errors: tuple[type[Exception], ...] = (ImageReadError,)  # what skip_bad_images skips

    def __init__(
        self,
        index: DataIndex,
        transform: Callable[[np.ndarray], torch.Tensor],
        cache: ImageCache | None = None,
        skip_bad_images: bool = False,
        intensity: str | int = 'auto',
    ):
        self.records = index.records
        self.labels = index.labels
        self.mask = index.mask
        self.class_names = index.class_names
        self.data_dir = index.data_dir
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.intensity = intensity
        self.bad_files: list[str] = []  # filled when skipping (per process: each worker keeps its own)
        self.epoch_seed: int | None = None  # set_epoch: random augmentation as a function of (seed, image)
        self._cache = cache
        self._cache_rows = cache.rows(self.records['path']) if cache is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch_seed: int) -> None:
        """Draw each image's augmentation from (epoch_seed, index) rather than from the process's random
        stream: what a worker serves no longer depends on how many workers there are or where a run
        resumed, so a run resumed mid-epoch repeats the uninterrupted one exactly."""
        self.epoch_seed = epoch_seed

    def _transform(self, image: np.ndarray, i: int) -> torch.Tensor:
        if self.epoch_seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.epoch_seed * 1_000_003 + i)
            return self.transform(image)

    def load_image(self, i: int) -> np.ndarray:
        """Float [H, W] in [0, 1]: from the memory-mapped cache when it holds the image, else the file."""
        if self._cache is not None and self._cache_rows is not None and self._cache_rows[i] >= 0:
            return self._cache.image(int(self._cache_rows[i]))
        return read_image(self.records['path'].iat[i], intensity=self.intensity)

    def __getitem__(self, i: int):
        for j in range(i, i + len(self)):
            j %= len(self)
            try:
                image = self.load_image(j)
            except self.read_errors as exc:
                if not self.skip_bad_images:
                    raise
                self.bad_files.append(str(exc))
                log.warning('skipping bad image (%d so far in this process): %s', len(self.bad_files), exc)
                continue
            return self._transform(image, j), torch.from_numpy(self.labels[j]), torch.from_numpy(self.mask[j])
        raise ImageReadError('every image in the dataset failed to read')


class VolumeDataset(ChestXrayDataset):
    """Items are (volume FloatTensor[1, D, H, W], target FloatTensor[K], mask FloatTensor[K]): the same
    dataset with the volume reader. A series that does not form a volume (DataError) is skipped like an
    unreadable file when DATA.skip_bad_images is set."""

    read_errors = (ImageReadError, DataError)

    def __init__(
        self,
        index: DataIndex,
        transform: Callable[[np.ndarray], torch.Tensor],
        skip_bad_images: bool = False,
        spacing: list[float] | None = None,
        window: list[float] | None = None,
    ):
        super().__init__(index, transform, None, skip_bad_images)
        self.spacing = spacing
        self.window = window

    def load_image(self, i: int) -> np.ndarray:
        """Float [D, H, W] in [0, 1]: a row of a MedMNIST .npz (uint8 / 255), else read_volume."""
        path = self.records['path'].iat[i]
        if 'row' in self.records:
            images = read_medmnist(path)[self.records['split'].iat[i]][0]
            return images[int(self.records['row'].iat[i])].astype(np.float32) / 255.0
        return read_volume(path, spacing=self.spacing, window=self.window).array


def build_datasets(config: Config, use_cache: bool = True) -> dict[str, ChestXrayDataset]:
    """{'train', 'val', 'test'} datasets for the configured data, with their transforms.

    `use_cache=False` reads every image from its file, as predict does: the cache's pixels are resampled
    once more and quantised, which is fine for training but would make evaluate's probabilities differ
    from predict's on the same file. Volumes (DATA.spatial_dims=3) are always read from their files."""
    volumes = config.DATA['spatial_dims'] == 3
    if volumes:
        require_3d()
    index = build_index(config)
    leaks = patient_leaks(index.records['patient_id'], index.records['split'])
    if leaks:
        patient, where = next(iter(leaks.items()))
        raise DataError(
            f'{index.source}: {len(leaks)} patient(s) have images in more than one split, '
            f'e.g. patient {patient!r} in {" and ".join(where)}'
        )
    cache = open_cache(config, index.data_dir) if use_cache and not volumes else None
    index = _drop_missing(index, cache, config.DATA['skip_bad_images'])
    if volumes:
        return {
            split: VolumeDataset(
                index.subset((index.records['split'] == split).to_numpy()),
                build_transforms(config, train=split == 'train'),
                config.DATA['skip_bad_images'],
                config.DATA['spacing'],
                config.DATA['intensity_window'],
            )
            for split in SPLITS
        }
    return {
        split: ChestXrayDataset(
            index.subset((index.records['split'] == split).to_numpy()),
            build_transforms(config, train=split == 'train'),
            cache,
            config.DATA['skip_bad_images'],
            config.DATA['intensity'],
        )
        for split in SPLITS
    }


def _drop_missing(index: DataIndex, cache: ImageCache | None, skip: bool) -> DataIndex:
    """Missing files fail now, with a count and an example, not at epoch 3 (or are dropped when skipping)."""
    paths = index.records['path']
    present = cache.rows(paths) >= 0 if cache is not None else np.zeros(len(paths), dtype=bool)
    present[~present] = [os.path.exists(p) for p in paths[~present]]  # files the cache holds are not touched
    if present.all():
        return index
    missing = index.records['path'][~present]
    if not skip:
        raise DataError(
            f'{len(missing)} image file(s) listed in {index.source} are missing, e.g. '
            f'{missing.iloc[0]}; set DATA.skip_bad_images=true to leave them out'
        )
    log.warning(
        '%d image file(s) listed in %s are missing and left out, e.g. %s', len(missing), index.source, missing.iloc[0]
    )
    return index.subset(present)


# -- class imbalance -----------------------------------------------------------------
def positive_counts(dataset: ChestXrayDataset) -> np.ndarray:
    """Positives per class among labels that count (mask 1)."""
    return (dataset.labels * dataset.mask).sum(axis=0)


def compute_pos_weight(dataset: ChestXrayDataset) -> torch.Tensor:
    """BCE pos_weight = negatives / positives per class, from this (training) split.

    A class with no positives gets negatives / 1: it has no positive terms to weight anyway.
    """
    pos = positive_counts(dataset)
    neg = ((1.0 - dataset.labels) * dataset.mask).sum(axis=0)
    return torch.tensor(neg / np.maximum(pos, 1.0), dtype=torch.float32)


def make_weighted_sampler(dataset: ChestXrayDataset, seed: int | None = None) -> WeightedRandomSampler:
    """Draw images so that each class (and 'no finding') is seen about equally often.

    An image's weight is that of its rarest positive class (1 / positives), and
    1 / (images without findings) for an image with none.
    """
    labels = dataset.labels * dataset.mask
    inverse = 1.0 / np.maximum(labels.sum(axis=0), 1.0)
    weights = (labels * inverse).max(axis=1)
    empty = labels.sum(axis=1) == 0
    weights[empty] = 1.0 / max(int(empty.sum()), 1)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return WeightedRandomSampler(
        # torch annotates `weights: Sequence[float]`, but the sampler takes a tensor: it applies torch.as_tensor
        torch.as_tensor(weights, dtype=torch.double),  # type: ignore[arg-type]
        num_samples=len(dataset),
        replacement=True,
        generator=generator,
    )
