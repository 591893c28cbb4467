"""3D feature pyramids: volumes [B, C, D, H, W] in, 4 NCDHW maps out.

MONAI's 3D networks (ResNet in MedicalNet's layout, the Swin encoder of SwinUNETR, MedNeXt) are imported
when built: MONAI is the `3d` extra. ConvNeXt-T is rebuilt in 3D here, with timm's key names, so its 2D
weights inflate onto it. Pretrained 3D weights come from local files only (nothing is downloaded), read by
the same safe reader and checked as strictly as 2D ones.
"""

from __future__ import annotations

import importlib
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import adapt_input_conv
from torch import nn

from hybridmednet.errors import ConfigError, PretrainedWeightsError
from hybridmednet.models.attention import LayerNormNd
from hybridmednet.models.backbones import FeaturePyramid, StateDict, check_fits, create_timm_model, read_state_dict


def monai_nets(*needs: str) -> Any:
    """monai.networks.nets, or the one-line error naming the extra; `needs`: MONAI's optional imports the network
    uses (it would only fail at the first forward)."""
    try:
        for module in needs:
            importlib.import_module(module)
        return importlib.import_module('monai.networks.nets')
    except ImportError as exc:
        raise ConfigError(f"3D backbones need {exc.name or 'MONAI'}: pip install 'hybridmednet[3d]'") from None


def check_volume_size(name: str, size: Sequence[int] | None, stride: int) -> None:
    """A volume must span the pyramid's coarsest stride on every side (None: the size is not known yet)."""
    if size is None:
        return
    if len(size) != 3 or not all(isinstance(s, int) and s >= stride for s in size):
        raise ConfigError(
            f"{name}: DATA['volume_size'] must be 3 sides [D, H, W] of at least {stride} voxels "
            f"(the backbone's coarsest stride), got {size!r}"
        )


def load_local_3d(
    module: nn.Module, pretrained: bool | str, name: str, where: str, convert: Callable[[StateDict], StateDict]
) -> None:
    """Load a local weights file into `module` strictly, after `convert` maps its published layout onto the
    module's keys; `pretrained=True` is refused, as there is nothing to download from (`where` says what to get)."""
    if pretrained is True:
        raise PretrainedWeightsError(
            f"{name}: 3D weights are not downloaded; set MODEL['pretrained'] to a local file ({where}) or False"
        )
    if pretrained:
        state = convert(read_state_dict(pretrained))
        check_fits(module.state_dict(), state, f'weights file {pretrained} does not fit {name}')
        module.load_state_dict(state, strict=False)  # only BatchNorm counters may be missing (check_fits)


def no_drop_path(name: str, drop_path_rate: float) -> None:
    if drop_path_rate:
        raise ConfigError(f"{name} has no drop path; set MODEL['drop_path_rate'] = 0")


def named_groups(model: nn.Module, units: list[list[str]]) -> list[list[str]]:
    """Parameter names grouped by module-name prefixes: one group per unit (stem first, then the blocks)."""
    names = [n for n, _ in model.named_parameters()]
    return [[n for n in names if any(n.startswith(p + '.') for p in unit)] for unit in units]


class ResNet3dPyramid(FeaturePyramid):
    """MONAI's ResNet as MedicalNet built it (stride-2 7^3 stem, max pool), cut after its 4 stages: strides 4..32."""

    def __init__(self, net: Any):  # monai.networks.nets.ResNetFeatures
        super().__init__()
        self.net = net
        expansion = type(net.layer1[0]).expansion
        self.channels = [c * expansion for c in (64, 128, 256, 512)]
        self.reductions = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)[1:]  # [stem, layer1..layer4]

    def layer_groups(self) -> list[list[str]]:
        layers = [getattr(self.net, f'layer{i}') for i in range(1, 5)]
        blocks = [[f'net.layer{i}.{j}'] for i, layer in enumerate(layers, 1) for j in range(len(layer))]
        return named_groups(self, [['net.conv1', 'net.bn1'], *blocks])


def medicalnet_state(state: StateDict) -> StateDict:
    """MedicalNet's files ('module.' prefixes, removed by read_state_dict) minus a segmentation head (conv_seg)
    or a MONAI classifier's fc."""
    return {k: v for k, v in state.items() if not k.startswith(('conv_seg.', 'fc.'))}


