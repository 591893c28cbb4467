"""Configuration: six plain dicts, validated once, saved inside every checkpoint.

A `Config()` copies the class-level defaults, so editing `config.MODEL[...]` on
one instance never leaks into another. Subclasses (configs/default_config.py)
override sections by redefining the class attributes.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from hybridmednet.errors import ConfigError
from hybridmednet.models.registry import get_backbone_spec

NIH_FINDINGS = [
    'Atelectasis',
    'Cardiomegaly',
    'Effusion',
    'Infiltration',
    'Mass',
    'Nodule',
    'Pneumonia',
    'Pneumothorax',
    'Consolidation',
    'Edema',
    'Emphysema',
    'Fibrosis',
    'Pleural_Thickening',
    'Hernia',
]

SECTIONS = ('MODEL', 'TRAIN', 'DATA', 'LOSS', 'CHECKPOINT', 'LOGGING', 'EVAL')
SHIPPED_CONFIGS = Path(__file__).resolve().parent / 'configs'  # `--config quickstart`
SAMPLE_DATA_DIRS = (None, '', 'sample')  # DATA.data_dir values meaning the built-in sample dataset


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; a learning rate must not be one. A key given
    twice (a section repeated further down a file) is an error, not a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f'{key!r} is given twice; merge the two into one', key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(
        r'^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+'
        r'|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$'
    ),
    list('-+0123456789.'),
)


def parse_value(text: str) -> Any:
    """A command-line or YAML scalar: numbers (1e-4 too), booleans, null, lists, else the string."""
    return yaml.load(text, Loader=_Loader)


class Config:
    MODEL: dict[str, Any] = {
        'backbone': 'convnext_base',
        'use_modern_attention': True,
        'use_cross_scale_attention': True,
        'num_heads': 8,
        'num_classes': 14,
        'pretrained': True,  # True: ImageNet via timm; a path: local weights file
        'fusion_channels': 512,
        'dropout': 0.5,
        'fpn_channels': 256,  # ResNet + FPN only
        'hierarchical': False,
        'num_coarse_classes': 3,
        'coarse_groups': None,  # {group: [finding, ...]}; None -> NIH groups
        'attention_pool_size': 7,  # keys/values pooled to at most this side
        'drop_path_rate': 0.0,
        'finetune': 'full',  # full | linear (backbone frozen, in eval mode) | partial (its last trainable_blocks train)
        'trainable_blocks': None,  # finetune = partial: how many of the backbone's last blocks train
    }
    TRAIN: dict[str, Any] = {
        'batch_size': 32,
        'epochs': 50,
        'learning_rate': 1e-4,
        'weight_decay': 1e-4,
        'lr_scheduler': 'cosine',  # cosine | step | plateau | none
        'warmup_epochs': 5,
        'step_size': 10,  # step scheduler: epochs per decay
        'gamma': 0.1,  # step / plateau decay factor
        'plateau_patience': 3,  # plateau scheduler: epochs without a better val AUC before a cut
        'gradient_accumulation_steps': 1,
        'grad_clip_norm': 1.0,  # 0 disables clipping
        'mixed_precision': True,
        'ema_decay': 0.0,  # 0 disables the weight EMA
        'precise_bn': False,  # recompute BatchNorm statistics on un-augmented training images after each epoch
        'early_stopping_patience': 10,
        'early_stopping_min_delta': 0.0,  # a val AUC gain below this is not an improvement
        'max_bad_steps': 10,  # consecutive NaN/Inf losses or gradients before aborting
        'weighted_sampler': False,
        'seed': 42,
        'device': 'auto',  # auto | cpu | cuda | cuda:N
        'max_steps_per_epoch': None,  # cap for quick runs
        'layer_decay': 1.0,  # layer-wise learning-rate decay over the backbone's blocks, e.g. 0.75; 1.0 = off
        'feature_cache': False,  # finetune linear, no augmentation: backbone maps computed once, then cached
    }
    DATA: dict[str, Any] = {
        'dataset': 'nih',  # nih | chexpert | csv | folder | medmnist3d
        'spatial_dims': 2,  # 2: images; 3: volumes (NIfTI, DICOM series, MedMNIST-3D .npz)
        'volume_size': [64, 64, 64],  # 3D: the D, H, W every volume is fitted into (aspect kept, padded)
        'spacing': None,  # 3D: resample to this voxel size (mm along D, H, W) before fitting; None: as stored
        'intensity_window': None,  # 3D: [low, high] in the file's units (CT: HU) -> [0, 1]; None: percentiles
        'data_dir': None,  # None or 'sample': the built-in synthetic dataset
        'labels_file': None,
        'class_names': None,  # None -> the 14 NIH findings
        'image_size': 224,
        'num_workers': 4,
        'use_albumentations': False,
        'horizontal_flip': False,  # laterality matters in chest X-rays
        'train_split': 0.7,
        'val_split': 0.1,
        'test_split': 0.2,
        'split_seed': 42,
        'view_positions': None,  # e.g. ['PA'] keeps PA views only
        'frontal_only': False,  # CheXpert
        'uncertainty': 'ones',  # CheXpert -1: ones | zeros | ignore
        'mean': None,  # per-channel normalisation; None: the backbone's (set by training)
        'std': None,
        'intensity': 'auto',  # auto (PNG sBIT, else the file's full range) | minmax | bits, e.g. 12
        'skip_bad_images': False,
        'cache_dir': None,  # memory-mapped image cache (hybridmednet cache)
        'sample_size': None,  # built-in sample dataset: images (None: 2000) or volumes (None: 400)
        'sample_image_size': None,  # its side in pixels (None: 256) or voxels (None: 48)
    }
    LOSS: dict[str, Any] = {
        'type': 'bce',  # bce | focal | asymmetric
        'pos_weight': None,  # None | 'auto' | list of K floats
        'focal_gamma': 2.0,
        'asl_gamma_pos': 0.0,
        'asl_gamma_neg': 4.0,
        'asl_clip': 0.05,
        'fine_weight': 1.0,  # hierarchical head
        'coarse_weight': 0.5,
        'consistency_weight': 0.1,
    }
    CHECKPOINT: dict[str, Any] = {
        'dir': 'checkpoints',
        'save_freq': 1,  # epochs between 'last' checkpoints
    }
    LOGGING: dict[str, Any] = {
        'log_dir': 'logs',
        'tensorboard': True,
        'log_freq': 10,  # steps between progress lines
    }
    EVAL: dict[str, Any] = {
        'threshold_method': 'youden',  # youden | f1 | sensitivity
        'target_sensitivity': 0.9,
        'bootstrap_samples': 1000,
        'confidence_level': 0.95,
        'interval': 'percentile',  # percentile | bca (bias-corrected and accelerated)
        'temperature_scaling': False,
        'tta': False,
    }

    def __init__(self, **sections: dict):
        for name in SECTIONS:
            setattr(self, name, copy.deepcopy(getattr(type(self), name)))
        for name, values in sections.items():
            self._section(name).update(values)

    # -- access -----------------------------------------------------------------
    def _section(self, name: str) -> dict:
        if name not in SECTIONS:
            raise ConfigError(f'unknown config section {name!r}{_suggest(name, SECTIONS)}')
        return getattr(self, name)

    def to_dict(self) -> dict[str, dict]:
        """Plain nested dict, safe for JSON and checkpoints."""
        return {name: copy.deepcopy(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, dict]) -> Config:
        config = cls()
        config.update(data)
        return config

    def update(self, data: dict[str, dict]) -> Config:
        for name, values in data.items():
            section = self._section(name)
            if not isinstance(values, dict):
                raise ConfigError(f'config section {name} must be a mapping, got {type(values).__name__}')
            for key, value in values.items():
                _check_key(name, key, section)
                section[key] = value
        return self

    # -- files and command lines ------------------------------------------------
    def merge_yaml(self, path: str | Path) -> Config:
        """Apply a YAML file; a bare name such as `quickstart` is a config shipped with the package."""
        path = Path(path)
        if not path.exists() and (SHIPPED_CONFIGS / f'{path}.yaml').is_file():
            path = SHIPPED_CONFIGS / f'{path}.yaml'
        try:
            data = yaml.load(path.read_text(), Loader=_Loader) or {}
        except FileNotFoundError:
            raise ConfigError(f'config file not found: {path}') from None
        except yaml.YAMLError as exc:
            raise ConfigError(f'config file {path} is not valid YAML: {exc}') from None
        if not isinstance(data, dict):
            raise ConfigError(f'config file {path} must hold a mapping of sections')
        try:
            return self.update(data)
        except ConfigError as exc:
            raise ConfigError(f'{path}: {exc}') from None

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def apply_overrides(self, overrides: Iterable[str]) -> Config:
        """Apply `SECTION.key=value` strings; values are parsed as YAML (1e-4, true, [PA])."""
        for item in overrides:
            dotted, sep, raw = item.partition('=')
            name, dot, key = dotted.partition('.')
            if not sep or not dot:
                raise ConfigError(
                    f'override {item!r} is not of the form SECTION.key=value (e.g. MODEL.backbone=convnext_tiny)'
                )
            self.update(
                {name.upper() if name.upper() in SECTIONS else name: {key: parse_value(raw) if raw != '' else None}}
            )
        return self

    # -- validation ---------------------------------------------------------------
    def validate(self) -> Config:
        """Check every key against its rule (type, range, allowed values) and the keys against each other.

        Values are normalised in place: '~' expanded in paths, a string for a list key read as a
        one-element list, allowed words matched case-insensitively. Raises ConfigError naming the key.
        """
        for name in SECTIONS:
            section = getattr(self, name)
            for key in section:
                _check_key(name, key, getattr(Config, name))
                section[key] = RULES[name][key](f'{name}[{key!r}]', section[key])
        get_backbone_spec(self.MODEL['backbone'])
        splits = [self.DATA[k] for k in ('train_split', 'val_split', 'test_split')]
        self._check_dimensions()
        if self.TRAIN['precise_bn'] and self.TRAIN['ema_decay'] > 0:
            raise ConfigError(
                'TRAIN.precise_bn recomputes the BatchNorm statistics of the live weights, but with '
                'TRAIN.ema_decay > 0 the EMA weights are validated and saved: use one of the two'
            )
        if abs(sum(splits) - 1.0) > 1e-6:
            raise ConfigError(f'DATA train/val/test splits must be non-negative and sum to 1, got {splits}')
        names = self.class_names
        if len(names) != self.MODEL['num_classes']:
            raise ConfigError(
                f"MODEL['num_classes'] is {self.MODEL['num_classes']} but DATA['class_names'] has {len(names)} names"
            )
        weights = self.LOSS['pos_weight']
        if isinstance(weights, list) and len(weights) != len(names):
            raise ConfigError(f"LOSS['pos_weight'] has {len(weights)} values for {len(names)} classes")
        return self

    def _check_dimensions(self) -> None:
        """Keys that only images or only volumes read are refused in the other mode, not ignored."""
        data = self.DATA
        if data['spatial_dims'] == 2:
            if data['dataset'] == 'medmnist3d':
                raise ConfigError(f"DATA['dataset'] = {data['dataset']!r} holds volumes: set DATA.spatial_dims=3")
            for key in VOLUME_KEYS:
                if data[key] != Config.DATA[key]:
                    raise ConfigError(
                        f"DATA['{key}'] = {data[key]!r} applies to volumes: set DATA.spatial_dims=3 or remove it"
                    )
            return
        for key in IMAGE_KEYS:
            if data[key] != Config.DATA[key]:
                raise ConfigError(
                    f"DATA['{key}'] = {data[key]!r} applies to 2D images, not to volumes (DATA.spatial_dims=3): "
                    f'remove it (volumes: DATA.intensity_window, DATA.spacing)'
                )
        if data['data_dir'] in SAMPLE_DATA_DIRS:
            if data['dataset'] == 'medmnist3d':
                raise ConfigError(
                    "DATA['dataset'] = 'medmnist3d' needs DATA.data_dir: the folder of the .npz file "
                    '(or DATA.labels_file: the .npz file)'
                )
            return
        if data['dataset'] not in VOLUME_DATASET_KINDS:
            raise ConfigError(
                f"DATA['dataset'] = {data['dataset']!r} reads 2D images; volumes (DATA.spatial_dims=3) come from "
                f'DATA.dataset {" or ".join(VOLUME_DATASET_KINDS)}'
            )
        if data['dataset'] == 'medmnist3d':
            for key in ('spacing', 'intensity_window'):
                if data[key] is not None:
                    raise ConfigError(
                        f"DATA['{key}'] = {data[key]!r} does not apply to DATA.dataset=medmnist3d: its volumes are "
                        f'published resampled to a cube and as 8-bit values; remove it'
                    )

    @property
    def class_names(self) -> list[str]:
        return list(self.DATA['class_names'] or NIH_FINDINGS)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input [C, *spatial] as the data pipeline makes it: grey images copied to 3 channels,
        volumes with 1 (export and pruning trace the model with it)."""
        if self.DATA['spatial_dims'] == 3:
            return (1, *self.DATA['volume_size'])
        return (3, self.DATA['image_size'], self.DATA['image_size'])

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.to_dict()!r})'


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.5)
    return f'; did you mean {", ".join(map(repr, close))}?' if close else f'; valid: {", ".join(map(repr, choices))}'


