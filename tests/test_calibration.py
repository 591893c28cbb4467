"""Calibration stored with the model: Platt scaling recovers known distortions, travels with the model
files, and is applied exactly once by the operating point that predict and evaluate use."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.special import expit
from test_engine_train import TinyNet, run, tiny_datasets

from hybridmednet.checkpoint import export_weights, load_checkpoint, load_model, save_checkpoint, write_model_entries
from hybridmednet.errors import CheckpointError
from hybridmednet.evaluation.calibration import (
    Calibration,
    apply_temperature,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
)
from hybridmednet.evaluation.metrics import choose_thresholds
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.models.hybrid import create_model

NAMES = ['a', 'b', 'c']


def distorted(n: int = 20_000, seed: int = 0):
    """Labels drawn from calibrated logits t, and model logits z with a * z + b = t for known (a, b)."""
    rng = np.random.default_rng(seed)
    t = rng.normal(-1.5, 2.0, (n, 3))
    y = (rng.random(t.shape) < expit(t)).astype(float)
    a, b = np.array([0.5, 2.0, 1.0]), np.array([-1.0, 0.5, -2.0])  # c: a pure shift, as pos_weight gives
    return (t - b) / a, y, a, b


def test_platt_recovers_a_known_scale_and_shift():
    z, y, a, b = distorted()
    got_a, got_b = fit_platt(z, y)
    assert got_a == pytest.approx(a, rel=0.06) and got_b == pytest.approx(b, abs=0.08)
    before = expected_calibration_error(y, expit(z))
    after = expected_calibration_error(y, expit(got_a * z + got_b))
    assert np.all(before > 0.09) and np.all(after < 0.02)


def test_a_shift_is_what_temperature_cannot_undo():
    """pos_weight moves a finding's logits by about log(pos_weight): Platt undoes it, a temperature cannot."""
    z, y, _, _ = distorted()
    temperature = expected_calibration_error(y, apply_temperature(z, fit_temperature(z, y)))
    platt = expected_calibration_error(y, Calibration.fit(z, y, None, NAMES).probabilities(z))
    assert temperature[2] > 0.05 and platt[2] < 0.02


def test_platt_keeps_rankings_and_leaves_one_class_findings_alone():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 3))
    y = np.stack([z[:, 0] > 0, rng.random(400) < 0.3, np.zeros(400, bool)], 1).astype(float)  # a: separable
    mask = np.ones_like(y)
    mask[:200, 1] = 0
    y[:200, 1] = -1  # unknown labels may hold anything
    a, b = fit_platt(-z, y, mask)  # anti-correlated for a: the slope stays positive, rankings are kept
    assert np.all(a > 0) and np.isfinite(a).all()
    assert (a[2], b[2]) == (1.0, 0.0)
    assert fit_platt(-z[200:], y[200:], None)[0][1] == pytest.approx(a[1])  # masked rows did not count


def test_calibration_record_round_trip():
    z, y, _, _ = distorted(2000)
    cal = Calibration.fit(z, y, None, NAMES, {'split': 'val', 'n_images': 2000})
    again = Calibration.from_meta(json.loads(json.dumps(cal.to_meta())), NAMES)
    assert np.array_equal(again.probabilities(z), cal.probabilities(z)) and again.fitted_on == cal.fitted_on
    assert Calibration.from_meta(None, NAMES) is None
    with pytest.raises(CheckpointError, match=re.escape("lacks the classes ['d']")):
        Calibration.from_meta(cal.to_meta(), ['a', 'd'])


# -- applied exactly once ---------------------------------------------------------------------------------
def test_operating_point_applies_the_calibration_once_before_thresholds():
    z, y, _, _ = distorted(3000)
    cal = Calibration.fit(z, y, None, NAMES)
    op = OperatingPoint.fit(z, y, None, NAMES, 'youden', calibration=cal)
    assert np.array_equal(op.probabilities(z), cal.probabilities(z))
    assert np.array_equal(op.thresholds, choose_thresholds(y, cal.probabilities(z), None, 'youden', 0.9, 0.5, NAMES))
    # on top of it, temperatures are fitted to the calibrated logits (close to 1: nothing left to fix)
    tempered = OperatingPoint.fit(z, y, None, NAMES, 'youden', temperature_scaling=True, calibration=cal)
    assert tempered.temperatures == pytest.approx(np.ones(3), abs=0.05)
    assert np.allclose(tempered.probabilities(z), apply_temperature(cal.logits(z), tempered.temperatures))


