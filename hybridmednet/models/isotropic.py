"""The one adapter from an isotropic encoder to the 4-scale pyramid: Vision Mamba, DINOv2 and SAM all use it.

An isotropic encoder (a ViT, Vim) keeps one token grid at its patch stride through every block. As in
ViTDet's simple feature pyramid (Li et al., 2022), the maps after 4 blocks spread over the depth are
resampled to strides 4, 8, 16 and 32: two 2x deconvolutions, one, none, a 2x max-pool. A patch other than
16 (DINOv2's 14) is first resized to the stride-16 grid, so the strides are true ones.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hybridmednet.errors import ConfigError
from hybridmednet.models.backbones import FeaturePyramid, deconv_upsamplers


def tap_blocks(depth: int) -> list[int]:
    """1-based blocks whose outputs feed the pyramid: after 1/4, 2/4, 3/4 and all of the depth (ViT-B: 3, 6,
    9, 12, SAM-B's global-attention blocks)."""
    return [max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)]


def check_image_size(name: str, img_size: int, patch: int) -> None:
    """An encoder with `patch`-pixel patches takes a multiple of the patch, with 2 stride-16 cells for stride 32."""
    low = -(-32 // patch) * patch
    if img_size % patch or img_size < low:
        lower = img_size // patch * patch
        sizes = [str(s) for s in (lower, lower + patch) if s >= low] or [str(low)]
        raise ConfigError(
            f'{name}: DATA.image_size = {img_size} must be a multiple of its {patch}-pixel patches, at least {low}; '
            f'set DATA.image_size to {" or ".join(sizes)}'
        )


class IsotropicPyramid(FeaturePyramid):
    """The simple feature pyramid over `trunk`, whose blocks are the module list `trunk.<blocks>` and whose
    final norm, if any, is `trunk.<norm>`. Subclasses run the encoder in `taps`."""

    def __init__(self, trunk: nn.Module, dim: int, blocks: str, norm: str | None = None):
        super().__init__()
        self.trunk = trunk
        self.blocks, self.norm = blocks, norm
        self.indices = tap_blocks(len(list(trunk.get_submodule(blocks).children())))
        self.channels = [dim // 4, dim // 2, dim, dim]
        self.reductions = [4, 8, 16, 32]
        self.resample = nn.ModuleList([*deconv_upsamplers(dim), nn.Identity(), nn.MaxPool2d(2)])

    def taps(self, x: Tensor) -> list[Tensor]:
        """The outputs of the blocks in `indices` as NCHW maps at the patch stride."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        grid = (x.shape[-2] // 16, x.shape[-1] // 16)
        maps = []
        for tap, resample in zip(self.taps(x), self.resample):
            if tap.shape[-2:] != grid:
                tap = F.interpolate(tap, size=grid, mode='bilinear', align_corners=False)
            maps.append(resample(tap))
        return maps

    def layer_groups(self) -> list[list[str]]:
        """The stem (everything before the blocks), then each block; the final norm joins the last block, as in
        timm's grouping of its ViTs."""
        blocks = enumerate(self.trunk.get_submodule(self.blocks).children())
        groups = [[f'trunk.{self.blocks}.{i}.{n}' for n, _ in block.named_parameters()] for i, block in blocks]
        later = (f'{self.blocks}.', f'{self.norm}.') if self.norm else (f'{self.blocks}.',)
        stem = [f'trunk.{n}' for n, _ in self.trunk.named_parameters() if not n.startswith(later)]
        if self.norm:
            groups[-1] += [f'trunk.{self.norm}.{n}' for n, _ in self.trunk.get_submodule(self.norm).named_parameters()]
        return [stem, *groups]
