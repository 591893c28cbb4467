"""Checkpoints: written atomically, read without unpickling code, and able to rebuild their own model.

A training checkpoint (.pth) holds only tensors and plain containers, so both
`torch.load(path, weights_only=True)` and the SPEC's legacy
`model.load_state_dict(torch.load(path)['model_state_dict'])` work. For inference the best
weights are also exported as `.safetensors` with a `.json` sidecar (config, class names,
preprocessing).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hybridmednet.config import Config

FORMAT = 'hybridmednet-checkpoint'
EXPORT_FORMAT = 'hybridmednet-weights'
PTH_SUFFIXES = ('.pth', '.pt', '.ckpt')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically save a dict of tensors and plain values (everything must load with weights_only=True)."""
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = 'cpu') -> dict[str, Any]:
    """Read a .pth safely; a file holding arbitrary Python objects is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint of tensors and plain values "
                              f"(weights_only=True refused it or it is corrupt): {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


# -- RNG states as tensors and plain values (weights_only-loadable) ------------------------------
def rng_state() -> dict[str, Any]:
    """Every random stream the loop draws from: torch (CPU, CUDA), numpy, Python."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64), 'gauss_next': gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'].cpu())
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss_next']))


# -- inference export -----------------------------------------------------------------------------
def preprocessing(config: Config) -> dict[str, Any]:
    """What a caller must do to an image before the model sees it (recorded beside the weights)."""
    from hybridmednet.data.transforms import MEAN, STD
    return {'image_size': config.DATA['image_size'], 'channels': 3, 'input': 'grey image in [0, 1], resized, '
            'copied to 3 channels, normalised', 'mean': list(MEAN), 'std': list(STD)}


def export_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config: Config,
                   meta: dict[str, Any] | None = None) -> Path:
    """Write `path` (.safetensors) and its `.json` sidecar, both atomically."""
    from safetensors.torch import save_file
    path = Path(path).with_suffix('.safetensors')
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    sidecar = {'format': EXPORT_FORMAT, 'config': config.to_dict(), 'class_names': config.class_names,
               'preprocessing': preprocessing(config), 'thresholds': None, **(meta or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={'format': EXPORT_FORMAT}))
    atomic_write(path.with_suffix('.json'), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2)))
    return path


# -- loading a model --------------------------------------------------------------------------------
def _read(path: Path, map_location) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata with 'config') from a training checkpoint or a safetensors export."""
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        sidecar = path.with_suffix('.json')
        if not sidecar.is_file():
            raise CheckpointError(f"{path}: the sidecar {sidecar.name} (config, class names) is missing")
        meta = json.loads(sidecar.read_text())
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        return load_file(str(path), device=str(map_location)), meta
    if path.suffix not in PTH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected a training "
                              f"checkpoint ({', '.join(PTH_SUFFIXES)}) or a .safetensors export with its .json")
    ckpt = load_checkpoint(path, map_location)
    if 'model_state_dict' not in ckpt or 'config' not in ckpt:
        raise CheckpointError(f"{path} is a bare state dict without a config; build the model yourself "
                              f"(HybridMedNet(config)) and call model.load_state_dict(checkpoint['model_state_dict'])")
    weights = ckpt.get('ema_state_dict') or ckpt['model_state_dict']
    meta = {k: ckpt.get(k) for k in ('config', 'class_names', 'preprocessing', 'thresholds', 'epoch', 'best_auc')}
    return weights, meta


def load_model(path: str | Path, map_location: str | torch.device = 'cpu',
               num_classes: int | None = None) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the HybridMedNet a checkpoint was trained as; strict, and loud on any mismatch.

    Returns (model in eval mode, its Config, meta with class_names, thresholds, preprocessing).
    Training checkpoints with EMA give the EMA weights (the ones that were validated).
    `num_classes`, when given, must match the checkpoint's (e.g. the classes of a dataset to score).
    """
    from hybridmednet.models.hybrid import HybridMedNet
    path = Path(path)
    state_dict, meta = _read(path, map_location)
    config = Config.from_dict(meta['config'])
    config.MODEL['pretrained'] = False      # the weights come from the file, never the network
    names = meta.get('class_names') or config.class_names
    k = config.MODEL['num_classes']
    if len(names) != k or (num_classes is not None and num_classes != k):
        wanted = f"; {num_classes} were asked for" if num_classes is not None else ''
        raise CheckpointError(f"{path}: class-count mismatch: the model has {k} outputs and "
                              f"{len(names)} class names ({', '.join(names)}){wanted}")
    model = HybridMedNet(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit a {config.MODEL['backbone']} HybridMedNet with "
                              f"{k} classes:\n{exc}") from None
    meta = {**meta, 'class_names': names, 'preprocessing': meta.get('preprocessing') or preprocessing(config)}
    return model.to(map_location).eval(), config, meta
