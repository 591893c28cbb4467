"""Structured channel pruning of the backbone with Torch-Pruning's dependency graph (`hybridmednet prune`).

Whole channels are removed, so the pruned model is a smaller dense network that is faster anywhere,
not a sparse one. The dependency graph couples every layer that shares a channel, so when a backbone
stage loses channels the attention, fusion and head inputs lose the same ones; the layers whose
outputs are not backbone channels (attention's inner width, fusion's width, the classes) are never
pruned themselves.

A pruned model no longer matches `HybridMedNet(config)`, so the checkpoint records the pruning
history (layer name, output or input channels, indices removed) as plain values, and
`models.pruning.restore_pruning` replays it on a freshly built model before its weights are loaded.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import torch
from torch import nn

from hybridmednet.deploy import DeployError, require
from hybridmednet.models.attention import CBAM, PyramidSelfAttention
from hybridmednet.models.hybrid import HybridMedNet
from hybridmednet.models.pruning import example_input, layer_scales_unremarked, sync_channels
from hybridmednet.models.registry import get_backbone_spec

# Families whose every operator the dependency graph follows (checked by restoring and comparing outputs).
PRUNABLE_FAMILIES = ('resnet', 'convnext', 'efficientnet', 'efficientnetv2')
ROUND_TO = 8  # channel counts stay multiples of 8, which vectorised kernels prefer


def _fixed_outputs(model: HybridMedNet) -> list[nn.Module]:
    """Layers whose outputs are not backbone channels: their inputs follow the backbone, their outputs stay."""
    fixed: list[nn.Module] = [model.fusion, model.head]
    for module in model.attention.modules():
        if isinstance(module, PyramidSelfAttention):
            fixed += [*module.q, *module.kv, *module.context]
        elif isinstance(module, CBAM):
            fixed += [module.mlp[0], module.spatial]
    return fixed


def check_prunable(backbone: str, ratio: float) -> None:
    """Refuse, before any work, a backbone the dependency graph cannot follow or a ratio outside (0, 1)."""
    family = get_backbone_spec(backbone).family
    if family not in PRUNABLE_FAMILIES:
        raise DeployError(
            f'pruning supports the {", ".join(PRUNABLE_FAMILIES)} backbones; {backbone} ({family}) has layers '
            f'whose channels Torch-Pruning cannot follow'
        )
    if not 0.0 < ratio < 1.0:
        raise DeployError(f'pruning ratio {ratio}: give the fraction of channels to remove, between 0 and 1')


def prune_backbone(model: HybridMedNet, ratio: float) -> list[list[Any]]:
    """Remove `ratio` of the channels of every backbone layer (smallest L2 norm first), in place.

    Returns the pruning history to store in the checkpoint (see `restore_pruning`)."""
    check_prunable(model.config.MODEL['backbone'], ratio)
    tp = require('torch_pruning')
    model.eval()  # tracing runs the model: BatchNorm statistics must not move
    with layer_scales_unremarked():
        pruner = tp.pruner.MetaPruner(
            model,
            example_input(model),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=_fixed_outputs(model),
            round_to=ROUND_TO,
        )
        pruner.step()
    sync_channels(model)
    return [[name, bool(out), [int(i) for i in indices]] for name, out, indices in pruner.pruning_history()]


def cost(model: HybridMedNet, repeats: int = 5) -> dict[str, float]:
    """Parameters, multiply-accumulates and median batch-1 latency (ms, this process's threads) of `model`."""
    tp = require('torch_pruning')
    x = example_input(model, 1)
    macs, params = tp.utils.count_ops_and_params(model.eval(), x)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(1000 * (time.perf_counter() - start))
    return {'params': float(params), 'macs': float(macs), 'latency_ms': median(times)}
