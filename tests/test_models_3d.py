"""3D volumes through the same model: MONAI and inflated backbones, attention, fusion and heads on NCDHW maps."""

import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import LayerNorm2d

from hybridmednet import Config, HybridMedNet, create_model
from hybridmednet.errors import ConfigError, PretrainedWeightsError
from hybridmednet.models.attention import CBAM, LayerNormNd, PyramidAttention
from hybridmednet.models.backbones3d import ConvNeXt3d, SwinInflated3d
from hybridmednet.models.registry import build_backbone, get_backbone_spec, list_backbones

pytest.importorskip('monai')

BACKBONES_3D = [
    'resnet3d_10',
    'resnet3d_18',
    'resnet3d_34',
    'resnet3d_50',
    'swin3d_tiny',
    'mednext_s',
    'mednext_b',
    'convnext3d_tiny',
    'swin3d_inflated_tiny',
]
MODES = [(False, False), (True, False), (True, True)]  # CBAM; self-attention; plus cross-scale
VOLUME = [32, 32, 64]  # not a cube, so a swapped axis shows


def test_3d_backbones_are_registered_as_3d():
    assert set(BACKBONES_3D) <= set(list_backbones())
    assert {n for n in list_backbones() if get_backbone_spec(n).spatial_dims == 3} == set(BACKBONES_3D)
    assert get_backbone_spec('convnext_tiny').spatial_dims == 2


@pytest.mark.parametrize('name', BACKBONES_3D)
def test_every_3d_backbone_and_attention_mode_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, pretrained=False, volume_size=VOLUME)
    backbone = model.backbone
    x = torch.randn(2, 1, *VOLUME)
    maps = backbone(x)
    assert len(maps) == 4 and len(backbone.channels) == len(backbone.reductions) == 4
    for m, c, r in zip(maps, backbone.channels, backbone.reductions):
        assert m.shape == (2, c, *(s // r for s in VOLUME))
    # the trunk's parameters, grouped by depth for layer-wise learning rates and partial fine-tuning
    groups = backbone.layer_groups()
    assert sorted(n for g in groups for n in g) == sorted(n for n, _ in backbone.named_parameters())
    first = next(backbone.parameters())
    for mode in MODES:
        model.attention = PyramidAttention(backbone.channels, backbone.reductions, *mode, 8, 7, spatial_dims=3)
        refined = model.attention(maps)
        assert [t.shape for t in refined] == [m.shape for m in maps]
        assert all(not torch.equal(t, m) for t, m in zip(refined, maps))
        out = model.forward_head(refined)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        first.grad = None
        out.sum().backward(retain_graph=True)
        assert first.grad is not None and first.grad.abs().sum() > 0, mode
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.attention.parameters()), mode


def test_3d_model_takes_volumes_end_to_end_and_one_channel_by_default():
    model = create_model('resnet3d_10', num_classes=2, pretrained=False, hierarchical=False).eval()
    assert model.spatial_dims == 3 and model.backbone.net.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError, match=r'volumes \[B, C, D, H, W\].*\(1, 1, 32, 32\)'):
        model(torch.randn(1, 1, 32, 32))
    assert build_backbone('resnet3d_10', in_chans=2).net.conv1.in_channels == 2


def test_the_config_says_volumes_and_their_size():
    model = create_model('resnet3d_10', pretrained=False, volume_size=[32, 48, 64])
    assert model.config.DATA['spatial_dims'] == 3 and model.config.DATA['volume_size'] == [32, 48, 64]
    config = Config()
    config.MODEL.update(backbone='resnet3d_10', pretrained=False)
    with pytest.raises(ConfigError, match=r"'resnet3d_10' takes volumes: set DATA.spatial_dims = 3"):
        HybridMedNet(config)
    config.DATA['spatial_dims'] = 3
    config.DATA['volume_size'] = [16, 64, 64]
    with pytest.raises(ConfigError, match=r'volume_size.*at least 32'):
        HybridMedNet(config)
    config.MODEL.update(backbone='convnext_atto')
    with pytest.raises(ConfigError, match=r"'convnext_atto' takes images: set DATA.spatial_dims = 2"):
        HybridMedNet(config)
    with pytest.raises(ConfigError, match='drop path'):
        create_model('resnet3d_10', pretrained=False, drop_path_rate=0.1)


