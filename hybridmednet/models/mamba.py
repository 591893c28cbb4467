"""Vision Mamba (Zhu et al., 2024): bidirectional state-space blocks over image patches.

Pure PyTorch, so it trains and runs on CPU; the selective scan itself lives in `selective_scan`
(mamba-ssm's fused kernel on a GPU where it is installed). The multi-scale backbone resamples the
stride-16 tokens as ViTDet's simple feature pyramid does (models/isotropic.py, shared with DINOv2 and SAM).

Module and parameter names follow the official hustvl/Vim code, so its checkpoints load
key for key (`load_vim_checkpoint`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from torch import Tensor, nn

from hybridmednet.errors import PretrainedWeightsError
from hybridmednet.models.backbones import check_fits, read_state_dict
from hybridmednet.models.isotropic import IsotropicPyramid, check_image_size
from hybridmednet.models.selective_scan import scan_function, selective_scan

VIM_VARIANTS: dict[str, dict[str, Any]] = {
    'vim_tiny': dict(embed_dim=192),
    'vim_small': dict(embed_dim=384),
    'vim_base': dict(embed_dim=768),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba mixer ("v2"): one input and output projection, and for each scan
    direction its own conv1d, x/dt projections, A and D. The backward direction scans the flipped
    sequence; both outputs are averaged before `out_proj`."""

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        for suffix in ('', '_b'):
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner)
            nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():  # softplus(bias) = dt
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            setattr(self, f'conv1d{suffix}', conv)
            setattr(self, f'x_proj{suffix}', x_proj)
            setattr(self, f'dt_proj{suffix}', dt_proj)
            setattr(self, 'A_log' if not suffix else 'A_b_log', nn.Parameter(torch.log(A)))
            setattr(self, f'D{suffix}', nn.Parameter(torch.ones(self.d_inner)))

    def forward(self, hidden: Tensor) -> Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # [b, l, d_inner] each
        forward = self.scan_direction(x, z, backward=False)
        backward = self.scan_direction(x.flip(1), z.flip(1), backward=True).flip(1)
        return self.out_proj((forward + backward) / 2)

    def scan_direction(self, x: Tensor, z: Tensor, backward: bool) -> Tensor:
        """One causal selective scan over the tokens of x [b, l, d_inner] gated by z, giving [b, l, d_inner];
        `backward` picks the _b parameters (the caller flips the sequence). The PyTorch scan takes the
        tokens-first layout as it is; mamba-ssm's kernel wants channels first."""
        s = '_b' if backward else ''
        conv, x_proj, dt_proj = getattr(self, f'conv1d{s}'), getattr(self, f'x_proj{s}'), getattr(self, f'dt_proj{s}')
        A = -torch.exp(getattr(self, 'A_b_log' if backward else 'A_log').float())
        u = F.silu(conv(x.transpose(1, 2))[..., : x.shape[1]]).transpose(1, 2)  # causal depthwise conv
        dt, B, C = x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ dt_proj.weight.t()
        options = dict(D=getattr(self, f'D{s}').float(), delta_bias=dt_proj.bias.float(), delta_softplus=True)
        scan = scan_function(x.device)
        if scan is selective_scan:
            return selective_scan(u, delta, A, B, C, z=z, tokens_first=True, **options)
        channels_first = [t.transpose(1, 2).contiguous() for t in (u, delta, B, C, z)]
        return scan(*channels_first[:2], A, *channels_first[2:4], z=channels_first[4], **options).transpose(1, 2)