def build_resnet3d(
    spec: Any,
    pretrained: bool | str = False,
    img_size: Sequence[int] | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 1,
) -> ResNet3dPyramid:
    check_volume_size(spec.name, img_size, 32)
    no_drop_path(spec.name, drop_path_rate)
    depth = spec.name.removeprefix('resnet3d_')
    net = monai_nets().ResNetFeatures(f'resnet{depth}', pretrained=False, spatial_dims=3, in_channels=in_chans)
    load_local_3d(net, pretrained, spec.name, f"MedicalNet's resnet_{depth}.pth", medicalnet_state)
    return ResNet3dPyramid(net)


class Swin3dPyramid(FeaturePyramid):
    """SwinUNETR's Swin encoder (MONAI's SwinTransformer, patch 2, window 7): its layer-normed hidden states
    after the 4 stages, strides 4..32 (the stride-2 patch embedding is left out)."""

    def __init__(self, encoder: nn.Module, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.channels = [embed_dim * 2**i for i in range(1, 5)]
        self.reductions = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x, normalize=True)[1:]

    def layer_groups(self) -> list[list[str]]:
        units = [['encoder.patch_embed']]
        for i in range(1, 5):
            stage = f'encoder.layers{i}.0'
            depth = len(getattr(self.encoder, f'layers{i}')[0].blocks)
            units += [[f'{stage}.blocks.{j}'] for j in range(depth)]
            units[-1].append(f'{stage}.downsample')
        return named_groups(self, units)


def swin_unetr_state(state: StateDict) -> StateDict:
    """SwinUNETR's self-supervised encoder file ('module.' prefixes, MLPs as fc1/fc2) or a whole SwinUNETR's
    state dict ('swinViT.' prefixes) -> the encoder's keys; heads and decoders are left out."""
    if any(k.startswith('swinViT.') for k in state):
        state = {k.removeprefix('swinViT.'): v for k, v in state.items() if k.startswith('swinViT.')}
    return {
        k.replace('.mlp.fc1.', '.mlp.linear1.').replace('.mlp.fc2.', '.mlp.linear2.'): v
        for k, v in state.items()
        if k.startswith(('patch_embed.', 'layers'))
    }


def build_swin3d(
    spec: Any,
    pretrained: bool | str = False,
    img_size: Sequence[int] | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 1,
) -> Swin3dPyramid:
    check_volume_size(spec.name, img_size, 32)
    swin_unetr = monai_nets('einops').swin_unetr
    embed_dim = 48  # SwinUNETR's feature_size for its self-supervised weights
    device = torch.get_default_device()
    with torch.device('cpu'):  # MONAI reads its drop-path rates with .item(), which a meta tensor refuses
        encoder = swin_unetr.SwinTransformer(
            in_chans=in_chans,
            embed_dim=embed_dim,
            window_size=(7, 7, 7),
            patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2),
            num_heads=(3, 6, 12, 24),
            drop_path_rate=drop_path_rate,
            spatial_dims=3,
            downsample=swin_unetr.PatchMerging,
        )
    encoder.to(device)
    load_local_3d(encoder, pretrained, spec.name, "SwinUNETR's self-supervised model_swinvit.pt", swin_unetr_state)
    return Swin3dPyramid(encoder, embed_dim)


class MedNeXtPyramid(FeaturePyramid):
    """MedNeXt's encoder (its full-resolution stem, 4 stages and bottleneck; the decoder is dropped). Its stages
    sit at strides 1..16, so the pyramid is stages 2-4 and the bottleneck: strides 2, 4, 8, 16."""

    def __init__(self, net: Any):  # monai.networks.nets.MedNeXt
        super().__init__()
        self.stem, self.enc_stages, self.down_blocks, self.bottleneck = (
            net.stem,
            net.enc_stages,
            net.down_blocks,
            net.bottleneck,
        )
        width = net.stem.out_channels
        self.channels = [width * 2**i for i in range(1, 5)]
        self.reductions = [2, 4, 8, 16]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for i, (stage, down) in enumerate(zip(self.enc_stages, self.down_blocks)):
            x = stage(x)
            if i:
                maps.append(x)
            x = down(x)
        return [*maps, self.bottleneck(x)]

    def layer_groups(self) -> list[list[str]]:
        units = [['stem']]
        for i, stage in enumerate(self.enc_stages):
            units += [[f'enc_stages.{i}.{j}'] for j in range(len(stage))]
            units[-1].append(f'down_blocks.{i}')
        units += [[f'bottleneck.{j}'] for j in range(len(self.bottleneck))]
        return named_groups(self, units)


