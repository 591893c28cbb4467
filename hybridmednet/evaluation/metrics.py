"""Per-finding metrics with bootstrap confidence intervals, and operating thresholds.

Every statistic is written for per-image weights `w [B, N]`: a point estimate uses weights of one,
a bootstrap resample uses how often each image (or its patient) was drawn. One code path serves
both, and a thousand resamples cost a handful of matrix operations instead of a Python loop.
Labels come with a mask (0 = label unknown): a masked label takes part in nothing.

The mean AUC averages the findings that have both classes in the data evaluated, and a resample
in which one of them lacks a class has no mean AUC (NaN, left out of the interval). Averaging the
remaining findings instead would mix means over different sets of findings: with a rare, poorly
ranked finding, the resamples that miss its positives report the other findings' mean and pull
the upper bound up to it. Stratified resampling cannot avoid this here: one patient carries
several findings, so no partition of patients into strata keeps a positive and a negative of
every finding in every resample. Every interval states how many resamples it rests on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy.special import ndtr, ndtri

from hybridmednet.config import BOOTSTRAP_INTERVALS, THRESHOLD_METHODS
from hybridmednet.errors import DataError

THRESHOLD_METRICS = ('sensitivity', 'specificity', 'ppv', 'npv', 'f1')
FEW_POSITIVES = 10  # fewer positive patients (or images) than this: the interval is a rough range
_CHUNK_ELEMENTS = 4_000_000  # weights held at once: B_chunk * N


def as_matrices(
    y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores and mask as float64 [N, K] (a 1-D input is one finding).

    A label that counts (mask > 0) must be 0 or 1: any other value (CheXpert's -1, a NaN) would be
    read as a class weight and give impossible metrics. A masked label may hold anything.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim == 1:
        y, s = y[:, None], s[:, None]
    if y.shape != s.shape:
        raise DataError(f'labels {y.shape} and scores {s.shape} differ in shape')
    m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=np.float64).reshape(y.shape)
    bad = (m > 0) & (y != 0) & (y != 1)
    if bad.any():
        row, k = np.argwhere(bad)[0]
        raise DataError(
            f'finding {k}: label {y[row, k]} in row {row} is neither 0 nor 1 ({bad.sum()} such '
            f'labels); give unknown labels mask 0'
        )
    if not np.isfinite(s).all():
        row, k = np.argwhere(~np.isfinite(s))[0]
        raise DataError(f'finding {k}: score {s[row, k]} in row {row} is not a finite number')
    return np.where(m > 0, y, 0.0), s, m


# -- ranking metrics on one finding -------------------------------------------------------------
class _Ranked:
    """One finding's labelled images sorted by score, grouped by tied score.

    Computed with torch on [B, N] weights: its cumulative sums along a contiguous axis are several
    times faster than numpy's, and the cumulative sums are the whole cost of a bootstrap.
    """

    def __init__(self, y: np.ndarray, s: np.ndarray, m: np.ndarray):
        labelled = np.flatnonzero(m > 0)
        order = labelled[np.argsort(s[labelled], kind='stable')]
        ss, ys = s[order], y[order]
        new_group = np.r_[True, ss[1:] != ss[:-1]] if len(ss) else np.zeros(0, bool)
        group = np.cumsum(new_group) - 1
        self.n_groups = int(new_group.sum())
        self.index = torch.from_numpy(order)
        self.y = ys
        self.group = None if self.n_groups == len(order) else torch.from_numpy(group)
        # groups holding a positive image: the only places where AUC and AP terms are non-zero
        self.pos_groups = torch.from_numpy(np.unique(group[ys > 0.5]))
        self.scores = ss[new_group]  # each group's score, ascending

    def group_sums(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative weight of each tied group, [B, groups] (ascending score)."""
        w = w.index_select(1, self.index)
        pos = w * torch.from_numpy(self.y).to(w.dtype)
        neg = w - pos
        if self.group is not None:
            pos = w.new_zeros(w.shape[0], self.n_groups).index_add_(1, self.group, pos)
            neg = w.new_zeros(w.shape[0], self.n_groups).index_add_(1, self.group, neg)
        return pos, neg

    def stats(self, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """ROC AUC and average precision per weight row of `w [B, N]`; NaN where a class is absent.

        AUC = P(score_pos > score_neg) + 0.5 P(tie). AP follows scikit-learn: the sum over
        thresholds of recall step x precision. Final sums run in float64: float32 products of
        counts are exact, their long sums would not be.
        """
        if len(self.pos_groups) == 0:
            nan = np.full(w.shape[0], np.nan)
            return nan, nan
        pos, neg = self.group_sums(w)
        cum_neg = torch.cumsum(neg, 1)
        n_neg = cum_neg[:, -1:]
        pos, neg, cum_neg = (t.index_select(1, self.pos_groups) for t in (pos, neg, cum_neg))
        cum_pos = torch.cumsum(pos, 1)
        n_pos = cum_pos[:, -1:]
        tp = n_pos - cum_pos + pos  # predicted positive: this group and above
        fp = n_neg - cum_neg + neg
        auc = (pos * (cum_neg - 0.5 * neg)).sum(1, dtype=torch.float64) / (n_pos * n_neg).squeeze(1)
        ap = torch.nan_to_num(pos * tp / (tp + fp)).sum(1, dtype=torch.float64) / n_pos.squeeze(1)
        return auc.numpy(), ap.numpy()


# -- all findings --------------------------------------------------------------------------------
class MetricSet:
    """Every per-finding statistic of one set of predictions, as a function of image weights."""

    def __init__(
        self,
        y_true: np.ndarray,
        y_score: np.ndarray,
        mask: np.ndarray | None = None,
        thresholds: Sequence[float] | np.ndarray | None = None,
    ):
        self.y, self.s, self.m = as_matrices(y_true, y_score, mask)
        labelled = self.m > 0
        # findings with both classes: the ones the mean AUC averages, in every resample
        self.defined = (labelled & (self.y > 0.5)).any(0) & (labelled & (self.y < 0.5)).any(0)
        self.ranked = [_Ranked(self.y[:, k], self.s[:, k], self.m[:, k]) for k in range(self.y.shape[1])]
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        if self.thresholds is not None:
            pred = (self.s >= self.thresholds).astype(np.float64)
            # TP, FP, FN, TN indicators, each [N, K]
            self._cells = [
                torch.from_numpy(c)
                for c in (
                    self.m * self.y * pred,
                    self.m * (1 - self.y) * pred,
                    self.m * self.y * (1 - pred),
                    self.m * (1 - self.y) * (1 - pred),
                )
            ]

    @property
    def n_images(self) -> int:
        return self.y.shape[0]

    def auc(self, w: np.ndarray) -> np.ndarray:
        """Per-finding AUC for weight rows `w [B, N]`, [B, K]."""
        tw = torch.from_numpy(w)
        return np.stack([r.stats(tw)[0] for r in self.ranked], axis=1)

    def mean_auc(self, auc: np.ndarray) -> np.ndarray:
        """Mean of `auc [B, K]` over the findings defined on the full data, [B]; NaN where one of them
        is undefined, so that every resample averages the same findings (see the module docstring)."""
        if not self.defined.any():
            return np.full(len(auc), np.nan)
        return auc[:, self.defined].mean(1)

    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """All statistics for weight rows `w [B, N]`: each value is [B, K], except mean_auc [B]."""
        tw = torch.from_numpy(w)
        auc, ap = (np.stack(v, axis=1) for v in zip(*(r.stats(tw) for r in self.ranked)))
        out = {'auc': auc, 'mean_auc': self.mean_auc(auc), 'ap': ap}
        if self.thresholds is not None:
            tp, fp, fn, tn = ((tw @ c.to(tw.dtype)).double().numpy() for c in self._cells)
            with np.errstate(invalid='ignore', divide='ignore'):
                out.update(
                    sensitivity=tp / (tp + fn),
                    specificity=tn / (tn + fp),
                    ppv=tp / (tp + fp),
                    npv=tn / (tn + fn),
                    f1=2 * tp / (2 * tp + fp + fn),
                )
        return out

    def point(self) -> dict[str, np.ndarray]:
        """The statistics on the data as given (every weight 1)."""
        return {k: v[0] for k, v in self(np.ones((1, self.n_images))).items()}


def roc_auc(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-finding ROC AUC, [K]; NaN for a finding without both classes."""
    return MetricSet(y_true, y_score, mask).point()['auc']


def average_precision(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-finding average precision, [K]; NaN for a finding without positives."""
    return MetricSet(y_true, y_score, mask).point()['ap']


def threshold_metrics(
    y_true: np.ndarray, y_score: np.ndarray, thresholds: Sequence[float], mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV and F1 per finding when `score >= threshold` is positive."""
    point = MetricSet(y_true, y_score, mask, thresholds).point()
    return {k: point[k] for k in THRESHOLD_METRICS}


# -- bootstrap -----------------------------------------------------------------------------------
def resampling_units(n_images: int, groups: Sequence | None = None) -> tuple[np.ndarray, int]:
    """Each image's resampling unit (its patient, or the image itself) as codes 0..U-1, and U."""
    if groups is None:
        return np.arange(n_images), n_images
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(codes) != n_images:
        raise DataError(f'{len(codes)} patient IDs for {n_images} images')
    return codes, int(codes.max()) + 1 if len(codes) else 0


def bootstrap_weights(
    n_images: int, n_boot: int, groups: Sequence | None = None, seed: int = 0
) -> Iterator[np.ndarray]:
    """Resample weights in chunks of rows [b, N].

    With `groups` (patient IDs) whole patients are drawn with replacement and every image of a drawn
    patient counts once per draw: images of one patient are correlated, so resampling images alone
    would give intervals that are too narrow.
    """
    codes, n_units = resampling_units(n_images, groups)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n_images, n_units, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units)) + np.arange(b)[:, None] * n_units
        counts = np.bincount(draws.ravel(), minlength=b * n_units).reshape(b, n_units)
        yield counts[:, codes].astype(np.float32)  # exact for counts; halves the memory traffic


def jackknife_weights(n_images: int, groups: Sequence | None = None) -> Iterator[np.ndarray]:
    """Leave-one-unit-out weights in chunks of rows [b, N]: row u drops every image of unit u."""
    codes, n_units = resampling_units(n_images, groups)
    chunk = max(1, _CHUNK_ELEMENTS // max(n_images, 1))
    for start in range(0, n_units, chunk):
        left_out = np.arange(start, min(start + chunk, n_units))
        yield (codes[None, :] != left_out[:, None]).astype(np.float32)


def evaluate_weights(
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]], weights: Iterable[np.ndarray]
) -> dict[str, np.ndarray]:
    """`statistic` on every chunk of weight rows; each value gains a leading axis, one entry per row."""
    parts: dict[str, list[np.ndarray]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these mid-sized ops only slow down when threads compete for cores
    try:
        for w in weights:
            for key, value in statistic(w).items():
                parts.setdefault(key, []).append(value)
    finally:
        torch.set_num_threads(threads)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def bootstrap(
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]],
    n_images: int,
    n_boot: int,
    groups: Sequence | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Evaluate `statistic` on `n_boot` resamples; each value gains a leading [n_boot] axis."""
    if n_boot < 1:
        raise ValueError(f'the number of bootstrap resamples must be at least 1, got {n_boot}')
    return evaluate_weights(statistic, bootstrap_weights(n_images, n_boot, groups, seed))


def bca_levels(
    samples: np.ndarray, point: np.ndarray, jackknife: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap quantiles that bound a bias-corrected and accelerated (BCa) interval, per statistic.

    Efron's BCa moves the percentile interval's quantiles to correct for a bootstrap distribution that
    is off-centre (z0: the share of resamples below the point estimate, ties counted half, as scipy does)
    and for a standard error that changes with the true value (acceleration: the skewness of the
    leave-one-unit-out estimates). Undefined (NaN) resamples and jackknife values are left out.
    NaN where the point estimate lies outside the bootstrap distribution: BCa is undefined there.
    """
    finite = np.isfinite(samples)
    with np.errstate(invalid='ignore', divide='ignore'):
        share_below = ((samples < point).sum(0) + (samples <= point).sum(0)) / (2 * finite.sum(0))
        z0 = ndtri(share_below)
        d = np.nansum(jackknife, 0) / np.isfinite(jackknife).sum(0) - jackknife
        spread = np.nansum(d**2, 0) ** 1.5
        accel = np.where(spread > 0, np.nansum(d**3, 0) / (6 * spread), 0.0)
        alpha = (1.0 - level) / 2.0
        low, high = (ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z))) for z in ndtri([alpha, 1.0 - alpha]))
    valid = np.isfinite(z0)
    return np.where(valid, low, np.nan), np.where(valid, high, np.nan)


