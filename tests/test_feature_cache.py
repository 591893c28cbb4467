"""TRAIN.feature_cache: a frozen backbone's maps computed once, cached on disk, and training from them equal to
training through the backbone. A tiny resnet18 linear probe at 32 px on a CSV dataset of PNG files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hybridmednet.checkpoint import load_checkpoint, weights_hash
from hybridmednet.config import Config
from hybridmednet.data.datasets import build_datasets
from hybridmednet.data.transforms import MEAN, STD, build_transforms
from hybridmednet.engine import feature_cache
from hybridmednet.engine.feature_cache import FeatureCache, cache_features
from hybridmednet.engine.runtime import setup_device
from hybridmednet.engine.trainer import Trainer, train
from hybridmednet.errors import ConfigError
from hybridmednet.evaluation import gradcam
from hybridmednet.models.hybrid import HybridMedNet

N_IMAGES = 24  # 2 in 3 train, 1 in 3 val


def write_image(path, i: int, shade: int = 0) -> None:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 120, (40, 40)) + (100 if i % 2 else 0) + shade  # label 'a' is brighter
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv('HYBRIDMEDNET_CACHE', str(tmp_path / 'cache'))
    folder = tmp_path / 'data'
    folder.mkdir()
    rows = []
    for i in range(N_IMAGES):
        write_image(folder / f'{i}.png', i)
        labels = '|'.join(n for n, on in zip('abc', (i % 2, i % 4 in (0, 3), i % 4 == 1)) if on) or 'No Finding'
        rows.append(f'{i}.png,{labels},p{i},{("train", "train", "val")[i % 3]}')
    (folder / 'labels.csv').write_text('image,labels,patient_id,split\n' + '\n'.join(rows) + '\n')
    return folder


def make_config(tmp_path, data, name: str = 'run', **train_options) -> Config:
    return Config(
        MODEL={
            'backbone': 'resnet18',
            'num_classes': 3,
            'pretrained': False,
            'fusion_channels': 16,
            'fpn_channels': 16,
            'finetune': 'linear',
            'num_heads': 2,
        },
        TRAIN={
            'batch_size': 4,
            'epochs': 2,
            'learning_rate': 1e-2,
            'warmup_epochs': 0,
            'lr_scheduler': 'none',
            'mixed_precision': False,
            'device': 'cpu',
            'feature_cache': True,
            **train_options,
        },
        DATA={
            'dataset': 'csv',
            'data_dir': str(data),
            'class_names': ['a', 'b', 'c'],
            'image_size': 32,
            'num_workers': 0,
            'mean': list(MEAN),
            'std': list(STD),
        },
        CHECKPOINT={'dir': str(tmp_path / name / 'ckpt')},
        LOGGING={'log_dir': str(tmp_path / name / 'logs'), 'tensorboard': False},
    ).validate()


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_training_from_the_cache_equals_training_through_the_backbone(tmp_path, data):
    """Same seed: the same trained weights and validation metrics, the cache built while the run starts."""
    plain = make_config(tmp_path, data, 'plain', feature_cache=False)
    datasets = build_datasets(plain)
    datasets['train'].transform = build_transforms(plain, train=False)  # the cache trains without augmentation
    without = train(plain, datasets=datasets)
    cached = make_config(tmp_path, data, 'cached')
    with_cache = train(cached, datasets=build_datasets(cached))  # its own train transform: augmented, replaced
    a = load_checkpoint(without['last_checkpoint'])['model_state_dict']
    b = load_checkpoint(with_cache['last_checkpoint'])['model_state_dict']
    init = HybridMedNet(make_config(tmp_path, data)).state_dict()
    assert not torch.allclose(a['head.fc.weight'], init['head.fc.weight'], atol=1e-3)  # it did train
    assert a.keys() == b.keys()  # the checkpoint holds the whole model, backbone included
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4, rtol=0), key
    for row_a, row_b in zip(without['history'], with_cache['history'], strict=True):
        for key in ('train_loss', 'val_loss', 'val_mean_auc', 'auc_a', 'auc_b', 'auc_c'):
            assert row_a[key] == pytest.approx(row_b[key], abs=1e-4), key
    assert (tmp_path / 'cache' / 'features').is_dir()


def test_epochs_after_the_first_do_not_call_the_backbone(tmp_path, data):
    config = make_config(tmp_path, data, epochs=3)
    model = HybridMedNet(config)
    calls = count_calls(model.backbone)
    train(config, model=model)
    # the maps of 16 train and 8 val images in batches of 4: 6 calls, then none in 3 epochs, OOD, calibration and
    # the heatmap reference (the mean of the training images themselves)
    assert calls[0] == 6
    again = HybridMedNet(make_config(tmp_path, data, 'again'))
    again.backbone.load_state_dict(model.backbone.state_dict())
    calls_again = count_calls(again.backbone)
    train(make_config(tmp_path, data, 'again'), model=again)
    assert calls_again[0] == 0  # a second run with the same backbone reads every map from the cache


def cache_for(config: Config, model: HybridMedNet):
    """The cache folder as a new reader sees it, and the train split as the cache reads it."""
    source = build_datasets(config)['train']
    source.transform = build_transforms(config, train=False)
    (root,) = (feature_cache.cache_root() / 'features').glob('resnet18-*')
    return FeatureCache(
        root, feature_cache.cache_key(config, weights_hash(model.backbone.state_dict()), source)
    ), source


def direct(model: HybridMedNet, image: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([m.flatten(1) for m in model.backbone.eval()(image[None])], 1)[0].numpy()


def test_a_changed_image_or_other_weights_invalidate_entries(tmp_path, data):
    config = make_config(tmp_path, data)
    model = HybridMedNet(config)
    log: list[str] = []
    datasets, _ = cache_features(config, model, build_datasets(config), torch.device('cpu'), log.append)
    assert 'feature cache (train + val): 0 of 24 images cached, 24 computed' in log[0]

    cache_features(config, model, build_datasets(config), torch.device('cpu'), log.append)
    assert '24 of 24 images cached, 0 computed' in log[1]

    write_image(data / '0.png', 0, shade=60)  # new pixels: size and mtime change
    datasets, _ = cache_features(config, model, build_datasets(config), torch.device('cpu'), log.append)
    assert '23 of 24 images cached, 1 computed' in log[2]
    fresh = build_datasets(config)['train']
    fresh.transform = build_transforms(config, train=False)
    np.testing.assert_allclose(datasets['train'][0][0].numpy(), direct(model, fresh[0][0]), atol=1e-5)
    assert not np.allclose(datasets['train'][1][0].numpy(), datasets['train'][0][0].numpy())

    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.01)  # other weights: another key, nothing reused
    cache_features(config, model, build_datasets(config), torch.device('cpu'), log.append)
    assert '0 of 24 images cached, 24 computed' in log[3]
    assert len(list((tmp_path / 'cache' / 'features').glob('resnet18-*'))) == 2


def test_feature_cache_is_refused_for_a_training_backbone_or_augmentation(tmp_path, data):
    for section, key, value in [
        ('MODEL', 'finetune', 'full'),
        ('DATA', 'use_albumentations', True),
        ('DATA', 'horizontal_flip', True),
    ]:
        config = make_config(tmp_path, data)
        getattr(config, section)[key] = value
        with pytest.raises(ConfigError, match=rf'TRAIN.feature_cache.*{section}.{key}'):
            train(config)
        assert not (tmp_path / 'cache' / 'features').exists()


def test_a_killed_write_leaves_the_previous_cache_and_no_usable_half(tmp_path, data, monkeypatch):
    config = make_config(tmp_path, data, batch_size=2)
    model = HybridMedNet(config)
    device = torch.device('cpu')
    cache_features(config, model, build_datasets(config), device, lambda _: None)
    for i in range(0, 12, 3):  # 4 train images change
        write_image(data / f'{i}.png', i, shade=60)

    forward = model.backbone.forward
    calls = [0]

    def dies_on_the_second_batch(x):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt  # stands for kill -9: no cleanup runs after it
        return forward(x)

    monkeypatch.setattr(model.backbone, 'forward', dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cache_features(config, model, build_datasets(config), device, lambda _: None)
    monkeypatch.setattr(model.backbone, 'forward', forward)
    (root,) = (tmp_path / 'cache' / 'features').glob('resnet18-*')
    assert len(list(root.glob('maps-*.npy'))) == 2  # the half-written generation is on disk ...

    cache, source = cache_for(config, model)
    keys = [feature_cache._file_key(p) for p in source.records['path']]
    assert sum(k in cache.index for k in keys) == 12  # ... but meta.json still names the old one: 12 valid

    log: list[str] = []
    datasets, _ = cache_features(config, model, build_datasets(config), device, log.append)
    assert '20 of 24 images cached, 4 computed' in log[0]
    assert len(list(root.glob('maps-*.npy'))) == 1  # leftovers removed
    for i in range(len(source)):
        np.testing.assert_allclose(datasets['train'][i][0].numpy(), direct(model, source[i][0]), atol=1e-5)

    maps = cache_for(config, model)[0].maps_file
    maps.write_bytes(maps.read_bytes()[: maps.stat().st_size // 2])  # a torn file is no cache at all
    assert cache_for(config, model)[0].index == {}


def test_training_stores_the_healthy_films_as_many_as_fit_or_their_mean(tmp_path, data, monkeypatch):
    """The heatmaps' references are the training images themselves (not the cached maps), evenly spaced, as
    many as `stored_images` allows; when fewer than MIN_FILMS would fit, their mean alone."""
    config = make_config(tmp_path, data)
    trainer = Trainer(config, *setup_device(config))
    images = torch.stack([trainer.unaugmented(trainer.datasets['train'].source)[i][0] for i in range(16)])
    entry = trainer.fit_heatmap_reference()  # 16 training images, too few healthy ones: all of them
    assert entry['n_images'] == 16 and entry['images'].startswith('all')
    torch.testing.assert_close(entry['healthy_images'], images.half())
    monkeypatch.setattr(gradcam, 'MIN_FILMS', 2)
    monkeypatch.setattr(gradcam, 'REFERENCE_VALUES', 5 * images[0].numel())  # room for 5 films
    entry = trainer.fit_heatmap_reference()
    torch.testing.assert_close(entry['healthy_images'], images[[0, 4, 8, 11, 15]].half())  # evenly spaced
    monkeypatch.setattr(gradcam, 'MIN_FILMS', 6)  # 5 are too few: the mean of all 16
    entry = trainer.fit_heatmap_reference()
    assert entry['n_images'] == 16 and entry['healthy_images'].shape == (1, *images[0].shape)
    torch.testing.assert_close(entry['healthy_images'].float(), images.mean(0, keepdim=True), atol=2e-3, rtol=0)