def _check_key(section_name: str, key: str, section: dict) -> None:
    if key not in getattr(Config, section_name):
        raise ConfigError(f'unknown key {section_name}[{key!r}]{_suggest(key, section)}')


# -- one rule per key: type, range and allowed values, written once ----------------------------
Rule = Callable[[str, Any], Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nullable(rule: Rule) -> Rule:
    return lambda key, value: None if value is None else rule(key, value)


def integer(low: int | None = None, high: int | None = None) -> Rule:
    def check(key: str, value: Any) -> int:
        if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                'a positive integer'
                if (low, high) == (1, None)
                else f'an integer >= {low}'
                if high is None
                else f'an integer in [{low}, {high}]'
            )
            raise ConfigError(f'{key} must be {bounds}, got {value!r}')
        return value

    return check


def number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    """A float in an interval; '(' / ')' in the message mark open ends."""

    def check(key: str, value: Any) -> float:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        if not ok:
            interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
            raise ConfigError(f'{key} must be a number in {interval}, got {value!r}')
        return float(value)

    return check


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f'{key} must be true or false, got {value!r}')
    return value


def choice(*allowed: str) -> Rule:
    def check(key: str, value: Any) -> str:
        word = value.lower() if isinstance(value, str) else value
        if word not in allowed:
            raise ConfigError(f'{key} = {value!r} is not one of {", ".join(map(repr, allowed))}')
        return word

    return check


