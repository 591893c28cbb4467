"""What the report says must be what happened: threshold source, split, interval method, TTA."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_evaluation_commands import make_checkpoint

from hybridmednet.checkpoint import load_model, write_model_entries
from hybridmednet.commands import cache as cache_command
from hybridmednet.commands import predict
from hybridmednet.data.datasets import build_datasets
from hybridmednet.data.io import read_image
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.data.transforms import build_transforms
from hybridmednet.evaluation.evaluate import evaluate_model
from hybridmednet.evaluation.inference import batch_logits, dataset_outputs
from hybridmednet.evaluation.ood import fit_ood
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.evaluation.report import evaluation_sections, to_markdown


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return generate_sample_dataset(tmp_path_factory.mktemp('trust') / 'data', n=200, size=32, seed=1, workers=1)


def report_text(results: dict) -> str:
    return to_markdown('report', evaluation_sections(results))


def test_report_names_the_real_threshold_source_when_validation_is_empty(data, tmp_path):
    model = make_checkpoint(tmp_path / 'm.pth', data, 0)
    no_val = ['DATA.train_split=0.7', 'DATA.val_split=0.0', 'DATA.test_split=0.3']
    with pytest.warns(UserWarning, match='validation split is empty'):
        results = evaluate_model(model, no_val, eval_options={'bootstrap_samples': 20})
    source = results['operating_point']['source']
    assert source.startswith('none fitted') and 'validation' not in source
    text = report_text(results)
    assert 'none fitted' in text and 'fitted on the validation split' not in text


def test_report_describes_the_evaluated_split_and_interval_method(data, tmp_path):
    model = make_checkpoint(tmp_path / 'm.pth', data, 0)
    with pytest.warns(UserWarning, match='optimistic'):
        results = evaluate_model(model, split='val', eval_options={'bootstrap_samples': 30, 'interval': 'bca'})
    text = report_text(results)
    assert 'labelled images of the val split' in text and 'test images' not in text
    assert 'bias-corrected and accelerated (BCa) bootstrap' in text and results['settings']['interval'] == 'bca'
    row = results['metrics']['per_finding']['Cardiomegaly']
    assert isinstance(row['auc']['resamples_used'], int) and isinstance(row['few_positives'], bool)


def test_predict_uses_the_tta_setting_the_thresholds_were_fitted_with(data, tmp_path, capsys):
    model_path = make_checkpoint(tmp_path / 'm.pth', data, 0)
    evaluate_model(model_path, eval_options={'bootstrap_samples': 20, 'tta': True})
    model, config, meta = load_model(model_path)
    op = OperatingPoint.of_model(meta)
    assert op.fitted_on['tta'] is True
    image = tmp_path / 'one'
    image.mkdir()
    shutil.copy(sorted((data / 'images').glob('*.png'))[0], image / 'x.png')
    assert (
        predict.main(['--image_path', str(image), '--model_path', str(model_path), '--output_dir', str(tmp_path / 'p')])
        == 0
    )
    scored = np.loadtxt(tmp_path / 'p' / 'predictions.csv', delimiter=',', skiprows=1, usecols=range(1, 15))
    x = build_transforms(config, train=False)(read_image(image / 'x.png'))[None]
    with torch.no_grad():
        expected = op.probabilities(batch_logits(model, x, tta=True).numpy())[0]
        plain = op.probabilities(batch_logits(model, x, tta=False).numpy())[0]
    assert np.abs(scored - expected).max() < 1e-5 < np.abs(scored - plain).max()
    capsys.readouterr()
    assert (
        predict.main(
            [
                '--image_path',
                str(image),
                '--model_path',
                str(model_path),
                '--no-tta',
                '--output_dir',
                str(tmp_path / 'q'),
            ]
        )
        == 0
    )
    assert 'fitted with test-time augmentation on' in capsys.readouterr().err


@pytest.mark.parametrize('cached', [False, True])
def test_evaluate_gives_predicts_probabilities_with_and_without_a_cache(data, tmp_path, cached):
    work = tmp_path / 'data'
    shutil.copytree(data, work)
    model_path = make_checkpoint(tmp_path / 'm.pth', work, 0)
    if cached:
        assert cache_command.main(['--size', '64', '--workers', '1', f'DATA.data_dir={work}']) == 0
    results = evaluate_model(model_path, out_dir=tmp_path / 'eval', eval_options={'bootstrap_samples': 10})
    paths, probs = results['predictions']['path'][:5], np.asarray(results['predictions']['probabilities'])[:5]
    folder = tmp_path / 'some'
    folder.mkdir()
    for p in paths:
        shutil.copy(p, folder / Path(p).name)
    assert (
        predict.main(
            ['--image_path', str(folder), '--model_path', str(model_path), '--output_dir', str(tmp_path / 'p')]
        )
        == 0
    )
    frame = pd.read_csv(tmp_path / 'p' / 'predictions.csv').set_index('path')
    scored = np.stack([frame.loc[str(folder / Path(p).name)].to_numpy()[:14].astype(float) for p in paths])
    assert np.abs(scored - probs).max() < 1e-4


def test_evaluate_reports_ood_flags_and_heatmap_localisation(data, tmp_path):
    work = tmp_path / 'data'
    shutil.copytree(data, work)
    model_path = make_checkpoint(tmp_path / 'm.pth', work, 0)
    model, config, _ = load_model(model_path)
    datasets = build_datasets(config, use_cache=False)
    train, test = (dataset_outputs(model, datasets[s], ood=True)[1] for s in ('train', 'test'))
    ood = fit_ood(train, train[:40])
    # the threshold sits between the test images' distances: the flags must be the images above it
    ood.threshold = float(np.median(ood.score(test)))
    write_model_entries(model_path, {'ood': ood.to_state()})

    results = evaluate_model(model_path, out_dir=tmp_path / 'eval', eval_options={'bootstrap_samples': 10})
    scores = np.asarray(results['predictions']['ood_score'])
    np.testing.assert_allclose(scores, ood.score(test), rtol=1e-6)
    assert results['ood']['n_flagged'] == int((scores > ood.threshold).sum()) == len(test) // 2
    loc = results['localization']
    boxes = pd.read_csv(work / 'BBox_List_2017.csv')
    in_test = boxes['Image Index'].isin([Path(p).name for p in datasets['test'].records['path']])
    assert loc['n_images'] == boxes.loc[in_test, 'Image Index'].nunique() > 0
    assert loc['all']['n_boxes'] == in_test.sum()
    text = (tmp_path / 'eval' / 'report.md').read_text()
    assert f'{len(test) // 2} of {len(test)} images' in text and 'Localisation of the heatmaps' in text
    assert (tmp_path / 'eval' / 'reliability_raw.png').is_file()

    (work / 'BBox_List_2017.csv').unlink()  # no box file: no localisation, and the report says nothing about it
    seen = []

    def counting_loader(path, map_location='cpu'):
        loaded = load_model(path, map_location=map_location)
        loaded[0].backbone.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
        return loaded

    results = evaluate_model(
        model_path, out_dir=tmp_path / 'eval2', eval_options={'bootstrap_samples': 10}, loader=counting_loader
    )
    assert 'localization' not in results and 'Localisation' not in (tmp_path / 'eval2' / 'report.md').read_text()
    np.testing.assert_allclose(results['predictions']['ood_score'], ood.score(test), rtol=1e-6)
    assert sum(seen) == len(datasets['val']) + len(test)  # logits and OOD features from one pass per image
