"""Bootstrap intervals: rare findings and the mean AUC, BCa against scipy, coverage at several levels.

References are computed independently: scikit-learn's AUC on each resample written out as a list of
drawn images, scipy's BCa, and the known AUC of binormal scores.
"""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from hybridmednet.config import BOOTSTRAP_INTERVALS
from hybridmednet.evaluation import metrics


def rare_finding_data(n_rare: int, n: int = 200, seed: int = 0):
    """Three findings with AUC ~0.87 and a fourth with `n_rare` positives ranked low (AUC ~0.27)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.3).astype(float)
    s = rng.normal(size=(n, 4)) + 1.45 * y
    y[:, 0] = 0
    y[:n_rare, 0] = 1
    s[:n_rare, 0] = np.quantile(s[n_rare:, 0], np.linspace(0.2, 0.34, n_rare))
    return y, s


def resampled_aucs(y, s, n_boot, seed, groups=None):
    """Per-finding AUC on each resample of `metrics.bootstrap_weights`, by roc_auc_score on the drawn images."""
    out = np.full((n_boot, y.shape[1]), np.nan)
    b = 0
    for chunk in metrics.bootstrap_weights(len(y), n_boot, groups, seed):
        for w in chunk:
            drawn = np.repeat(np.arange(len(y)), w.astype(int))
            for k in range(y.shape[1]):
                if len(np.unique(y[drawn, k])) == 2:
                    out[b, k] = roc_auc_score(y[drawn, k], s[drawn, k])
            b += 1
    return out


def old_rule_quantile(aucs, q):
    """The bound the old rule gave: each resample's mean over whichever findings it defines."""
    some = np.isfinite(aucs).any(1)
    return np.percentile(np.nanmean(aucs[some], 1), q)


def test_rare_finding_mean_auc_interval_uses_fully_defined_resamples_only():
    """Before the fix this case read [0.686, 0.868]: resamples without a rare positive reported the mean
    of the three good findings (~0.87) and set the upper bound. Over fully defined resamples: [0.685, 0.751]."""
    y, s = rare_finding_data(3)
    n_boot, level = 1000, 0.95
    out = metrics.evaluate_predictions(y, s, n_boot=n_boot, level=level, seed=0)
    aucs = resampled_aucs(y, s, n_boot, seed=0)
    full = np.isfinite(aucs).all(1)
    assert 0 < (~full).sum() < n_boot / 10  # the case exercises undefined resamples
    reference = np.percentile(aucs[full].mean(1), [2.5, 97.5])
    mean = out['mean_auc']
    assert [mean['ci_low'], mean['ci_high']] == pytest.approx(reference.tolist(), abs=1e-6)
    assert mean['resamples_used'] == full.sum()
    assert mean['ci_high'] < 0.78 < old_rule_quantile(aucs, 97.5)  # the old rule reads ~0.87
    for k in range(4):  # each finding: the resamples where it is defined
        defined = np.isfinite(aucs[:, k])
        assert [out['auc']['ci_low'][k], out['auc']['ci_high'][k]] == pytest.approx(
            np.percentile(aucs[defined, k], [2.5, 97.5]).tolist(), abs=1e-6
        )
        assert out['auc']['resamples_used'][k] == defined.sum()
    assert out['n_pos_units'].tolist() == out['n_pos'].tolist()
    assert out['few_positives'].tolist() == [True, False, False, False]


def test_two_positive_findings_no_longer_give_an_upper_bound_of_one():
    """Finding 0: two low-ranked positives (AUC ~0.27). Finding 1: one positive above every negative and one
    below (AUC ~0.5). Resamples that miss finding 0's positives and draw only finding 1's top one used to
    average finding 1 alone: a mean AUC of 1.0 in more than 2.5% of resamples. Before the fix the interval read
    [0.000, 1.000] (the lower bound: finding 0 alone); now [0.098, 0.671]."""
    y, s = rare_finding_data(2)
    y, s = y[:, :2].copy(), s[:, :2].copy()
    y[:, 1] = 0
    y[2:4, 1] = 1  # other images than finding 0's positives
    s[2:4, 1] = [s[:, 1].max() + 1, s[:, 1].min() - 1]
    point = metrics.roc_auc(y, s)
    assert point[0] < 0.3 and point[1] == pytest.approx(0.5, abs=0.01)
    aucs = resampled_aucs(y, s, 1000, seed=0)
    assert old_rule_quantile(aucs, 97.5) == 1.0
    mean = metrics.evaluate_predictions(y, s, n_boot=1000, seed=0)['mean_auc']
    assert mean['ci_high'] < 0.8