def text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f'{key} must be a non-empty string, got {value!r}')
    return value


def path(key: str, value: Any) -> str:
    """A file or folder name; '~' is expanded here, once, for every path key."""
    return os.path.expanduser(text(key, value))


def string_list(key: str, value: Any) -> list[str]:
    """A list of names; one string (`DATA.view_positions=PA`) is a one-element list, not its letters."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f'{key} must be a name or a list of names, got {value!r}')
    return list(values)


def pretrained(key: str, value: Any) -> bool | str:
    return value if isinstance(value, bool) else path(key, value)


def pos_weight(key: str, value: Any) -> str | list[float]:
    if isinstance(value, str):
        return choice('auto')(key, value)
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ConfigError(f"{key} must be null, 'auto' or a list of positive numbers (one per class), got {value!r}")
    return [float(v) for v in values]


def groups(key: str, value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not all(isinstance(v, (list, tuple)) for v in value.values()):
        raise ConfigError(f'{key} must map each group name to a list of findings, got {value!r}')
    return {str(g): list(v) for g, v in value.items()}


def intensity(key: str, value: Any) -> str | int:
    return integer(1, 16)(key, value) if _is_int(value) else choice(*INTENSITY_MODES)(key, value)


def device(key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r'auto|cpu|cuda(:\d+)?', value):
        raise ConfigError(f"{key} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


def triple(low: float, high: float, low_open: bool = False, each: str = 'channel') -> Rule:
    """Three numbers, one per colour channel (or per axis)."""
    rule = number(low, high, low_open=low_open)

    def check(key: str, value: Any) -> list[float]:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ConfigError(f'{key} must be three numbers (one per {each}), got {value!r}')
        return [rule(key, v) for v in value]

    return check


def sizes(low: int, high: int) -> Rule:
    """A volume's D, H, W: three integers in [low, high]."""
    rule = integer(low, high)

    def check(key: str, value: Any) -> list[int]:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ConfigError(f'{key} must be three integers (D, H, W), e.g. [64, 64, 64], got {value!r}')
        return [rule(key, v) for v in value]

    return check


