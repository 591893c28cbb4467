"""evaluate / predict / card end to end on a tiny sample dataset and an untrained small model.

The model is untrained on purpose: these tests check that every number written is the number
scikit-learn computes from the written predictions, that thresholds travel with the model, and
how the commands fail, not how good the model is.
"""

import json
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_data_io import write_dicom

from hybridmednet.checkpoint import export_weights, load_model, save_checkpoint
from hybridmednet.commands import card, evaluate, predict
from hybridmednet.config import Config
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.models.hybrid import HybridMedNet


def make_checkpoint(path, data_dir, seed):
    config = Config(
        MODEL={'backbone': 'resnet18', 'pretrained': False},
        DATA={'data_dir': str(data_dir), 'image_size': 32, 'num_workers': 0},
    ).validate()
    torch.manual_seed(seed)
    model = HybridMedNet(config)
    save_checkpoint(
        path,
        {
            'model_state_dict': model.state_dict(),
            'config': config.to_dict(),
            'class_names': config.class_names,
            'epoch': 1,
        },
    )
    export_weights(path.with_suffix('.safetensors'), model.state_dict(), config, {'epoch': 1})
    return path


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('evaluation')
    data = generate_sample_dataset(root / 'data', n=300, size=32, seed=0, workers=1)
    return {
        'root': root,
        'data': data,
        'model_a': make_checkpoint(root / 'a' / 'best.pth', data, 0),
        'model_b': make_checkpoint(root / 'b' / 'best.pth', data, 1),
    }


@pytest.fixture(scope='module')
def evaluated(workspace):
    out = workspace['root'] / 'results_a'
    rc = evaluate.main(
        [
            '--model_path',
            str(workspace['model_a']),
            '--save_results',
            '--output_dir',
            str(out),
            '--bootstrap_samples',
            '100',
            '--temperature_scaling',
        ]
    )
    assert rc == 0
    return json.loads((out / 'results.json').read_text()), out


def test_evaluate_writes_every_artifact(evaluated):
    results, out = evaluated
    for name in ('report.md', 'report.html', 'results.json', 'roc_curves.png', 'pr_curves.png', 'reliability.png'):
        assert (out / name).stat().st_size > 0, name
    assert '## Discrimination' in (out / 'report.md').read_text()
    assert '<table>' in (out / 'report.html').read_text()
    assert results['data']['resampling'] == 'patient'
    assert set(results['subgroups']) <= {'view', 'sex', 'age_band'} and results['subgroups']


def test_evaluate_numbers_match_sklearn(evaluated):
    results, _ = evaluated
    pred = results['predictions']
    y, p, m = (np.asarray(pred[k], dtype=float) for k in ('labels', 'probabilities', 'mask'))
    names = results['model']['class_names']
    aucs = []
    for k, name in enumerate(names):
        row = results['metrics']['per_finding'][name]
        keep = m[:, k] > 0
        if 0 < y[keep, k].sum() < keep.sum():
            aucs.append(roc_auc_score(y[keep, k], p[keep, k]))
            assert row['auc']['value'] == pytest.approx(aucs[-1], abs=1e-9)
            assert row['auc']['ci_low'] <= row['auc']['value'] <= row['auc']['ci_high']
        positive = p[keep, k] >= row['threshold']
        if y[keep, k].sum():
            assert row['sensitivity']['value'] == pytest.approx(positive[y[keep, k] == 1].mean())
    assert results['metrics']['mean_auc']['value'] == pytest.approx(np.mean(aucs), abs=1e-9)


def test_thresholds_travel_with_the_model(workspace, evaluated):
    results, _ = evaluated
    stored = results['operating_point']
    assert stored['temperatures'] is not None and stored['fitted_on']['split'] == 'val'
    for path in (workspace['model_a'], workspace['model_a'].with_suffix('.safetensors')):
        _, _, meta = load_model(path)
        op = OperatingPoint.from_meta(meta['thresholds'], meta['class_names'])
        assert op.method == 'youden' and op.to_meta()['values'] == stored['values']


def test_compare_two_models(workspace, evaluated):
    _, out_a = evaluated
    out_b = workspace['root'] / 'results_b'
    assert (
        evaluate.main(
            [
                '--model_path',
                str(workspace['model_b']),
                '--save_results',
                '--output_dir',
                str(out_b),
                '--bootstrap_samples',
                '100',
                '--compare',
                str(out_a / 'results.json'),
            ]
        )
        == 0
    )
    a, b = (json.loads((o / 'results.json').read_text()) for o in (out_a, out_b))
    comparison = b['comparison']
    assert comparison['n_images'] == b['data']['n_images']
    assert comparison['mean_auc_a'] == pytest.approx(b['metrics']['mean_auc']['value'])
    assert comparison['mean_auc_b'] == pytest.approx(a['metrics']['mean_auc']['value'], abs=1e-5)
    diff = comparison['mean_auc_diff']
    assert diff['ci_low'] <= diff['value'] <= diff['ci_high'] and 0 <= diff['p_value'] <= 1
    assert '## Comparison' in (out_b / 'report.md').read_text()