def mednext_encoder_state(state: StateDict) -> StateDict:
    """A MONAI MedNeXt's state dict -> its encoder's keys (the decoder and output blocks are left out)."""
    return {k: v for k, v in state.items() if k.startswith(('stem.', 'enc_stages.', 'down_blocks.', 'bottleneck.'))}


def build_mednext(
    spec: Any,
    pretrained: bool | str = False,
    img_size: Sequence[int] | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 1,
) -> MedNeXtPyramid:
    check_volume_size(spec.name, img_size, 16)
    no_drop_path(spec.name, drop_path_rate)
    variant = spec.name.removeprefix('mednext_').upper()
    pyramid = MedNeXtPyramid(monai_nets().mednext.create_mednext(variant, spatial_dims=3, in_channels=in_chans))
    load_local_3d(pyramid, pretrained, spec.name, "a MONAI MedNeXt's state dict", mednext_encoder_state)
    return pyramid


def inflate_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 2D k x k kernel [O, I, k, k] -> 3D [O, I, k, k, k]: repeated along depth and divided by k (I3D), so a
    volume of identical slices gives the 2D response on every slice."""
    return weight.unsqueeze(2).repeat(1, 1, weight.shape[-1], 1, 1) / weight.shape[-1]


class ConvNeXtBlock3d(nn.Module):
    """timm's ConvNeXt block in 3D, same parameter names. The depthwise 7^3 convolution pads depth by repeating
    the edge slices (height and width by zeros, as in 2D), so a volume of identical slices stays one, and inflated
    weights give the 2D model's features on every slice."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv3d(dim, dim, 7, padding=(0, 3, 3), groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, act_layer=nn.GELU)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(F.pad(x, (0, 0, 0, 0, 3, 3), mode='replicate'))
        y = (self.mlp(self.norm(y.movedim(1, -1))) * self.gamma).movedim(-1, 1)
        return self.drop_path(y) + x