def window(key: str, value: Any) -> list[float]:
    """[low, high], low < high: the values mapped to 0 and 1 (CT lung window: [-1000, 400] HU)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f'{key} must be [low, high], e.g. [-1000, 400] (HU), got {value!r}')
    low, high = (number(-1e6, 1e6)(key, v) for v in value)
    if low >= high:
        raise ConfigError(f'{key} must be [low, high] with low < high, got {value!r}')
    return [low, high]


FRACTION = number(0.0, 1.0)
POSITIVE = integer(1)
COUNT = integer(0)

# Allowed words: the modules that act on these keys read them from here.
LR_SCHEDULERS = ('cosine', 'step', 'plateau', 'none')
LOSS_TYPES = ('bce', 'focal', 'asymmetric')
DATASET_KINDS = ('nih', 'chexpert', 'csv', 'folder', 'medmnist3d')
VOLUME_DATASET_KINDS = ('csv', 'medmnist3d')  # the kinds that read volumes (csv reads both)
VOLUME_KEYS = ('volume_size', 'spacing', 'intensity_window')  # read with DATA.spatial_dims=3 only
IMAGE_KEYS = ('use_albumentations', 'cache_dir', 'intensity')  # read with DATA.spatial_dims=2 only
UNCERTAINTY_POLICIES = ('ones', 'zeros', 'ignore')
THRESHOLD_METHODS = ('youden', 'f1', 'sensitivity')
BOOTSTRAP_INTERVALS = ('percentile', 'bca')
INTENSITY_MODES = ('auto', 'minmax')
FINETUNE_MODES = ('full', 'linear', 'partial')

RULES: dict[str, dict[str, Rule]] = {
    'MODEL': {
        'backbone': text,
        'use_modern_attention': boolean,
        'use_cross_scale_attention': boolean,
        'num_heads': POSITIVE,
        'num_classes': POSITIVE,
        'pretrained': pretrained,
        'fusion_channels': POSITIVE,
        'dropout': number(0.0, 1.0, high_open=True),
        'fpn_channels': POSITIVE,
        'hierarchical': boolean,
        'num_coarse_classes': POSITIVE,
        'coarse_groups': _nullable(groups),
        'attention_pool_size': POSITIVE,
        'drop_path_rate': number(0.0, 1.0, high_open=True),
        'finetune': choice(*FINETUNE_MODES),
        'trainable_blocks': _nullable(COUNT),
    },
    'TRAIN': {
        'batch_size': POSITIVE,
        'epochs': POSITIVE,
        'learning_rate': number(0.0, 10.0, low_open=True),
        'weight_decay': number(0.0, 10.0),
        'lr_scheduler': choice(*LR_SCHEDULERS),
        'warmup_epochs': number(0.0, 1e6),
        'step_size': POSITIVE,
        'gamma': number(0.0, 1.0, low_open=True),
        'plateau_patience': COUNT,
        'gradient_accumulation_steps': POSITIVE,
        'grad_clip_norm': number(0.0, 1e6),
        'mixed_precision': boolean,
        'ema_decay': number(0.0, 1.0, high_open=True),
        'precise_bn': boolean,
        'early_stopping_patience': COUNT,
        'early_stopping_min_delta': number(0.0, 1.0),
        'max_bad_steps': POSITIVE,
        'weighted_sampler': boolean,
        'seed': COUNT,
        'device': device,
        'max_steps_per_epoch': _nullable(POSITIVE),
        'layer_decay': number(0.0, 1.0, low_open=True),
        'feature_cache': boolean,
    },
    'DATA': {
        'dataset': choice(*DATASET_KINDS),
        'spatial_dims': integer(2, 3),
        'volume_size': sizes(8, 1024),
        'spacing': _nullable(triple(0.0, 100.0, low_open=True, each='axis: D, H, W')),
        'intensity_window': _nullable(window),
        'data_dir': _nullable(path),
        'labels_file': _nullable(path),
        'class_names': _nullable(string_list),
        'image_size': POSITIVE,
        'num_workers': COUNT,
        'use_albumentations': boolean,
        'horizontal_flip': boolean,
        'train_split': FRACTION,
        'val_split': FRACTION,
        'test_split': FRACTION,
        'split_seed': COUNT,
        'view_positions': _nullable(string_list),
        'frontal_only': boolean,
        'uncertainty': choice(*UNCERTAINTY_POLICIES),
        'intensity': intensity,
        'mean': _nullable(triple(0.0, 1.0)),
        'std': _nullable(triple(0.0, 10.0, low_open=True)),
        'skip_bad_images': boolean,
        'cache_dir': _nullable(path),
        'sample_size': _nullable(integer(10)),
        'sample_image_size': _nullable(integer(16)),
    },
    'LOSS': {
        'type': choice(*LOSS_TYPES),
        'pos_weight': _nullable(pos_weight),
        'focal_gamma': number(0.0, 10.0),
        'asl_gamma_pos': number(0.0, 10.0),
        'asl_gamma_neg': number(0.0, 10.0),
        'asl_clip': number(0.0, 1.0, high_open=True),
        'fine_weight': number(0.0, 1e3),
        'coarse_weight': number(0.0, 1e3),
        'consistency_weight': number(0.0, 1e3),
    },
    'CHECKPOINT': {'dir': path, 'save_freq': COUNT},
    'LOGGING': {'log_dir': path, 'tensorboard': boolean, 'log_freq': POSITIVE},
    'EVAL': {
        'threshold_method': choice(*THRESHOLD_METHODS),
        'target_sensitivity': number(0.0, 1.0, low_open=True, high_open=True),
        'bootstrap_samples': POSITIVE,
        'confidence_level': number(0.0, 1.0, low_open=True, high_open=True),
        'interval': choice(*BOOTSTRAP_INTERVALS),
        'temperature_scaling': boolean,
        'tta': boolean,
    },
}


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), base: type[Config] = Config) -> Config:
    """The command-line recipe: defaults, then a YAML file, then KEY=VALUE overrides."""
    config = base()
    if path:
        config.merge_yaml(path)
    return config.apply_overrides(overrides).validate()
