"""Foundation encoders (DINOv2, RAD-DINO, SAM, MedSAM) as pyramids through the one isotropic adapter.

Most tests shrink the encoders through timm's own width/depth arguments (same wiring, fewer weights), so
each builds in well under a second."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

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


# -- published layouts, loaded through MODEL.pretrained: parity with the publishers' own code ----------------------
def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights, every tensor distinct (LayerNorm gains, layer scales and biases too)."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return module.eval()


def _transformers_dinov2(tmp_path, size=56):
    """A small transformers Dinov2Model saved as microsoft/rad-dino publishes it (model.safetensors + config.json)."""
    transformers = pytest.importorskip('transformers')
    config = transformers.Dinov2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=size,
        patch_size=14,
    )
    reference = _perturbed(transformers.Dinov2Model(config))
    reference.save_pretrained(tmp_path / 'rad-dino')
    return reference, tmp_path / 'rad-dino' / 'model.safetensors'


def _segment_anything_sam(tmp_path):
    """A small segment_anything Sam (image encoder, prompt encoder, mask decoder) saved as medsam_vit_b.pth is."""
    modeling = pytest.importorskip('segment_anything.modeling')
    encoder = modeling.ImageEncoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=64,
        depth=4,
        num_heads=2,
        out_chans=32,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),  # as segment_anything's build_sam
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1, 3),
    )
    decoder = modeling.MaskDecoder(
        transformer_dim=32, transformer=modeling.TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2)
    )
    prompts = modeling.PromptEncoder(
        embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8
    )
    sam = _perturbed(modeling.Sam(encoder, prompts, decoder))
    torch.save(sam.state_dict(), tmp_path / 'medsam_vit_b.pth')
    return sam, tmp_path / 'medsam_vit_b.pth'


def test_rad_dino_file_gives_the_transformers_encoder_outputs(tmp_path, small_encoders):
    reference, path = _transformers_dinov2(tmp_path)
    model = create_model('rad_dino', pretrained=str(path), image_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = reference(pixel_values=x, output_hidden_states=True)
        taps = model.backbone.taps(x)
    normed = [reference.layernorm(out.hidden_states[i]) for i in model.backbone.indices]
    assert torch.equal(normed[-1], out.last_hidden_state)
    for tap, tokens in zip(taps, normed):  # the patch tokens (class token dropped) as a 4 x 4 map
        expected = tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)
        assert (tap - expected).abs().max() < 1e-4


def test_medsam_file_gives_the_segment_anything_encoder_outputs(tmp_path, small_encoders, capsys):
    sam, path = _segment_anything_sam(tmp_path)
    model = create_model('medsam_vit_b', pretrained=str(path), image_size=64).eval()
    others = sum(not k.startswith('image_encoder.') for k in sam.state_dict())
    assert f'{others} keys outside image_encoder.* (prompt encoder, mask decoder) ignored' in capsys.readouterr().out
    blocks = []
    hooks = [
        sam.image_encoder.blocks[i - 1].register_forward_hook(lambda m, a, out: blocks.append(out))
        for i in [1, 2, 3, 4]
    ]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        sam.image_encoder(x)
        taps = model.backbone.taps(x)
    for hook in hooks:
        hook.remove()
    for tap, block in zip(taps, blocks):
        assert (tap - block.permute(0, 3, 1, 2)).abs().max() < 1e-4


def test_medsam_at_a_smaller_size_resizes_positions_as_sam_does_at_run_time(tmp_path, small_encoders):
    """Built for 128 px from a 64 px file: the tables are resized once, on load, and give what an encoder
    built for 64 px gives when it resizes them on every forward pass."""
    sam, path = _segment_anything_sam(tmp_path)
    model = create_model('medsam_vit_b', pretrained=str(path), image_size=128).eval()
    assert model.backbone.trunk.pos_embed.shape == (1, 8, 8, 64)
    native = build_backbone('medsam_vit_b', pretrained=str(path), img_size=64, **SMALL_SAM).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for ours, theirs in zip(model.backbone.taps(x), native.taps(x)):
            assert (ours - theirs).abs().max() < 1e-5


def _one_line_error(name, path, **options):
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone(name, pretrained=str(path), **options)
    message = str(info.value)
    assert '\n' not in message and str(path) in message
    return message


def test_rad_dino_file_missing_or_misshapen_keys_are_named(tmp_path):
    reference, path = _transformers_dinov2(tmp_path)
    state = load_file(str(path))
    del state['encoder.layer.2.attention.attention.key.weight'], state['layernorm.bias']
    state['encoder.layer.1.mlp.fc1.weight'] = state['encoder.layer.1.mlp.fc1.weight'][:128]
    save_file(state, str(path))
    message = _one_line_error('rad_dino', path, img_size=56, **SMALL_VIT)
    for named in (
        "'blocks.2.attn.qkv.weight'",  # timm's name, with the file's own for what could not be mapped
        "'encoder.layer.2.attention.attention.query.weight'",
        "'encoder.layer.2.attention.attention.value.weight'",
        "'norm.bias'",
        'blocks.1.mlp.fc1.weight (128, 64) vs (256, 64)',
    ):
        assert named in message


def test_medsam_file_missing_or_misshapen_keys_are_named(tmp_path):
    sam, path = _segment_anything_sam(tmp_path)
    state = sam.state_dict()
    del state['image_encoder.blocks.3.attn.proj.bias']
    state['image_encoder.neck.0.weight'] = state['image_encoder.neck.0.weight'][:16]
    torch.save(state, path)
    message = _one_line_error('medsam_vit_b', path, img_size=64, **SMALL_SAM)
    assert "'blocks.3.attn.proj.bias'" in message and 'neck.0.weight (16, 64, 1, 1) vs (32, 64, 1, 1)' in message


def test_a_rad_dino_file_given_for_medsam_says_which_backbone_reads_it(tmp_path):
    _, path = _transformers_dinov2(tmp_path)
    message = _one_line_error('medsam_vit_b', path, img_size=64, **SMALL_SAM)
    assert 'not a segment_anything checkpoint' in message and 'MODEL.backbone = rad_dino' in message


def test_a_safetensors_file_of_another_model_is_refused_for_rad_dino(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_file(build_backbone('convnext_atto').model.state_dict(), str(path))
    message = _one_line_error('rad_dino', path, img_size=56, **SMALL_VIT)
    assert 'not in the transformers Dinov2Model layout' in message and "'stages.0.blocks.0.conv_dw.bias'" in message


def test_dinov2_and_sam_hub_weights_come_from_the_hugging_face_cache(tmp_path):
    """pretrained=True reads timm's hub files from the cache, offline: DINOv2's position table (518 px) is
    resized by timm on load, SAM's (1024 px) by the SAM builder after timm has loaded it."""
    import timm

    commit = 'a' * 40
    for timm_name, options in (
        ('vit_small_patch14_dinov2.lvd142m', SMALL_VIT),
        ('samvit_base_patch16.sa1b', SMALL_SAM),
    ):
        repo = tmp_path / 'hf' / 'hub' / f'models--timm--{timm_name}'
        (repo / 'refs').mkdir(parents=True)
        (repo / 'refs' / 'main').write_text(commit)
        (repo / 'snapshots' / commit).mkdir(parents=True)
        reference = _perturbed(timm.create_model(timm_name.split('.')[0], **options))
        save_file(reference.state_dict(), str(repo / 'snapshots' / commit / 'model.safetensors'))
        torch.save(reference.state_dict(), tmp_path / f'{timm_name}.pt')
    code = f"""
import torch
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc
from hybridmednet.models.registry import build_backbone
for name, timm_name, size, options in (('dinov2_small', 'vit_small_patch14_dinov2.lvd142m', 56, {SMALL_VIT}),
                                       ('sam_vit_b', 'samvit_base_patch16.sa1b', 64, {SMALL_SAM})):
    ref = torch.load({str(tmp_path)!r} + f'/{{timm_name}}.pt')
    trunk = build_backbone(name, pretrained=True, img_size=size, **options).trunk.state_dict()
    assert torch.equal(trunk['blocks.3.mlp.fc2.weight'], ref['blocks.3.mlp.fc2.weight'])
    if name == 'sam_vit_b':
        assert torch.equal(trunk['pos_embed'], resample_abs_pos_embed_nhwc(ref['pos_embed'], [4, 4]))
        assert trunk['blocks.3.attn.rel_pos_h'].shape == (7, 32) and ref['blocks.3.attn.rel_pos_h'].shape == (127, 32)
    else:
        assert torch.equal(trunk['pos_embed'], resample_abs_pos_embed(ref['pos_embed'], [4, 4], num_prefix_tokens=1))
    print('loaded', name)
"""
    env = {**os.environ, 'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('loaded') == 2
