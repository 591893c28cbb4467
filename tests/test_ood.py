"""The out-of-distribution score: Mahalanobis distance of the pooled features, its threshold, its storage
with the model, and a trained model (12 s on 2 cores) flagging photographs and noise but not held-out X-rays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.covariance import LedoitWolf
from sklearn.datasets import load_sample_images

from hybridmednet.checkpoint import export_weights, load_model, save_checkpoint, write_model_entries
from hybridmednet.config import Config
from hybridmednet.data.datasets import build_datasets
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.data.transforms import build_transforms
from hybridmednet.engine.trainer import train
from hybridmednet.errors import CheckpointError, DataError
from hybridmednet.evaluation.calibration import Calibration, apply_temperature, expected_calibration_error
from hybridmednet.evaluation.inference import dataset_outputs
from hybridmednet.evaluation.ood import OodModel, fit_ood, ood_features
from hybridmednet.models.hybrid import create_model

D = 16


def gaussian(n: int, seed: int) -> np.ndarray:
    """Correlated features whose spread differs 100-fold between directions."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(1, -1, D)
    rotation = np.linalg.qr(np.random.default_rng(99).normal(size=(D, D)))[0]
    return 3.0 + (rng.normal(size=(n, D)) * scales) @ rotation.T, rotation, scales


def test_in_distribution_points_pass_and_shifted_points_are_flagged():
    train_x, rotation, _ = gaussian(4000, 0)
    ood = fit_ood(train_x, gaussian(1000, 1)[0])
    held_out = gaussian(4000, 2)[0]
    assert ood.flag(held_out).mean() <= 0.02
    # 1.5 units along the narrowest direction: far in Mahalanobis terms (15 sd), near in Euclidean ones
    shifted = held_out + 1.5 * rotation[:, -1]
    assert ood.flag(shifted).mean() >= 0.95
    # the distance under the Ledoit-Wolf estimate of the training features' covariance
    assert ood.score(held_out) ** 2 == pytest.approx(LedoitWolf().fit(train_x).mahalanobis(held_out), rel=1e-9)
    assert ood.threshold == pytest.approx(np.quantile(ood.score(gaussian(1000, 1)[0]), 0.99))


def test_fit_ood_refuses_what_it_cannot_fit():
    x = gaussian(100, 0)[0]
    with pytest.raises(DataError, match='at least 2 training and 1 validation'):
        fit_ood(x, x[:0])
    with pytest.raises(DataError, match=r'quantile 1.5 must lie in \(0, 1\)'):
        fit_ood(x, x, quantile=1.5)
    with pytest.raises(DataError, match='features have 3 dimensions, the model 16'):
        fit_ood(x, x).score(x[:, :3])


def test_ood_state_is_plain_tensors_and_values(tmp_path):
    x = gaussian(500, 0)[0]
    ood = fit_ood(x[:400], x[400:])
    torch.save(ood.to_state(), tmp_path / 's.pth')
    again = OodModel.from_state(torch.load(tmp_path / 's.pth', weights_only=True))
    assert np.array_equal(again.score(x), ood.score(x)) and again.threshold == ood.threshold
    assert (again.n_train, again.n_val, again.feature_dim) == (400, 100, D)
    with pytest.raises(CheckpointError, match='feature_dim 8, mean \\(16,\\)'):
        OodModel.from_state({**ood.to_state(), 'feature_dim': 8})
    with pytest.raises(CheckpointError, match="reads features 'fused', this version computes"):
        OodModel.from_state({**ood.to_state(), 'features': 'fused'})


def test_ood_model_is_stored_with_the_model(tmp_path):
    model = create_model('resnet18', num_classes=3, image_size=32, fpn_channels=16, fusion_channels=D)
    config = model.config
    pth = save_checkpoint(tmp_path / 'm.pth', {'model_state_dict': model.state_dict(), 'config': config.to_dict()})
    export = export_weights(tmp_path / 'm.safetensors', model.state_dict(), config)
    assert load_model(pth)[2]['ood'] is None and load_model(export)[2]['ood'] is None  # stored without one
    x = gaussian(300, 0)[0]
    ood = fit_ood(x[:200], x[200:])
    write_model_entries(pth, {'ood': ood.to_state()})
    sidecar = json.loads(export.with_suffix('.json').read_text())
    assert sidecar['ood']['threshold'] == ood.threshold and sidecar['ood']['tensor_file'] == 'm.ood.safetensors'
    assert set(load_file(str(tmp_path / 'm.ood.safetensors'))) == {'mean', 'precision'}
    assert set(load_file(str(export))) == set(model.state_dict())  # the weights file is untouched
    for path in (pth, export):
        stored = OodModel.from_state(load_model(path)[2]['ood'])
        assert np.allclose(stored.score(x), ood.score(x), rtol=0, atol=1e-9) and stored.threshold == ood.threshold
    (tmp_path / 'm.ood.safetensors').unlink()
    with pytest.raises(CheckpointError, match='m.ood.safetensors, which it names as a tensor file, is missing'):
        load_model(export)