def quantiles(
    samples: np.ndarray, q_low: np.ndarray | float, q_high: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """Per statistic, quantiles `q_low` and `q_high` of its defined (finite) resamples along axis 0."""
    flat = samples.reshape(len(samples), -1)
    q = np.broadcast_to(np.stack([q_low, q_high], -1), samples.shape[1:] + (2,)).reshape(-1, 2)
    bounds = np.full(q.shape, np.nan)
    for j, column in enumerate(flat.T):
        column = column[np.isfinite(column)]
        if len(column) and np.isfinite(q[j]).all():
            bounds[j] = np.quantile(column, q[j])
    shape = samples.shape[1:]
    return bounds[:, 0].reshape(shape)[()], bounds[:, 1].reshape(shape)[()]  # [()]: a scalar for shape ()


def bootstrap_intervals(
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]],
    n_images: int,
    n_boot: int,
    groups: Sequence | None = None,
    level: float = 0.95,
    seed: int = 0,
    interval: str = 'percentile',
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """{statistic: {'value', 'ci_low', 'ci_high', 'resamples_used'}} and the bootstrap samples behind them.

    interval: 'percentile' (quantiles of the bootstrap distribution) or 'bca' (see `bca_levels`; it
    costs one extra evaluation per patient, or per image without patient IDs, for the jackknife).
    `resamples_used` counts the resamples in which the statistic is defined.
    """
    if interval not in BOOTSTRAP_INTERVALS:
        raise ValueError(f'interval {interval!r} is not one of {", ".join(BOOTSTRAP_INTERVALS)}')
    point = {k: v[0] for k, v in statistic(np.ones((1, n_images))).items()}
    samples = bootstrap(statistic, n_images, n_boot, groups, seed)
    jack = evaluate_weights(statistic, jackknife_weights(n_images, groups)) if interval == 'bca' else None
    alpha = (1.0 - level) / 2.0
    out = {}
    for key, value in point.items():
        levels = (alpha, 1.0 - alpha) if jack is None else bca_levels(samples[key], value, jack[key], level)
        low, high = quantiles(samples[key], *levels)
        out[key] = {
            'value': np.asarray(value),
            'ci_low': low,
            'ci_high': high,
            'resamples_used': np.isfinite(samples[key]).sum(0),
        }
    return out, samples


