"""The model file formats, and their one owner: written atomically, read without unpickling code,
able to rebuild their own model.

A training checkpoint (.pth) holds only tensors and plain containers, so both
`torch.load(path, weights_only=True)` and the SPEC's legacy
`model.load_state_dict(torch.load(path)['model_state_dict'])` work. For inference the best
weights are also exported as `.safetensors` with a `.json` sidecar (config, class names,
preprocessing). What else describes the model is stored into these files here too, as entries of
the checkpoint dict and of the sidecar: 'thresholds' (the operating point `evaluate` fits),
'calibration', 'ood' and 'heatmap_reference' (fitted at the end of training). The tensors of an entry
(the OOD model's mean and precision matrix, the heatmaps' healthy reference films) go into a second safetensors
file beside the export, `<name>.<entry>.safetensors`, so the export itself stays a plain state dict.

A model package in the Hugging Face layout (deploy/hub.py) is the same export named `model.safetensors`
with its sidecar named `config.json`; a folder holding the two loads like the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hybridmednet.config import Config
from hybridmednet.data.transforms import normalization
from hybridmednet.errors import CheckpointError
from hybridmednet.models.backbones import state_dict_mismatch
from hybridmednet.models.hybrid import HybridMedNet
from hybridmednet.models.pruning import restore_pruning

FORMAT = 'hybridmednet-checkpoint'
EXPORT_FORMAT = 'hybridmednet-weights'
PTH_SUFFIXES = ('.pth', '.pt', '.ckpt')
MODEL_ENTRIES = ('thresholds', 'calibration', 'ood', 'heatmap_reference')  # stored with the model, None until fitted
PACKAGE_WEIGHTS, PACKAGE_CONFIG = 'model.safetensors', 'config.json'  # the Hugging Face layout's names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; every model file gets the usual mode
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
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f'{path} is not a readable PyTorch checkpoint of tensors and plain values '
            f'(weights_only=True refused it or it is corrupt): {exc}'
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f'{path} holds a {type(state).__name__}, not a checkpoint dict')
    return state


# -- inference export -----------------------------------------------------------------------------
def preprocessing(config: Config) -> dict[str, Any]:
    """What a caller must do to an image or volume before the model sees it (recorded beside the weights)."""
    shape = list(config.input_shape)
    if config.DATA['spatial_dims'] == 3:
        return {
            'input_shape': shape,
            'volume_size': shape[1:],
            'channels': 1,
            'spacing': config.DATA['spacing'],
            'intensity_window': config.DATA['intensity_window'],
            'input': 'volume [D, H, W] in RAS order, windowed to [0, 1], fitted into volume_size (aspect kept, padded)',
        }
    return {
        'input_shape': shape,
        'image_size': config.DATA['image_size'],
        'channels': 3,
        'input': 'grey image in [0, 1], resized, copied to 3 channels, normalised',
        **dict(zip(('mean', 'std'), normalization(config))),
    }


def package_weights(path: str | Path) -> Path | None:
    """The weights file of a model package folder (model.safetensors beside config.json), else None."""
    folder = Path(path)
    weights = folder / PACKAGE_WEIGHTS
    return weights if folder.is_dir() and weights.is_file() and (folder / PACKAGE_CONFIG).is_file() else None


def sidecar_of(path: Path) -> Path:
    """The JSON beside a .safetensors export: `<name>.json`, or a package's `config.json`."""
    package = path.parent / PACKAGE_CONFIG
    if path.name == PACKAGE_WEIGHTS and package.is_file() and not path.with_suffix('.json').is_file():
        return package
    return path.with_suffix('.json')


def export_weights(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: Config,
    meta: dict[str, Any] | None = None,
    sidecar: str | Path | None = None,
) -> Path:
    """Write `path` (.safetensors) and its sidecar (default `<name>.json`), both atomically."""
    path = Path(path).with_suffix('.safetensors')
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    record = {
        'format': EXPORT_FORMAT,
        'config': config.to_dict(),
        'class_names': config.class_names,
        'preprocessing': preprocessing(config),
        **dict.fromkeys(MODEL_ENTRIES),
        **(meta or {}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={'format': EXPORT_FORMAT}))
    text = json.dumps(record, indent=2)
    atomic_write(Path(sidecar) if sidecar else path.with_suffix('.json'), lambda tmp: tmp.write_text(text))
    return path