def test_of_model_takes_the_models_calibration_once():
    z, y, _, _ = distorted(3000)
    cal = Calibration.fit(z, y, None, NAMES, {'split': 'val'})
    meta = {'class_names': NAMES, 'thresholds': None, 'calibration': cal.to_meta()}
    with pytest.warns(UserWarning, match='no fitted thresholds'):
        unfitted = OperatingPoint.of_model(meta)
    assert np.array_equal(unfitted.probabilities(z), cal.probabilities(z))
    # evaluate's record names the calibration too; the model's and the record's are one, applied once
    meta['thresholds'] = OperatingPoint.fit(z, y, None, NAMES, calibration=cal).to_meta()
    assert np.array_equal(OperatingPoint.of_model(meta).probabilities(z), cal.probabilities(z))
    # thresholds fitted on uncalibrated probabilities do not fit this model's
    meta['thresholds'] = OperatingPoint.fit(z, y, None, NAMES).to_meta()
    with pytest.raises(CheckpointError, match='uncalibrated; model: Platt scaling'):
        OperatingPoint.of_model(meta)
    # a model stored before calibration existed: no entry, plain sigmoids
    old = {'class_names': NAMES, 'thresholds': OperatingPoint.fit(z, y, None, NAMES).to_meta()}
    assert np.array_equal(OperatingPoint.of_model(old).probabilities(z), expit(z))


# -- stored with the model ----------------------------------------------------------------------------
def test_calibration_round_trips_through_checkpoint_and_export(tmp_path):
    model = create_model(
        'resnet18', num_classes=3, image_size=32, class_names=NAMES, fpn_channels=16, fusion_channels=16
    )
    config = model.config
    pth = save_checkpoint(tmp_path / 'm.pth', {'model_state_dict': model.state_dict(), 'config': config.to_dict()})
    export = export_weights(tmp_path / 'm.safetensors', model.state_dict(), config)
    for path in (pth, export):
        assert load_model(path)[2]['calibration'] is None  # stored without one
    z, y, _, _ = distorted(2000)
    cal = Calibration.fit(z, y, None, NAMES, {'split': 'val', 'n_images': 2000})
    assert write_model_entries(pth, {'calibration': cal.to_meta()}) == [pth, export.with_suffix('.json')]
    for path in (pth, export):
        meta = load_model(path)[2]
        assert meta['calibration'] == cal.to_meta()
        with pytest.warns(UserWarning):
            assert np.array_equal(OperatingPoint.of_model(meta).probabilities(z), cal.probabilities(z))
    assert set(load_file(str(export))) == set(model.state_dict())  # the export stays a plain state dict


def test_training_stores_a_calibration_fitted_on_validation(tmp_path):
    result, _ = run(tmp_path, epochs=2, ema_decay=0.5)
    best = load_checkpoint(result['best_checkpoint'])
    sidecar = json.loads(result['best_export'].with_suffix('.json').read_text())
    assert best['calibration'] == sidecar['calibration'] and best['calibration']['method'] == 'platt'
    assert best['calibration']['fitted_on'] == {'split': 'val', 'n_images': 24}
    assert best['ood'] is None and sidecar['ood'] is None  # a stand-in model has no fused features
    assert 'calibration' not in load_checkpoint(result['last_checkpoint'])  # only the best weights get one
    # fitted on the best (EMA) weights' validation logits
    net = TinyNet()
    net.load_state_dict(best['ema_state_dict'])
    x, y, m = tiny_datasets()['val'].tensors
    with torch.no_grad():
        logits = net(x).numpy()
    expected = Calibration.fit(logits, y.numpy(), m.numpy(), ['a', 'b', 'c'])
    stored = Calibration.from_meta(best['calibration'], ['a', 'b', 'c'])
    assert stored.a == pytest.approx(expected.a, rel=1e-4) and stored.b == pytest.approx(expected.b, abs=1e-4)
