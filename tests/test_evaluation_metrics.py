"""Metrics against scikit-learn and numpy, input checks, threshold rules, calibration.

Interval tests (rare findings, BCa, coverage) are in test_evaluation_intervals.py.
"""

import re

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from hybridmednet.errors import DataError
from hybridmednet.evaluation import calibration, metrics


@pytest.fixture
def random_data():
    rng = np.random.default_rng(0)
    n, k = 400, 5
    y = (rng.random((n, k)) < [0.05, 0.2, 0.3, 0.5, 0.7]).astype(float)
    scores = np.round(rng.random((n, k)) + 0.4 * y, 2)  # rounded: plenty of tied scores
    mask = (rng.random((n, k)) < 0.85).astype(float)
    return y, scores, mask


def test_auc_and_ap_match_sklearn(random_data):
    y, s, m = random_data
    auc, ap = metrics.roc_auc(y, s, m), metrics.average_precision(y, s, m)
    for k in range(y.shape[1]):
        keep = m[:, k] > 0
        assert auc[k] == pytest.approx(roc_auc_score(y[keep, k], s[keep, k]), abs=1e-12)
        assert ap[k] == pytest.approx(average_precision_score(y[keep, k], s[keep, k]), abs=1e-12)


def test_weighted_statistics_match_sklearn_sample_weight(random_data):
    """A bootstrap resample is a weighting: check the weighted path, in float32 as the bootstrap runs it."""
    y, s, m = random_data
    w = np.random.default_rng(1).integers(0, 4, len(y)).astype(np.float32)
    out = metrics.MetricSet(y, s, m)(w[None])
    for k in range(y.shape[1]):
        keep = m[:, k] > 0
        assert out['auc'][0, k] == pytest.approx(roc_auc_score(y[keep, k], s[keep, k], sample_weight=w[keep]), abs=1e-6)
        assert out['ap'][0, k] == pytest.approx(
            average_precision_score(y[keep, k], s[keep, k], sample_weight=w[keep]), abs=1e-6
        )


def test_threshold_metrics_match_sklearn(random_data):
    y, s, m = random_data
    thresholds = np.array([0.3, 0.5, 0.6, 0.7, 0.9])
    got = metrics.threshold_metrics(y, s, thresholds, m)
    for k, t in enumerate(thresholds):
        keep = m[:, k] > 0
        pred = s[keep, k] >= t
        tn, fp, fn, tp = confusion_matrix(y[keep, k], pred, labels=[0, 1]).ravel()
        assert got['sensitivity'][k] == pytest.approx(tp / (tp + fn))
        assert got['specificity'][k] == pytest.approx(tn / (tn + fp))
        assert got['ppv'][k] == pytest.approx(tp / (tp + fp))
        assert got['npv'][k] == pytest.approx(tn / (tn + fn))
        assert got['f1'][k] == pytest.approx(f1_score(y[keep, k], pred))


def test_rates_and_ap_on_fixed_data_match_sklearn():
    """By hand at threshold 0.5: tp 3, fp 4, fn 2, tn 3; tied scores at 0.8 and 0.3 hold one of each class."""
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0], float)
    s = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1])
    pred = s >= 0.5
    got = metrics.threshold_metrics(y, s, [0.5])
    assert got['sensitivity'][0] == pytest.approx(recall_score(y, pred)) == 3 / 5
    assert got['specificity'][0] == pytest.approx(recall_score(y, pred, pos_label=0)) == 3 / 7
    assert got['ppv'][0] == pytest.approx(precision_score(y, pred)) == 3 / 7
    assert got['npv'][0] == pytest.approx(precision_score(y, pred, pos_label=0)) == 3 / 5
    assert got['f1'][0] == pytest.approx(f1_score(y, pred)) == 0.5
    assert metrics.average_precision(y, s)[0] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert metrics.roc_auc(y, s)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# -- input checks ----------------------------------------------------------------------------------
