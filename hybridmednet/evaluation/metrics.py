"""Per-finding metrics with bootstrap confidence intervals, and operating thresholds.

Every statistic is written for per-image weights `w [B, N]`: a point estimate uses weights of one,
a bootstrap resample uses how often each image (or its patient) was drawn. One code path serves
both, and a thousand resamples cost a handful of matrix operations instead of a Python loop.
Labels come with a mask (0 = label unknown): a masked label takes part in nothing.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from hybridmednet.config import THRESHOLD_METHODS

THRESHOLD_METRICS = ('sensitivity', 'specificity', 'ppv', 'npv', 'f1')
_CHUNK_ELEMENTS = 4_000_000   # weights held at once: B_chunk * N


def as_matrices(y_true: np.ndarray, y_score: np.ndarray,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores and mask as float64 [N, K] (a 1-D input is one finding)."""
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim == 1:
        y, s = y[:, None], s[:, None]
    m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=np.float64).reshape(y.shape)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return np.where(m > 0, y, 0.0), s, m     # an unknown label may be stored as NaN


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
        self.scores = ss[new_group]            # each group's score, ascending

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
        tp = n_pos - cum_pos + pos                    # predicted positive: this group and above
        fp = n_neg - cum_neg + neg
        auc = (pos * (cum_neg - 0.5 * neg)).sum(1, dtype=torch.float64) / (n_pos * n_neg).squeeze(1)
        ap = torch.nan_to_num(pos * tp / (tp + fp)).sum(1, dtype=torch.float64) / n_pos.squeeze(1)
        return auc.numpy(), ap.numpy()


# -- all findings --------------------------------------------------------------------------------
class MetricSet:
    """Every per-finding statistic of one set of predictions, as a function of image weights."""

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None,
                 thresholds: Sequence[float] | None = None):
        self.y, self.s, self.m = as_matrices(y_true, y_score, mask)
        self.ranked = [_Ranked(self.y[:, k], self.s[:, k], self.m[:, k]) for k in range(self.y.shape[1])]
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        if self.thresholds is not None:
            pred = (self.s >= self.thresholds).astype(np.float64)
            # TP, FP, FN, TN indicators, each [N, K]
            self._cells = [torch.from_numpy(c) for c in (
                self.m * self.y * pred, self.m * (1 - self.y) * pred,
                self.m * self.y * (1 - pred), self.m * (1 - self.y) * (1 - pred))]

    @property
    def n_images(self) -> int:
        return self.y.shape[0]

    def auc(self, w: np.ndarray) -> np.ndarray:
        """Per-finding AUC for weight rows `w [B, N]`, [B, K]."""
        w = torch.from_numpy(w)
        return np.stack([r.stats(w)[0] for r in self.ranked], axis=1)

    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """All statistics for weight rows `w [B, N]`: each value is [B, K], except mean_auc [B]."""
        tw = torch.from_numpy(w)
        auc, ap = (np.stack(v, axis=1) for v in zip(*(r.stats(tw) for r in self.ranked)))
        out = {'auc': auc, 'mean_auc': _nanmean_rows(auc), 'ap': ap}
        if self.thresholds is not None:
            tp, fp, fn, tn = ((tw @ c.to(tw.dtype)).double().numpy() for c in self._cells)
            with np.errstate(invalid='ignore', divide='ignore'):
                out.update(sensitivity=tp / (tp + fn), specificity=tn / (tn + fp), ppv=tp / (tp + fp),
                           npv=tn / (tn + fn), f1=2 * tp / (2 * tp + fp + fn))
        return out

    def point(self) -> dict[str, np.ndarray]:
        """The statistics on the data as given (every weight 1)."""
        return {k: v[0] for k, v in self(np.ones((1, self.n_images))).items()}


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    """Mean over findings with a defined value; NaN when none is defined."""
    count = np.isfinite(a).sum(1)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(count > 0, np.nansum(a, axis=1) / count, np.nan)


