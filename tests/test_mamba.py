"""Vision Mamba: the chunked scan against the sequential one, the bidirectional design, the
pyramid, parameter counts, official checkpoint layout, and that it learns."""

from __future__ import annotations

import argparse
import importlib.util
import pickle

import pytest
import torch
import torch.nn.functional as F

from hybridmednet.errors import PretrainedWeightsError
from hybridmednet.models.mamba import (
    VIM_VARIANTS,
    BiMamba,
    VimBackbone,
    VisionMamba,
    load_vim_checkpoint,
    resize_pos_embed,
)
from hybridmednet.models.registry import build_backbone, get_backbone_spec, list_backbones
from hybridmednet.models.selective_scan import (
    _channel_major,
    _softplus,
    _time_major,
    scan_function,
    selective_scan,
    selective_scan_ref,
)


def scan_inputs(b=2, d=12, n=4, length=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return [
        r(b, d, length),
        r(b, d, length) - 1,
        -torch.rand(d, n, generator=g) * 4 - 0.1,
        r(b, n, length),
        r(b, n, length),
        r(d),
        r(b, d, length),
        r(d),
    ]


def run_scan(scan, inputs, **kw):
    u, delta, A, B, C, D, z, bias = inputs
    return scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, **kw)


def assert_close_rel(actual, expected, tol=1e-5):
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= tol * scale, (actual - expected).abs().max()


@pytest.mark.parametrize('length,chunk', [(37, 8), (64, 8), (300, 8), (300, 16), (5, 1), (50, 3)])
def test_chunked_scan_matches_sequential_forward_and_backward(length, chunk):
    leaves = [t.requires_grad_() for t in scan_inputs(length=length)]
    y_ref = run_scan(selective_scan_ref, leaves)
    y = run_scan(selective_scan, leaves, chunk=chunk)
    assert_close_rel(y, y_ref)
    grad = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(y_ref, leaves, grad)):
        assert_close_rel(g, g_ref)


@pytest.mark.parametrize('length,chunk,segment', [(37, 4, 8), (100, 4, 32), (9, 2, 4)])
def test_segments_and_custom_backward_match_autograd_of_the_reference(length, chunk, segment):
    # several segments, a partial last one, and gradients carried across segment boundaries
    leaves = [t.requires_grad_() for t in scan_inputs(length=length)]
    y_ref = run_scan(selective_scan_ref, leaves)
    y = run_scan(selective_scan, leaves, chunk=chunk, segment=segment)
    assert_close_rel(y, y_ref)
    grad = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(y_ref, leaves, grad)):
        assert_close_rel(g, g_ref)


@pytest.mark.parametrize('length', [37, 64])
def test_tokens_first_layout_gives_the_same_scan(length):
    leaves = [t.requires_grad_() for t in scan_inputs(length=length)]
    y_ref = run_scan(selective_scan_ref, leaves)
    u, delta, A, B, C, D, z, bias = (t.transpose(1, 2) if t.dim() == 3 else t for t in leaves)
    y = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, tokens_first=True)
    assert y.shape == (2, length, 12)
    assert_close_rel(y.transpose(1, 2), y_ref)
    grad = torch.randn_like(y_ref)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad.transpose(1, 2)), torch.autograd.grad(y_ref, leaves, grad)):
        assert_close_rel(g, g_ref)


def test_scan_gradients_without_softplus():
    u, delta, A, B, C, *_ = scan_inputs(length=23)
    leaves = [t.requires_grad_() for t in (u, F.softplus(delta).detach(), A, B, C)]
    y, y_ref = selective_scan(*leaves, segment=8), selective_scan_ref(*leaves)
    assert_close_rel(y, y_ref)
    grad = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(y_ref, leaves, grad)):
        assert_close_rel(g, g_ref)


def test_fast_softplus_matches_torch():
    x = torch.linspace(-80, 40, 100_001)
    expected = F.softplus(x.double())
    assert ((_softplus(x) - expected).abs() / expected).max() < 1e-6


