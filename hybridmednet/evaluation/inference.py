"""Logits for a batch or a dataset, with optional test-time augmentation.

Shared by evaluate and predict so that the numbers a report states are the numbers predict gives.
TTA averages logits over small zooms and shifts; it never flips (the heart is on the left).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hybridmednet.errors import ConfigError
from hybridmednet.evaluation.ood import pooled_features
from hybridmednet.models.hybrid import HybridMedNet

# (scale, shift x, shift y) in normalised coordinates: identity (the image itself), 10% zoom-in, two 3% shifts
TTA_VIEWS = ((1.0, 0.0, 0.0), (0.9, 0.0, 0.0), (1.0, 0.06, 0.06), (1.0, -0.06, -0.06))


def tta_view(x: torch.Tensor, scale: float, dx: float, dy: float) -> torch.Tensor:
    """Zoom by 1/scale and shift, keeping the size; borders are replicated, not zero-filled."""
    theta = x.new_tensor([[scale, 0.0, dx], [0.0, scale, dy]]).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


@torch.no_grad()
def batch_outputs(
    model: torch.nn.Module, x: torch.Tensor, tta: bool = False, ood: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, K] and, with `ood` (a HybridMedNet), its out-of-distribution features [B, D]
    (`ood.pooled_features`) from the same forward pass. With TTA the logits are the mean over `TTA_VIEWS`,
    whose first view is the image itself (images only); the features are the image's."""
    if tta and x.dim() != 4:
        raise ConfigError('EVAL.tta: test-time augmentation is defined for 2D images only; set EVAL.tta=false')
    features = None
    if ood:
        maps, logits = maps_and_logits(cast(HybridMedNet, model), x)
        logits, features = logits.float(), pooled_features(maps)
    else:
        logits = model(x).float()
    return (tta_mean(model, x, logits) if tta else logits), features


def maps_and_logits(model: HybridMedNet, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The attention maps (where the OOD features come from) and the logits computed from them: one pass."""
    maps = model.forward_features(x)
    return maps, model.forward_head(maps)


@torch.no_grad()
def tta_mean(model: torch.nn.Module, x: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """The TTA logits of images `x` whose own logits `plain` are already computed: the mean over `TTA_VIEWS`."""
    views = (model(tta_view(x, *view)).float() for view in TTA_VIEWS[1:])
    return torch.stack([plain.detach().float(), *views]).mean(0)


def batch_logits(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits [B, K]; with TTA, the mean logit over `TTA_VIEWS` (images only)."""
    return batch_outputs(model, x, tta)[0]


def dataset_outputs(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 32,
    device: str | torch.device = 'cpu',
    tta: bool = False,
    num_workers: int = 0,
    desc: str = 'predicting',
    ood: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`batch_outputs` for every item of a dataset of (image, target, mask), in dataset order: logits [N, K]
    and, with `ood`, the features [N, D] (None without)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    logits, features = [], []
    for batch in tqdm(loader, desc=desc, unit='batch', leave=False):
        out, feats = batch_outputs(model, batch[0].to(device), tta, ood)
        logits.append(out.cpu())
        if feats is not None:
            features.append(feats.cpu())
    found = torch.cat(features).numpy().astype(np.float64) if features else None
    if logits:
        return torch.cat(logits).numpy().astype(np.float64), found
    class_names = cast(list[str], model.class_names)  # HybridMedNet's; torch types module attributes loosely
    return np.zeros((0, len(class_names))), found