class VimBlock(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(RMSNorm(x)))."""

    def __init__(self, dim: int, d_state: int = 16, drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mixer = BiMamba(dim, d_state)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class VisionMamba(nn.Module):
    """The Vim classifier: patch embedding, a class token in the middle of the sequence, absolute
    position embedding, `depth` bidirectional Mamba blocks, a final RMSNorm and a linear head on the
    class token. Keys match the official checkpoints."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(VimBlock(embed_dim, d_state, rate) for rate in rates)
        self.norm_f = RMSNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        # as in the Vim code: lecun-normal patch conv, truncated-normal tokens and head, zero Linear
        # biases except dt_proj (set above), out_proj scaled down by sqrt(depth)
        lecun_normal_(self.patch_embed.proj.weight)
        if self.patch_embed.proj.bias is None:
            raise RuntimeError('PatchEmbed.proj must have a bias (Vim checkpoints carry one)')
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            out_proj = cast(VimBlock, layer).mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight /= math.sqrt(depth)

    def tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int], int]:
        """Embedded token sequence [b, h*w + 1, d] with the class token at index h*w // 2."""
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        mid = x.shape[1] // 2
        x = torch.cat([x[:, :mid], self.cls_token.expand(x.shape[0], -1, -1), x[:, mid:]], 1)
        return x + resize_pos_embed(self.pos_embed, self.grid, grid), grid, mid

    def forward_intermediates(self, x: Tensor, indices: list[int]) -> tuple[list[Tensor], tuple[int, int], int]:
        """Token sequences after the blocks at 1-based depths `indices`, each passed through norm_f."""
        x, grid, mid = self.tokens(x)
        taps = {}
        for depth, layer in enumerate(self.layers, 1):
            x = layer(x)
            if depth in indices:
                taps[depth] = self.norm_f(x)
        return [taps[i] for i in indices], grid, mid

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised class token [b, d]."""
        (x,), _, mid = self.forward_intermediates(x, [len(self.layers)])
        return x[:, mid]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resize of the patch position embeddings; the class token's entry (middle index) is kept."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    old_mid, new_mid = old_grid[0] * old_grid[1] // 2, new_grid[0] * new_grid[1] // 2
    cls = pos_embed[:, old_mid : old_mid + 1]
    patches = torch.cat([pos_embed[:, :old_mid], pos_embed[:, old_mid + 1 :]], 1)
    patches = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode='bicubic', align_corners=False)
    patches = patches.to(pos_embed.dtype).flatten(2).transpose(1, 2)
    return torch.cat([patches[:, :new_mid], cls, patches[:, new_mid:]], 1)


class VimBackbone(IsotropicPyramid):
    """Vim as a 4-scale pyramid through the isotropic adapter: tokens after 1/4, 2/4, 3/4 and all of the
    blocks, each through norm_f, without the class token, as stride-16 maps."""

    trunk: VisionMamba

    def __init__(self, img_size: int = 224, embed_dim: int = 192, depth: int = 24, **options: Any):
        trunk = VisionMamba(img_size=img_size, embed_dim=embed_dim, depth=depth, **options)
        if trunk.patch_size != 16:
            raise ValueError('the Vim pyramid expects 16x16 patches (strides 4..32 are resampled from 16)')
        super().__init__(trunk, embed_dim, 'layers', 'norm_f')

    def taps(self, x: Tensor) -> list[Tensor]:
        taps, (h, w), mid = self.trunk.forward_intermediates(x, self.indices)
        patches = [torch.cat([tokens[:, :mid], tokens[:, mid + 1 :]], 1) for tokens in taps]  # no class token
        return [tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w) for tokens in patches]

    def load_pretrained(self, path: str | Path) -> None:
        load_vim_checkpoint(self.trunk, path)


def load_vim_checkpoint(model: VisionMamba, path: str | Path) -> None:
    """Load an official hustvl/Vim checkpoint (.pth with a 'model' entry, a plain state dict, or
    .safetensors). The layouts match key for key; the position embedding is resized to the model's
    grid, the classifier is dropped when the model has none, and anything else that does not fit
    is an error listing the keys."""
    state = read_state_dict(path)
    if not isinstance(model.head, nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith('head.')}
    if 'pos_embed' in state:
        old = state['pos_embed']
        side = math.isqrt(old.shape[1] - 1)
        if side * side != old.shape[1] - 1:
            raise PretrainedWeightsError(
                f'Vim checkpoint {path}: pos_embed has {old.shape[1]} entries, not a square '
                'grid plus a class token; is it a Vision Mamba checkpoint?'
            )
        state['pos_embed'] = resize_pos_embed(old, (side, side), model.grid)
    check_fits(
        model.state_dict(),
        state,
        f'Vim checkpoint {path} does not fit a Vim with embed_dim={model.embed_dim}, depth={len(model.layers)}',
    )
    model.load_state_dict(state, strict=True)


def build_vim_backbone(spec: Any, pretrained: bool | str = False, img_size: int = 224, **options: Any) -> VimBackbone:
    """Registry builder for vim_tiny / vim_small / vim_base; `pretrained` is False or a local checkpoint path."""
    if pretrained is True:
        raise PretrainedWeightsError(
            f'{spec.name}: there is no hub source for Vision Mamba weights. Download an official checkpoint '
            "from https://github.com/hustvl/Vim and set MODEL['pretrained'] = '/path/to/vim_checkpoint.pth', "
            "or MODEL['pretrained'] = False to train from scratch."
        )
    check_image_size(spec.name, img_size, 16)
    model = VimBackbone(img_size=img_size, **{**VIM_VARIANTS[spec.name], **options})
    if pretrained:
        model.load_pretrained(pretrained)
    return model
