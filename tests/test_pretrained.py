"""Pretrained weights: local files for real, the Hugging Face cache for real, and a plain offline error."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from hybridmednet import create_model
from hybridmednet.errors import PretrainedWeightsError


def _trunk(model):
    return getattr(model.backbone, 'body', model.backbone).model


@pytest.mark.parametrize(
    'name,suffix',
    [
        ('convnext_atto', '.safetensors'),
        ('resnet18', '.pth'),
        ('efficientnet_b0', '.pth'),
        ('efficientvim_m1', '.safetensors'),
    ],
)
def test_local_weights_file_loads_exactly(tmp_path, name, suffix):
    from hybridmednet.models.registry import get_backbone_spec

    reference = timm.create_model(get_backbone_spec(name).timm_name, pretrained=False)
    path = tmp_path / f'weights{suffix}'
    if suffix == '.safetensors':
        save_file(reference.state_dict(), str(path))
    else:
        torch.save({'state_dict': reference.state_dict()}, path)
    model = create_model(name, pretrained=str(path))
    ref = reference.state_dict()
    loaded = _trunk(model).state_dict()
    assert loaded and all(torch.equal(v, ref[k]) for k, v in loaded.items())


def batchnorm_weights_without_counters():
    """resnet18 weights as old torchvision files hold them: random values, no num_batches_tracked entries."""
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in timm.create_model('resnet18', pretrained=False).state_dict().items()
    }
    counters = [k for k in state if k.endswith('.num_batches_tracked')]
    assert counters
    return {k: v for k, v in state.items() if k not in counters}


def test_weights_without_batchnorm_counters_load(tmp_path):
    state = batchnorm_weights_without_counters()
    torch.save(state, tmp_path / 'resnet18-f37072fd.pth')
    trunk = _trunk(create_model('resnet18', pretrained=str(tmp_path / 'resnet18-f37072fd.pth'))).state_dict()
    loaded = {k: v for k, v in trunk.items() if not k.endswith('.num_batches_tracked')}
    assert set(loaded) == set(state) - {'fc.weight', 'fc.bias'}
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())


def test_only_batchnorm_counters_may_be_missing(tmp_path):
    state = batchnorm_weights_without_counters()
    del state['layer1.0.bn1.running_var']
    torch.save(state, tmp_path / 'resnet18.pth')
    with pytest.raises(
        PretrainedWeightsError, match=r"resnet18\.pth does not fit.*1 missing keys \['layer1.0.bn1.running_var'\]"
    ):
        create_model('resnet18', pretrained=str(tmp_path / 'resnet18.pth'))


def test_local_swin_weights_resize_to_other_image_sizes(tmp_path):
    reference = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False)
    path = tmp_path / 'swin.safetensors'
    save_file(reference.state_dict(), str(path))
    model = create_model('swin_tiny', pretrained=str(path), image_size=256)  # window 8: bias tables resized
    ref = reference.state_dict()
    same = [k for k, v in _trunk(model).state_dict().items() if 'relative_position' not in k and 'attn_mask' not in k]
    assert same and all(torch.equal(_trunk(model).state_dict()[k], ref[k]) for k in same)
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 14)


def test_wrong_weights_file_is_a_loud_error(tmp_path):
    path = tmp_path / 'other.safetensors'
    save_file(timm.create_model('resnet18', pretrained=False).state_dict(), str(path))
    with pytest.raises(PretrainedWeightsError, match='does not fit'):
        create_model('convnext_atto', pretrained=str(path))
    save_file(timm.create_model('resnet34', pretrained=False).state_dict(), str(path))
    with pytest.raises(PretrainedWeightsError, match='does not fit.*missing keys'):
        create_model('resnet18', pretrained=str(path))
    with pytest.raises(PretrainedWeightsError, match='nothing.pth'):
        create_model('convnext_atto', pretrained=str(tmp_path / 'nothing.pth'))


def save_stating_architecture(state, folder, architecture, where):
    """A model.safetensors naming `architecture` in its metadata, or in a config.json beside it laid out
    as timm's push_to_hub writes one."""
    path = folder / 'model.safetensors'
    save_file(
        state, str(path), metadata={'format': 'pt', 'architecture': architecture} if where == 'metadata' else None
    )
    if where == 'config.json':
        (folder / 'config.json').write_text(
            json.dumps(
                {
                    'architecture': architecture,
                    'num_classes': 1000,
                    'pretrained_cfg': {'tag': architecture.partition('.')[2]},
                }
            )
        )
    return path


