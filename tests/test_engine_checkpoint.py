"""Checkpoints: atomic writes, safe loading, RNG round trips, and models rebuilt from their own files."""

from __future__ import annotations

import datetime
import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hybridmednet.checkpoint import load_checkpoint, load_model, save_checkpoint
from hybridmednet.config import NIH_FINDINGS, Config
from hybridmednet.engine.runtime import rng_state, set_rng_state
from hybridmednet.engine.trainer import train
from hybridmednet.errors import CheckpointError


def test_a_crash_during_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    save_checkpoint(path, {'epoch': 1, 'w': torch.ones(3)})

    def crash(obj, f):  # half a file written, then the process "dies"
        with open(f, 'wb') as handle:
            handle.write(b'PK\x03\x04 partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(path, {'epoch': 2, 'w': torch.zeros(3)})
    assert load_checkpoint(path)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['last.pth']  # no temporary file left behind


def test_loading_refuses_pickled_objects(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model_state_dict': {}, 'when': datetime.datetime(2024, 1, 1)}, path)
    with pytest.raises(CheckpointError, match='weights_only'):
        load_checkpoint(path)


def test_rng_state_round_trip():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real hierarchical HybridMedNet (convnext_atto, 32 px) trained for one epoch on random data."""
    tmp = tmp_path_factory.mktemp('hier')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 32, 32, generator=g)
    y = (torch.rand(24, 14, generator=g) < 0.3).float()
    m = torch.ones_like(y)
    m[:, 0] = 0  # Atelectasis unknown everywhere: masked out
    data = {'train': TensorDataset(x[:16], y[:16], m[:16]), 'val': TensorDataset(x[16:], y[16:], m[16:])}
    config = Config(
        MODEL={
            'backbone': 'convnext_atto',
            'pretrained': False,
            'hierarchical': True,
            'fusion_channels': 32,
            'num_heads': 2,
        },
        TRAIN={'batch_size': 8, 'epochs': 1, 'mixed_precision': False, 'device': 'cpu', 'warmup_epochs': 0},
        DATA={'image_size': 32, 'num_workers': 0},
        LOSS={'pos_weight': [2.0] * 14},
        CHECKPOINT={'dir': str(tmp / 'ckpt')},
        LOGGING={'log_dir': str(tmp / 'logs'), 'tensorboard': True},
    )
    result = train(config, datasets=data)
    return result, x[16:]


def test_checkpoint_rebuilds_its_own_model(trained):
    result, images = trained
    model, config, meta = load_model(result['best_checkpoint'])
    exported, _, exported_meta = load_model(result['best_export'])
    assert config.MODEL['hierarchical'] and meta['class_names'] == NIH_FINDINGS
    assert exported_meta['preprocessing']['image_size'] == 32 and len(exported_meta['preprocessing']['mean']) == 3
    with torch.no_grad():
        assert torch.equal(model(images), exported(images))
    assert np.isnan(result['history'][0]['auc_Atelectasis'])  # a fully masked finding has no AUC


def test_load_model_is_loud_on_mismatch(trained, tmp_path):
    result, _ = trained
    with pytest.raises(CheckpointError, match='class-count mismatch'):
        load_model(result['best_checkpoint'], num_classes=5)
    ckpt = load_checkpoint(result['best_checkpoint'])
    ckpt['config']['MODEL']['hierarchical'] = False  # the weights no longer fit the config
    save_checkpoint(tmp_path / 'edited.pth', ckpt)
    with pytest.raises(CheckpointError, match='do not fit'):
        load_model(tmp_path / 'edited.pth')
    save_checkpoint(tmp_path / 'bare.pth', ckpt['model_state_dict'])
    with pytest.raises(CheckpointError, match='bare state dict'):
        load_model(tmp_path / 'bare.pth')
    (tmp_path / 'model.onnx').write_bytes(b'onnx')
    with pytest.raises(CheckpointError, match='unknown checkpoint format'):
        load_model(tmp_path / 'model.onnx')


def test_exported_weights_get_the_same_file_mode_as_checkpoints(tmp_path):
    from hybridmednet.checkpoint import export_weights

    config = Config(MODEL={'backbone': 'resnet18', 'pretrained': False})
    pth = save_checkpoint(tmp_path / 'a.pth', {'w': torch.zeros(1)})
    exported = export_weights(tmp_path / 'a.safetensors', {'w': torch.zeros(1)}, config)
    assert exported.stat().st_mode == pth.stat().st_mode == exported.with_suffix('.json').stat().st_mode