def test_missing_monai_or_einops_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'einops', None)
    with pytest.raises(ConfigError, match=r"need einops: pip install 'hybridmednet\[3d\]'$"):
        build_backbone('swin3d_tiny')
    monkeypatch.setitem(sys.modules, 'monai.networks.nets', None)
    with pytest.raises(ConfigError, match=r"need monai.networks.nets: pip install 'hybridmednet\[3d\]'$"):
        build_backbone('resnet3d_18')


def test_2d_attention_keys_and_shapes_are_unchanged():
    """The 2D checkpoint format: CBAM's 4D kernels, the self-attention's keys (the 3D CBAM has 5D kernels)."""
    cbam = PyramidAttention([16, 32, 64, 128], [4, 8, 16, 32], False, False, 8, 7).state_dict()
    assert {k: tuple(v.shape) for k, v in cbam.items() if k.startswith('blocks.0.')} == {
        'blocks.0.mlp.0.weight': (8, 16, 1, 1),
        'blocks.0.mlp.0.bias': (8,),
        'blocks.0.mlp.2.weight': (16, 8, 1, 1),
        'blocks.0.mlp.2.bias': (16,),
        'blocks.0.spatial.weight': (1, 2, 7, 7),
        'blocks.0.spatial.bias': (1,),
    }
    assert CBAM(16, spatial_dims=3).spatial.weight.shape == (1, 2, 7, 7, 7)
    modern = PyramidAttention([16, 32, 64, 128], [4, 8, 16, 32], True, True, 8, 7).state_dict()
    assert {k: tuple(v.shape) for k, v in modern.items() if '.0.' in k or k.endswith(('.0', 'embed'))} == {
        'blocks.scale_embed': (4, 256),
        'blocks.norms.0.weight': (16,),
        'blocks.norms.0.bias': (16,),
        'blocks.context.0.weight': (256, 16),
        'blocks.context.0.bias': (256,),
        'blocks.q.0.weight': (16, 16),
        'blocks.q.0.bias': (16,),
        'blocks.kv.0.weight': (32, 256),
        'blocks.kv.0.bias': (32,),
        'blocks.proj.0.weight': (16, 16),
        'blocks.proj.0.bias': (16,),
        'blocks.gamma.0': (16,),
    }


def test_channels_first_layer_norm_is_timms_in_2d_and_normalises_channels_in_3d():
    torch.manual_seed(0)
    ours, timms = LayerNormNd(8), LayerNorm2d(8)
    for p in ours.parameters():
        p.data.normal_()
    timms.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 5, 6)
    assert torch.equal(ours(x), timms(x))
    v = torch.randn(2, 8, 3, 4, 5)
    expected = torch.nn.functional.layer_norm(v.permute(0, 2, 3, 4, 1), (8,), ours.weight, ours.bias, 1e-6)
    torch.testing.assert_close(ours(v), expected.permute(0, 4, 1, 2, 3))


