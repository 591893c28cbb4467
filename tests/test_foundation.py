"""Foundation encoders (DINOv2, RAD-DINO, SAM, MedSAM) as pyramids through the one isotropic adapter.

Most tests shrink the encoders through timm's own width/depth arguments (same wiring, fewer weights), so
each builds in well under a second."""

from __future__ import annotations

import pytest
import torch

from hybridmednet import create_model
from hybridmednet.errors import ConfigError, PretrainedWeightsError
from hybridmednet.models import foundation
from hybridmednet.models.backbones import backbone_preprocessing
from hybridmednet.models.heads import HierarchicalHead, coarse_groups
from hybridmednet.models.isotropic import IsotropicPyramid
from hybridmednet.models.mamba import VimBackbone
from hybridmednet.models.registry import build_backbone, list_backbones

SMALL_VIT = dict(embed_dim=64, depth=4, num_heads=2)
SMALL_SAM = dict(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=4, neck_chans=32)
SMALL = {'dinov2_small': SMALL_VIT, 'dinov2_base_reg': SMALL_VIT, 'rad_dino': SMALL_VIT, 'sam_vit_b': SMALL_SAM}
SMALL['medsam_vit_b'] = SMALL_SAM


@pytest.fixture
def small_encoders(monkeypatch):
    """Every foundation builder creates its timm encoder at the SMALL size of its backbone."""
    create = foundation.create_timm_model

    def small(timm_name, pretrained, **kwargs):
        options = SMALL_SAM if timm_name.startswith('samvit') else SMALL_VIT
        return create(timm_name, pretrained, **{**kwargs, **options})

    monkeypatch.setattr(foundation, 'create_timm_model', small)


def test_registered_by_family():
    assert list_backbones('dinov2') == [
        'dinov2_small',
        'dinov2_small_reg',
        'dinov2_base',
        'dinov2_base_reg',
        'dinov2_large',
        'dinov2_large_reg',
        'rad_dino',
    ]
    assert list_backbones('sam') == ['sam_vit_b', 'sam_vit_l', 'sam_vit_h', 'medsam_vit_b']


@pytest.mark.parametrize(
    'name,size', [('dinov2_small', 224), ('dinov2_base_reg', 112), ('rad_dino', 224), ('sam_vit_b', 64)]
)
def test_pyramid_has_true_strides_4_to_32(name, size):
    """Patch-14 grids are resized to the stride-16 grid first, so every map is size / stride."""
    backbone = build_backbone(name, img_size=size, **SMALL[name])
    assert isinstance(backbone, IsotropicPyramid)
    assert backbone.reductions == [4, 8, 16, 32] and backbone.channels == [16, 32, 64, 64]
    assert backbone.indices == [1, 2, 3, 4]
    maps = backbone(torch.randn(2, 3, size, 2 * size))
    assert [tuple(m.shape) for m in maps] == [
        (2, c, size // r, 2 * size // r) for c, r in zip(backbone.channels, backbone.reductions)
    ]


def test_dinov2_small_is_the_real_vit_s14():
    backbone = build_backbone('dinov2_small_reg', img_size=112)
    assert backbone.indices == [3, 6, 9, 12] and backbone.channels == [96, 192, 384, 384]
    assert backbone.trunk.pos_embed.shape == (1, 64, 384) and backbone.trunk.reg_token.shape == (1, 4, 384)
    # 22.06M at 518 px (timm's table), of which 37 x 37 x 384 are the position table's
    weights = sum(p.numel() for n, p in backbone.trunk.named_parameters() if n != 'pos_embed')
    assert weights == pytest.approx(22.06e6 - 37 * 37 * 384, rel=0.005)


@pytest.mark.parametrize('name', ['dinov2_small', 'sam_vit_b'])
def test_hybridmednet_in_every_attention_mode_and_with_the_hierarchical_head(name, small_encoders):
    size = 112 if name.startswith('dinov2') else 64
    model = create_model(name, image_size=size)
    x = torch.randn(2, 3, size, size)
    maps = model.backbone(x)
    for modern, cross in [(False, False), (True, False), (True, True)]:
        model.attention = type(model.attention)(model.backbone.channels, model.backbone.reductions, modern, cross, 8, 7)
        model.zero_grad()
        out = model.forward_head(model.attention(maps))
        assert out.shape == (2, 14)
        out.sum().backward(retain_graph=True)
        assert model.backbone.trunk.patch_embed.proj.weight.grad.abs().sum() > 0
    model.head = HierarchicalHead(512, model.class_names, coarse_groups(model.config), 0.0)
    fine, coarse = model(x, return_coarse=True)
    assert fine.shape == (2, 14) and coarse.shape == (2, 3)


@pytest.mark.parametrize(
    'name,size,fix',
    [
        ('dinov2_small', 225, '224 or 238'),
        ('rad_dino', 512, '504 or 518'),
        ('sam_vit_b', 500, '496 or 512'),
        ('medsam_vit_b', 1000, '992 or 1008'),
        ('dinov2_base', 28, '42'),
        ('vim_tiny', 200, '192 or 208'),
    ],
)
def test_a_size_off_the_patch_grid_is_a_one_line_config_error(name, size, fix):
    with pytest.raises(ConfigError) as info:
        build_backbone(name, img_size=size)
    message = str(info.value)
    assert '\n' not in message and name in message and f'DATA.image_size = {size}' in message
    assert message.endswith(f'set DATA.image_size to {fix}')


@pytest.mark.parametrize('name,where', [('rad_dino', 'microsoft/rad-dino'), ('medsam_vit_b', 'MedSAM')])
def test_weights_without_a_hub_source_ask_for_a_local_file(name, where):
    with pytest.raises(PretrainedWeightsError, match=f"{where}.*MODEL\\['pretrained'\\] = '/path/to/"):
        build_backbone(name, pretrained=True)


def test_preprocessing_of_each_family():
    imagenet = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'interpolation': 'bicubic'}
    assert backbone_preprocessing('dinov2_large_reg') == imagenet
    assert backbone_preprocessing('sam_vit_h') == imagenet
    assert backbone_preprocessing('rad_dino') == {
        'mean': (0.5307,) * 3,
        'std': (0.2583,) * 3,
        'interpolation': 'bicubic',
        'image_size': 518,
    }
    assert backbone_preprocessing('medsam_vit_b') == {
        'mean': (0.0,) * 3,
        'std': (1.0,) * 3,
        'interpolation': 'bicubic',
        'image_size': 1024,
        'intensity': 'minmax',
    }


def test_vim_shares_the_adapter():
    backbone = VimBackbone(img_size=32, embed_dim=32, depth=4)
    assert isinstance(backbone, IsotropicPyramid)
    groups = backbone.layer_groups()
    assert sorted(groups[0]) == [
        'trunk.cls_token',
        'trunk.patch_embed.proj.bias',
        'trunk.patch_embed.proj.weight',
        'trunk.pos_embed',
    ]
    assert [g[0].split('.')[:3] for g in groups[1:]] == [['trunk', 'layers', str(i)] for i in range(4)]
