"""Per-backbone input normalisation, read from timm's pretrained configs without building a model."""

from __future__ import annotations

import pytest
import timm

from hybridmednet.models.backbones import backbone_preprocessing
from hybridmednet.models.registry import list_backbones

IMAGENET = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}


@pytest.mark.parametrize(
    'name,expected',
    [
        ('resnet50', {**IMAGENET, 'interpolation': 'bilinear'}),  # torchvision weights
        ('convnext_tiny', {**IMAGENET, 'interpolation': 'bicubic'}),
        ('swin_tiny', {**IMAGENET, 'interpolation': 'bicubic'}),
        ('efficientnetv2_s', {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'interpolation': 'bicubic'}),  # TF port
        ('efficientnetv2_l', {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'interpolation': 'bicubic'}),
        ('vim_tiny', {**IMAGENET, 'interpolation': 'bicubic'}),
        ('mambaout_femto', {**IMAGENET, 'interpolation': 'bicubic'}),
        ('efficientvim_m1', {**IMAGENET, 'interpolation': 'bicubic'}),
    ],
)
def test_each_family_gets_the_normalisation_its_weights_were_trained_with(name, expected):
    assert backbone_preprocessing(name) == expected


def test_every_backbone_is_answered_without_building_a_model(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError('backbone_preprocessing built a model')

    monkeypatch.setattr(timm, 'create_model', no_model)
    for name in list_backbones():
        info = backbone_preprocessing(name)
        # image_size and intensity only where the weights bring their own preparation (RAD-DINO, MedSAM)
        assert (
            {'mean', 'std', 'interpolation'} <= set(info) <= {'mean', 'std', 'interpolation', 'image_size', 'intensity'}
        )
        assert isinstance(info['mean'], tuple) and len(info['mean']) == 3 and len(info['std']) == 3, name
        assert all(0 < s <= 1 for s in info['std']) and info['interpolation'] in ('bilinear', 'bicubic'), name
