"""timm-backed feature pyramids: 4 NCHW maps at strides 4, 8, 16, 32.

The timm classifier is built whole, weights are loaded into it under its own
key names (hub, Hugging Face cache or a local file), then its head is pruned and
`forward_intermediates` gives the maps, NCHW for every family (Swin included).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.models import get_pretrained_cfg, group_parameters, split_model_name_tag
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from hybridmednet.errors import ConfigError, PretrainedWeightsError
from hybridmednet.models.registry import get_backbone_spec


class FeaturePyramid(nn.Module):
    """What every registry builder returns: `forward(x)` gives 4 NCHW maps (strides 4, 8, 16, 32),
    described by `channels` and `reductions` (one entry per map)."""

    channels: list[int]
    reductions: list[int]

    def layer_groups(self) -> list[list[str]]:
        """Parameter names of the pretrained trunk by depth, as timm groups them for layer-wise learning rates:
        [stem, block 1, ..., block n] (a final norm goes with the last block). Parameters in none of them, the
        layers a pyramid adds (FPN, deconvolutions), are new, and train like the head."""
        raise NotImplementedError(f'{type(self).__name__} does not group its parameters by depth')

    def freeze(self, trainable_blocks: int | None = None, backbone: str = 'the backbone') -> None:
        """Stop training the whole pyramid (None: a linear probe), or its stem and all but the last
        `trainable_blocks` blocks (the layers it adds train); `backbone` names it in messages."""
        frozen = {name for name, _ in self.named_parameters()}
        if trainable_blocks is not None:
            groups = self.layer_groups()
            depth = len(groups) - 1
            if not 0 <= trainable_blocks <= depth:
                raise ConfigError(
                    f'MODEL.trainable_blocks = {trainable_blocks} but {backbone} has {depth} blocks; '
                    f'use 0 to {depth}, or MODEL.finetune = full'
                )
            frozen = {name for group in groups[: depth + 1 - trainable_blocks] for name in group}
        for name, param in self.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        self.train(self.training)

    def lr_scales(self, decay: float) -> dict[str, float]:
        """Layer-wise learning-rate decay (BEiT, timm's param_groups_layer_decay): a parameter at depth i of the
        stem (0) and n blocks gets decay ** (n + 1 - i); those in no group (scale 1) train like the head."""
        groups = self.layer_groups()
        return {name: decay ** (len(groups) - depth) for depth, group in enumerate(groups) for name in group}

    def train(self, mode: bool = True) -> FeaturePyramid:
        """Frozen parts stay in eval mode, so a frozen backbone's BatchNorm statistics, dropout and drop-path
        change nothing: a linear probe sees the same features in every epoch."""
        super().train(mode)
        if mode:
            for module in self.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self


class _TimmFeatures(Protocol):
    """The part of timm's feature-extraction API a pyramid uses (timm models define it; nn.Module does not)."""

    feature_info: Any  # per stage: {'num_chs', 'reduction', 'module'}
    pretrained_cfg: dict[str, Any]

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]: ...

    def prune_intermediate_layers(self, indices: list[int], prune_norm: bool, prune_head: bool) -> list[int]: ...

    def forward_intermediates(
        self, x: torch.Tensor, *, indices: list[int], intermediates_only: bool, output_fmt: str, norm: bool = False
    ) -> list[torch.Tensor]: ...


def timm_features(model: nn.Module) -> _TimmFeatures:
    """`model` seen through timm's feature API (torch types its attributes as Tensor | Module)."""
    return cast(_TimmFeatures, model)