TWO_FINDINGS_Y = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 0], [1, 1]], float)
TWO_FINDINGS_S = np.array(
    [[0.1, 0.9], [0.8, 0.3], [0.35, 0.6], [0.7, 0.2], [0.2, 0.55], [0.9, 0.4], [0.3, 0.1], [0.6, 0.7]]
)
METRIC_CALLS = {
    'roc_auc': lambda y, s, m: metrics.roc_auc(y, s, m),
    'average_precision': lambda y, s, m: metrics.average_precision(y, s, m),
    'threshold_metrics': lambda y, s, m: metrics.threshold_metrics(y, s, [0.5, 0.5], m),
    'evaluate_predictions': lambda y, s, m: metrics.evaluate_predictions(y, s, m, n_boot=5),
    'compare_mean_auc': lambda y, s, m: metrics.compare_mean_auc(y, s, s[::-1], m, n_boot=5),
    'choose_thresholds': lambda y, s, m: metrics.choose_thresholds(y, s, m),
    'expected_calibration_error': lambda y, s, m: calibration.expected_calibration_error(y, s, m),
    'fit_temperature': lambda y, s, m: calibration.fit_temperature(s, y, m),
}


@pytest.mark.parametrize('bad', [2.0, -1.0, np.nan])
@pytest.mark.parametrize('call', METRIC_CALLS.values(), ids=METRIC_CALLS.keys())
def test_labels_other_than_0_or_1_are_refused_where_they_count(call, bad):
    """Today's alternative is nonsense: a label 2 read as a class weight gave AUC -2.01, specificity -3.75."""
    y = TWO_FINDINGS_Y.copy()
    y[3, 1] = bad
    with pytest.raises(DataError, match=re.escape(f'finding 1: label {bad} in row 3 is neither 0 nor 1')):
        call(y, TWO_FINDINGS_S, None)
    mask = np.ones_like(y)
    mask[3, 1] = 0
    call(y, TWO_FINDINGS_S, mask)  # masked out: any value is ignored


def test_masked_labels_may_hold_anything():
    """CheXpert's uncertain -1 under U-Ignore, or NaN, with mask 0: the metrics are those of the other images."""
    y, s = TWO_FINDINGS_Y.copy(), TWO_FINDINGS_S
    mask = np.ones_like(y)
    y[[2, 6], 1], mask[[2, 6], 1] = [-1, np.nan], 0
    keep = mask[:, 1] > 0
    assert metrics.roc_auc(y, s, mask)[1] == pytest.approx(roc_auc_score(y[keep, 1], s[keep, 1]))
    pred = s[keep, 1] >= 0.5
    rates = metrics.threshold_metrics(y, s, [0.5, 0.5], mask)
    assert rates['specificity'][1] == pytest.approx(recall_score(y[keep, 1], pred, pos_label=0))
    assert rates['npv'][1] == pytest.approx(precision_score(y[keep, 1], pred, pos_label=0))


def test_one_finding_threshold_checks_its_labels():
    with pytest.raises(DataError, match=re.escape('finding 0: label 2.0 in row 2')):
        metrics.choose_threshold([0, 1, 2, 1], [0.1, 0.5, 0.6, 0.9])


def test_scores_must_be_finite():
    s = TWO_FINDINGS_S.copy()
    s[4, 1] = np.nan
    with pytest.raises(DataError, match=re.escape('finding 1: score nan in row 4 is not a finite number')):
        metrics.roc_auc(TWO_FINDINGS_Y, s)
    with pytest.raises(DataError, match=re.escape('labels (8, 2) and scores (8, 1) differ in shape')):
        metrics.roc_auc(TWO_FINDINGS_Y, TWO_FINDINGS_S[:, :1])


def test_absent_class_gives_nan_and_mean_skips_it():
    y = np.array([[0, 1], [0, 0], [0, 1], [0, 0]], float)
    s = np.array([[0.1, 0.9], [0.2, 0.3], [0.3, 0.8], [0.4, 0.1]])
    point = metrics.MetricSet(y, s).point()
    assert np.isnan(point['auc'][0]) and point['auc'][1] == 1.0
    assert point['mean_auc'] == 1.0