# -- loading a model --------------------------------------------------------------------------------
def _read(path: Path, map_location) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata with 'config') from a training checkpoint or a safetensors export."""
    if path.suffix == '.safetensors':
        sidecar = sidecar_of(path)
        if not sidecar.is_file():
            raise CheckpointError(f'{path}: the sidecar {sidecar.name} (config, class names) is missing')
        meta = json.loads(sidecar.read_text())
        if not path.is_file():
            raise CheckpointError(f'checkpoint not found: {path}')
        meta.update({key: read_sidecar_entry(sidecar, meta.get(key)) for key in MODEL_ENTRIES})
        return load_file(str(path), device=str(map_location)), meta
    if path.suffix not in PTH_SUFFIXES:
        raise CheckpointError(
            f'{path}: unknown checkpoint format {path.suffix!r}; expected a training '
            f'checkpoint ({", ".join(PTH_SUFFIXES)}) or a .safetensors export with its .json'
        )
    ckpt = load_checkpoint(path, map_location)
    if 'model_state_dict' not in ckpt or 'config' not in ckpt:
        raise CheckpointError(
            f'{path} is a bare state dict without a config; build the model yourself '
            f"(HybridMedNet(config)) and call model.load_state_dict(checkpoint['model_state_dict'])"
        )
    weights = ckpt.get('ema_state_dict') or ckpt['model_state_dict']
    keys = ('config', 'class_names', 'preprocessing', *MODEL_ENTRIES, 'epoch', 'best_auc', 'pruning')
    meta = {k: ckpt.get(k) for k in keys}
    return weights, meta


def load_model(
    path: str | Path, map_location: str | torch.device = 'cpu', num_classes: int | None = None
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the HybridMedNet a checkpoint was trained as; strict, and loud on any mismatch.

    Returns (model in eval mode, its Config, meta with class_names, preprocessing, and the entries
    thresholds, calibration, ood, heatmap_reference: each None when the model was stored without it). The
    heatmap reference's images are attached to the model as `model.heatmap_reference` (evaluation/gradcam.py).
    Training checkpoints with EMA give the EMA weights (the ones that were validated).
    `num_classes`, when given, must match the checkpoint's (e.g. the classes of a dataset to score).
    """
    path = package_weights(path) or Path(path)
    state_dict, meta = _read(path, map_location)
    config = Config.from_dict(meta['config'])
    config.MODEL['pretrained'] = False  # the weights come from the file, never the network
    names = meta.get('class_names') or config.class_names
    k = config.MODEL['num_classes']
    if len(names) != k or (num_classes is not None and num_classes != k):
        wanted = f'; {num_classes} were asked for' if num_classes is not None else ''
        raise CheckpointError(
            f'{path}: class-count mismatch: the model has {k} outputs and '
            f'{len(names)} class names ({", ".join(names)}){wanted}'
        )
    model = HybridMedNet(config)
    if meta.get('pruning'):  # `hybridmednet prune` removed channels: remove the same ones before loading
        restore_pruning(model, meta['pruning']['history'])
    problems = state_dict_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f'{path}: weights do not fit a {config.MODEL["backbone"]} HybridMedNet with {k} classes: {problems}'
        )
    model.load_state_dict(state_dict, strict=True)
    model.heatmap_reference = reference_images(meta.get('heatmap_reference'), map_location)
    meta = {
        **meta,
        'class_names': names,
        'preprocessing': meta.get('preprocessing') or preprocessing(config),
    }
    return model.to(map_location).eval(), config, meta


def reference_images(entry: dict[str, Any] | None, map_location: str | torch.device = 'cpu') -> torch.Tensor | None:
    """The heatmap reference entry's healthy images [N, C, *spatial], or None. Models stored earlier on
    2026-12-01 hold their mean alone ('image': one reference for every image); those stored on 2026-11-30 hold
    trunk maps instead, and their heatmaps are plain HiResCAM."""
    entry = entry or {}
    if entry.get('healthy_images') is not None:
        return entry['healthy_images'].to(map_location)
    return entry['image'][None].to(map_location) if entry.get('image') is not None else None


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A short fingerprint of the weights themselves (not the file, which gains thresholds after evaluate)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()[:16]


# -- what is stored with a model: operating point, calibration, OOD model ---------------------------
def model_files(model_path: str | Path) -> list[Path]:
    """The training checkpoint and/or safetensors sidecar that describe this model (those that exist)."""
    path = package_weights(model_path) or Path(model_path)
    candidates = [sidecar_of(path)] if path.suffix == '.safetensors' else [path]
    candidates += [path.with_suffix(s) for s in PTH_SUFFIXES if path.suffix == '.safetensors']
    if path.suffix in PTH_SUFFIXES and path.with_suffix('.safetensors').is_file():
        candidates.append(path.with_suffix('.json'))
    return [p for p in dict.fromkeys(candidates) if p.is_file()]


def write_sidecar_entry(sidecar: Path, key: str, record: Any) -> Any:
    """The JSON form of an entry for the sidecar file `sidecar` (or any JSON model description): its tensors
    written to `<sidecar stem>.<key>.safetensors` beside it, named in 'tensor_file'."""
    tensors = {k: v for k, v in record.items() if isinstance(v, torch.Tensor)} if isinstance(record, dict) else {}
    if not tensors:
        return record
    path = sidecar.with_suffix(f'.{key}.safetensors')
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata={'format': EXPORT_FORMAT, 'entry': key}))
    return {**{k: v for k, v in record.items() if k not in tensors}, 'tensor_file': path.name}


def read_sidecar_entry(sidecar: Path, record: Any) -> Any:
    """An entry as the training checkpoint holds it: tensors read back from its 'tensor_file'."""
    if not isinstance(record, dict) or 'tensor_file' not in record:
        return record
    path = sidecar.parent / record['tensor_file']
    if not path.is_file():
        raise CheckpointError(f'{sidecar}: {path.name}, which it names as a tensor file, is missing')
    return {**{k: v for k, v in record.items() if k != 'tensor_file'}, **load_file(str(path))}


def write_model_entries(model_path: str | Path, entries: dict[str, Any]) -> list[Path]:
    """Write `entries` (keys from MODEL_ENTRIES) into every file describing the model; returns those files."""
    written = []
    for path in model_files(model_path):
        if path.suffix == '.json':
            sidecar = json.loads(path.read_text())
            sidecar.update({key: write_sidecar_entry(path, key, record) for key, record in entries.items()})
            text = json.dumps(sidecar, indent=2)
            atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
        else:
            state = load_checkpoint(path)
            state.update(entries)
            save_checkpoint(path, state)
        written.append(path)
    return written


def write_thresholds(model_path: str | Path, record: dict[str, Any]) -> list[Path]:
    """Write `record` as the `thresholds` entry of every file describing the model; returns those files."""
    return write_model_entries(model_path, {'thresholds': record})
