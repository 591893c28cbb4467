"""Volumes as datasets: config keys and their combinations, the CSV and MedMNIST-3D layouts, items shaped
like the 2D ones, patient-level splits, repeatable augmentation, and the synthetic sample volumes."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from test_data_volumes import write_medmnist

from hybridmednet.commands.sample_data import main as sample_data
from hybridmednet.config import Config
from hybridmednet.data.datasets import VolumeDataset, build_datasets, build_index
from hybridmednet.data.splits import patient_leaks
from hybridmednet.data.synthetic_volumes import FINDINGS, _plan, generate_sample_volumes, render
from hybridmednet.data.transforms import build_transforms, fit_volume
from hybridmednet.errors import ConfigError, DataError


def volume_config(data_dir=None, **data):
    c = Config()
    c.DATA.update(spatial_dims=3, data_dir=str(data_dir) if data_dir else None, volume_size=[16, 16, 16], **data)
    return c


@pytest.mark.parametrize(
    'data, match',
    [
        ({'spatial_dims': 4}, r"DATA\['spatial_dims'\] must be an integer in \[2, 3\], got 4"),
        ({'spatial_dims': 3, 'volume_size': [64, 64]}, r"DATA\['volume_size'\] must be three integers"),
        ({'spatial_dims': 3, 'volume_size': [64, 0, 64]}, r"DATA\['volume_size'\] must be an integer in \[8, 1024\]"),
        ({'spatial_dims': 3, 'spacing': [1, 1, -1]}, r"DATA\['spacing'\] must be a number in \(0.0, 100.0\]"),
        ({'spatial_dims': 3, 'spacing': [1, 1]}, r"DATA\['spacing'\] must be three numbers \(one per axis"),
        ({'spatial_dims': 3, 'intensity_window': [400, -1000]}, r"intensity_window'\] must be \[low, high\] with low"),
        ({'spatial_dims': 3, 'intensity_window': 400}, r"intensity_window'\] must be \[low, high\], e.g."),
        ({'intensity_window': [-1000, 400]}, r"intensity_window'\] = \[-1000.0, 400.0\] applies to volumes"),
        ({'volume_size': [32, 32, 32]}, r"DATA\['volume_size'\].*applies to volumes: set DATA.spatial_dims=3"),
        ({'dataset': 'medmnist3d', 'data_dir': '/d'}, r"'medmnist3d' holds volumes: set DATA.spatial_dims=3"),
        ({'spatial_dims': 3, 'dataset': 'nih', 'data_dir': '/d'}, r"'nih' reads 2D images; .* csv or medmnist3d"),
        ({'spatial_dims': 3, 'cache_dir': '/c'}, r"DATA\['cache_dir'\] = '/c' applies to 2D images"),
        ({'spatial_dims': 3, 'use_albumentations': True}, r"use_albumentations'\] = True applies to 2D images"),
        ({'spatial_dims': 3, 'dataset': 'medmnist3d'}, r"'medmnist3d' needs DATA.data_dir"),
        (
            {'spatial_dims': 3, 'dataset': 'medmnist3d', 'data_dir': '/d', 'spacing': [1, 1, 1]},
            r"DATA\['spacing'\] = \[1.0, 1.0, 1.0\] does not apply to DATA.dataset=medmnist3d",
        ),
    ],
)
def test_config_keys_and_combinations(data, match):
    c = Config()
    c.DATA.update(data)
    with pytest.raises(ConfigError, match=match):
        c.validate()


def test_config_accepts_a_volume_setup():
    c = Config()
    c.apply_overrides(['DATA.spatial_dims=3', 'DATA.dataset=csv', 'DATA.data_dir=/d', 'DATA.spacing=[1, 1.5, 1.5]'])
    c.apply_overrides(['DATA.intensity_window=[-1000, 400]', 'DATA.volume_size=[32, 64, 64]'])
    c.validate()
    assert c.DATA['spacing'] == [1.0, 1.5, 1.5] and c.DATA['intensity_window'] == [-1000.0, 400.0]


def nifti_csv(tmp_path, patients=12, per_patient=2):
    """Volumes whose mean intensity encodes their row; labels alternate; two volumes per patient."""
    rows = []
    for p in range(patients):
        for _ in range(per_patient):
            i = len(rows)
            data = np.zeros((10, 12, 8), np.float32)
            data[2:8, 3:9, 2:6] = i + 1
            nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / f'v{i}.nii.gz')
            rows.append((f'v{i}.nii.gz', ['a', 'b', 'a|b', 'No Finding'][i % 4], f'p{p}'))
    pd.DataFrame(rows, columns=['image', 'labels', 'patient_id']).to_csv(tmp_path / 'labels.csv', index=False)
    return rows


def test_csv_volumes_items_match_the_2d_contract_and_split_by_patient(tmp_path):
    rows = nifti_csv(tmp_path)
    config = volume_config(tmp_path, dataset='csv', class_names=['a', 'b'], intensity_window=[0, 100])
    datasets = build_datasets(config)
    assert all(isinstance(d, VolumeDataset) for d in datasets.values())
    assert sum(len(d) for d in datasets.values()) == len(rows)
    index = build_index(config)
    assert patient_leaks(index.records['patient_id'], index.records['split']) == {}
    volume, target, mask = datasets['val'][0]
    assert volume.shape == (1, 16, 16, 16) and volume.dtype == torch.float32
    assert target.dtype == torch.float32 and target.shape == (2,) and mask.tolist() == [1.0, 1.0]
    name = datasets['val'].records['path'].iat[0].rsplit('/', 1)[1]
    i = int(name[1:].split('.')[0])
    expected = {'a': [1, 0], 'b': [0, 1], 'a|b': [1, 1], 'No Finding': [0, 0]}[rows[i][1]]
    assert target.tolist() == expected
    assert volume.max().item() == pytest.approx((i + 1) / 100, rel=0.05)  # this row's volume, windowed


def test_augmentation_repeats_per_epoch_seed_and_changes_across_epochs(tmp_path):
    nifti_csv(tmp_path, patients=4)
    train = build_datasets(volume_config(tmp_path, dataset='csv', class_names=['a', 'b']))['train']
    train.set_epoch(3)
    first, again = train[0][0], train[0][0]
    train.set_epoch(4)
    other = train[0][0]
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    plain = build_transforms(volume_config(tmp_path), train=False)(train.load_image(0))
    assert not torch.equal(first, plain)  # training does augment


def test_fit_volume_keeps_aspect_and_centres():
    volume = torch.ones(1, 10, 20, 40)
    out = fit_volume(volume, [16, 16, 16])
    assert out.shape == (1, 16, 16, 16)
    filled = out[0].sum(dim=(1, 2)) > 0
    assert filled.tolist() == [False] * 6 + [True] * 4 + [False] * 6  # 10 -> 4 slices, centred
    assert out[0, 8].sum(dim=1).gt(0).sum() == 8  # 20 -> 8 rows


def test_medmnist3d_published_splits_one_hot_labels(tmp_path):
    arrays = write_medmnist(tmp_path / 'organmnist3d.npz', classes=11)
    config = volume_config(tmp_path, dataset='medmnist3d', class_names=[f'organ{k}' for k in range(11)])
    config.MODEL['num_classes'] = 11
    config.validate()
    datasets = build_datasets(config)
    assert [len(datasets[s]) for s in ('train', 'val', 'test')] == [6, 2, 3]
    volume, target, _ = datasets['test'][2]
    assert volume.shape == (1, 16, 16, 16)
    assert target.argmax().item() == arrays['test_labels'][2, 0] and target.sum() == 1
    raw = arrays['test_images'][2].astype(np.float32) / 255
    expected = fit_volume(torch.from_numpy(raw)[None], [16, 16, 16])
    torch.testing.assert_close(volume, expected)  # test row 2 itself, not another row or split


def test_medmnist3d_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match='expected one MedMNIST .npz file, found 0'):
        build_index(volume_config(tmp_path, dataset='medmnist3d'))
    write_medmnist(tmp_path / 'a.npz', classes=5)
    with pytest.raises(DataError, match=r'a.npz: train_labels hold values other than 0..2 \(3 classes, as DATA'):
        build_index(volume_config(tmp_path, dataset='medmnist3d', class_names=['x', 'y', 'z']))
    write_medmnist(tmp_path / 'b.npz')
    with pytest.raises(DataError, match=r'found 2 \(a.npz, b.npz\); set DATA.labels_file'):
        build_index(volume_config(tmp_path, dataset='medmnist3d'))
    index = build_index(volume_config(tmp_path, dataset='medmnist3d', labels_file='a.npz'))
    assert index.class_names == ['0', '1', '2', '3', '4'] and set(index.records['split']) == {'train', 'val', 'test'}


def test_bad_series_is_skipped_when_asked(tmp_path):
    nifti_csv(tmp_path, patients=2, per_patient=1)
    (tmp_path / 'v0.nii.gz').write_bytes(b'broken')
    config = volume_config(tmp_path, dataset='csv', class_names=['a', 'b'], split_seed=1)
    config.DATA.update(train_split=1.0, val_split=0.0, test_split=0.0)
    with pytest.raises(Exception, match='v0.nii.gz: cannot read NIfTI'):
        train = build_datasets(config)['train']
        [train[i] for i in range(len(train))]
    config.DATA['skip_bad_images'] = True
    train = build_datasets(config)['train']
    assert all(train[i][0].shape == (1, 16, 16, 16) for i in range(len(train)))
    assert len(train.bad_files) == 1


def test_sample_volumes_deterministic_and_labels_match_what_is_drawn(tmp_path):
    a = generate_sample_volumes(tmp_path / 'a', n=12, size=24, seed=5)
    b = generate_sample_volumes(tmp_path / 'b', n=12, size=24, seed=5)
    table = pd.read_csv(a / 'labels.csv')
    assert table.equals(pd.read_csv(b / 'labels.csv'))
    first = nib.load(a / table['image'][0]).get_fdata()
    np.testing.assert_array_equal(first, nib.load(b / table['image'][0]).get_fdata())
    assert table['patient_id'].value_counts().max() > 1  # some patients have follow-ups
    info = json.loads((a / 'sample_info.json').read_text())
    assert (
        info['n'] == 12
        and sum(info['label_counts'][f] for f in FINDINGS) == table['labels'].str.count('|'.join(FINDINGS)).sum()
    )
    # Toggling one label changes exactly that finding's voxels, for every finding.
    labels = np.zeros(len(FINDINGS), bool)
    plain, _ = render(labels, np.random.default_rng(0), 32)
    for k, name in enumerate(FINDINGS):
        one = labels.copy()
        one[k] = True
        drawn, masks = render(one, np.random.default_rng(0), 32)
        changed = drawn != plain
        assert set(masks) == {name} and changed.any()
        assert not changed[~masks[name]].any()  # nothing outside the finding moved
        assert changed[masks[name]].mean() > 0.5


def test_sample_volumes_as_the_built_in_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv('HYBRIDMEDNET_CACHE', str(tmp_path))
    config = volume_config(sample_size=20, sample_image_size=16, class_names=FINDINGS)
    index = build_index(config)
    assert len(index.records) == 20
    assert index.data_dir.name == 'sample3d-v1-n20-s16-seed0'
    _, labels = _plan(20, 0)
    np.testing.assert_array_equal(index.labels, labels.astype(np.float32))
    volume, target, _ = build_datasets(config)['train'][0]
    assert volume.shape == (1, 16, 16, 16) and target.shape == (4,)


def test_sample_data_command_writes_volumes(tmp_path, capsys):
    assert sample_data([str(tmp_path / 'out'), '--3d', '--n', '10', '--size', '16']) == 0
    assert 'wrote 10 volumes of' in capsys.readouterr().out
    assert len(list((tmp_path / 'out' / 'volumes').glob('*.nii.gz'))) == 10
    assert sample_data([str(tmp_path / 'x'), '--3d', '--n', '3']) == 2