def roc_auc(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-finding ROC AUC, [K]; NaN for a finding without both classes."""
    return MetricSet(y_true, y_score, mask).point()['auc']


def average_precision(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-finding average precision, [K]; NaN for a finding without positives."""
    return MetricSet(y_true, y_score, mask).point()['ap']


def threshold_metrics(y_true: np.ndarray, y_score: np.ndarray, thresholds: Sequence[float],
                      mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV and F1 per finding when `score >= threshold` is positive."""
    point = MetricSet(y_true, y_score, mask, thresholds).point()
    return {k: point[k] for k in THRESHOLD_METRICS}


# -- bootstrap -----------------------------------------------------------------------------------
def bootstrap_weights(n_images: int, n_boot: int, groups: Sequence | None = None,
                      seed: int = 0) -> Iterator[np.ndarray]:
    """Resample weights in chunks of rows [b, N].

    With `groups` (patient IDs) whole patients are drawn with replacement and every image of a drawn
    patient counts once per draw: images of one patient are correlated, so resampling images alone
    would give intervals that are too narrow.
    """
    if groups is None:
        codes, n_groups = np.arange(n_images), n_images
    else:
        _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        n_groups = int(codes.max()) + 1 if len(codes) else 0
    if len(codes) != n_images:
        raise ValueError(f"{len(codes)} group labels for {n_images} images")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n_images, n_groups, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + np.arange(b)[:, None] * n_groups
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, codes].astype(np.float32)   # exact for counts; halves the memory traffic


def bootstrap(statistic: Callable[[np.ndarray], dict[str, np.ndarray]], n_images: int, n_boot: int,
              groups: Sequence | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Evaluate `statistic` on `n_boot` resamples; each value gains a leading [n_boot] axis."""
    if n_boot < 1:
        raise ValueError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    parts: dict[str, list[np.ndarray]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # these mid-sized ops only slow down when threads compete for cores
    try:
        for w in bootstrap_weights(n_images, n_boot, groups, seed):
            for key, value in statistic(w).items():
                parts.setdefault(key, []).append(value)
    finally:
        torch.set_num_threads(threads)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring resamples where the statistic is undefined."""
    alpha = (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)   # all-NaN columns stay NaN
        low, high = np.nanquantile(samples, [alpha, 1.0 - alpha], axis=0)
    return low, high


def with_intervals(point: dict[str, np.ndarray], samples: dict[str, np.ndarray],
                   level: float = 0.95) -> dict[str, dict[str, np.ndarray]]:
    """{statistic: {'value', 'ci_low', 'ci_high'}} from point estimates and bootstrap samples."""
    out = {}
    for key, value in point.items():
        low, high = percentile_interval(samples[key], level)
        out[key] = {'value': np.asarray(value), 'ci_low': low, 'ci_high': high}
    return out


def evaluate_predictions(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None,
                         thresholds: Sequence[float] | None = None, groups: Sequence | None = None,
                         n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Point estimates and bootstrap intervals of every metric (see `MetricSet`), plus counts."""
    metric_set = MetricSet(y_true, y_score, mask, thresholds)
    stats = with_intervals(metric_set.point(), bootstrap(metric_set, metric_set.n_images, n_boot, groups, seed),
                           level)
    labelled = metric_set.m > 0
    stats['n_pos'] = (labelled & (metric_set.y > 0.5)).sum(0)
    stats['n_neg'] = (labelled & (metric_set.y <= 0.5)).sum(0)
    return stats


def compare_mean_auc(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                     mask: np.ndarray | None = None, groups: Sequence | None = None,
                     n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Paired bootstrap of AUC(a) - AUC(b) on the same images: both models see the same resamples.

    The p-value is two-sided: twice the smaller share of resamples on either side of zero.
    """
    set_a, set_b = MetricSet(y_true, score_a, mask), MetricSet(y_true, score_b, mask)

    def difference(w: np.ndarray) -> dict[str, np.ndarray]:
        auc_a, auc_b = set_a.auc(w), set_b.auc(w)
        return {'auc_diff': auc_a - auc_b, 'mean_auc_diff': _nanmean_rows(auc_a) - _nanmean_rows(auc_b)}

    ones = np.ones((1, set_a.n_images))
    point = {k: v[0] for k, v in difference(ones).items()}
    samples = bootstrap(difference, set_a.n_images, n_boot, groups, seed)
    out = with_intervals(point, samples, level)
    for key in out:
        finite = np.isfinite(samples[key])
        with np.errstate(invalid='ignore', divide='ignore'):
            below = ((samples[key] <= 0) & finite).sum(0) / finite.sum(0)
            above = ((samples[key] >= 0) & finite).sum(0) / finite.sum(0)
        out[key]['p_value'] = np.minimum(1.0, 2 * np.minimum(below, above))
    out['mean_auc_a'] = float(_nanmean_rows(set_a.auc(ones))[0])
    out['mean_auc_b'] = float(_nanmean_rows(set_b.auc(ones))[0])
    return out


# -- operating thresholds ------------------------------------------------------------------------
def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, method: str = 'youden',
                     target_sensitivity: float = 0.9) -> float:
    """One finding's threshold (positive iff score >= threshold), chosen among its observed scores.

    youden: the largest sensitivity + specificity - 1; f1: the largest F1; sensitivity: the highest
    threshold whose sensitivity reaches the target (so specificity is as high as that allows).
    Ties go to the higher threshold: fewer false alarms for the same score.
    Returns NaN when the labels lack a class (no operating point can be fitted).
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method {method!r} is not one of {', '.join(THRESHOLD_METHODS)}")
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    n_pos, n_neg = (y > 0.5).sum(), (y <= 0.5).sum()
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    ranked = _Ranked(y, s, np.ones_like(y))
    candidates = ranked.scores[::-1]                               # distinct scores, descending
    pos, neg = (g[0].numpy()[::-1] for g in ranked.group_sums(torch.ones(1, len(y), dtype=torch.float64)))
    tp, fp = np.cumsum(pos), np.cumsum(neg)                        # at threshold = candidates[i]
    tpr, fpr = tp / n_pos, fp / n_neg
    if method == 'youden':
        best = int(np.argmax(tpr - fpr))
    elif method == 'f1':
        best = int(np.argmax(2 * tp / (tp + fp + n_pos)))
    else:
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    return float(candidates[best])


def choose_thresholds(y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray | None = None,
                      method: str = 'youden', target_sensitivity: float = 0.9,
                      fallback: float = 0.5, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Per-finding thresholds [K]; a finding without both classes gets `fallback`, with a warning."""
    y, s, m = as_matrices(y_true, y_score, mask)
    out = np.empty(y.shape[1])
    for k in range(y.shape[1]):
        keep = m[:, k] > 0
        out[k] = choose_threshold(y[keep, k], s[keep, k], method, target_sensitivity)
    if np.isnan(out).any():
        missing = np.flatnonzero(np.isnan(out)).tolist()
        named = [class_names[k] for k in missing] if class_names is not None else missing
        warnings.warn(f"no threshold can be fitted for {', '.join(map(str, named))} (the threshold data lack "
                      f"positives or negatives): {fallback} is used instead", stacklevel=2)
        out = np.where(np.isnan(out), fallback, out)
    return out
