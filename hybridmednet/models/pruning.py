"""Replaying a structural pruning on a freshly built HybridMedNet, so a pruned checkpoint's weights fit it.

`hybridmednet prune` (deploy/prune.py) removes channels with Torch-Pruning and stores the pruning history
in the checkpoint; `checkpoint.load_model` calls `restore_pruning` before loading the weights. The replay
lives here, with the model, so that reading a checkpoint does not depend on the deploy package.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from hybridmednet.errors import CheckpointError
from hybridmednet.models.hybrid import HybridMedNet


def _torch_pruning() -> ModuleType:
    try:
        import torch_pruning
    except ImportError:
        raise CheckpointError(
            'this checkpoint was pruned (hybridmednet prune); reading it needs torch-pruning: '
            "pip install 'hybridmednet[deploy]'"
        ) from None
    return torch_pruning


def example_input(model: HybridMedNet, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model.config.input_shape, device=next(model.parameters()).device)


@contextmanager
def layer_scales_unremarked() -> Iterator[None]:
    """Torch-Pruning warns about every bare nn.Parameter (layer scales), whose last dimension it rightly prunes."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Unwrapped parameters detected')
        yield


def sync_channels(model: HybridMedNet) -> None:
    """The backbone's declared pyramid widths, as they are after pruning."""
    with torch.no_grad():
        model.backbone.channels = [m.shape[1] for m in model.backbone(example_input(model, 1))]


def restore_pruning(model: HybridMedNet, history: list[list[Any]]) -> HybridMedNet:
    """Replay a stored pruning history on a freshly built model, so a pruned checkpoint's weights fit it."""
    tp = _torch_pruning()
    with layer_scales_unremarked():
        graph = tp.DependencyGraph().build_dependency(model.eval(), example_input(model))
        graph.load_pruning_history([(name, out, indices) for name, out, indices in history])
    sync_channels(model)
    return model
