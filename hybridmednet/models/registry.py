"""One registry: every backbone name maps to a spec; `list_backbones()` and the docs come from here.

A builder takes `(spec, pretrained, img_size, **options)` and returns a `FeaturePyramid` whose
`forward(x)` gives a list of 4 NCHW feature maps (strides 4, 8, 16, 32) and whose
`channels` / `reductions` attributes describe them. A 3D backbone (`spatial_dims=3`) takes
[B, C, D, H, W] volumes, gets the volume size (3 ints, or None) as `img_size` and gives NCDHW maps.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hybridmednet.errors import ConfigError

if TYPE_CHECKING:
    from hybridmednet.models.backbones import FeaturePyramid


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    builder: str  # 'module:function', imported when the backbone is built
    timm_name: str | None = None  # the timm classifier this backbone is cut from
    out_indices: tuple[int, ...] | None = None
    spec_params_m: float | None = None  # whole-model parameters the SPEC states (millions)
    experimental: bool = False
    # what backbone_preprocessing returns where the weights bring their own preparation (not timm's config)
    preprocessing: dict[str, Any] | None = field(default=None, hash=False)
    spatial_dims: int = 2  # 3: takes volumes [B, C, D, H, W] and gives NCDHW maps

    def build(self, pretrained: bool | str = False, img_size: Any = None, **options: Any) -> FeaturePyramid:
        """`img_size`: the image side (default 224 px), or a volume's [D, H, W] for a 3D backbone (default None:
        not fixed)."""
        module_name, _, func_name = self.builder.partition(':')
        builder: Callable[..., FeaturePyramid] = getattr(importlib.import_module(module_name), func_name)
        if img_size is None and self.spatial_dims == 2:
            img_size = 224
        return builder(self, pretrained=pretrained, img_size=img_size, **options)


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f'backbone {spec.name!r} is registered twice')
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f'did you mean {", ".join(map(repr, close))}? ' if close else ''
        raise ConfigError(f'unknown backbone {name!r}; {hint}available: {", ".join(_REGISTRY)}') from None


def list_backbones(family: str | None = None) -> list[str]:
    return [n for n, s in _REGISTRY.items() if family is None or s.family == family]


def build_backbone(name: str, pretrained: bool | str = False, img_size: Any = None, **options: Any) -> FeaturePyramid:
    return get_backbone_spec(name).build(pretrained=pretrained, img_size=img_size, **options)


_TIMM = 'hybridmednet.models.backbones:build_timm_backbone'
_RESNET = 'hybridmednet.models.backbones:build_resnet_fpn'
_VIM = 'hybridmednet.models.mamba:build_vim_backbone'

for _name, _params in (('resnet34', None), ('resnet50', 25.0), ('resnet101', None)):
    register(BackboneSpec(_name, 'resnet', _RESNET, f'{_name}.tv_in1k', (1, 2, 3, 4), _params))
for _size, _params in (('tiny', 28.0), ('small', 50.0), ('base', 89.0), ('large', 198.0)):
    register(
        BackboneSpec(
            f'convnext_{_size}', 'convnext', _TIMM, f'convnext_{_size}.fb_in22k_ft_in1k', (0, 1, 2, 3), _params
        )
    )
for _size, _params in (('tiny', 28.0), ('small', 50.0), ('base', 88.0)):
    register(
        BackboneSpec(
            f'swin_{_size}', 'swin', _TIMM, f'swin_{_size}_patch4_window7_224.ms_in22k_ft_in1k', (0, 1, 2, 3), _params
        )
    )
# EfficientNetV2 has 5 feature stages (strides 2..32); the pyramid takes strides 4..32.
for _size, _params in (('s', 21.0), ('m', 54.0), ('l', 119.0)):
    register(
        BackboneSpec(
            f'efficientnetv2_{_size}',
            'efficientnetv2',
            _TIMM,
            f'tf_efficientnetv2_{_size}.in21k_ft_in1k',
            (1, 2, 3, 4),
            _params,
        )
    )
# Small backbones beyond the SPEC, for CPU quickstarts and fast tests.
register(BackboneSpec('resnet18', 'resnet', _RESNET, 'resnet18.tv_in1k', (1, 2, 3, 4)))
register(BackboneSpec('convnext_atto', 'convnext', _TIMM, 'convnext_atto.d2_in1k', (0, 1, 2, 3)))
register(BackboneSpec('efficientnet_b0', 'efficientnet', _TIMM, 'efficientnet_b0.ra_in1k', (1, 2, 3, 4)))
for _size, _params in (('tiny', 7.0), ('small', 26.0), ('base', 98.0)):
    register(BackboneSpec(f'vim_{_size}', 'mamba', _VIM, None, None, _params, experimental=True))
# MambaOut (Yu & Wang, 2024): gated-CNN stages from the Mamba line of work, strides 4..32, CPU-friendly.
for _size, _params in (('femto', 7.3), ('kobe', 9.1), ('tiny', 26.5), ('small', 48.5), ('base', 84.8)):
    register(BackboneSpec(f'mambaout_{_size}', 'mambaout', _TIMM, f'mambaout_{_size}.in1k', (0, 1, 2, 3), _params))
# EfficientViM (Lee et al., 2025): hidden-state-mixer SSD stages at strides 16/32/64, resampled to 4..32.
for _size in ('m1', 'm2', 'm3', 'm4'):
    register(
        BackboneSpec(
            f'efficientvim_{_size}',
            'efficientvim',
            'hybridmednet.models.backbones:build_efficientvim',
            f'efficientvim_{_size}.e450_in1k',
            (0, 1, 2),
        )
    )
# Foundation encoders through the isotropic adapter (models/isotropic.py): DINOv2 (Oquab et al., 2024), with
# 4 register tokens (Darcet et al., 2024); RAD-DINO, a DINOv2-B trained on chest X-rays (Perez-Garcia et al.,
# 2025), from a local transformers file; SAM's image encoder (Kirillov et al., 2023) and MedSAM's (Ma et al.,
# 2024), from a local segment_anything file.
_FOUNDATION = 'hybridmednet.models.foundation'
for _size in ('small', 'base', 'large'):
    for _suffix, _timm in (('', 'dinov2'), ('_reg', 'reg4_dinov2')):
        _name, _timm_name = f'dinov2_{_size}{_suffix}', f'vit_{_size}_patch14_{_timm}.lvd142m'
        register(BackboneSpec(_name, 'dinov2', f'{_FOUNDATION}:build_dinov2', _timm_name))
register(
    BackboneSpec(
        'rad_dino',
        'dinov2',
        f'{_FOUNDATION}:build_rad_dino',
        'vit_base_patch14_dinov2',
        # microsoft/rad-dino's preprocessor_config.json: resize and crop to 518 px, bicubic, its own normalisation
        preprocessing={'mean': (0.5307,) * 3, 'std': (0.2583,) * 3, 'interpolation': 'bicubic', 'image_size': 518},
    )
)
for _size, _letter in (('base', 'b'), ('large', 'l'), ('huge', 'h')):
    register(BackboneSpec(f'sam_vit_{_letter}', 'sam', f'{_FOUNDATION}:build_sam', f'samvit_{_size}_patch16.sa1b'))
register(
    BackboneSpec(
        'medsam_vit_b',
        'sam',
        f'{_FOUNDATION}:build_medsam',
        'samvit_base_patch16',
        # MedSAM's inference: each image stretched to [0, 1] by its own range, 1024 px (bicubic), no normalisation
        preprocessing={
            'mean': (0.0,) * 3,
            'std': (1.0,) * 3,
            'interpolation': 'bicubic',
            'image_size': 1024,
            'intensity': 'minmax',
        },
    )
)
# 3D backbones (models/backbones3d.py): volumes [B, C, D, H, W], 1 channel by default (CT, MRI).
# MONAI's networks (the `3d` extra): ResNets in MedicalNet's layout (Chen et al., 2019), the Swin encoder of
# SwinUNETR (Hatamizadeh et al., 2022; feature size 48, its self-supervised weights' width), and MedNeXt
# (Roy et al., 2023), whose encoder sits at strides 2..16.
_3D = 'hybridmednet.models.backbones3d'
for _depth in (10, 18, 34, 50):
    register(BackboneSpec(f'resnet3d_{_depth}', 'resnet3d', f'{_3D}:build_resnet3d', spatial_dims=3))
register(BackboneSpec('swin3d_tiny', 'swin3d', f'{_3D}:build_swin3d', spatial_dims=3))
for _size in ('s', 'b'):
    register(BackboneSpec(f'mednext_{_size}', 'mednext', f'{_3D}:build_mednext', spatial_dims=3))
# timm's 2D ConvNeXt-T and Swin-T in 3D, their weights inflated from 2D ones (I3D, Carreira & Zisserman, 2017).
register(
    BackboneSpec(
        'convnext3d_tiny',
        'convnext3d',
        f'{_3D}:build_inflated',
        'convnext_tiny.fb_in22k_ft_in1k',
        (0, 1, 2, 3),
        spatial_dims=3,
    )
)
register(
    BackboneSpec(
        'swin3d_inflated_tiny',
        'swin3d_inflated',
        f'{_3D}:build_inflated',
        'swin_tiny_patch4_window7_224.ms_in22k_ft_in1k',
        (0, 1, 2, 3),
        spatial_dims=3,
    )
)