def test_patient_bootstrap_draws_whole_patients():
    groups = ['a', 'a', 'a', 'b', 'c', 'c']
    for w in metrics.bootstrap_weights(6, 50, groups, seed=3):
        assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 1] == w[:, 2]) and np.all(w[:, 4] == w[:, 5])
        assert np.all(w[:, [0, 3, 4]].sum(1) == 3)  # three patients drawn per resample


def test_patient_bootstrap_is_wider_for_correlated_images():
    """Ten identical images per patient carry the information of one: the interval must say so."""
    rng = np.random.default_rng(0)
    y1, s1 = np.r_[np.ones(20), np.zeros(20)], np.r_[rng.normal(1, 1, 20), rng.normal(0, 1, 20)]
    y, s, patients = np.repeat(y1, 10), np.repeat(s1, 10), np.repeat(np.arange(40), 10)
    by_image = metrics.evaluate_predictions(y, s, n_boot=500)['auc']
    by_patient = metrics.evaluate_predictions(y, s, groups=patients, n_boot=500)['auc']
    width = lambda r: r['ci_high'][0] - r['ci_low'][0]
    assert width(by_patient) > 2 * width(by_image)


def test_paired_comparison():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random((n, 3)) < 0.3).astype(float)
    good = y + rng.normal(0, 0.5, y.shape)
    bad = y + rng.normal(0, 2.0, y.shape)
    out = metrics.compare_mean_auc(y, good, bad, n_boot=500)
    diff = out['mean_auc_diff']
    assert diff['value'] == pytest.approx(out['mean_auc_a'] - out['mean_auc_b'])
    assert out['mean_auc_a'] == pytest.approx(np.mean([roc_auc_score(y[:, k], good[:, k]) for k in range(3)]))
    assert diff['ci_low'] > 0 and diff['p_value'] < 0.01
    same = metrics.compare_mean_auc(y, good, good, n_boot=100)['mean_auc_diff']
    assert same['value'] == 0 and same['ci_low'] == 0 and same['ci_high'] == 0


# -- thresholds on hand-built cases ----------------------------------------------------------------
Y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
S = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])


def test_youden_threshold():
    # at 0.7: sensitivity 4/5, specificity 5/5 -> J = 0.8 (at 0.5: 5/5 and 4/5, also 0.8; the higher wins)
    assert metrics.choose_threshold(Y, S, 'youden') == 0.7


def test_f1_threshold():
    # at 0.5: tp 5, fp 1 -> F1 10/11; at 0.7: tp 4, fp 0, fn 1 -> 8/9 < 10/11
    assert metrics.choose_threshold(Y, S, 'f1') == 0.5


def test_sensitivity_threshold():
    assert metrics.choose_threshold(Y, S, 'sensitivity', target_sensitivity=0.8) == 0.7
    assert metrics.choose_threshold(Y, S, 'sensitivity', target_sensitivity=0.9) == 0.5
    assert metrics.choose_threshold(Y, S, 'sensitivity', target_sensitivity=1.0) == 0.5


def test_threshold_ties_and_fallback():
    # tied scores move together: 0.5 marks both images at 0.5 positive
    assert metrics.choose_threshold([0, 1, 0, 1], [0.1, 0.5, 0.5, 0.9], 'youden') == 0.9
    with pytest.warns(UserWarning, match='fitted for 1 '):
        t = metrics.choose_thresholds(np.c_[Y, np.zeros(10)], np.c_[S, S], method='f1')
    assert t.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match='youden'):
        metrics.choose_threshold(Y, S, 'best')


