"""Metrics against scikit-learn, bootstrap coverage, threshold rules, calibration."""
import numpy as np
import pytest
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

from hybridmednet.evaluation import calibration, metrics


@pytest.fixture
def random_data():
    rng = np.random.default_rng(0)
    n, k = 400, 5
    y = (rng.random((n, k)) < [0.05, 0.2, 0.3, 0.5, 0.7]).astype(float)
    scores = np.round(rng.random((n, k)) + 0.4 * y, 2)     # rounded: plenty of tied scores
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
        assert out['auc'][0, k] == pytest.approx(roc_auc_score(y[keep, k], s[keep, k], sample_weight=w[keep]),
                                                 abs=1e-6)
        assert out['ap'][0, k] == pytest.approx(
            average_precision_score(y[keep, k], s[keep, k], sample_weight=w[keep]), abs=1e-6)


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
        assert np.all(w[:, [0, 3, 4]].sum(1) == 3)     # three patients drawn per resample


def test_bootstrap_interval_covers_known_auc():
    """Binormal scores with separation d have AUC = Phi(d / sqrt 2); a 95% interval should cover it ~95%."""
    d, n_pos, n_neg, trials = 1.0, 60, 140, 200
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    hits = 0
    for trial in range(trials):
        s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        out = metrics.evaluate_predictions(y, s, n_boot=400, seed=trial)['auc']
        hits += out['ci_low'][0] <= true_auc <= out['ci_high'][0]
    assert 0.89 <= hits / trials <= 0.99


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
S = np.array([.1, .2, .3, .4, .5, .6, .7, .8, .9, .95])


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
    y = (rng.random(1000) < p ** 2).astype(float)
    frequency, confidence = calibration_curve(y, p, n_bins=10, strategy='uniform')
    counts = np.histogram(p, bins=np.linspace(0, 1, 11))[0]
    expected = np.sum(counts[counts > 0] * np.abs(frequency - confidence)) / len(p)
    assert calibration.expected_calibration_error(y, p)[0] == pytest.approx(expected)


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