def evaluate_predictions(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    groups: Sequence | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    interval: str = 'percentile',
) -> dict:
    """Point estimates and bootstrap intervals of every metric (see `MetricSet`, `bootstrap_intervals`),
    plus per finding: labelled positive and negative images, positive units (patients with a positive
    image, or positive images without patient IDs) and `few_positives` where those are under FEW_POSITIVES.
    """
    metric_set = MetricSet(y_true, y_score, mask, thresholds)
    stats, _ = bootstrap_intervals(metric_set, metric_set.n_images, n_boot, groups, level, seed, interval)
    labelled = metric_set.m > 0
    positive = labelled & (metric_set.y > 0.5)
    units, _ = resampling_units(metric_set.n_images, groups)
    n_pos_units = np.array([len(np.unique(units[p])) for p in positive.T])
    return {
        **stats,
        'n_pos': positive.sum(0),
        'n_neg': (labelled & (metric_set.y < 0.5)).sum(0),
        'n_pos_units': n_pos_units,
        'few_positives': n_pos_units < FEW_POSITIVES,
    }


def compare_mean_auc(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    mask: np.ndarray | None = None,
    groups: Sequence | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    interval: str = 'percentile',
) -> dict:
    """Paired bootstrap of AUC(a) - AUC(b) on the same images: both models see the same resamples.

    The p-value is two-sided: twice the smaller share of defined resamples on either side of zero
    (the percentile bootstrap's, whichever `interval` bounds the difference).
    """
    set_a, set_b = MetricSet(y_true, score_a, mask), MetricSet(y_true, score_b, mask)

    def difference(w: np.ndarray) -> dict[str, np.ndarray]:
        auc_a, auc_b = set_a.auc(w), set_b.auc(w)
        return {'auc_diff': auc_a - auc_b, 'mean_auc_diff': set_a.mean_auc(auc_a) - set_b.mean_auc(auc_b)}

    out, samples = bootstrap_intervals(difference, set_a.n_images, n_boot, groups, level, seed, interval)
    for key in out:
        finite = np.isfinite(samples[key])
        with np.errstate(invalid='ignore', divide='ignore'):
            below = ((samples[key] <= 0) & finite).sum(0) / finite.sum(0)
            above = ((samples[key] >= 0) & finite).sum(0) / finite.sum(0)
        out[key]['p_value'] = np.minimum(1.0, 2 * np.minimum(below, above))
    return {**out, 'mean_auc_a': float(set_a.point()['mean_auc']), 'mean_auc_b': float(set_b.point()['mean_auc'])}


