"""Training defects that gave wrong results or died late: each test fails on the old behaviour."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_engine_train import assert_same_weights, run, tiny_datasets
from torch.utils.data import DataLoader, TensorDataset

import hybridmednet.engine.trainer as trainer_module
from hybridmednet.config import Config
from hybridmednet.data.datasets import ChestXrayDataset, DataIndex
from hybridmednet.data.transforms import build_transforms
from hybridmednet.errors import TrainingError


def test_an_empty_validation_split_fails_before_any_training(tmp_path):
    data = {
        'train': tiny_datasets()['train'],
        'val': TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, 3), torch.zeros(0, 3)),
    }
    with pytest.raises(TrainingError, match='validation split is empty.*DATA.val_split'):
        run(tmp_path, datasets=data)
    assert not (tmp_path / 'ckpt').exists()


@pytest.mark.parametrize('first,second', [(False, True), (True, False)])
def test_resume_across_mixed_precision_settings(tmp_path, monkeypatch, first, second):
    # A CPU run (no loss scale) continued where fp16 scaling is on, and the reverse.
    def scaler(enabled):
        return lambda *_: (nullcontext, torch.amp.GradScaler('cpu', enabled=enabled))

    monkeypatch.setattr(trainer_module, 'precision', scaler(first))
    run(tmp_path, epochs=1)
    monkeypatch.setattr(trainer_module, 'precision', scaler(second))
    result, _ = run(tmp_path, resume=tmp_path / 'ckpt' / 'last_model.pth', epochs=2)
    assert result['epochs'] == 2


def masked_datasets() -> dict:
    data = tiny_datasets()
    x, y, _ = data['train'].tensors
    mask = (torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) > 0.4).float()  # U-Ignore style
    return {'train': TensorDataset(x, y, mask), 'val': data['val']}


def test_accumulation_with_label_masks_equals_one_large_batch(tmp_path):
    _, small = run(
        tmp_path / 'a', datasets=masked_datasets(), batch_size=4, gradient_accumulation_steps=3, grad_clip_norm=0.0
    )
    _, large = run(
        tmp_path / 'b', datasets=masked_datasets(), batch_size=12, gradient_accumulation_steps=1, grad_clip_norm=0.0
    )
    assert_same_weights(small, large, atol=1e-6)


def test_early_stopping_min_delta(tmp_path):
    result, _ = run(tmp_path, epochs=6, early_stopping_patience=2, early_stopping_min_delta=0.9)
    assert result['stopped_early'] and result['epochs'] == 3  # no later epoch beats the first by 0.9 AUC


@pytest.fixture(params=[False, True], ids=['torchvision', 'albumentations'])
def augmented(tmp_path, request) -> ChestXrayDataset:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(paths[-1])
    index = DataIndex(
        pd.DataFrame({'path': paths, 'patient_id': paths, 'split': 'train'}),
        np.zeros((8, 2), np.float32),
        np.ones((8, 2), np.float32),
        ['a', 'b'],
        'test',
        tmp_path,
    )
    config = Config(
        DATA={'image_size': 32, 'class_names': ['a', 'b'], 'use_albumentations': request.param},
        MODEL={'num_classes': 2},
    )
    return ChestXrayDataset(index, build_transforms(config, train=True))


def test_augmentation_depends_on_epoch_and_image_not_on_workers_or_process_state(augmented):
    augmented.set_epoch(7)
    first = augmented[3][0]
    torch.manual_seed(12345)  # another process state: same image
    assert torch.equal(augmented[3][0], first)
    augmented.set_epoch(8)
    assert not torch.equal(augmented[3][0], first)  # still random from epoch to epoch
    augmented.set_epoch(7)
    serial = torch.cat([b[0] for b in DataLoader(augmented, batch_size=2)])
    parallel = torch.cat([b[0] for b in DataLoader(augmented, batch_size=2, num_workers=2)])
    assert torch.equal(serial, parallel)  # what a worker serves does not depend on it


def test_the_trainer_seeds_each_epoch(tmp_path):
    seen = []

    class Recording(TensorDataset):
        def set_epoch(self, seed: int) -> None:
            seen.append(seed)

    data = tiny_datasets()
    run(tmp_path, datasets={'train': Recording(*data['train'].tensors), 'val': data['val']}, epochs=2)
    assert len(seen) == 2 and seen[0] != seen[1]


def test_training_records_the_normalisation_of_the_backbone_weights(tmp_path):
    # tf_efficientnetv2 weights expect mean = std = 0.5; the pipeline used to apply ImageNet statistics to all.
    from hybridmednet.checkpoint import load_checkpoint
    from hybridmednet.data.transforms import normalization

    config = Config(
        MODEL={'backbone': 'efficientnetv2_s', 'pretrained': False, 'num_classes': 3},
        TRAIN={'epochs': 1, 'batch_size': 4, 'mixed_precision': False, 'device': 'cpu', 'warmup_epochs': 0},
        DATA={'class_names': ['a', 'b', 'c']},
        CHECKPOINT={'dir': str(tmp_path / 'ckpt')},
        LOGGING={'log_dir': str(tmp_path / 'logs'), 'tensorboard': False},
    )
    from test_engine_train import TinyNet

    trainer_module.train(config, model=TinyNet(), datasets=tiny_datasets())
    saved = load_checkpoint(tmp_path / 'ckpt' / 'last_model.pth')
    assert saved['config']['DATA']['mean'] == [0.5] * 3 and saved['config']['DATA']['std'] == [0.5] * 3
    assert saved['preprocessing']['mean'] == [0.5] * 3
    assert normalization(Config.from_dict(saved['config'])) == ([0.5] * 3, [0.5] * 3)