# -- calibration -----------------------------------------------------------------------------------
def test_ece_matches_sklearn_calibration_curve():
    rng = np.random.default_rng(0)
    p = rng.random(1000)
    y = (rng.random(1000) < p**2).astype(float)
    frequency, confidence = calibration_curve(y, p, n_bins=10, strategy='uniform')
    counts = np.histogram(p, bins=np.linspace(0, 1, 11))[0]
    expected = np.sum(counts[counts > 0] * np.abs(frequency - confidence)) / len(p)
    assert calibration.expected_calibration_error(y, p)[0] == pytest.approx(expected)


def test_ece_matches_a_numpy_loop_with_mask():
    """Eight bins: edges i/8 are exact in binary, so binning cannot differ by rounding; p == 1 is in the last bin."""
    rng = np.random.default_rng(3)
    p = rng.random((500, 2))
    p[:5], p[5:10] = 1.0, 0.0
    y = (rng.random((500, 2)) < p**1.5).astype(float)
    mask = rng.random((500, 2)) < 0.8
    y[~mask] = -1  # masked: must take part in nothing
    got = calibration.expected_calibration_error(y, p, mask, n_bins=8)
    for k in range(2):
        pk, yk = p[mask[:, k], k], y[mask[:, k], k]
        total = 0.0
        for i in range(8):
            inside = (pk >= i / 8) & ((pk < (i + 1) / 8) | (i == 7))
            if inside.any():
                total += inside.sum() * abs(yk[inside].mean() - pk[inside].mean())
        assert got[k] == pytest.approx(total / len(pk), abs=1e-12)


def test_ece_refuses_values_that_are_not_probabilities():
    with pytest.raises(DataError, match=re.escape('finding 0: probability 2.3 in row 1 is outside [0, 1]')):
        calibration.expected_calibration_error([0, 1, 1], [0.2, 2.3, 0.9])


def test_temperature_scaling_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (5000, 2))
    y = (rng.random(true_logits.shape) < 1 / (1 + np.exp(-true_logits))).astype(float)
    temperatures = calibration.fit_temperature(3 * true_logits, y)
    assert temperatures == pytest.approx([3, 3], rel=0.1)
    before = calibration.expected_calibration_error(y, calibration.apply_temperature(3 * true_logits))
    after = calibration.expected_calibration_error(y, calibration.apply_temperature(3 * true_logits, temperatures))
    assert np.all(after < before / 2)


# -- the operating point stored with a model -------------------------------------------------------
def test_operating_point_round_trip_and_legacy_forms():
    from hybridmednet.evaluation.operating_point import OperatingPoint

    names = ['a', 'b']
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 2)) * 3
    y = (rng.random((200, 2)) < 1 / (1 + np.exp(-logits / 3))).astype(float)
    op = OperatingPoint.fit(logits, y, None, names, 'f1', temperature_scaling=True, fitted_on={'split': 'val'})
    again = OperatingPoint.from_meta(op.to_meta(), names)
    assert np.array_equal(again.thresholds, op.thresholds) and np.array_equal(again.temperatures, op.temperatures)
    assert np.array_equal(again.positives(again.probabilities(logits)), op.positives(op.probabilities(logits)))
    assert OperatingPoint.from_meta([0.2, 0.7], names).thresholds.tolist() == [0.2, 0.7]
    assert OperatingPoint.from_meta(None, names).thresholds.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="lack the classes \\['c'\\]"):
        OperatingPoint.from_meta(op.to_meta(), ['a', 'c'])


def test_top1_accuracy_only_for_one_label_per_image():
    from hybridmednet.evaluation.evaluate import top1_accuracy

    y = np.eye(3)[[0, 1, 2, 2]]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4]])
    assert top1_accuracy(y, probs, np.ones_like(y)) == 0.5  # rows 0 and 2 right, rows 1 and 3 wrong
    two_labels = y.copy()
    two_labels[0, 1] = 1
    assert top1_accuracy(two_labels, probs, np.ones_like(y)) is None  # multi-label data has no top-1 accuracy
    masked = np.ones_like(y)
    masked[1, 2] = 0
    assert top1_accuracy(y, probs, masked) is None  # an unknown label: which one is the image's is unknown