@pytest.mark.parametrize('where', ['metadata', 'config.json'])
def test_weights_of_another_architecture_with_the_same_keys_are_refused(tmp_path, where):
    # timm's efficientnetv2_s and the tf_efficientnetv2_s our efficientnetv2_s is cut from share every key and shape
    state = timm.create_model('efficientnetv2_s', pretrained=False).state_dict()
    own = timm.create_model('tf_efficientnetv2_s', pretrained=False).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in own.items()}
    path = save_stating_architecture(state, tmp_path, 'efficientnetv2_s.ra_in1k', where)
    with pytest.raises(PretrainedWeightsError, match=r"efficientnetv2_s\.ra_in1k.*'tf_efficientnetv2_s'"):
        create_model('efficientnetv2_s', pretrained=str(path))


@pytest.mark.parametrize('where', ['metadata', 'config.json'])
def test_weights_stating_the_same_architecture_load(tmp_path, where):
    state = timm.create_model('resnet18', pretrained=False).state_dict()
    path = save_stating_architecture(state, tmp_path, 'resnet18.a1_in1k', where)  # another tag is fine
    trunk = _trunk(create_model('resnet18', pretrained=str(path))).state_dict()
    assert trunk and all(torch.equal(v, state[k]) for k, v in trunk.items())


def test_weights_stating_no_architecture_load(tmp_path):
    state = {
        k: v + 1 if v.is_floating_point() else v
        for k, v in timm.create_model('resnet18', pretrained=False).state_dict().items()
    }
    path = tmp_path / 'model.safetensors'
    save_file(state, str(path), metadata={'format': 'pt'})
    # a transformers-style config.json beside it names no timm architecture
    (tmp_path / 'config.json').write_text(json.dumps({'architectures': ['ResNetForImageClassification']}))
    trunk = _trunk(create_model('resnet18', pretrained=str(path))).state_dict()
    assert trunk and all(torch.equal(v, state[k]) for k, v in trunk.items())


def _run_offline(code: str, hf_home) -> subprocess.CompletedProcess:
    env = {**os.environ, 'HF_HOME': str(hf_home), 'HF_HUB_OFFLINE': '1'}
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)


def test_no_weights_offline_names_the_three_fixes(tmp_path):
    out = _run_offline(
        "from hybridmednet import create_model; create_model('convnext_atto', pretrained=True)",
        tmp_path / 'empty_cache',
    )
    assert out.returncode != 0
    assert 'PretrainedWeightsError' in out.stderr
    for fix in (
        "MODEL['pretrained'] = False",
        "MODEL['pretrained'] = '/path/to/weights.safetensors'",
        'Hugging Face cache',
    ):
        assert fix in out.stderr
    assert issubclass(PretrainedWeightsError, RuntimeError)


def test_pretrained_true_reads_a_populated_hugging_face_cache(tmp_path):
    """The real timm hub path, served from a cache laid out as huggingface_hub writes it."""
    reference = timm.create_model('convnext_atto', pretrained=False)
    commit = 'a' * 40
    repo = tmp_path / 'hf' / 'hub' / 'models--timm--convnext_atto.d2_in1k'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    save_file(reference.state_dict(), str(repo / 'snapshots' / commit / 'model.safetensors'))
    torch.save(reference.state_dict(), tmp_path / 'ref.pt')
    code = f"""
import torch
from hybridmednet import create_model
model = create_model('convnext_atto', pretrained=True)
ref = torch.load({str(tmp_path / 'ref.pt')!r})
trunk = model.backbone.model.state_dict()
assert all(torch.equal(v, ref[k]) for k, v in trunk.items())
print('loaded', len(trunk))
"""
    out = _run_offline(code, tmp_path / 'hf')
    assert out.returncode == 0, out.stderr
    assert 'loaded' in out.stdout
