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

# (scale, shift x, shift y) in normalised coordinates: identity, 10% zoom-in, two 3% shifts
TTA_VIEWS = ((1.0, 0.0, 0.0), (0.9, 0.0, 0.0), (1.0, 0.06, 0.06), (1.0, -0.06, -0.06))


def tta_view(x: torch.Tensor, scale: float, dx: float, dy: float) -> torch.Tensor:
    """Zoom by 1/scale and shift, keeping the size; borders are replicated, not zero-filled."""
    theta = x.new_tensor([[scale, 0.0, dx], [0.0, scale, dy]]).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


@torch.no_grad()
def batch_logits(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits [B, K]; with TTA, the mean logit over `TTA_VIEWS` (images only)."""
    if not tta:
        return model(x).float()
    if x.dim() != 4:
        raise ConfigError('EVAL.tta: test-time augmentation is defined for 2D images only; set EVAL.tta=false')
    return torch.stack([model(tta_view(x, *view)).float() for view in TTA_VIEWS]).mean(0)


def dataset_logits(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 32,
    device: str | torch.device = 'cpu',
    tta: bool = False,
    num_workers: int = 0,
    desc: str = 'predicting',
) -> np.ndarray:
    """Logits [N, K] for every item of a dataset of (image, target, mask), in dataset order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    out = [
        batch_logits(model, batch[0].to(device), tta).cpu()
        for batch in tqdm(loader, desc=desc, unit='batch', leave=False)
    ]
    if out:
        return torch.cat(out).numpy().astype(np.float64)
    class_names = cast(list[str], model.class_names)  # HybridMedNet's; torch types module attributes loosely
    return np.zeros((0, len(class_names)))