class ConvNeXtStage3d(nn.Module):
    def __init__(self, in_dim: int, dim: int, drop_paths: list[float]):
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNormNd(in_dim), nn.Conv3d(in_dim, dim, 2, stride=2)) if in_dim != dim else nn.Identity()
        )
        self.blocks = nn.Sequential(*(ConvNeXtBlock3d(dim, p) for p in drop_paths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt3d(FeaturePyramid):
    """ConvNeXt (Liu et al., 2022) in 3D with timm's key names: the 4 stage outputs, strides 4..32.
    `load_2d_state` inflates a timm 2D ConvNeXt's weights onto it."""

    def __init__(
        self,
        in_chans: int = 1,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.in_chans, self.depths = in_chans, depths
        self.stem = nn.Sequential(nn.Conv3d(in_chans, dims[0], 4, stride=4), LayerNormNd(dims[0]))
        total = sum(depths)
        rates = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]  # timm's linspace, meta-safe
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.Sequential(
            *(
                ConvNeXtStage3d(dims[max(i - 1, 0)], dims[i], rates[s : s + d])
                for i, (s, d) in enumerate(zip(starts, depths))
            )
        )
        self.channels = list(dims)
        self.reductions = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def load_2d_state(self, state: StateDict, source: str = 'the 2D weights') -> None:
        """Inflate a timm 2D ConvNeXt's state dict (I3D): each k x k kernel repeated k times along depth and
        divided by k; the stem's RGB kernels summed for 1 channel (timm's adapt_input_conv); the classifier
        head left out. Strict: `source` names the weights in the error."""
        inflated = {}
        for key, value in state.items():
            if key.startswith('head.'):
                continue
            if key == 'stem.0.weight':
                value = adapt_input_conv(self.in_chans, value)
            inflated[key] = inflate_kernel(value) if value.dim() == 4 else value
        check_fits(self.state_dict(), inflated, f'{source} do not fit {type(self).__name__}')
        self.load_state_dict(inflated)

    def layer_groups(self) -> list[list[str]]:
        units = [['stem']]
        for i, depth in enumerate(self.depths):
            units += [[f'stages.{i}.blocks.{j}'] for j in range(depth)]
            units[-depth].append(f'stages.{i}.downsample')  # with the stage's first block, as in timm
        return named_groups(self, units)


class SwinStage3d(nn.Module):
    """One timm Swin stage in 3D: patch merging first (timm's order), then MONAI's 3D window-attention blocks
    with windows `window` [D, H, W]."""

    def __init__(
        self, swin: Any, in_dim: int, dim: int, depth: int, heads: int, window: tuple[int, ...], drop_paths: list[float]
    ):
        super().__init__()
        self.window = window
        self.downsample = swin.PatchMergingV2(in_dim, spatial_dims=3) if in_dim != dim else None
        self.layer = swin.BasicLayer(dim, depth, heads, window, drop_paths, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x.movedim(1, -1)).movedim(-1, 1)
        # MONAI shrinks a window to a smaller grid, but then reads its relative-position biases for the first
        # tokens of the full window: right when only depth shrinks (the index runs depth-major), wrong otherwise.
        grid = tuple(x.shape[2:])
        if any(g < w for g, w in zip(grid[1:], self.window[1:])):
            raise ValueError(
                f'swin3d_inflated: a {grid} token grid is smaller in-plane than its {self.window} windows; build '
                'the model for the volume size it is given (DATA.volume_size)'
            )
        return self.layer(x)


def swin_windows(window: int, stages: int, volume_size: Sequence[int] | None) -> list[tuple[int, ...]]:
    """Each stage's window [D, H, W]: `window` on every side, cut to the stage's token grid where the volume is
    smaller (the patch embedding and each merging round up, as MONAI's padding does)."""
    if volume_size is None:
        return [(window,) * 3] * stages
    grid, windows = [-(-s // 4) for s in volume_size], []
    for _ in range(stages):
        windows.append(tuple(min(window, g) for g in grid))
        grid = [-(-g // 2) for g in grid]
    return windows


class SwinInflated3d(FeaturePyramid):
    """timm's Swin-T in 3D on MONAI's 3D Swin blocks (Video Swin's shifted 3D windows): the 4 stage outputs,
    strides 4..32. `load_2d_state` inflates a timm 2D Swin's weights onto it so that a volume of identical slices
    gives the 2D model's features on every slice: kernels as in I3D, each relative-position bias copied to every
    depth offset (duplicated keys leave a softmax average unchanged), and each patch-merging weight shared by the
    two depth neighbours of its 2D position. Windows are cut to the token grid where `volume_size` is smaller
    (their biases the central ones of the 2D table); volumes whose token grid a window does not divide are
    zero-padded as in MONAI's SwinUNETR."""

    def __init__(
        self,
        in_chans: int = 1,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window: int = 7,
        drop_path_rate: float = 0.0,
        volume_size: Sequence[int] | None = None,
    ):
        super().__init__()
        swin = monai_nets('einops').swin_unetr
        self.in_chans, self.depths = in_chans, depths
        self.patch_embed = swin.PatchEmbed(4, in_chans, embed_dim, nn.LayerNorm, spatial_dims=3)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        total = sum(depths)
        rates = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.windows = swin_windows(window, len(depths), volume_size)
        self.layers = nn.Sequential(
            *(
                SwinStage3d(swin, dims[max(i - 1, 0)], dims[i], d, h, w, rates[s : s + d])
                for i, (s, d, h, w) in enumerate(zip(starts, depths, num_heads, self.windows))
            )
        )
        self.channels = dims
        self.reductions = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        maps = []
        for stage in self.layers:
            x = stage(x)
            maps.append(x)
        return maps

    def load_2d_state(self, state: StateDict, source: str = 'the 2D weights') -> None:
        """Inflate a timm 2D Swin's state dict (its classifier and final norm left out); the relative-position
        indices are the 3D model's own. Strict: `source` names the weights in the error."""
        # PatchMergingV2 concatenates the 8 neighbours (d, h, w) in product order; timm's 2D merging the 4
        # neighbours w-major: 3D slot (d, h, w) takes 2D slot 2w + h, each 2D slot twice (d = 0, 1).
        slots = [2 * w + h for _, h, w in itertools.product(range(2), range(2), range(2))]
        own = self.state_dict()
        inflated = {k: v for k, v in own.items() if k.endswith('relative_position_index')}
        for key, value in state.items():
            if key.startswith(('head.', 'norm.')) or key.endswith(('relative_position_index', 'attn_mask')):
                continue
            key = re.sub(r'^layers\.(\d+)\.blocks\.', r'layers.\1.layer.blocks.', key)
            key = key.replace('.mlp.fc1.', '.mlp.linear1.').replace('.mlp.fc2.', '.mlp.linear2.')
            if key == 'patch_embed.proj.weight':
                value = inflate_kernel(adapt_input_conv(self.in_chans, value))
            elif key.endswith('relative_position_bias_table'):
                value = self._inflate_biases(key, value, source)
            elif key.endswith('downsample.norm.weight') or key.endswith('downsample.norm.bias'):
                value = value.view(4, -1)[slots].flatten()
            elif key.endswith('downsample.reduction.weight'):
                value = value.view(value.shape[0], 4, -1)[:, slots].flatten(1) / 2
            inflated[key] = value
        check_fits(own, inflated, f'{source} do not fit {type(self).__name__}')
        self.load_state_dict(inflated)

    def _inflate_biases(self, key: str, table: torch.Tensor, source: str) -> torch.Tensor:
        """A 2D table [(2W-1)^2, heads] -> the 3D window's [(2d-1)(2h-1)(2w-1), heads]: the central (2h-1) x
        (2w-1) offsets, the same for every depth offset (MONAI's index runs depth, then height, then width)."""
        d, h, w = self.windows[int(key.split('.')[1])]
        side = round(table.shape[0] ** 0.5)  # 2W - 1
        half = (side + 1) // 2  # W
        if h > half or w > half:
            raise PretrainedWeightsError(
                f'{source}: {key} holds the biases of a {half}x{half} window, smaller than the {h}x{w} windows '
                'of the 3D model'
            )
        grid = table.view(side, side, -1)[half - h : half + h - 1, half - w : half + w - 1]
        return grid.reshape(-1, table.shape[1]).repeat(2 * d - 1, 1)

    def layer_groups(self) -> list[list[str]]:
        units = [['patch_embed']]
        for i, depth in enumerate(self.depths):
            units += [[f'layers.{i}.layer.blocks.{j}'] for j in range(depth)]
            units[-depth].append(f'layers.{i}.downsample')  # with the stage's first block, as in timm
        return named_groups(self, units)


# family -> the 3D model, from (in_chans, drop_path_rate, volume_size)
INFLATED: dict[str, Callable[[int, float, Sequence[int] | None], ConvNeXt3d | SwinInflated3d]] = {
    'convnext3d': lambda chans, rate, size: ConvNeXt3d(chans, drop_path_rate=rate),
    'swin3d_inflated': lambda chans, rate, size: SwinInflated3d(chans, drop_path_rate=rate, volume_size=size),
}


def build_inflated(
    spec: Any,
    pretrained: bool | str = False,
    img_size: Sequence[int] | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 1,
) -> ConvNeXt3d | SwinInflated3d:
    """The 3D model of the spec's family (`INFLATED`); `pretrained`: True inflates timm's ImageNet weights
    (hub or cache), a path a local timm weights file."""
    check_volume_size(spec.name, img_size, 32)
    model = INFLATED[spec.family](in_chans, drop_path_rate, img_size)
    if pretrained:
        model_2d = create_timm_model(spec.timm_name, pretrained)  # architecture and keys checked as for 2D
        model.load_2d_state(model_2d.state_dict(), f'the weights of {spec.timm_name}')
    return model
