"""Configuration: six plain dicts, validated once, saved inside every checkpoint.

A `Config()` copies the class-level defaults, so editing `config.MODEL[...]` on
one instance never leaks into another. Subclasses (configs/default_config.py)
override sections by redefining the class attributes.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

NIH_FINDINGS = [
    'Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule',
    'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema',
    'Fibrosis', 'Pleural_Thickening', 'Hernia',
]

SECTIONS = ('MODEL', 'TRAIN', 'DATA', 'LOSS', 'CHECKPOINT', 'LOGGING', 'EVAL')


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; a learning rate must not be one."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+'
               r'|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$'),
    list('-+0123456789.'))


def parse_value(text: str) -> Any:
    """A command-line or YAML scalar: numbers (1e-4 too), booleans, null, lists, else the string."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A configuration key or value that cannot be used, named in the message."""


class Config:
    MODEL = {
        'backbone': 'convnext_base',
        'use_modern_attention': True,
        'use_cross_scale_attention': True,
        'num_heads': 8,
        'num_classes': 14,
        'pretrained': True,          # True: ImageNet via timm; a path: local weights file
        'fusion_channels': 512,
        'dropout': 0.5,
        'fpn_channels': 256,         # ResNet + FPN only
        'hierarchical': False,
        'num_coarse_classes': 3,
        'coarse_groups': None,       # {group: [finding, ...]}; None -> NIH groups
        'attention_pool_size': 7,    # keys/values pooled to at most this side
        'drop_path_rate': 0.0,
    }
    TRAIN = {
        'batch_size': 32,
        'epochs': 50,
        'learning_rate': 1e-4,
        'weight_decay': 1e-4,
        'lr_scheduler': 'cosine',    # cosine | step | plateau | none
        'warmup_epochs': 5,
        'step_size': 10,             # step scheduler: epochs per decay
        'gamma': 0.1,                # step / plateau decay factor
        'plateau_patience': 3,       # plateau scheduler: epochs without a better val AUC before a cut
        'gradient_accumulation_steps': 1,
        'grad_clip_norm': 1.0,       # 0 disables clipping
        'mixed_precision': True,
        'ema_decay': 0.0,            # 0 disables the weight EMA
        'early_stopping_patience': 10,
        'max_bad_steps': 10,         # consecutive NaN/Inf losses before aborting
        'weighted_sampler': False,
        'seed': 42,
        'device': 'auto',            # auto | cpu | cuda | cuda:N
        'max_steps_per_epoch': None, # cap for quick runs
    }
    DATA = {
        'dataset': 'nih',            # nih | chexpert | csv | folder
        'data_dir': None,            # None or 'sample': the built-in synthetic dataset
        'labels_file': None,
        'class_names': None,         # None -> the 14 NIH findings
        'image_size': 224,
        'num_workers': 4,
        'use_albumentations': False,
        'horizontal_flip': False,    # laterality matters in chest X-rays
        'train_split': 0.7,
        'val_split': 0.1,
        'test_split': 0.2,
        'split_seed': 42,
        'view_positions': None,      # e.g. ['PA'] keeps PA views only
        'frontal_only': False,       # CheXpert
        'uncertainty': 'ones',       # CheXpert -1: ones | zeros | ignore
        'skip_bad_images': False,
        'cache_dir': None,           # memory-mapped image cache (hybridmednet cache)
        'sample_size': 2000,         # built-in sample dataset: images
        'sample_image_size': 256,
    }
    LOSS = {
        'type': 'bce',               # bce | focal | asymmetric
        'pos_weight': None,          # None | 'auto' | list of K floats
        'focal_gamma': 2.0,
        'asl_gamma_pos': 0.0,
        'asl_gamma_neg': 4.0,
        'asl_clip': 0.05,
        'fine_weight': 1.0,          # hierarchical head
        'coarse_weight': 0.5,
        'consistency_weight': 0.1,
    }
    CHECKPOINT = {
        'dir': 'checkpoints',
        'save_freq': 1,              # epochs between 'last' checkpoints
    }
    LOGGING = {
        'log_dir': 'logs',
        'tensorboard': True,
        'log_freq': 10,              # steps between progress lines
    }
    EVAL = {
        'threshold_method': 'youden',  # youden | f1 | sensitivity
        'target_sensitivity': 0.9,
        'bootstrap_samples': 1000,
        'confidence_level': 0.95,
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
            raise ConfigError(f"unknown config section {name!r}{_suggest(name, SECTIONS)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, dict]:
        """Plain nested dict, safe for JSON and checkpoints."""
        return {name: copy.deepcopy(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, dict]) -> 'Config':
        config = cls()
        config.update(data)
        return config

    def update(self, data: dict[str, dict]) -> 'Config':
        for name, values in data.items():
            section = self._section(name)
            if not isinstance(values, dict):
                raise ConfigError(f"config section {name} must be a mapping, got {type(values).__name__}")
            for key, value in values.items():
                _check_key(name, key, section)
                section[key] = value
        return self

    # -- files and command lines ------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> 'Config':
        return cls().merge_yaml(path)

    def merge_yaml(self, path: str | Path) -> 'Config':
        path = Path(path)
        try:
            data = yaml.load(path.read_text(), Loader=_Loader) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        try:
            return self.update(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def apply_overrides(self, overrides: Iterable[str]) -> 'Config':
        """Apply `SECTION.key=value` strings; values are parsed as YAML (1e-4, true, [PA])."""
        for item in overrides:
            dotted, sep, raw = item.partition('=')
            name, dot, key = dotted.partition('.')
            if not sep or not dot:
                raise ConfigError(f"override {item!r} is not of the form SECTION.key=value "
                                  f"(e.g. MODEL.backbone=convnext_tiny)")
            self.update({name.upper() if name.upper() in SECTIONS else name:
                         {key: parse_value(raw) if raw != '' else None}})
        return self

    # -- validation ---------------------------------------------------------------
    def validate(self) -> 'Config':
        """Check keys and the values later stages rely on; raise ConfigError naming them."""
        for name in SECTIONS:
            for key in getattr(self, name):
                _check_key(name, key, getattr(Config, name))
        from hybridmednet.models.registry import get_backbone_spec
        get_backbone_spec(self.MODEL['backbone'])
        _check_choice('TRAIN', 'lr_scheduler', self.TRAIN, ('cosine', 'step', 'plateau', 'none'))
        _check_choice('LOSS', 'type', self.LOSS, ('bce', 'focal', 'asymmetric'))
        _check_choice('DATA', 'dataset', self.DATA, ('nih', 'chexpert', 'csv', 'folder'))
        _check_choice('DATA', 'uncertainty', self.DATA, ('ones', 'zeros', 'ignore'))
        _check_choice('EVAL', 'threshold_method', self.EVAL, ('youden', 'f1', 'sensitivity'))
        for section, key in (('MODEL', 'num_classes'), ('MODEL', 'num_heads'), ('MODEL', 'fusion_channels'),
                             ('TRAIN', 'batch_size'), ('TRAIN', 'epochs'),
                             ('TRAIN', 'gradient_accumulation_steps'), ('DATA', 'image_size')):
            value = getattr(self, section)[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{section}[{key!r}] must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.MODEL['dropout']) < 1.0:
            raise ConfigError(f"MODEL['dropout'] must be in [0, 1), got {self.MODEL['dropout']!r}")
        splits = [self.DATA[k] for k in ('train_split', 'val_split', 'test_split')]
        if any(s < 0 for s in splits) or abs(sum(splits) - 1.0) > 1e-6:
            raise ConfigError(f"DATA train/val/test splits must be non-negative and sum to 1, got {splits}")
        names = self.class_names
        if len(names) != self.MODEL['num_classes']:
            raise ConfigError(f"MODEL['num_classes'] is {self.MODEL['num_classes']} but "
                              f"DATA['class_names'] has {len(names)} names")
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.DATA['class_names'] or NIH_FINDINGS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else \
        f"; valid: {', '.join(map(repr, choices))}"


def _check_key(section_name: str, key: str, section: dict) -> None:
    if key not in getattr(Config, section_name):
        raise ConfigError(f"unknown key {section_name}[{key!r}]{_suggest(key, section)}")


def _check_choice(section: str, key: str, values: dict, choices: tuple) -> None:
    if values[key] not in choices:
        raise ConfigError(f"{section}[{key!r}] = {values[key]!r} is not one of {', '.join(map(repr, choices))}")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                base: type[Config] = Config) -> Config:
    """The command-line recipe: defaults, then a YAML file, then KEY=VALUE overrides."""
    config = base()
    if path:
        config.merge_yaml(path)
    return config.apply_overrides(overrides).validate()
