"""An exported directory in place of a checkpoint: predict and evaluate give the checkpoint's probabilities
(within 1e-4) and the same decisions at the thresholds stored with the model."""

import json

import numpy as np
import pytest
from test_deploy_export import make_checkpoint

from hybridmednet import cli
from hybridmednet.checkpoint import load_model
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.deploy.export import export_onnx
from hybridmednet.deploy.runtime import OnnxModel, load_any_model, load_exported

pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """A checkpoint with thresholds fitted by evaluate, and its export (made after, so it carries them)."""
    root = tmp_path_factory.mktemp('runtime')
    data = generate_sample_dataset(root / 'data', n=80, size=64, seed=0, workers=1)
    ckpt = make_checkpoint(root / 'model.pth', data=data)
    assert cli.main(['evaluate', '--model_path', str(ckpt), '--bootstrap_samples', '20']) == 0
    export_onnx(ckpt, root / 'onnx')
    return {'root': root, 'data': data, 'checkpoint': ckpt, 'export': root / 'onnx'}


def test_load_exported_mirrors_load_model(models):
    model, config, meta = load_exported(models['export'])
    torch_model, torch_config, torch_meta = load_model(models['checkpoint'])
    assert isinstance(model, OnnxModel)
    assert config.to_dict() == torch_config.to_dict()
    for key in ('class_names', 'preprocessing', 'thresholds', 'calibration'):
        assert meta[key] == torch_meta[key]
    assert meta['thresholds']['method'] == 'youden'
    assert isinstance(load_any_model(models['export'])[0], OnnxModel)
    assert load_any_model(models['checkpoint'])[0].__class__ is torch_model.__class__


def predictions(model_path, images, out):
    assert (
        cli.main(['predict', '--image_path', str(images), '--model_path', str(model_path), '--output_dir', str(out)])
        == 0
    )
    return json.loads((out / 'predictions.json').read_text())


def test_predict_with_an_export_gives_the_checkpoints_probabilities_and_decisions(models):
    images = models['data'] / 'images'
    torch_run = predictions(models['checkpoint'], images, models['root'] / 'pred_torch')
    onnx_run = predictions(models['export'], images, models['root'] / 'pred_onnx')
    assert onnx_run['operating_point'] == torch_run['operating_point']
    names = list(torch_run['operating_point']['values'])
    thresholds = np.array([torch_run['operating_point']['values'][n] for n in names])
    a, b = (np.array([[p['probabilities'][n] for n in names] for p in run['images']]) for run in (torch_run, onnx_run))
    assert a.shape == (80, 14) and np.abs(a - b).max() <= 1e-4
    positive = [
        np.array([[n in p['positive_findings'] for n in names] for p in run['images']]) for run in (torch_run, onnx_run)
    ]
    assert 0 < positive[0].sum() < a.size  # the thresholds split the images: a real comparison
    # Youden thresholds are validation images' own probabilities, so those images sit on the threshold,
    # where a 1e-7 difference decides; everywhere else the decisions must be the same.
    clear = np.abs(a - thresholds) > 1e-4
    assert (positive[0] == positive[1])[clear].all()
    assert (~clear).sum() <= len(names)


def test_evaluate_with_an_export_gives_the_checkpoints_numbers(models):
    runs = {}
    for name in ('checkpoint', 'export'):
        out = models['root'] / f'eval_{name}'
        args = ['--model_path', str(models[name]), '--save_results', '--output_dir', str(out)]
        assert cli.main(['evaluate', *args, '--bootstrap_samples', '20', '--no_store_thresholds']) == 0
        runs[name] = json.loads((out / 'results.json').read_text())
    torch_run, onnx_run = runs['checkpoint'], runs['export']
    probs = [np.array(run['predictions']['probabilities']) for run in (torch_run, onnx_run)]
    assert np.abs(probs[0] - probs[1]).max() <= 1e-4
    assert onnx_run['model']['weights_hash'] == torch_run['model']['weights_hash']
    assert abs(onnx_run['metrics']['mean_auc']['value'] - torch_run['metrics']['mean_auc']['value']) <= 1e-4


def test_heatmaps_need_the_checkpoint(models, tmp_path, capsys):
    image = next((models['data'] / 'images').iterdir())
    args = ['predict', '--image_path', str(image), '--model_path', str(models['export']), '--visualize']
    assert cli.main([*args, '--output_dir', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'heatmaps' in err[0] and str(models['export']) in err[0]
    assert not (tmp_path / 'out').exists()