def test_time_major_round_trip_pads_with_zeros():
    x = torch.randn(3, 5, 7)
    t = _time_major(x, 10)
    assert t.shape == (3, 10, 5) and t.is_contiguous()
    torch.testing.assert_close(t[:, :7], x.transpose(1, 2), rtol=0, atol=0)
    assert (t[:, 7:] == 0).all()
    torch.testing.assert_close(_channel_major(t, 7), x, rtol=0, atol=0)


def test_scan_without_optional_terms_and_under_no_grad():
    u, delta, A, B, C, *_ = scan_inputs(length=20)
    delta = F.softplus(delta)
    with torch.no_grad():
        assert_close_rel(selective_scan(u, delta, A, B, C), selective_scan_ref(u, delta, A, B, C))


def test_scan_is_causal():
    inputs = scan_inputs(length=30)
    y = run_scan(selective_scan, inputs)
    changed = [t.clone() for t in inputs]
    for i in (0, 1, 3, 4, 6):  # every per-token input, from token 20 on
        changed[i][..., 20:] = torch.randn_like(changed[i][..., 20:])
    y2 = run_scan(selective_scan, changed)
    torch.testing.assert_close(y2[..., :20], y[..., :20])
    assert not torch.allclose(y2[..., 20:], y[..., 20:])


def test_cpu_uses_the_pytorch_scan():
    assert scan_function(torch.device('cpu')) is selective_scan


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec('mamba_ssm') is None, reason='needs a GPU and mamba-ssm'
)
def test_mamba_ssm_kernel_matches_pytorch_scan():
    leaves = [t.cuda().requires_grad_() for t in scan_inputs(length=200)]
    kernel = scan_function(leaves[0].device)
    assert kernel is not selective_scan
    y_kernel, y = run_scan(kernel, leaves), run_scan(selective_scan, leaves)
    assert_close_rel(y_kernel, y, 1e-4)
    grad = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y_kernel, leaves, grad), torch.autograd.grad(y, leaves, grad)):
        assert_close_rel(g, g_ref, 1e-3)


def test_backward_branch_is_the_forward_branch_on_reversed_tokens():
    mixer = BiMamba(16, d_state=4).eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the two directions differ
    swapped = BiMamba(16, d_state=4).eval()
    pairs = [
        ('conv1d', 'conv1d_b'),
        ('x_proj', 'x_proj_b'),
        ('dt_proj', 'dt_proj_b'),
        ('A_log', 'A_b_log'),
        ('D', 'D_b'),
    ]
    state = mixer.state_dict()
    new = dict(state)
    for fwd, bwd in pairs:
        for key in [k for k in state if k == fwd or k.startswith(fwd + '.')]:
            other = bwd + key[len(fwd) :]
            new[key], new[other] = state[other], state[key]
    swapped.load_state_dict(new)
    x = torch.randn(2, 11, 16)
    # swapping the directions' parameters is the same as reading the sequence backwards
    torch.testing.assert_close(swapped(x.flip(1)).flip(1), mixer(x), rtol=1e-5, atol=1e-6)
    xi, z = mixer.in_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(
        mixer.scan_direction(xi.flip(1), z.flip(1), backward=True),
        swapped.scan_direction(xi.flip(1), z.flip(1), backward=False),
    )


@pytest.mark.parametrize('name,paper_m', [('vim_tiny', 7.15), ('vim_small', 25.8), ('vim_base', 97.6)])
def test_parameter_counts_match_the_paper(name, paper_m):
    dim = {'vim_tiny': 192, 'vim_small': 384, 'vim_base': 768}[name]
    with torch.device('meta'):
        model = VisionMamba(embed_dim=dim, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - paper_m) / paper_m < 0.05, count
    assert get_backbone_spec(name).family == 'mamba'


