"""Dynamic feature fusion: the 4 scales merged with per-image learned weights."""

from __future__ import annotations

import torch
from torch import nn

from hybridmednet.models.attention import ADAPTIVE_AVG_POOL, ADAPTIVE_MAX_POOL


class DynamicFusion(nn.Module):
    """Pool and project each scale, then mix them with softmax weights predicted from all scales.

    The weights adapt per image (a small gate reads every scale) around learned
    per-scale priors, so an image with a small lesion can lean on the fine scales.
    Maps are NCHW or NCDHW (volumes): pooling is global either way.
    """

    def __init__(self, channels: list[int], out_channels: int):
        super().__init__()
        self.project = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * c, out_channels), nn.LayerNorm(out_channels), nn.GELU()) for c in channels
        )
        self.prior = nn.Parameter(torch.zeros(len(channels)))
        self.gate = nn.Linear(len(channels) * out_channels, len(channels))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def scale_weights(self, projected: torch.Tensor) -> torch.Tensor:
        """[B, S, F] projected scales -> [B, S] mixing weights summing to 1."""
        return torch.softmax(self.prior + self.gate(projected.flatten(1)), dim=-1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        n = maps[0].dim() - 2
        pooled = [torch.cat([ADAPTIVE_AVG_POOL[n](m, 1), ADAPTIVE_MAX_POOL[n](m, 1)], 1).flatten(1) for m in maps]
        projected = torch.stack([proj(p) for proj, p in zip(self.project, pooled)], dim=1)
        return (self.scale_weights(projected).unsqueeze(-1) * projected).sum(dim=1)
