"""An exported model directory run by ONNX Runtime, in the shape predict and evaluate expect of a model.

`load_exported(dir)` returns what `checkpoint.load_model` returns (model, Config, meta), so the
scoring code is the same for both; `load_any_model` picks between them by the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridmednet.checkpoint import MODEL_ENTRIES, load_model, package_weights, read_sidecar_entry
from hybridmednet.config import Config
from hybridmednet.deploy import DeployError
from hybridmednet.deploy.export import FORMAT, META_FILE, session


def read_meta(directory: str | Path) -> dict[str, Any]:
    """model.json of an exported directory, or a DeployError saying what the path is missing."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise DeployError(
            f'{directory}: no {META_FILE}, so it is not an exported model; make one with '
            f'`hybridmednet export --model_path CHECKPOINT --output_dir {directory}`'
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DeployError(f'{path} is not valid JSON ({exc}); re-export the model') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise DeployError(f'{path} is not an export description (format {FORMAT!r}); re-export the model')
    return meta


class OnnxModel(nn.Module):
    """Logits [B, K] for images [B, 3, S, S], like the PyTorch model the directory was exported from.

    A module without parameters, so the scoring code takes it where it takes a HybridMedNet; the image
    size is fixed at export, and other sizes are refused with the size to use.
    """

    def __init__(self, directory: str | Path, threads: int | None = None):
        super().__init__()
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        self.path = self.directory / self.meta['model_file']
        if not self.path.is_file():
            raise DeployError(f'{self.path} is missing (named in {self.directory / META_FILE}); re-export the model')
        self.class_names: list[str] = list(self.meta['class_names'])
        pre = self.meta['preprocessing']
        # exports written before input_shape was recorded are all images [3, S, S]
        self.input_shape = [int(n) for n in pre.get('input_shape') or [3, pre['image_size'], pre['image_size']]]
        self.session = session(self.path, threads)
        node = self.session.get_inputs()[0]
        self.input_name = node.name
        if list(node.shape[1:]) != self.input_shape:
            raise DeployError(
                f'{self.path} takes inputs of shape {node.shape[1:]}, but {META_FILE} says '
                f'{self.input_shape}; re-export the checkpoint with `hybridmednet export`'
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if list(x.shape[1:]) != self.input_shape:
            setting = (
                f'DATA.volume_size={self.input_shape[1:]}'
                if len(self.input_shape) == 4
                else f'DATA.image_size={self.input_shape[-1]}'
            )
            raise DeployError(
                f'{self.path} takes inputs [B, {", ".join(map(str, self.input_shape))}], got {list(x.shape)}; '
                f'set {setting} or export the model again at the new size'
            )
        logits = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)


def load_exported(directory: str | Path, threads: int | None = None) -> tuple[OnnxModel, Config, dict[str, Any]]:
    """(model, Config, meta) of an exported directory, as `checkpoint.load_model` gives for a checkpoint
    (the stored entries with their tensors, e.g. the OOD model's, read back)."""
    model = OnnxModel(directory, threads)
    config = Config.from_dict(model.meta['config'])
    config.MODEL['pretrained'] = False
    entries = {key: read_sidecar_entry(model.directory / META_FILE, model.meta.get(key)) for key in MODEL_ENTRIES}
    return model, config, {**{k: v for k, v in model.meta.items() if k != 'config'}, **entries}


def load_any_model(
    path: str | Path, map_location: str | torch.device = 'cpu'
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """An exported directory through ONNX Runtime (CPU only), anything else (a model package folder
    included) through `load_model`."""
    if not Path(path).is_dir() or package_weights(path):
        return load_model(path, map_location=map_location)
    if torch.device(map_location).type != 'cpu':
        raise DeployError(f'{path}: exported models run on the CPU with ONNX Runtime; use --device cpu')
    return load_exported(path)
