"""Attention over the 4-scale pyramid; every module keeps each scale's shape.

Cost is bounded: queries run on a grid of stride >= 16 (finer maps are pooled
and their outputs upsampled) and keys and values are pooled to at most
`pool_size` x `pool_size` tokens per scale, so attention grows linearly with the
number of pixels instead of quadratically, and runs through
`scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


class CBAM(nn.Module):
    """Channel then spatial attention (Woo et al., 2018): cheap, the classic ResNet pairing."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def attention_dim(channels: int, num_heads: int, max_dim: int = 256) -> int:
    """Inner width: at most `max_dim`, a multiple of the head count."""
    return max(num_heads, min(channels, max_dim) // num_heads * num_heads)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, num_heads, d // num_heads).transpose(1, 2)  # [B, heads, N, d_head]


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class PyramidSelfAttention(nn.Module):
    """Multi-head attention at every scale, with keys/values from pooled context tokens.

    Each scale is normalised, pooled to at most pool_size^2 tokens and projected
    to a shared context width once. Queries keep each scale's own width, on a
    grid of stride at least `query_stride`: the stride-4 and stride-8 maps attend
    on pooled grids and their outputs are upsampled (context is smooth; the fine
    detail stays in the residual). Without cross-scale attention a scale reads its own
    context only; with it, the context of all four scales, so scales reinforce
    each other at almost no extra cost (the context is 4 x 49 tokens).
    """

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        num_heads: int,
        pool_size: int,
        cross_scale: bool,
        context_dim: int = 256,
        query_stride: int = 16,
        layer_scale: float = 0.1,
    ):
        super().__init__()
        self.num_heads, self.pool_size, self.cross_scale = num_heads, pool_size, cross_scale
        self.query_pool = [max(1, query_stride // r) for r in reductions]
        dims = [attention_dim(c, num_heads) for c in channels]
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in channels)
        self.context = nn.ModuleList(nn.Linear(c, context_dim) for c in channels)
        self.scale_embed = nn.Parameter(torch.zeros(len(channels), context_dim))
        self.q = nn.ModuleList(nn.Linear(c, d) for c, d in zip(channels, dims))
        self.kv = nn.ModuleList(nn.Linear(context_dim, 2 * d) for d in dims)
        self.proj = nn.ModuleList(nn.Linear(d, c) for c, d in zip(channels, dims))
        self.gamma = nn.ParameterList(nn.Parameter(torch.full((c,), layer_scale)) for c in channels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        normed = [norm(m) for norm, m in zip(self.norms, maps)]
        contexts = []
        for i, y in enumerate(normed):
            pooled = F.adaptive_avg_pool2d(y, (min(y.shape[2], self.pool_size), min(y.shape[3], self.pool_size)))
            contexts.append(self.context[i](_tokens(pooled)) + self.scale_embed[i])
        shared = torch.cat(contexts, dim=1) if self.cross_scale else None
        out = []
        for i, (x, y) in enumerate(zip(maps, normed)):
            b, c, h, w = x.shape
            context = shared if self.cross_scale else contexts[i]
            k, v = (_heads(t, self.num_heads) for t in self.kv[i](context).chunk(2, dim=-1))
            if self.query_pool[i] > 1:
                y = F.avg_pool2d(y, self.query_pool[i], ceil_mode=True)
            q = _heads(self.q[i](_tokens(y)), self.num_heads)
            attended = self.proj[i](_merge_heads(F.scaled_dot_product_attention(q, k, v))) * self.gamma[i]
            attended = attended.transpose(1, 2).reshape(b, c, *y.shape[2:])
            if self.query_pool[i] > 1:
                attended = F.interpolate(attended, size=(h, w), mode='bilinear', align_corners=False)
            out.append(x + attended)
        return out


class PyramidAttention(nn.Module):
    """The SPEC's settings: CBAM per scale (modern=False); self-attention per scale; plus cross-scale."""

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        modern: bool,
        cross_scale: bool,
        num_heads: int,
        pool_size: int,
    ):
        super().__init__()
        # cross_scale applies to the modern attention only: the SPEC's classic row sets just
        # use_modern_attention=False and leaves the default (True) for cross-scale, so CBAM ignores it quietly.
        self.modern = modern
        self.blocks: PyramidSelfAttention | nn.ModuleList
        if modern:
            self.blocks = PyramidSelfAttention(channels, reductions, num_heads, pool_size, cross_scale)
        else:
            self.blocks = nn.ModuleList(CBAM(c) for c in channels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(self.blocks, PyramidSelfAttention):  # modern
            return self.blocks(maps)
        return [block(m) for block, m in zip(self.blocks, maps)]
