"""Datasets as published: exact labels, patient-level splits and errors naming the row."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hybridmednet.config import NIH_FINDINGS, Config
from hybridmednet.data.datasets import (
    DataError,
    build_datasets,
    build_index,
    compute_pos_weight,
    make_weighted_sampler,
    positive_counts,
)
from hybridmednet.data.io import ImageReadError
from hybridmednet.data.splits import patient_leaks, patient_split


def png(path, value=100, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def config(data_dir, **data):
    c = Config()
    c.DATA.update(data_dir=str(data_dir), image_size=16, **data)
    return c


def nih(tmp_path, rows, lists=None):
    """rows: (image, labels, patient, view); images split over images_001/ and images_002/."""
    for i, (name, *_) in enumerate(rows):
        png(tmp_path / f'images_00{1 + i % 2}' / 'images' / name)
    pd.DataFrame(rows, columns=['Image Index', 'Finding Labels', 'Patient ID', 'View Position']).assign(
        **{'Follow-up #': 0, 'Patient Age': '058Y', 'Patient Gender': 'M'}
    ).to_csv(tmp_path / 'Data_Entry_2017.csv', index=False)
    if lists:
        (tmp_path / 'train_val_list.txt').write_text('\n'.join(lists[0]) + '\n')
        (tmp_path / 'test_list.txt').write_text('\n'.join(lists[1]) + '\n')
    return tmp_path


def test_nih_labels_paths_and_columns(tmp_path):
    nih(tmp_path, [('a.png', 'No Finding', 1, 'PA'), ('b.png', 'Mass|Nodule', 2, 'AP'), ('c.png', 'Hernia', 3, 'PA')])
    index = build_index(config(tmp_path))
    assert index.class_names == NIH_FINDINGS
    expected = np.zeros((3, 14), np.float32)
    expected[1, [4, 5]] = 1
    expected[2, 13] = 1
    np.testing.assert_array_equal(index.labels, expected)
    assert index.records['path'][1].endswith('images_002/images/b.png')
    assert list(index.records['view']) == ['PA', 'AP', 'PA']
    assert list(index.records['age']) == [58, 58, 58]


def test_nih_unknown_label_names_label_and_line(tmp_path):
    nih(tmp_path, [('a.png', 'Mass', 1, 'PA'), ('b.png', 'Nodule|Cardiomegally', 2, 'PA')])
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv: line 3: unknown label 'Cardiomegally'"):
        build_index(config(tmp_path))


def test_nih_official_lists_val_by_patient_and_leak_left_out(tmp_path):
    rows = [(f'{p:03d}_{k}.png', 'No Finding', p, 'PA') for p in range(40) for k in range(3)]
    train_val = [r[0] for r in rows if r[2] < 30]
    test = [r[0] for r in rows if r[2] >= 30] + ['leak_test.png']
    rows.append(('leak_test.png', 'Mass', 7, 'PA'))  # patient 7 is also in train_val
    index = build_index(config(nih(tmp_path, rows, (train_val, test))))
    split = index.records.set_index(index.records['path'].str.rsplit('/', n=1).str[1])['split']
    assert (split[test] == 'test').all()
    assert (split[[f'007_{k}.png' for k in range(3)]] == '').all()  # leaking patient's train_val images left out
    assert set(split[[n for n in train_val if not n.startswith('007')]]) == {'train', 'val'}
    assert patient_leaks(index.records['patient_id'], index.records['split']) == {}
    n_val = (split == 'val').sum()
    assert 3 <= n_val <= 9 and n_val % 3 == 0  # 1/8 of 29 patients, whole patients only
    again = build_index(config(tmp_path))
    assert list(again.records['split']) == list(index.records['split'])


def test_nih_without_lists_uses_fractions_and_view_filter(tmp_path):
    rows = [
        (f'{p}_{k}.png', 'Effusion' if k else 'No Finding', p, 'PA' if k else 'AP') for p in range(50) for k in range(2)
    ]
    index = build_index(config(nih(tmp_path, rows), view_positions=['PA']))
    assert len(index.records) == 50 and (index.records['view'] == 'PA').all()
    assert index.labels[:, 2].all()
    counts = index.records['split'].value_counts()
    assert counts['train'] == 35 and counts['val'] == 5 and counts['test'] == 10


def test_patient_split_is_seeded_and_whole_patients():
    pids = np.repeat(np.arange(200), 3)
    a = patient_split(pids, (0.7, 0.1, 0.2), seed=1)
    assert list(a) == list(patient_split(pids[::-1], (0.7, 0.1, 0.2), seed=1)[::-1])
    assert list(a) != list(patient_split(pids, (0.7, 0.1, 0.2), seed=2))
    assert patient_leaks(pids, a) == {}
    assert dict(pd.Series(a).value_counts()) == {'train': 420, 'test': 120, 'val': 60}


def chexpert(tmp_path):
    root = tmp_path / 'CheXpert-v1.0-small'
    names = ['Cardiomegaly', 'Edema', 'Pleural Effusion']
    head = 'Path,Sex,Age,Frontal/Lateral,AP/PA,' + ','.join(names)
    train = [
        f'CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_{v}.jpg,F,60,{v.capitalize()},AP,{vals}'
        for p, v, vals in [
            (1, 'frontal', '1,-1,'),
            (1, 'lateral', '0,1,-1'),
            (2, 'frontal', ',,1'),
            (3, 'frontal', '-1,0,0'),
        ]
    ]
    valid = ['CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,M,70,Frontal,PA,1,0,0']
    for lines, name in ((train, 'train.csv'), (valid, 'valid.csv')):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text('\n'.join([head, *lines]) + '\n')
        for line in lines:
            png(tmp_path / line.split(',')[0])
    return root, names


@pytest.mark.parametrize('policy, value, mask', [('ones', 1, 1), ('zeros', 0, 1), ('ignore', 0, 0)])
def test_chexpert_uncertainty_policies(tmp_path, policy, value, mask):
    root, names = chexpert(tmp_path)
    index = build_index(config(root, dataset='chexpert', class_names=names, uncertainty=policy))
    # row 0: 1, -1, blank -> blank is negative and counts
    np.testing.assert_array_equal(index.labels[0], [1, value, 0])
    np.testing.assert_array_equal(index.mask[0], [1, mask, 1])
    assert index.records['path'][0] == str(tmp_path / 'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg')
    assert list(index.records['split'])[-1] == 'test'
    assert index.records['patient_id'][0] == 'patient00001'


def test_chexpert_frontal_only_and_bad_value(tmp_path):
    root, names = chexpert(tmp_path)
    index = build_index(config(root, dataset='chexpert', class_names=names, frontal_only=True))
    assert len(index.records) == 4 and not index.records['path'].str.contains('lateral').any()
    text = (root / 'train.csv').read_text().replace(',,1\n', ',2,1\n')
    (root / 'train.csv').write_text(text)
    with pytest.raises(DataError, match=r"train.csv: line 4, column 'Edema': value '2'"):
        build_index(config(root, dataset='chexpert', class_names=names))


def csv_dataset(tmp_path, rows, header='image,labels,patient_id,split'):
    for row in rows:
        png(tmp_path / row.split(',')[0])
    (tmp_path / 'labels.csv').write_text('\n'.join([header, *rows]) + '\n')
    return tmp_path


def test_csv_class_names_from_data_and_given_splits(tmp_path):
    csv_dataset(tmp_path, ['x/1.png,b|a,p1,train', 'x/2.png,No Finding,p2,val', 'x/3.png,c,p3,test'])
    index = build_index(config(tmp_path, dataset='csv'))
    assert index.class_names == ['a', 'b', 'c']
    np.testing.assert_array_equal(index.labels, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    assert list(index.records['split']) == ['train', 'val', 'test']


def test_csv_label_not_in_class_list(tmp_path):
    csv_dataset(tmp_path, ['1.png,a,p1,train', '2.png,a|zebra,p2,val'])
    with pytest.raises(DataError, match=r"labels.csv: line 3: unknown label 'zebra'"):
        build_index(config(tmp_path, dataset='csv', class_names=['a', 'b']))


def test_csv_patient_in_two_splits_is_an_error(tmp_path):
    csv_dataset(tmp_path, ['1.png,a,p1,train', '2.png,a,p1,test', '3.png,a,p2,val'])
    with pytest.raises(DataError, match=r"patient 'p1' in test and train"):
        build_datasets(config(tmp_path, dataset='csv'))
    csv_dataset(tmp_path, ['1.png,a,p1,training'])
    with pytest.raises(DataError, match=r"line 2: split 'training'"):
        build_index(config(tmp_path, dataset='csv'))


def test_folder_per_class(tmp_path):
    for split in ('train', 'val'):
        for cls in ('normal', 'pneumonia'):
            png(tmp_path / split / cls / 'a.png')
    index = build_index(config(tmp_path, dataset='folder'))
    assert index.class_names == ['normal', 'pneumonia']
    assert list(index.records['split']) == ['train', 'train', 'val', 'val']
    np.testing.assert_array_equal(index.labels, [[1, 0], [0, 1], [1, 0], [0, 1]])
    with pytest.raises(DataError, match=r"folder 'pneumonia' is not a class name"):
        build_index(config(tmp_path, dataset='folder', class_names=['normal', 'covid']))


def test_items_missing_and_bad_images(tmp_path):
    rows = ['1.png,a,p1,train', '2.png,b,p2,train', '3.png,a|b,p3,train', '4.png,a,p4,train']
    csv_dataset(tmp_path, rows)
    data = build_datasets(config(tmp_path, dataset='csv'))['train']
    image, target, mask = data[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert target.tolist() == [1, 1] and mask.tolist() == [1, 1]
    (tmp_path / '2.png').write_bytes((tmp_path / '2.png').read_bytes()[:40])  # truncated
    with pytest.raises(ImageReadError, match='2.png'):
        data[1]
    skipping = build_datasets(config(tmp_path, dataset='csv', skip_bad_images=True))['train']
    assert skipping[1][1].tolist() == [1, 1]  # the next good image
    assert len(skipping.bad_files) == 1 and '2.png' in skipping.bad_files[0]
    (tmp_path / '4.png').unlink()
    with pytest.raises(DataError, match=r'1 image file\(s\) listed in .*labels.csv are missing, e.g. .*4.png'):
        build_datasets(config(tmp_path, dataset='csv'))
    assert len(build_datasets(config(tmp_path, dataset='csv', skip_bad_images=True))['train']) == 3


def test_pos_weight_and_sampler(tmp_path):
    csv_dataset(tmp_path, ['1.png,a,p1,train', '2.png,a,p2,train', '3.png,a|b,p3,train', '4.png,,p4,train'])
    data = build_datasets(config(tmp_path, dataset='csv'))['train']
    np.testing.assert_array_equal(positive_counts(data), [3, 1])
    np.testing.assert_allclose(compute_pos_weight(data).numpy(), [1 / 3, 3.0])
    sampler = make_weighted_sampler(data, seed=0)
    np.testing.assert_allclose(sampler.weights.numpy(), [1 / 3, 1 / 3, 1.0, 1.0])
    assert len(list(sampler)) == 4


def test_check_data_shows_official_list_leak(tmp_path, capsys):
    from hybridmednet.commands import check_data as check

    rows = [('a.png', 'Mass', 1, 'PA'), ('b.png', 'No Finding', 1, 'PA'), ('c.png', 'Nodule', 2, 'PA')]
    nih(tmp_path, rows, (['a.png', 'c.png'], ['b.png']))
    assert check.main(['--workers', '1', f'DATA.data_dir={tmp_path}']) == 0
    out = capsys.readouterr().out
    assert '1 patient(s) appear in both train_val_list and test_list (e.g. 1)' in out
    assert 'left out of every split: 1 image(s)' in out
