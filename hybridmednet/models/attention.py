"""Attention over the 4-scale pyramid; every module keeps each scale's shape.

Cost is bounded: queries run on a grid of stride >= 16 (finer maps are pooled
and their outputs upsampled) and keys and values are pooled to at most
`pool_size`^2 tokens per scale (a `pool_size` x `pool_size` grid for images, a
cube of about the same count for volumes: 4^3 for 7), so attention grows linearly
with the number of pixels instead of quadratically, and runs through
`scaled_dot_product_attention`.

The same modules take NCHW maps (2D images) and NCDHW maps (3D volumes): the
pooling and interpolation ops are chosen by the maps' number of spatial dims, and
CBAM's convolutions by its `spatial_dims` argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The ops for maps with 2 or 3 spatial dims (NCHW or NCDHW), keyed by that number.
_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOL: dict[int, Callable[..., torch.Tensor]] = {2: F.avg_pool2d, 3: F.avg_pool3d}
ADAPTIVE_AVG_POOL: dict[int, Callable[..., torch.Tensor]] = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
ADAPTIVE_MAX_POOL: dict[int, Callable[..., torch.Tensor]] = {2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_INTERPOLATION = {2: 'bilinear', 3: 'trilinear'}


def _pool_to(y: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Adaptive average pooling to `size`. A volume whose sides divide evenly is pooled with fixed windows instead:
    the same averages, and the ONNX exporters have no 3D adaptive pooling. Images keep adaptive pooling, so
    2D checkpoints give the same outputs to the bit."""
    n = y.dim() - 2
    if n == 3 and all(s % t == 0 for s, t in zip(y.shape[2:], size)):
        window = [s // t for s, t in zip(y.shape[2:], size)]
        return _AVG_POOL[n](y, window, window)
    return ADAPTIVE_AVG_POOL[n](y, size)


class LayerNormNd(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map with any number of spatial dims: timm's
    LayerNorm2d for NCHW (same parameters, same arithmetic), and NCDHW too."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


class CBAM(nn.Module):
    """Channel then spatial attention (Woo et al., 2018): cheap, the classic ResNet pairing."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__()
        hidden = max(channels // reduction, 8)
        conv = _CONV[spatial_dims]
        self.mlp = nn.Sequential(conv(channels, hidden, 1), nn.ReLU(inplace=True), conv(hidden, channels, 1))
        self.spatial = conv(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.dim() - 2
        x = x * torch.sigmoid(self.mlp(ADAPTIVE_AVG_POOL[n](x, 1)) + self.mlp(ADAPTIVE_MAX_POOL[n](x, 1)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def attention_dim(channels: int, num_heads: int, max_dim: int = 256) -> int:
    """Inner width: at most `max_dim`, a multiple of the head count."""
    return max(num_heads, min(channels, max_dim) // num_heads * num_heads)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, *spatial] -> [B, N, C]


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, num_heads, d // num_heads).transpose(1, 2)  # [B, heads, N, d_head]


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class PyramidSelfAttention(nn.Module):
    """Multi-head attention at every scale, with keys/values from pooled context tokens.

    Each scale is normalised, pooled to at most about pool_size^2 tokens and projected
    to a shared context width once. Queries keep each scale's own width, on a
    grid of stride at least `query_stride`: the stride-4 and stride-8 maps attend
    on pooled grids and their outputs are upsampled (context is smooth; the fine
    detail stays in the residual). Without cross-scale attention a scale reads its own
    context only; with it, the context of all four scales, so scales reinforce
    each other at almost no extra cost (the context is 4 x 49 tokens; 4 x 64 for volumes).
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
        self.norms = nn.ModuleList(LayerNormNd(c) for c in channels)
        self.context = nn.ModuleList(nn.Linear(c, context_dim) for c in channels)
        self.scale_embed = nn.Parameter(torch.zeros(len(channels), context_dim))
        self.q = nn.ModuleList(nn.Linear(c, d) for c, d in zip(channels, dims))
        self.kv = nn.ModuleList(nn.Linear(context_dim, 2 * d) for d in dims)
        self.proj = nn.ModuleList(nn.Linear(d, c) for c, d in zip(channels, dims))
        self.gamma = nn.ParameterList(nn.Parameter(torch.full((c,), layer_scale)) for c in channels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        normed = [norm(m) for norm, m in zip(self.norms, maps)]
        contexts = []
        n = maps[0].dim() - 2  # spatial dims
        side = max(1, round(self.pool_size ** (2 / n)))  # about pool_size^2 tokens in 2D and 3D alike
        for i, y in enumerate(normed):
            pooled = _pool_to(y, [min(s, side) for s in y.shape[2:]])
            contexts.append(self.context[i](_tokens(pooled)) + self.scale_embed[i])
        shared = torch.cat(contexts, dim=1) if self.cross_scale else None
        out = []
        for i, (x, y) in enumerate(zip(maps, normed)):
            b, c = x.shape[:2]
            context = shared if self.cross_scale else contexts[i]
            k, v = (_heads(t, self.num_heads) for t in self.kv[i](context).chunk(2, dim=-1))
            if self.query_pool[i] > 1:
                y = _AVG_POOL[n](y, self.query_pool[i], ceil_mode=True)
            q = _heads(self.q[i](_tokens(y)), self.num_heads)
            attended = self.proj[i](_merge_heads(F.scaled_dot_product_attention(q, k, v))) * self.gamma[i]
            attended = attended.transpose(1, 2).reshape(b, c, *y.shape[2:])
            if self.query_pool[i] > 1:
                attended = F.interpolate(attended, size=x.shape[2:], mode=_INTERPOLATION[n], align_corners=False)
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
        spatial_dims: int = 2,
    ):
        super().__init__()
        # cross_scale applies to the modern attention only: the SPEC's classic row sets just
        # use_modern_attention=False and leaves the default (True) for cross-scale, so CBAM ignores it quietly.
        self.modern = modern
        self.blocks: PyramidSelfAttention | nn.ModuleList
        if modern:
            self.blocks = PyramidSelfAttention(channels, reductions, num_heads, pool_size, cross_scale)
        else:
            self.blocks = nn.ModuleList(CBAM(c, spatial_dims=spatial_dims) for c in channels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(self.blocks, PyramidSelfAttention):  # modern
            return self.blocks(maps)
        return [block(m) for block, m in zip(self.blocks, maps)]
