"""The sample dataset: NIH layout, deterministic, NIH-like label statistics, usable out of the box."""

import json

import numpy as np
import pandas as pd
import pytest

from hybridmednet.commands import sample_data
from hybridmednet.config import NIH_FINDINGS, Config
from hybridmednet.data import synthetic
from hybridmednet.data.datasets import build_datasets, build_index
from hybridmednet.data.splits import patient_leaks


@pytest.fixture(scope='module')
def sample(tmp_path_factory):
    return synthetic.generate_sample_dataset(tmp_path_factory.mktemp('s') / 'a', n=60, size=48, seed=3, workers=1)


def test_layout_and_official_lists(sample):
    table = pd.read_csv(sample / 'Data_Entry_2017.csv')
    assert list(table.columns[:7]) == [
        'Image Index',
        'Finding Labels',
        'Follow-up #',
        'Patient ID',
        'Patient Age',
        'Patient Gender',
        'View Position',
    ]
    assert len(table) == 60 and table['Patient ID'].nunique() < 60  # several images per patient
    assert all((sample / 'images' / name).is_file() for name in table['Image Index'])
    train_val = (sample / 'train_val_list.txt').read_text().split()
    test = (sample / 'test_list.txt').read_text().split()
    assert sorted(train_val + test) == sorted(table['Image Index'])
    pid = dict(zip(table['Image Index'], table['Patient ID']))
    assert not {pid[n] for n in train_val} & {pid[n] for n in test}
    info = json.loads((sample / 'sample_info.json').read_text())
    assert info['label_counts']['No Finding'] == (table['Finding Labels'] == 'No Finding').sum()


def test_deterministic_for_a_seed(sample, tmp_path):
    again = synthetic.generate_sample_dataset(tmp_path / 'b', n=60, size=48, seed=3, workers=2)
    assert (again / 'Data_Entry_2017.csv').read_text() == (sample / 'Data_Entry_2017.csv').read_text()
    for name in ['00000001_000.png', (sample / 'test_list.txt').read_text().split()[0]]:
        assert (again / 'images' / name).read_bytes() == (sample / 'images' / name).read_bytes()
    assert (again / synthetic.BOX_FILE).read_text() == (sample / synthetic.BOX_FILE).read_text()
    other = synthetic.generate_sample_dataset(tmp_path / 'c', n=60, size=48, seed=4, workers=1)
    assert (other / 'Data_Entry_2017.csv').read_text() != (sample / 'Data_Entry_2017.csv').read_text()


def test_boxes_in_nih_layout_for_labelled_findings(sample):
    boxes = pd.read_csv(sample / synthetic.BOX_FILE)
    assert list(boxes.columns) == ['Image Index', 'Finding Label', 'Bbox [x', 'y', 'w', 'h]']
    assert set(boxes['Finding Label']) == {synthetic.NIH_BOX_SPELLING.get(f, f) for f in synthetic.BOX_FINDINGS}
    labels = pd.read_csv(sample / 'Data_Entry_2017.csv').set_index('Image Index')['Finding Labels']
    for name, finding in zip(boxes['Image Index'], boxes['Finding Label'].replace('Infiltrate', 'Infiltration')):
        assert finding in labels[name].split('|')
    x, y, w, h = boxes.iloc[:, 2:6].to_numpy().T
    assert (x >= 0).all() and (y >= 0).all() and (w > 0).all() and (h > 0).all()
    assert (x + w <= 48).all() and (y + h <= 48).all()  # pixels of the 48 px images


class MidRng:
    """Draws that do not depend on how many came before, so a phantom with a finding differs from
    the same phantom without it by the finding alone."""

    def uniform(self, low, high):
        return (low + high) / 2

    def random(self):
        return 0.5

    def normal(self, loc, scale, size):
        return np.full(size, loc)

    def standard_normal(self, shape):
        return np.random.default_rng(0).standard_normal(shape)

    def integers(self, low, high):
        return low

    def choice(self, options):
        return options[0]


@pytest.mark.parametrize('finding', synthetic.BOX_FINDINGS)
def test_box_surrounds_what_the_finding_changed(finding):
    anatomy = synthetic._anatomy(0, 1, 'PA')
    with_it, boxes = synthetic.render_with_boxes(np.array([f == finding for f in NIH_FINDINGS]), anatomy, MidRng(), 128)
    without = synthetic.render(np.zeros(14, bool), anatomy, MidRng(), 128)
    change = np.abs(with_it.astype(float) - without)
    inside = np.zeros(change.shape, bool)
    for name, x, y, w, h in boxes:
        assert name == finding
        inside[y : y + h, x : x + w] = True
    assert change[inside].sum() > 0.8 * change.sum()
    assert inside.mean() < 0.15  # the boxes are not the whole lung field


def test_label_statistics_follow_nih_with_a_floor():
    patients = np.repeat(np.arange(10000), 2)
    labels = synthetic.sample_labels(patients, np.random.default_rng(0))
    target = synthetic.prevalences(len(patients))
    assert target[NIH_FINDINGS.index('Hernia')] == pytest.approx(0.005)  # floor: 100 / 20000
    np.testing.assert_allclose(labels.mean(0), target, atol=0.01)
    effusion, atelectasis = labels[:, 2], labels[:, 0]
    assert effusion[atelectasis].mean() > 2 * effusion.mean()  # NIH co-occurrence kept
    same_patient = (labels[0::2] == labels[1::2]).all(1).mean()
    other_patient = (labels[0::2] == np.roll(labels[1::2], 1, axis=0)).all(1).mean()
    assert same_patient > other_patient  # follow-ups share findings


def test_sample_is_the_default_dataset(sample, monkeypatch, tmp_path):
    monkeypatch.setenv('HYBRIDMEDNET_CACHE', str(tmp_path))
    config = Config()
    config.DATA.update(sample_size=30, sample_image_size=32, image_size=32)
    data = build_datasets(config)
    assert sum(len(d) for d in data.values()) == 30
    image, target, mask = data['train'][0]
    assert image.shape == (3, 32, 32) and target.shape == (14,)
    folder = synthetic.cached_sample_dataset(30, 32)
    assert folder.parent == tmp_path and len(list(tmp_path.iterdir())) == 1  # no temporary left behind
    index = build_index(config)
    assert patient_leaks(index.records['patient_id'], index.records['split']) == {}
    boxes = (folder / synthetic.BOX_FILE).read_text()
    (folder / synthetic.BOX_FILE).unlink()  # a sample cached before the boxes were written gets them
    assert synthetic.cached_sample_dataset(30, 32) == folder
    assert (folder / synthetic.BOX_FILE).read_text() == boxes


def test_cli(tmp_path, capsys):
    assert sample_data.main([str(tmp_path / 'd'), '--n', '12', '--size', '32', '--workers', '1']) == 0
    assert 'wrote 12 images' in capsys.readouterr().out
    with pytest.raises(ValueError, match='n=3 is too small'):
        synthetic.generate_sample_dataset(tmp_path / 'e', n=3)