def test_backbone_pyramid_shapes_and_gradients():
    model = build_backbone('vim_tiny', img_size=64, depth=8)
    assert model.indices == [2, 4, 6, 8]
    assert model.reductions == [4, 8, 16, 32] and model.channels == [48, 96, 192, 192]
    x = torch.randn(2, 3, 64, 64)
    maps = model(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, c, 64 // r, 64 // r) for c, r in zip(model.channels, model.reductions)
    ]
    sum(m.square().mean() for m in maps).backward()
    for name in (
        'trunk.patch_embed.proj.weight',
        'trunk.pos_embed',
        'trunk.cls_token',
        'trunk.layers.0.mixer.A_log',
        'trunk.layers.0.mixer.A_b_log',
        'trunk.layers.7.mixer.dt_proj_b.weight',
        'resample.0.0.weight',
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_other_input_sizes_interpolate_position_embeddings():
    model = build_backbone('vim_tiny', img_size=64, depth=4).eval()
    for h, w in [(96, 80), (64, 64), (128, 128)]:
        maps = model(torch.randn(1, 3, h, w))
        assert [tuple(m.shape[-2:]) for m in maps] == [(h // r, w // r) for r in (4, 8, 16, 32)]
    big = build_backbone('vim_tiny', img_size=96, depth=4)
    assert big.trunk.pos_embed.shape == (1, 37, 192)


def test_resize_pos_embed_keeps_the_middle_class_token():
    pos = torch.randn(1, 197, 8)
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos
    new = resize_pos_embed(pos, (14, 14), (16, 20))
    assert new.shape == (1, 321, 8)
    torch.testing.assert_close(new[:, 160], pos[:, 98])
    # a constant patch embedding stays constant: the class token was not mixed into the grid
    flat = torch.ones(1, 197, 8)
    flat[:, 98] = 5.0
    out = resize_pos_embed(flat, (14, 14), (8, 8))
    assert torch.allclose(out[:, torch.arange(65) != 32], torch.ones(1), atol=1e-5) and out[0, 32, 0] == 5.0


def official_state_dict(dim=192, depth=2, num_classes=1000, grid=14):
    """A state dict written from the published Vim layout (hustvl/Vim vim/models_mamba.py), not from our modules."""
    inner, rank, n = 2 * dim, -(-dim // 16), 16
    sd = {
        'patch_embed.proj.weight': torch.randn(dim, 3, 16, 16),
        'patch_embed.proj.bias': torch.randn(dim),
        'cls_token': torch.randn(1, 1, dim),
        'pos_embed': torch.randn(1, grid * grid + 1, dim),
    }
    for i in range(depth):
        p = f'layers.{i}.'
        sd[p + 'norm.weight'] = torch.rand(dim) + 0.5
        sd[p + 'mixer.in_proj.weight'] = torch.randn(2 * inner, dim) * 0.05
        sd[p + 'mixer.out_proj.weight'] = torch.randn(dim, inner) * 0.05
        for s in ('', '_b'):
            sd[p + f'mixer.conv1d{s}.weight'] = torch.randn(inner, 1, 4) * 0.3
            sd[p + f'mixer.conv1d{s}.bias'] = torch.randn(inner) * 0.1
            sd[p + f'mixer.x_proj{s}.weight'] = torch.randn(rank + 2 * n, inner) * 0.05
            sd[p + f'mixer.dt_proj{s}.weight'] = torch.randn(inner, rank) * 0.1
            sd[p + f'mixer.dt_proj{s}.bias'] = torch.randn(inner) - 4
        sd[p + 'mixer.A_log'] = torch.randn(inner, n) * 0.1 + 1
        sd[p + 'mixer.A_b_log'] = torch.randn(inner, n) * 0.1 + 1
        sd[p + 'mixer.D'] = torch.randn(inner)
        sd[p + 'mixer.D_b'] = torch.randn(inner)
    sd['norm_f.weight'] = torch.rand(dim) + 0.5
    sd['head.weight'] = torch.randn(num_classes, dim) * 0.02
    sd['head.bias'] = torch.zeros(num_classes)
    return sd


def test_loads_an_official_vim_checkpoint(tmp_path):
    sd = official_state_dict()
    path = tmp_path / 'vim_t_midclstok_76p1acc.pth'
    torch.save({'model': sd, 'epoch': 300}, path)
    model = build_backbone('vim_tiny', pretrained=str(path), img_size=224, depth=2)
    own = model.trunk.state_dict()
    for key in ('layers.1.mixer.A_b_log', 'layers.0.mixer.conv1d_b.weight', 'pos_embed', 'norm_f.weight'):
        torch.testing.assert_close(own[key], sd[key])
    classifier = VisionMamba(embed_dim=192, depth=2, num_classes=1000)
    load_vim_checkpoint(classifier, path)
    torch.testing.assert_close(classifier.head.weight, sd['head.weight'])
    # another input size: the position grid is resized, the class token entry kept
    small = build_backbone('vim_tiny', pretrained=str(path), img_size=128, depth=2)
    assert small.trunk.pos_embed.shape == (1, 65, 192)
    torch.testing.assert_close(small.trunk.pos_embed[:, 32], sd['pos_embed'][:, 98])
    assert [tuple(m.shape) for m in small(torch.randn(1, 3, 128, 128))][2] == (1, 192, 8, 8)


def test_loads_safetensors_and_plain_state_dicts(tmp_path):
    from safetensors.torch import save_file

    sd = official_state_dict(depth=1)
    save_file(sd, tmp_path / 'vim.safetensors')
    torch.save(sd, tmp_path / 'plain.pth')
    for name in ('vim.safetensors', 'plain.pth'):
        model = build_backbone('vim_tiny', pretrained=str(tmp_path / name), depth=1)
        torch.testing.assert_close(model.trunk.layers[0].mixer.D_b, sd['layers.0.mixer.D_b'])


def test_loads_a_vim_training_checkpoint_with_its_argparse_namespace(tmp_path):
    # hustvl/Vim main.py saves model, optimizer, lr_scheduler, epoch, scaler and its argparse args
    source = VisionMamba(img_size=64, embed_dim=192, depth=2, num_classes=10)
    optimizer = torch.optim.AdamW(source.parameters(), lr=5e-4)
    source(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300)
    args = argparse.Namespace(
        model='vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2',
        batch_size=128,
        lr=5e-4,
        epochs=300,
        input_size=224,
        drop_path=0.0,
        betas=None,
        data_path='/data/imagenet',
        device='cuda',
        model_ema=False,
        if_amp=True,
        seed=0,
    )
    path = tmp_path / 'vim_t_checkpoint.pth'
    torch.save(
        {
            'model': source.state_dict(),
            'optimizer': optimizer.state_dict(),
            'lr_scheduler': scheduler.state_dict(),
            'epoch': 299,
            'scaler': torch.amp.GradScaler('cpu').state_dict(),
            'args': args,
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the layout this test is about
    model = VisionMamba(img_size=64, embed_dim=192, depth=2, num_classes=10)
    load_vim_checkpoint(model, path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), source.eval()(x), rtol=0, atol=0)
    backbone = build_backbone('vim_tiny', pretrained=str(path), img_size=64, depth=2).eval()
    torch.testing.assert_close(backbone.trunk.forward_features(x), source.forward_features(x), rtol=0, atol=0)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for these loads only


class Unexpected:
    """Any class other than argparse.Namespace in a weights file."""


def test_checkpoint_holding_other_objects_is_refused(tmp_path):
    path = tmp_path / 'vim_with_object.pth'
    torch.save(
        {'model': official_state_dict(depth=1), 'args': argparse.Namespace(lr=5e-4), 'extra': Unexpected()}, path
    )
    with pytest.raises(PretrainedWeightsError, match=r'vim_with_object\.pth.*Unexpected'):
        build_backbone('vim_tiny', pretrained=str(path), depth=1)


def test_checkpoint_that_does_not_fit_is_a_loud_error(tmp_path):
    sd = official_state_dict(depth=2)
    del sd['layers.1.mixer.x_proj_b.weight']
    sd['layers.0.mixer.gamma'] = torch.ones(192)
    torch.save({'model': sd}, tmp_path / 'bad.pth')
    with pytest.raises(PretrainedWeightsError, match=r'x_proj_b.weight.*gamma|gamma.*x_proj_b'):
        build_backbone('vim_tiny', pretrained=str(tmp_path / 'bad.pth'), depth=2)
    torch.save({'model': official_state_dict(dim=384, depth=2)}, tmp_path / 'small.pth')
    with pytest.raises(PretrainedWeightsError, match='shape mismatches'):
        build_backbone('vim_tiny', pretrained=str(tmp_path / 'small.pth'), depth=2)


def test_pretrained_true_asks_for_a_local_file():
    with pytest.raises(PretrainedWeightsError, match='local|/path/to'):
        build_backbone('vim_small', pretrained=True)


@pytest.mark.parametrize('modern,cross', [(False, False), (True, False), (True, True)])
def test_hybridmednet_with_vim_in_every_attention_mode(modern, cross, monkeypatch):
    from hybridmednet.models.hybrid import create_model

    monkeypatch.setitem(VIM_VARIANTS, 'vim_tiny', dict(embed_dim=192, depth=4))  # same wiring, fewer blocks
    model = create_model(
        'vim_tiny', num_classes=3, image_size=64, use_modern_attention=modern, use_cross_scale_attention=cross
    )
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.backbone.trunk.layers[0].mixer.in_proj.weight.grad is not None


def test_short_training_run_loss_falls():
    torch.manual_seed(0)
    backbone = VimBackbone(img_size=32, embed_dim=32, depth=2)
    head = torch.nn.Linear(backbone.channels[-1], 1)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    # target: is the bright square in the left or the right half of the image?
    x = torch.randn(32, 3, 32, 32) * 0.1
    y = torch.randint(0, 2, (32,)).float()
    for i, side in enumerate(y.long().tolist()):
        x[i, :, 8:16, 4 + side * 16 : 12 + side * 16] += 2.0
    losses = []
    for _ in range(25):
        logits = head(backbone(x)[-1].mean((2, 3))).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize('name', ['mambaout_femto', 'mambaout_kobe'])
def test_mambaout_backbones_are_registered_pyramids(name):
    assert set(list_backbones('mambaout')) == {f'mambaout_{s}' for s in ('femto', 'kobe', 'tiny', 'small', 'base')}
    model = build_backbone(name, img_size=64)
    assert model.reductions == [4, 8, 16, 32]
    maps = model(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [
        (1, c, 64 // r, 96 // r) for c, r in zip(model.channels, model.reductions)
    ]


@pytest.mark.parametrize('name', ['efficientvim_m1', 'efficientvim_m2'])
def test_efficientvim_backbones_resample_strides_16_to_64_into_4_to_32(name):
    assert list_backbones('efficientvim') == [f'efficientvim_m{i}' for i in (1, 2, 3, 4)]
    model = build_backbone(name, img_size=64)
    assert model.reductions == [4, 8, 16, 32]
    maps = model(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [
        (1, c, 64 // r, 96 // r) for c, r in zip(model.channels, model.reductions)
    ]
    maps[-1].sum().backward()  # the stride-64 stage feeds the stride-32 map
    assert all(p.grad is not None for p in model.body.model.stages[2].parameters())


@pytest.mark.parametrize('modern,cross', [(False, False), (True, False), (True, True)])
def test_efficientvim_trains_inside_hybridmednet(modern, cross):
    from hybridmednet import create_model

    model = create_model(
        'efficientvim_m1', num_classes=3, image_size=64, use_modern_attention=modern, use_cross_scale_attention=cross
    )
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.body.model.patch_embed.parameters()
    )