def test_paired_comparison_and_patient_resampling_share_the_rule():
    """compare_mean_auc's mean difference is defined only where every finding is, for both models,
    with patients as the resampling unit."""
    y, s = rare_finding_data(3, n=120)
    other = s + np.random.default_rng(1).normal(0, 1, s.shape)
    patients = np.arange(len(y)) // 2  # two images per patient
    n_boot = 400
    out = metrics.compare_mean_auc(y, s, other, groups=patients, n_boot=n_boot, level=0.8, seed=3)
    a, b = (resampled_aucs(y, x, n_boot, 3, patients) for x in (s, other))
    full = np.isfinite(a).all(1)
    diff = a[full].mean(1) - b[full].mean(1)
    d = out['mean_auc_diff']
    assert [d['ci_low'], d['ci_high']] == pytest.approx(np.percentile(diff, [10, 90]).tolist(), abs=1e-6)
    assert d['resamples_used'] == full.sum() < n_boot
    assert d['p_value'] == pytest.approx(min(1, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))


def test_few_positives_counts_patients():
    y = np.zeros((40, 1))
    y[:12] = 1  # 12 positive images from 3 patients
    s = np.linspace(0, 1, 40)[:, None]
    patients = np.r_[np.repeat([0, 1, 2], 4), np.arange(3, 31)]
    out = metrics.evaluate_predictions(y, s, groups=patients, n_boot=50)
    assert out['n_pos'].tolist() == [12] and out['n_pos_units'].tolist() == [3]
    assert out['few_positives'].tolist() == [True]


# -- BCa -------------------------------------------------------------------------------------------
def mann_whitney_auc(y, s, axis=-1):
    """AUC from rank sums, vectorised over leading axes (scipy.stats.bootstrap's `vectorized` form)."""
    ranks = stats.rankdata(s, axis=axis)
    n_pos = y.sum(axis)
    n_neg = y.shape[axis] - n_pos
    return ((ranks * y).sum(axis) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binormal(d, n_pos, n_neg, rng):
    return np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]


def test_bca_matches_scipy():
    """A skewed case (AUC ~0.91, 20 of 200 positive) where BCa lowers the lower bound by ~0.035. The resamples
    differ from scipy's (another seed): with 10000 of them a bound varies by ~0.0025 (one SD) between seeds."""
    y, s = binormal(2.0, 20, 180, np.random.default_rng(0))
    assert mann_whitney_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    ref = stats.bootstrap(
        (y, s), mann_whitney_auc, paired=True, n_resamples=10000, method='BCa', rng=np.random.default_rng(1)
    ).confidence_interval
    ours = {m: metrics.evaluate_predictions(y, s, n_boot=10000, seed=0, interval=m)['auc'] for m in BOOTSTRAP_INTERVALS}
    bca, percentile = ours['bca'], ours['percentile']
    assert bca['ci_low'][0] == pytest.approx(ref.low, abs=0.012)
    assert bca['ci_high'][0] == pytest.approx(ref.high, abs=0.012)
    assert percentile['ci_low'][0] - ref.low > 0.025  # so ignoring 'bca' would fail


def test_bca_jackknife_leaves_out_whole_patients():
    """Ten identical copies of each image under one patient ID: the patient bootstrap and the patient
    jackknife see exactly the single-image data, so the BCa interval is the same."""
    y, s = binormal(1.5, 15, 25, np.random.default_rng(2))
    single = metrics.evaluate_predictions(y, s, n_boot=500, interval='bca')['auc']
    patients = np.repeat([f'p{i:02d}' for i in range(40)], 10)  # sorted as images are: the same draws
    copies = metrics.evaluate_predictions(
        np.repeat(y, 10), np.repeat(s, 10), groups=patients, n_boot=500, interval='bca'
    )['auc']
    assert copies['ci_low'][0] == pytest.approx(single['ci_low'][0], abs=1e-6)
    assert copies['ci_high'][0] == pytest.approx(single['ci_high'][0], abs=1e-6)


def test_unknown_interval_is_refused():
    with pytest.raises(ValueError, match="'studentized' is not one of percentile, bca"):
        metrics.evaluate_predictions([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], n_boot=10, interval='studentized')


# -- coverage --------------------------------------------------------------------------------------
@pytest.mark.parametrize('interval', BOOTSTRAP_INTERVALS)
def test_interval_coverage_follows_the_level(interval):
    """Binormal scores with separation d have AUC = Phi(d / sqrt 2). Over 500 datasets a 90% interval must
    cover it in roughly 90% of them and a 50% interval in roughly half: an ignored or misapplied level fails.
    One standard error of a coverage over 500 datasets is ~0.013 (90%) and ~0.022 (50%)."""
    d, n_pos, n_neg, trials = 1.0, 40, 60, 500
    true_auc = stats.norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(0)
    hits = {0.9: 0, 0.5: 0}
    for trial in range(trials):
        y, s = binormal(d, n_pos, n_neg, rng)
        for level in hits:
            auc = metrics.evaluate_predictions(y, s, n_boot=300, level=level, seed=trial, interval=interval)['auc']
            hits[level] += auc['ci_low'][0] <= true_auc <= auc['ci_high'][0]
    assert 0.85 <= hits[0.9] / trials <= 0.95
    assert 0.40 <= hits[0.5] / trials <= 0.60