def test_features_are_the_attention_maps_pooled_before_the_fusion_normalises_them():
    model = create_model('resnet18', num_classes=3, image_size=32, fpn_channels=16, fusion_channels=D).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_features(x)
    expected = torch.cat([torch.cat([m.mean((2, 3)), m.amax((2, 3))], 1) for m in maps], 1)
    assert torch.allclose(ood_features(model, x), expected, atol=1e-6) and expected.shape == (2, 2 * 4 * 16)


# -- a trained model ------------------------------------------------------------------------------------
def as_model_input(grey: np.ndarray, config: Config) -> torch.Tensor:
    return build_transforms(config, train=False)(grey.astype(np.float32))


def test_a_trained_model_flags_photographs_and_noise_but_not_held_out_x_rays(tmp_path):
    data = generate_sample_dataset(tmp_path / 'sample', n=700, size=64, seed=0, workers=1)
    config = Config(
        MODEL={'backbone': 'resnet18', 'pretrained': False, 'fpn_channels': 32, 'fusion_channels': 64},
        TRAIN={'batch_size': 16, 'epochs': 2, 'learning_rate': 2e-3, 'mixed_precision': False, 'device': 'cpu'},
        DATA={'data_dir': str(data), 'image_size': 64, 'num_workers': 0},
        LOSS={'pos_weight': 'auto'},
        CHECKPOINT={'dir': str(tmp_path / 'ckpt')},
        LOGGING={'log_dir': str(tmp_path / 'logs'), 'tensorboard': False},
    )
    # many validation images (the threshold is their 99th percentile), few to train on; the test split
    # is the sample's official-style test list (a fifth of the patients)
    config.DATA.update(train_split=0.3, val_split=0.35, test_split=0.35)
    result = train(config)
    model, config, meta = load_model(result['best_export'])
    ood = OodModel.from_state(meta['ood'])
    # stored beside it too: the heatmaps' healthy reference, attached on loading, the same from both files
    assert meta['heatmap_reference']['images'] == 'without a finding' and meta['heatmap_reference']['n_images'] >= 25
    from_pth, _, _ = load_model(result['best_checkpoint'])
    side = config.DATA['image_size']
    n = meta['heatmap_reference']['n_images']
    assert model.heatmap_reference is not None and model.heatmap_reference.shape == (n, 3, side, side)
    torch.testing.assert_close(model.heatmap_reference, from_pth.heatmap_reference)
    test = build_datasets(config)['test']  # 145 images of patients the model never saw
    # About 1 % by construction; measured 3 of 145 (2.1 %; one image is 0.7 %). A threshold taken from the
    # training images' own distances, which the fit shrinks, flags 39 % here.
    logits, features = dataset_outputs(model, test, ood=True)  # evaluate's one pass: logits and features
    assert ood.flag(features).mean() <= 0.03
    first = torch.stack([test[i][0] for i in range(32)])  # dataset_outputs' first batch
    np.testing.assert_allclose(features[:32], ood_features(model, first).numpy(), rtol=1e-6, atol=1e-6)

    photos = []
    for photo in load_sample_images().images:  # two photographs, whole and in quarters
        grey = photo.mean(axis=2) / 255.0
        h, w = grey.shape
        photos += [grey] + [grey[i : i + h // 2, j : j + w // 2] for i in (0, h // 2) for j in (0, w // 2)]
    rng = np.random.default_rng(0)
    noise = [rng.random((64, 64)) for _ in range(5)] + [rng.normal(0.5, 0.15, (64, 64)).clip(0, 1) for _ in range(5)]
    for images in (photos, noise):
        x = torch.stack([as_model_input(image, config) for image in images])
        assert ood.flag(ood_features(model, x)).all()

    # the calibration fitted with it: the test split's probabilities are closer to the observed rates
    cal = Calibration.from_meta(meta['calibration'], meta['class_names'])
    before = expected_calibration_error(test.labels, apply_temperature(logits), test.mask)
    after = expected_calibration_error(test.labels, cal.probabilities(logits), test.mask)
    assert np.nanmean(after) < np.nanmean(before) / 2