class TimmPyramid(FeaturePyramid):
    """A timm model cut after the stages named by `indices`."""

    def __init__(self, model: nn.Module, indices: tuple[int, ...]):
        super().__init__()
        features = timm_features(model)
        features.prune_intermediate_layers(list(indices), prune_head=True, prune_norm=True)
        self.model = model
        self.indices = list(indices)
        info = [features.feature_info[i] for i in indices]
        self.channels = [f['num_chs'] for f in info]
        self.reductions = [f['reduction'] for f in info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return timm_features(self.model).forward_intermediates(
            x, indices=self.indices, intermediates_only=True, output_fmt='NCHW'
        )

    def layer_groups(self) -> list[list[str]]:
        return timm_layer_groups(self.model, 'model.')


class ResNetFPN(FeaturePyramid):
    """The classic configuration: ResNet stages merged top-down by a feature pyramid network."""

    def __init__(self, pyramid: TimmPyramid, fpn_channels: int):
        super().__init__()
        self.body = pyramid
        self.fpn = FeaturePyramidNetwork(pyramid.channels, fpn_channels)
        self.channels = [fpn_channels] * len(pyramid.channels)
        self.reductions = pyramid.reductions

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body(x)
        return list(self.fpn({str(i): m for i, m in enumerate(maps)}).values())

    def layer_groups(self) -> list[list[str]]:
        return [[f'body.{n}' for n in group] for group in self.body.layer_groups()]


def deconv_upsamplers(dim: int) -> tuple[nn.Module, nn.Module]:
    """ViTDet's simple-pyramid upsamplers for a stride-16 map of `dim` channels: to stride 4
    (two 2x deconvolutions, dim // 4 channels) and to stride 8 (one, dim // 2 channels)."""
    return (
        nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
        ),
        nn.ConvTranspose2d(dim, dim // 2, 2, 2),
    )


class EfficientViMPyramid(FeaturePyramid):
    """EfficientViM's three stages sit at strides 16, 32 and 64. The stride-16 map is deconvolved to
    strides 4 and 8 (as for Vim) and kept at 16; the stride-64 map is merged top-down into the
    stride-32 one (1x1 projection, nearest upsampling, sum), as in an FPN, so no stage is wasted."""

    def __init__(self, pyramid: TimmPyramid):
        super().__init__()
        self.body = pyramid
        c16, c32, c64 = pyramid.channels
        self.up4, self.up2 = deconv_upsamplers(c16)
        self.top_down = nn.Conv2d(c64, c32, 1)
        self.channels = [c16 // 4, c16 // 2, c16, c32]
        self.reductions = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s16, s32, s64 = self.body(x)
        s32 = s32 + F.interpolate(self.top_down(s64), size=s32.shape[-2:], mode='nearest')
        return [self.up4(s16), self.up2(s16), s16, s32]

    def layer_groups(self) -> list[list[str]]:
        return [[f'body.{n}' for n in group] for group in self.body.layer_groups()]


def timm_layer_groups(model: nn.Module, prefix: str) -> list[list[str]]:
    """A timm model's parameters grouped by its own group_matcher, stem first (the groups timm's layer decay uses)."""
    groups = group_parameters(model, timm_features(model).group_matcher(coarse=False))
    return [[prefix + n for n in names] for _, names in sorted(groups.items())]


def build_timm_backbone(
    spec: Any, pretrained: bool | str = False, img_size: int = 224, drop_path_rate: float = 0.0, **options: Any
) -> TimmPyramid:
    kwargs = {**options, **timm_size_options(spec, img_size)}
    if drop_path_rate:
        kwargs['drop_path_rate'] = drop_path_rate
    model = create_timm_model(spec.timm_name, pretrained, **kwargs)
    return TimmPyramid(model, spec.out_indices)


def build_resnet_fpn(
    spec: Any,
    pretrained: bool | str = False,
    img_size: int = 224,
    fpn_channels: int = 256,
    drop_path_rate: float = 0.0,
    **options: Any,
) -> ResNetFPN:
    return ResNetFPN(build_timm_backbone(spec, pretrained, img_size, drop_path_rate, **options), fpn_channels)


def build_efficientvim(
    spec: Any, pretrained: bool | str = False, img_size: int = 224, drop_path_rate: float = 0.0, **options: Any
) -> EfficientViMPyramid:
    return EfficientViMPyramid(build_timm_backbone(spec, pretrained, img_size, drop_path_rate, **options))


def backbone_preprocessing(name: str) -> dict[str, Any]:
    """How images were prepared for the backbone's pretrained weights: {'mean', 'std', 'interpolation'}, plus
    'image_size' and 'intensity' where the weights come with a preparation of their own (RAD-DINO, MedSAM),
    recorded in the registry. Otherwise from timm's pretrained config of its timm model (read from timm's
    registry: nothing is built or downloaded). Vision Mamba has no timm model; its official weights were
    trained on ImageNet-normalised, bicubic-resized images."""
    spec = get_backbone_spec(name)
    if spec.preprocessing is not None:
        return dict(spec.preprocessing)
    if spec.timm_name is None:
        return {'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'interpolation': 'bicubic'}
    cfg = get_pretrained_cfg(spec.timm_name)
    if cfg is None:
        raise ConfigError(f'{name}: timm has no pretrained config for {spec.timm_name!r} (is timm too old?)')
    return {'mean': tuple(cfg.mean), 'std': tuple(cfg.std), 'interpolation': cfg.interpolation}


def timm_size_options(spec: Any, img_size: int) -> dict[str, int]:
    """What timm must be told about the image size: Swin's img_size and a window dividing every stage."""
    if spec.family != 'swin':
        return {}
    return {'img_size': img_size, 'window_size': swin_window_size(spec.name, img_size)}


def swin_window_size(name: str, img_size: int) -> int:
    """Swin's last stage is img_size/32 tokens wide; one window across it divides every stage."""
    if img_size % 32:
        raise ConfigError(
            f"{name}: image size {img_size} is not a multiple of 32; Swin's windows must "
            f'divide every stage (try {img_size // 32 * 32} or {img_size // 32 * 32 + 32})'
        )
    return img_size // 32


def create_timm_model(timm_name: str, pretrained: bool | str, **kwargs: Any) -> nn.Module:
    """Build a timm model with timm's pretrained weights (True: ImageNet, or DINOv2's and SAM's own), a local
    weights file (a path) or none (False)."""
    if pretrained is True:
        try:
            return timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:  # hub, cache and network errors all land here, re-raised in plain words
            raise PretrainedWeightsError(
                f"could not load timm's pretrained weights for {timm_name!r} (no network and no cached copy?): "
                f'{type(exc).__name__}: {exc}\n'
                'Fix it with one of:\n'
                "  1. MODEL['pretrained'] = False  (train from scratch)\n"
                "  2. MODEL['pretrained'] = '/path/to/weights.safetensors'  (a local .safetensors/.pth file)\n"
                '  3. populate the Hugging Face cache (HF_HOME) on a machine with network, e.g. '
                f'python -c "import timm; timm.create_model(\'{timm_name}\', pretrained=True)", '
                'and copy it here'
            ) from exc
    model = timm.create_model(timm_name, pretrained=False, **kwargs)
    if pretrained:
        load_local_weights(model, pretrained)
    return model


StateDict = dict[str, torch.Tensor]


def load_local_weights(
    model: nn.Module, path: str | Path, convert: Callable[[StateDict, str], StateDict] | None = None
) -> None:
    """Load a state dict from a local file, strictly except for the classifier: in timm's layout, or in one that
    `convert(state, 'weights file PATH')` maps onto it (a publisher's own layout). Where the file says which
    architecture it holds, that must be the model's: another one with the same key names and shapes (timm's
    efficientnetv2_s for tf_efficientnetv2_s) would otherwise load without a word."""
    state = read_state_dict(path)
    expected = timm_features(model).pretrained_cfg['architecture']
    stated = weights_architecture(Path(path))
    if stated and split_model_name_tag(stated[0])[0] != expected:
        raise PretrainedWeightsError(
            f"weights file {path} holds {stated[0]!r} according to {stated[1]}, but this backbone is timm's "
            f"{expected!r}; use weights saved from {expected}, or set MODEL['pretrained'] = True (ImageNet "
            'weights) or False'
        )
    source = f'weights file {path}'
    load_timm_state(model, convert(state, source) if convert else state, source)


def load_timm_state(model: nn.Module, state: StateDict, source: str) -> None:
    """Load `state` into a timm model through timm's own key conversion for its family, strictly except for the
    classifier; `source` names where the weights came from in messages."""
    filter_fn = getattr(sys.modules[type(model).__module__], 'checkpoint_filter_fn', None)
    if filter_fn is not None:  # timm's own remapping: window or position-table resizing, old key names
        try:
            state = filter_fn(state, model)
        except Exception as exc:
            raise PretrainedWeightsError(
                f'{source} does not fit {type(model).__name__}: '
                f"timm's key conversion failed ({type(exc).__name__}: {exc})"
            ) from exc
    head = timm_features(model).pretrained_cfg.get('classifier') or ''
    heads = [head] if isinstance(head, str) else list(head)
    is_head = lambda k: any(h and (k == h or k.startswith(h + '.')) for h in heads)
    own = {k: v for k, v in model.state_dict().items() if not is_head(k)}
    state = {k: v for k, v in state.items() if not is_head(k)}
    check_fits(own, state, f'{source} does not fit {type(model).__name__}')
    model.load_state_dict(state, strict=False)  # strictness checked above; only the head is left out


def weights_architecture(path: Path) -> tuple[str, str] | None:
    """(architecture, where it was read) for a weights file that names the timm model it holds: in its
    safetensors metadata ('architecture'), or in a timm / Hugging Face config.json beside it (timm's
    push_to_hub layout). None when neither names one."""
    if path.suffix == '.safetensors':
        with safe_open(str(path), 'pt') as f:
            architecture = (f.metadata() or {}).get('architecture')
        if architecture:
            return architecture, 'its safetensors metadata'
    config_path = path.parent / 'config.json'
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except ValueError:  # not JSON: some other tool's config.json
        return None
    architecture = config.get('architecture') if isinstance(config, dict) else None
    return (architecture, str(config_path)) if isinstance(architecture, str) and architecture else None


def state_dict_mismatch(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], may_lack: Callable[[str], bool] = lambda key: False
) -> str:
    """'' when `state` matches the model's own state dict key for key and shape for shape, else one line
    naming the missing (except those `may_lack` allows), unexpected and misshapen keys."""
    missing = sorted(k for k in set(own) - set(state) if not may_lack(k))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}'
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if not (missing or unexpected or wrong):
        return ''
    return (
        f'{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}, '
        f'{len(wrong)} shape mismatches {wrong[:8]}'
    )


def check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """Raise PretrainedWeightsError `what: <state_dict_mismatch>` unless `state` fits the model. BatchNorm's
    `num_batches_tracked` counters may be missing, as PyTorch's own strict load allows: files from before
    the counter existed (old torchvision ResNets, TF-ported EfficientNets) lack them, and the model
    keeps its own."""
    problems = state_dict_mismatch(own, state, may_lack=lambda key: key.rpartition('.')[2] == 'num_batches_tracked')
    if problems:
        raise PretrainedWeightsError(
            f"{what}: {problems}. Use weights saved from this architecture, or set MODEL['pretrained'] = True "
            "(timm's pretrained weights, for the backbones that have them) or False"
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors or a torch file, never unpickling arbitrary objects. Besides tensors and
    plain values a torch file may hold an `argparse.Namespace`, and nothing else: hustvl/Vim's training
    script saves its arguments as one beside the weights."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"weights file not found: {path}; set MODEL['pretrained'] to an existing "
            '.safetensors/.pth file, True (ImageNet weights) or False'
        )
    if path.suffix == '.safetensors':
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(
            f'cannot read weights file {path} with torch.load(weights_only=True): it is damaged or holds '
            f'objects other than tensors and plain values ({_refusal(exc)}). If you trust the file, save its '
            "state dict alone, e.g. torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth'), "
            "and point MODEL['pretrained'] at that"
        ) from exc
    for key in ('state_dict', 'model_state_dict', 'model', 'module'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise PretrainedWeightsError(
            f'weights file {path} holds a {type(state).__name__}, not a state dict '
            "(a dict of tensors, or one under 'state_dict', 'model' or 'module')"
        )
    return {k.removeprefix('module.'): v for k, v in state.items()}


def _refusal(exc: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused, without its advice to allowlist it."""
    text = str(exc)
    detail = text.partition('WeightsUnpickler error:')[2].strip() or text.strip() or type(exc).__name__
    return detail.splitlines()[0].split(' Please use ')[0].rstrip('.')