def test_3d_cross_scale_attention_mixes_scales():
    """Changing only the coarsest map changes the finest map's output with cross-scale attention only."""
    channels, reductions = [16, 32, 64, 128], [4, 8, 16, 32]
    maps = [torch.randn(1, c, 16 // 2**i, 16 // 2**i, 32 // 2**i) for i, c in enumerate(channels)]
    changed = maps[:3] + [maps[3] + torch.randn_like(maps[3])]
    for cross in (False, True):
        torch.manual_seed(0)
        att = PyramidAttention(channels, reductions, True, cross, num_heads=4, pool_size=7, spatial_dims=3)
        with torch.no_grad():
            moved = (att(maps)[0] - att(changed)[0]).abs().max()
        assert (moved > 1e-4) == cross


def _outputs(module, x):
    with torch.no_grad():
        return module.eval()(x)


def _randomise(module):
    """Non-default weights and BatchNorm statistics, so a load that leaves anything at its init shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(t + 0.1 * torch.randn_like(t).abs() if 'running_var' in name else 0.1 * torch.randn_like(t))


def test_medicalnet_layout_round_trip_and_wrong_file(tmp_path):
    from monai.networks.nets import ResNetFeatures

    source = ResNetFeatures('resnet10', pretrained=False, spatial_dims=3, in_channels=1)
    _randomise(source)
    state = {f'module.{k}': v for k, v in source.state_dict().items()}  # saved from DataParallel, as published
    state['module.conv_seg.0.weight'] = torch.zeros(32, 512, 2, 2, 2)  # MedicalNet's segmentation head
    torch.save({'state_dict': state}, tmp_path / 'resnet_10.pth')
    loaded = build_backbone('resnet3d_10', pretrained=str(tmp_path / 'resnet_10.pth'))
    x = torch.randn(2, 1, 32, 32, 32)
    for got, want in zip(_outputs(loaded, x), _outputs(source, x)[1:]):
        torch.testing.assert_close(got, want)

    with pytest.raises(PretrainedWeightsError, match=r'does not fit resnet3d_18.*missing keys'):
        build_backbone('resnet3d_18', pretrained=str(tmp_path / 'resnet_10.pth'))
    with pytest.raises(PretrainedWeightsError, match='not found'):
        build_backbone('resnet3d_10', pretrained=str(tmp_path / 'absent.pth'))
    with pytest.raises(PretrainedWeightsError, match=r'not downloaded.*resnet_10\.pth'):
        build_backbone('resnet3d_10', pretrained=True)


def test_swin_unetr_self_supervised_layout_round_trip(tmp_path):
    source = build_backbone('swin3d_tiny')
    _randomise(source)
    encoder = source.encoder.state_dict()
    # the self-supervised file: 'module.' prefixes, MLPs named fc1/fc2, and heads of its pretext tasks
    ssl = {f'module.{k}'.replace('.linear1.', '.fc1.').replace('.linear2.', '.fc2.'): v for k, v in encoder.items()}
    ssl['module.rotation_head.weight'] = torch.zeros(4, 768)
    torch.save({'state_dict': ssl}, tmp_path / 'model_swinvit.pt')
    # a whole SwinUNETR's state dict: the encoder under 'swinViT.', beside its decoder
    whole = {f'swinViT.{k}': v for k, v in encoder.items()} | {'decoder1.conv.weight': torch.zeros(1)}
    torch.save(whole, tmp_path / 'swin_unetr.pt')
    x = torch.randn(1, 1, 32, 32, 32)
    want = _outputs(source, x)
    for file in ('model_swinvit.pt', 'swin_unetr.pt'):
        got = _outputs(build_backbone('swin3d_tiny', pretrained=str(tmp_path / file)), x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    torch.save({'state_dict': {'module.conv1.weight': torch.zeros(1)}}, tmp_path / 'other.pt')
    with pytest.raises(PretrainedWeightsError, match=r'does not fit swin3d_tiny.*missing keys'):
        build_backbone('swin3d_tiny', pretrained=str(tmp_path / 'other.pt'))


def test_mednext_state_dict_round_trip(tmp_path):
    from monai.networks.nets.mednext import create_mednext

    source = create_mednext('S', spatial_dims=3, in_channels=1)
    _randomise(source)
    save_file(source.state_dict(), str(tmp_path / 'mednext_s.safetensors'))
    loaded = build_backbone('mednext_s', pretrained=str(tmp_path / 'mednext_s.safetensors'))
    reference = build_backbone('mednext_s')
    reference.load_state_dict({k: v for k, v in source.state_dict().items() if k in reference.state_dict()})
    x = torch.randn(1, 1, 32, 32, 32)
    for got, want in zip(_outputs(loaded, x), _outputs(reference, x)):
        torch.testing.assert_close(got, want)
    with pytest.raises(PretrainedWeightsError, match='does not fit mednext_b'):
        build_backbone('mednext_b', pretrained=str(tmp_path / 'mednext_s.safetensors'))


@pytest.fixture(scope='module')
def convnext_2d():
    """timm's 2D ConvNeXt-T with every weight moved off its init (its layer scale starts at 1e-6)."""
    torch.manual_seed(0)
    model = timm.create_model('convnext_tiny', pretrained=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.full_like(p, 0.5) if name.endswith('gamma') else p + 0.02 * torch.randn_like(p))
    return model


def test_inflated_convnext_reproduces_2d_features_on_identical_slices(convnext_2d):
    """A volume of identical slices through the inflated 3D model gives, at every slice of every stage, the
    2D model's features of that slice. One grey channel: the 2D model sees it repeated as RGB."""
    model = ConvNeXt3d(in_chans=1)
    model.load_2d_state(convnext_2d.state_dict())
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = convnext_2d.forward_intermediates(
            image.expand(-1, 3, -1, -1), indices=[0, 1, 2, 3], intermediates_only=True
        )
        volume = image.unsqueeze(2).expand(-1, -1, 32, -1, -1)
        maps = model.eval()(volume)
    for got, want in zip(maps, expected):
        assert got.shape[2] == got.shape[3]
        torch.testing.assert_close(got, want.unsqueeze(2).expand_as(got), atol=1e-4, rtol=1e-4)
    # and it is 3D: one changed slice changes the features of its neighbours along depth
    changed = volume.clone()
    changed[:, :, 15] += 1
    with torch.no_grad():
        moved = (model(changed)[0] - maps[0]).abs().amax(dim=(0, 1, 3, 4))
    assert moved[3] > 0 and moved[0] > 0 and moved[7] > 0  # slice 15 lies in stride-4 cell 3 of 0..7


def test_inflated_convnext_loads_a_local_timm_file_and_refuses_another(convnext_2d, tmp_path):
    save_file(convnext_2d.state_dict(), str(tmp_path / 'convnext_tiny.safetensors'))
    loaded = build_backbone('convnext3d_tiny', pretrained=str(tmp_path / 'convnext_tiny.safetensors'))
    reference = ConvNeXt3d(in_chans=1)
    reference.load_2d_state(convnext_2d.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    stem = loaded.state_dict()['stem.0.weight']
    assert stem.shape == (96, 1, 4, 4, 4)
    torch.testing.assert_close(stem.sum(2), convnext_2d.stem[0].weight.sum(1, keepdim=True))
    save_file(timm.create_model('convnext_atto').state_dict(), str(tmp_path / 'atto.safetensors'))
    with pytest.raises(PretrainedWeightsError, match='does not fit'):
        build_backbone('convnext3d_tiny', pretrained=str(tmp_path / 'atto.safetensors'))


def tiny_swin_2d(size: int = 128):
    """A small timm 2D Swin, window 4, every weight moved off its init. At 128 px every stage's grid is a
    multiple of the window; at 64 px timm cuts the last stage's window to its 2 x 2 grid."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=size, window_size=4, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize('size', [128, 64])
def test_inflated_swin_reproduces_2d_features_on_identical_slices(size):
    """As for ConvNeXt: a volume of identical slices (depth 32: 8 token slices, shifted windows along depth too)
    gives the 2D Swin's features on every slice of every stage; the relative-position biases and the patch
    merging's 8 neighbours must map onto the 2D ones exactly for this to hold. At 64 px the deeper stages'
    windows are cut to their grids (MONAI would read wrong biases for a window it cuts in-plane itself)."""
    swin_2d = tiny_swin_2d(size)
    model = SwinInflated3d(1, 24, (2, 2, 2, 2), (2, 4, 8, 16), window=4, volume_size=[32, size, size]).eval()
    model.load_2d_state(swin_2d.state_dict())
    image = torch.rand(2, 1, size, size)
    with torch.no_grad():
        expected = swin_2d.forward_intermediates(image.expand(-1, 3, -1, -1), indices=4, intermediates_only=True)
        volume = image.unsqueeze(2).expand(-1, -1, 32, -1, -1)
        maps = model(volume)
    for got, want in zip(maps, expected):
        assert got.shape[2] * size == got.shape[3] * 32  # depth kept, to scale
        torch.testing.assert_close(got, want.unsqueeze(2).expand_as(got), atol=1e-4, rtol=1e-4)
    changed = volume.clone()
    changed[:, :, 13] += 1  # token slice 3 of 0..7; its window (slices 0-3, then 2-5 shifted) moves
    with torch.no_grad():
        moved = (model(changed)[0] - maps[0]).abs().amax(dim=(0, 1, 3, 4))
    assert moved[3] > 0 and moved[0] > 0 and moved[5] > 0 and moved[7] == 0


def test_inflated_swin_refuses_a_volume_that_would_cut_its_windows_in_plane():
    model = SwinInflated3d(1, 24, (2, 2, 2, 2), (2, 4, 8, 16), window=4)  # built for no size: windows 4 x 4 x 4
    with pytest.raises(ValueError, match=r'\(1, 2, 2\) token grid is smaller in-plane.*DATA.volume_size'):
        model(torch.rand(1, 1, 32, 64, 64))


def test_inflated_swin_loads_a_local_timm_file_and_refuses_another(tmp_path):
    torch.manual_seed(0)
    swin_2d = timm.create_model('swin_tiny_patch4_window7_224')
    save_file(swin_2d.state_dict(), str(tmp_path / 'swin_tiny.safetensors'))
    file = str(tmp_path / 'swin_tiny.safetensors')
    loaded = build_backbone('swin3d_inflated_tiny', pretrained=file, img_size=[64, 64, 64])
    tables = [f'layers.{i}.blocks.1.attn.relative_position_bias_table' for i in (1, 2)]
    # 64^3: stage 2's 8^3 grid keeps 7^3 windows, each 2D bias at every depth offset
    table_2d = swin_2d.state_dict()[tables[0]].view(13, 13, 6)
    table = loaded.state_dict()[tables[0].replace('.blocks.', '.layer.blocks.')].view(13, 13, 13, 6)
    assert torch.equal(table, table_2d.expand(13, -1, -1, -1))
    # stage 3's 4^3 grid gets 4^3 windows: the 2D biases of offsets -3..3, the central 7 x 7 of 13 x 13
    table_2d = swin_2d.state_dict()[tables[1]].view(13, 13, 12)
    table = loaded.state_dict()[tables[1].replace('.blocks.', '.layer.blocks.')].view(7, 7, 7, 12)
    assert torch.equal(table, table_2d[3:10, 3:10].expand(7, -1, -1, -1))
    assert loaded.state_dict()['patch_embed.proj.weight'].shape == (96, 1, 4, 4, 4)
    save_file(tiny_swin_2d().state_dict(), str(tmp_path / 'tiny.safetensors'))
    with pytest.raises(PretrainedWeightsError, match='does not fit'):
        build_backbone('swin3d_inflated_tiny', pretrained=str(tmp_path / 'tiny.safetensors'))


def test_3d_backbones_build_on_the_meta_device_for_the_parameter_table():
    from hybridmednet.models.summary import parameter_row

    rows = {name: parameter_row(name) for name in BACKBONES_3D}
    assert round(rows['resnet3d_18']['backbone_m'], 1) == 33.0 and round(rows['swin3d_tiny']['backbone_m'], 1) == 8.1
    assert all(r['model_m'] > r['backbone_m'] > 1 for r in rows.values())