def test_predict_directory_skips_unreadable_files(workspace, evaluated, tmp_path, capsys):
    images = tmp_path / 'images'
    (images / 'nested').mkdir(parents=True)
    sources = sorted((workspace['data'] / 'images').glob('*.png'))[:3]
    shutil.copy(sources[0], images / 'a.png')
    shutil.copy(sources[1], images / 'nested' / 'b.png')
    shutil.copy(sources[2], images / 'c.png')
    pixels = np.asarray(Image.open(sources[0])).astype(np.uint16) * 257
    write_dicom(images / 'd.dcm', pixels)
    write_dicom(images / 'nested' / 'pacs_export', pixels)  # no suffix
    (images / 'notes.txt').write_text('not an image, not listed')
    (images / 'broken.png').write_bytes(b'not an image')
    (images / 'truncated.png').write_bytes(sources[0].read_bytes()[:200])
    out = tmp_path / 'out'
    rc = predict.main(
        [
            '--image_path',
            str(images),
            '--model_path',
            str(workspace['model_a']),
            '--save_dir',
            str(out),
            '--batch_size',
            '2',
        ]
    )
    assert rc == 0
    result = json.loads((out / 'predictions.json').read_text())
    assert sorted(e['path'].split('/')[-1] for e in result['errors']) == ['broken.png', 'truncated.png']
    assert len(result['images']) == 5
    by_name = {i['path'].split('/')[-1]: i['probabilities'] for i in result['images']}
    assert by_name['pacs_export'] == by_name['d.dcm']  # DICOM found by its marker, scored alike
    assert 'broken.png' in capsys.readouterr().err
    rows = (out / 'predictions.csv').read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith('path,Atelectasis')
    thresholds = result['operating_point']['values']
    for image in result['images']:
        expected = [n for n, p in image['probabilities'].items() if p >= thresholds[n]]
        assert image['positive_findings'] == expected


def test_predict_offline_from_safetensors_alone(workspace, evaluated, tmp_path, monkeypatch):
    """Only the .safetensors and its .json: no checkpoint, no network; heatmaps for positive findings."""
    export = tmp_path / 'export'
    export.mkdir()
    for suffix in ('.safetensors', '.json'):
        shutil.copy(workspace['model_a'].with_suffix(suffix), export / f'model{suffix}')

    def no_network(*args, **kwargs):
        raise OSError('network access attempted')

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    image = sorted((workspace['data'] / 'images').glob('*.png'))[0]
    out = tmp_path / 'out'
    rc = predict.main(
        [
            '--image_path',
            str(image),
            '--model_path',
            str(export / 'model.safetensors'),
            '--visualize',
            '--save_dir',
            str(out),
        ]
    )
    assert rc == 0
    pred = json.loads((out / 'predictions.json').read_text())['images'][0]
    assert pred['positive_findings'], 'the untrained model at youden thresholds flags something'
    assert sorted(pred['heatmaps']) == sorted(pred['positive_findings'])
    assert all((out / 'heatmaps').joinpath(p.split('/')[-1]).is_file() for p in pred['heatmaps'].values())


def test_clear_errors(workspace, tmp_path, capsys):
    unknown = tmp_path / 'model.bin'
    unknown.write_bytes(b'\0' * 10)
    assert predict.main(['--image_path', str(tmp_path), '--model_path', str(unknown)]) == 2
    assert 'unknown checkpoint format' in capsys.readouterr().err
    # weights of a 14-class model under a sidecar that says 3 classes
    export = tmp_path / 'three.safetensors'
    shutil.copy(workspace['model_a'].with_suffix('.safetensors'), export)
    sidecar = json.loads(workspace['model_a'].with_suffix('.json').read_text())
    sidecar['config']['MODEL']['num_classes'] = 3
    sidecar['config']['DATA']['class_names'] = sidecar['class_names'] = ['a', 'b', 'c']
    export.with_suffix('.json').write_text(json.dumps(sidecar))
    assert predict.main(['--image_path', str(tmp_path), '--model_path', str(export)]) == 2
    assert '3 classes' in capsys.readouterr().err
    assert evaluate.main(['--model_path', str(tmp_path / 'missing.pth')]) == 2
    assert 'not found' in capsys.readouterr().err


def test_model_card(workspace, evaluated, tmp_path):
    _, out = evaluated
    path = tmp_path / 'card.md'
    assert (
        card.main(
            ['--model_path', str(workspace['model_a']), '--results', str(out / 'results.json'), '--output', str(path)]
        )
        == 0
    )
    text = path.read_text()
    results = json.loads((out / 'results.json').read_text())
    for heading in (
        'Intended use',
        'Data',
        'Discrimination',
        'Calibration',
        'Thresholds stored with the model',
        'Limitations',
        'Configuration',
    ):
        assert f'## {heading}' in text
    assert results['data']['split_hashes']['train'] in text
    assert 'youden rule, fitted on the val split' in text
    assert f'{results["metrics"]["mean_auc"]["value"]:.3f}' in text