# -- operating thresholds ------------------------------------------------------------------------
def choose_threshold(
    y_true: np.ndarray, y_score: np.ndarray, method: str = 'youden', target_sensitivity: float = 0.9
) -> float:
    """One finding's threshold (positive iff score >= threshold), chosen among its observed scores.

    youden: the largest sensitivity + specificity - 1; f1: the largest F1; sensitivity: the highest
    threshold whose sensitivity reaches the target (so specificity is as high as that allows).
    Ties go to the higher threshold: fewer false alarms for the same score.
    Returns NaN when the labels lack a class (no operating point can be fitted).
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f'threshold method {method!r} is not one of {", ".join(THRESHOLD_METHODS)}')
    y, s, _ = as_matrices(y_true, y_score)
    y, s = y[:, 0], s[:, 0]
    n_pos, n_neg = (y > 0.5).sum(), (y < 0.5).sum()
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    ranked = _Ranked(y, s, np.ones_like(y))
    candidates = ranked.scores[::-1]  # distinct scores, descending
    pos, neg = (g[0].numpy()[::-1] for g in ranked.group_sums(torch.ones(1, len(y), dtype=torch.float64)))
    tp, fp = np.cumsum(pos), np.cumsum(neg)  # at threshold = candidates[i]
    tpr, fpr = tp / n_pos, fp / n_neg
    if method == 'youden':
        best = int(np.argmax(tpr - fpr))
    elif method == 'f1':
        best = int(np.argmax(2 * tp / (tp + fp + n_pos)))
    else:
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    return float(candidates[best])


def choose_thresholds(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray | None = None,
    method: str = 'youden',
    target_sensitivity: float = 0.9,
    fallback: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Per-finding thresholds [K]; a finding without both classes gets `fallback`, with a warning."""
    y, s, m = as_matrices(y_true, y_score, mask)
    out = np.empty(y.shape[1])
    for k in range(y.shape[1]):
        keep = m[:, k] > 0
        out[k] = choose_threshold(y[keep, k], s[keep, k], method, target_sensitivity)
    if np.isnan(out).any():
        missing = np.flatnonzero(np.isnan(out)).tolist()
        named = [class_names[k] for k in missing] if class_names is not None else missing
        warnings.warn(
            f'no threshold can be fitted for {", ".join(map(str, named))} (the threshold data lack '
            f'positives or negatives): {fallback} is used instead',
            stacklevel=2,
        )
        out = np.where(np.isnan(out), fallback, out)
    return out
