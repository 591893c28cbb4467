"""Transforms, the memory-mapped cache and check-data."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from hybridmednet.commands import cache as cache_command
from hybridmednet.commands import check_data
from hybridmednet.config import Config
from hybridmednet.data import cache
from hybridmednet.data.datasets import build_datasets, build_index
from hybridmednet.data.transforms import MEAN, STD, build_transforms
from hybridmednet.errors import ConfigError


def test_eval_transform_is_deterministic_and_normalised():
    config = Config()
    config.DATA['image_size'] = 32
    transform = build_transforms(config, train=False)
    out = transform(np.full((50, 40), 0.5, np.float32))  # fitted to 32 x 26, padded 3 columns each side
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    for c in range(3):
        expected = torch.full((32, 32), -MEAN[c] / STD[c])
        expected[:, 3:29] = (0.5 - MEAN[c]) / STD[c]
        torch.testing.assert_close(out[c], expected)
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    assert torch.equal(transform(image), transform(image))


def test_train_transform_random_and_flip_only_when_asked():
    config = Config()
    config.DATA['image_size'] = 32
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    transform = build_transforms(config, train=True)
    assert transform(image).shape == (3, 32, 32)
    assert not torch.equal(transform(image), transform(image))
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in transform.transforms)
    config.DATA['horizontal_flip'] = True
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in build_transforms(config, train=True).transforms)


def test_albumentations_pipeline_or_one_line_error(monkeypatch):
    config = Config()
    config.DATA.update(image_size=32, use_albumentations=True)
    try:
        import albumentations  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'hybridmednet\[albumentations\]'"):
            build_transforms(config, train=True)
        return
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    assert build_transforms(config, train=True)(image).shape == (3, 32, 32)
    monkeypatch.setitem(sys.modules, 'albumentations', None)
    with pytest.raises(ConfigError, match=r"pip install 'hybridmednet\[albumentations\]'"):
        build_transforms(config, train=True)


def make_csv(tmp_path, n=6):
    lines = ['image,labels,patient_id']
    for i in range(n):
        Image.fromarray(np.full((40, 40), 20 * i, np.uint8)).save(tmp_path / f'{i}.png')
        lines.append(f'{i}.png,{"a" if i % 2 else "b"},p{i}')
    (tmp_path / 'labels.csv').write_text('\n'.join(lines) + '\n')
    config = Config()
    config.DATA.update(
        data_dir=str(tmp_path), dataset='csv', image_size=16, train_split=1.0, val_split=0.0, test_split=0.0
    )
    return config


def write_csv_cache(config, size, **kwargs):
    """The cache for a make_csv dataset, written where open_cache looks for it."""
    data_dir = Path(config.DATA['data_dir'])
    return cache.write_cache(
        build_index(config).records['path'], data_dir, cache.cache_dir(config, data_dir), size, **kwargs
    )


def test_cache_is_used_transparently(tmp_path):
    config = make_csv(tmp_path)
    root = write_csv_cache(config, 20)
    assert cache.ImageCache(root, tmp_path).images.shape == (6, 20, 20)
    (tmp_path / '3.png').unlink()  # served from the cache now
    data = build_datasets(config)['train']
    row = list(data.records['path']).index(str(tmp_path / '3.png'))
    np.testing.assert_allclose(data.load_image(row), np.full((20, 20), 60 / 255, np.float32))
    assert data[row][0].shape == (3, 16, 16)
    spawned = pickle.loads(pickle.dumps(data))  # as a spawn-started DataLoader worker gets it
    np.testing.assert_array_equal(spawned.load_image(row), data.load_image(row))
    config.DATA['image_size'] = 32  # cache too small: files are read, and 3.png is missing
    with pytest.raises(Exception, match='3.png'):
        build_datasets(config)


def test_dataset_reads_an_image_overwritten_after_caching(tmp_path):
    config = make_csv(tmp_path)
    write_csv_cache(config, 20)
    new = np.random.default_rng(0).integers(0, 256, (30, 50), dtype=np.uint8)
    Image.fromarray(new).save(tmp_path / '3.png')
    data = build_datasets(config)['train']
    row = list(data.records['path']).index(str(tmp_path / '3.png'))
    np.testing.assert_allclose(data.load_image(row), new / 255.0, atol=1e-6)
    other = list(data.records['path']).index(str(tmp_path / '2.png'))
    assert data.load_image(other).shape == (20, 20)  # unchanged files still come from the cache


def test_cache_written_to_any_folder_keyed_relative_to_data_dir(tmp_path):
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    make_csv(data_dir)
    root = cache.write_cache(
        [str(data_dir / '4.png'), str(data_dir / '1.png'), str(data_dir / '4.png')],
        data_dir,
        tmp_path / 'elsewhere',
        size=8,
    )
    assert root == tmp_path / 'elsewhere' and not (data_dir / '.cache').exists()
    opened = cache.ImageCache(root, data_dir)
    rows = opened.rows([str(data_dir / '1.png'), str(data_dir / '4.png'), str(data_dir / '0.png')])
    assert rows[2] == -1 and sorted(rows[:2]) == [0, 1]  # the duplicate is cached once
    np.testing.assert_allclose(opened.image(rows[0]), np.full((8, 8), 20 / 255, np.float32))
    np.testing.assert_allclose(opened.image(rows[1]), np.full((8, 8), 80 / 255, np.float32))


def test_cache_cli_skips_bad_images_when_asked(tmp_path, capsys):
    make_csv(tmp_path)
    (tmp_path / '2.png').write_bytes(b'junk')
    args = [
        '--size',
        '20',
        '--workers',
        '1',
        f'DATA.data_dir={tmp_path}',
        'DATA.dataset=csv',
        'DATA.train_split=1.0',
        'DATA.val_split=0.0',
        'DATA.test_split=0.0',
    ]
    assert cache_command.main(args) == 2
    assert '2.png' in capsys.readouterr().err
    assert cache_command.main(args + ['DATA.skip_bad_images=true']) == 0
    assert 'cached 5 images at 20 px' in capsys.readouterr().out
    assert cache.ImageCache(tmp_path / '.cache', tmp_path).images.shape == (5, 20, 20)


def test_check_data_reports_problems(tmp_path, capsys):
    config_args = [f'DATA.data_dir={tmp_path}', 'DATA.dataset=csv']
    make_csv(tmp_path)
    assert check_data.main(['--workers', '1', *config_args]) == 0
    assert 'missing files: 0' in capsys.readouterr().out
    (tmp_path / '1.png').unlink()
    (tmp_path / '2.png').write_bytes(b'junk')
    rows = [f'{i}.png,a,p{i % 4},{"test" if i == 4 else "train"}' for i in range(6)]  # p0 in both splits
    (tmp_path / 'labels.csv').write_text('\n'.join(['image,labels,patient_id,split', *rows]) + '\n')
    assert check_data.main(['--workers', '1', *config_args]) == 1
    out = capsys.readouterr().out
    assert 'missing files: 1' in out and '1.png' in out
    assert 'unreadable files: 1' in out and '2.png' in out
    assert 'patients in two splits: 1' in out and 'patient p0: test, train' in out
    (tmp_path / 'labels.csv').write_text('image,labels\n0.png,zebra|a\n')
    assert check_data.main([*config_args, 'DATA.class_names=[a]', 'MODEL.num_classes=1']) == 2
    assert "line 2: unknown label 'zebra'" in capsys.readouterr().err
