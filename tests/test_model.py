import pytest
import timm
import torch

from hybridmednet import Config, HybridMedNet, create_model, list_backbones
from hybridmednet.models.registry import get_backbone_spec

SPEC_BACKBONES = [
    'resnet34',
    'resnet50',
    'resnet101',
    'convnext_tiny',
    'convnext_small',
    'convnext_base',
    'convnext_large',
    'swin_tiny',
    'swin_small',
    'swin_base',
    'efficientnetv2_s',
    'efficientnetv2_m',
    'efficientnetv2_l',
]
MODES = [(False, False), (True, False), (True, True)]
SMALLEST = ['resnet34', 'convnext_tiny', 'swin_tiny', 'efficientnetv2_s']


def test_every_spec_backbone_is_registered():
    assert set(SPEC_BACKBONES + ['vim_tiny', 'vim_small', 'vim_base']) <= set(list_backbones())


@pytest.mark.parametrize('name', SPEC_BACKBONES)
def test_pyramid_is_nchw_in_every_attention_mode(name):
    """Shapes on the meta device: the whole model's shape logic, without the compute."""
    with torch.device('meta'):
        model = create_model(name)
        x = torch.randn(2, 3, 224, 224)
        maps = model.backbone(x)
        assert len(maps) == 4 and model.backbone.reductions == [4, 8, 16, 32]
        for m, c, r in zip(maps, model.backbone.channels, model.backbone.reductions):
            assert m.shape == (2, c, 224 // r, 224 // r)
        for mode in MODES:
            model.attention = type(model.attention)(model.backbone.channels, model.backbone.reductions, *mode, 8, 7)
            refined = model.attention(maps)
            assert [t.shape for t in refined] == [m.shape for m in maps]
            out = model.forward_head(refined)
            assert out.shape == (2, 14)
            out.sum().backward(retain_graph=True)
            assert next(model.backbone.parameters()).grad is not None


@pytest.mark.parametrize('size', [256, 320, 384, 512])
@pytest.mark.parametrize('name', SMALLEST)
def test_chest_xray_sizes(name, size):
    with torch.device('meta'):
        model = create_model(name, image_size=size)
        out = model(torch.randn(2, 3, size, size))
        out.sum().backward()
    assert out.shape == (2, 14)


@pytest.mark.parametrize('name,size', [('swin_tiny', 256), ('convnext_tiny', 224)])
def test_real_forward_backward_at_full_size(name, size):
    model = create_model(name, image_size=size)
    out = model(torch.randn(1, 3, size, size))
    out.sum().backward()
    assert out.shape == (1, 14) and torch.isfinite(out).all()
    assert next(model.backbone.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize('modern,cross', MODES)
@pytest.mark.parametrize('name', ['resnet18', 'convnext_atto', 'efficientnet_b0', 'swin_tiny'])
def test_forward_backward_reaches_first_layer(name, modern, cross):
    model = create_model(name, image_size=64, use_modern_attention=modern, use_cross_scale_attention=cross)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 14)
    out.sum().backward()
    first = next(p for p in model.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_swin_rejects_sizes_its_windows_cannot_divide():
    with pytest.raises(ValueError, match='300 is not a multiple of 32'):
        create_model('swin_tiny', image_size=300)


@pytest.mark.parametrize('name', SPEC_BACKBONES)
def test_parameter_counts_match_timm_and_spec(name):
    spec = get_backbone_spec(name)
    with torch.device('meta'):
        reference = timm.create_model(spec.timm_name, pretrained=False)
        ours = create_model(name).backbone
    trunk = getattr(ours, 'body', ours).model
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    # our trunk is timm's own model minus its classifier head: same keys, same shapes
    assert all(ref_shapes.get(k) == v.shape for k, v in trunk.state_dict().items())
    if spec.spec_params_m:
        total = sum(p.numel() for p in reference.parameters()) / 1e6
        assert abs(total - spec.spec_params_m) / spec.spec_params_m < 0.05, (total, spec.spec_params_m)


def test_eval_output_does_not_depend_on_batch_composition():
    model = create_model('convnext_atto', image_size=64).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        shuffled = model(x.flip(0)).flip(0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together, shuffled, atol=1e-5, rtol=1e-4)


def test_attention_modes_differ_and_cross_scale_mixes_scales():
    """Cross-scale: changing only the coarsest map changes the finest map's output."""
    from hybridmednet.models.attention import PyramidAttention

    channels, reductions = [16, 32, 64, 128], [4, 8, 16, 32]
    maps = [torch.randn(1, c, 32 // (2**i), 32 // (2**i)) for i, c in enumerate(channels)]
    changed = maps[:3] + [maps[3] + torch.randn_like(maps[3])]
    for cross in (False, True):
        torch.manual_seed(0)
        att = PyramidAttention(channels, reductions, True, cross, num_heads=4, pool_size=7)
        with torch.no_grad():
            moved = (att(maps)[0] - att(changed)[0]).abs().max()
        assert (moved > 1e-4) == cross


def test_hierarchical_head():
    config = Config()
    config.MODEL.update(backbone='convnext_atto', pretrained=False, hierarchical=True)
    model = HybridMedNet(config)
    x = torch.randn(2, 3, 64, 64)
    fine, coarse = model(x, return_coarse=True)
    assert fine.shape == (2, 14) and coarse.shape == (2, 3)
    assert model(x).shape == (2, 14)
    assert model.head.group_matrix.sum(0).eq(1).all()
    config.MODEL['num_coarse_classes'] = 4
    with pytest.raises(ValueError, match='coarse_groups'):
        HybridMedNet(config)


def test_spec_smoke_snippet_runs_as_written():
    import subprocess
    import sys

    code = """
from configs.default_config import Config
from models.hybrid_med_net import HybridMedNet
import torch

config = Config()
config.MODEL['backbone'] = 'convnext_base'
config.MODEL['pretrained'] = False
model = HybridMedNet(config)
x = torch.randn(2, 3, 224, 224)
output = model(x)
print(f"Output shape: {output.shape}")
"""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'Output shape: torch.Size([2, 14])' in out.stdout


def test_legacy_checkpoint_round_trip(tmp_path):
    config = Config()
    config.MODEL.update(backbone='resnet50', pretrained=False)
    config.DATA['image_size'] = 64
    old = HybridMedNet(config).eval()
    torch.save({'model_state_dict': old.state_dict(), 'epoch': 3}, tmp_path / 'old_model.pth')
    model = HybridMedNet(config).eval()
    checkpoint = torch.load(tmp_path / 'old_model.pth')
    model.load_state_dict(checkpoint['model_state_dict'])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), old(x))
