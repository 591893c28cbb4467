"""Calibration: expected calibration error, reliability bins, per-finding temperature scaling.

Temperature scaling divides each finding's logit by a temperature fitted on the validation split.
It leaves every ranking (and so every AUC) unchanged and only makes the probabilities honest,
which matters when a clinician reads "0.8" as a risk.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit

from hybridmednet.errors import DataError
from hybridmednet.evaluation.metrics import as_matrices


def reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins over [0, 1]: mean predicted probability, observed frequency and count per bin."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_prob, dtype=np.float64)
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)  # p == 1 falls in the last bin
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid='ignore', divide='ignore'):
        confidence = np.bincount(bins, weights=p, minlength=n_bins) / count
        frequency = np.bincount(bins, weights=y, minlength=n_bins) / count
    return {
        'confidence': confidence,
        'frequency': frequency,
        'count': count,
        'edges': np.linspace(0.0, 1.0, n_bins + 1),
    }


def expected_calibration_error(
    y_true: np.ndarray, y_prob: np.ndarray, mask: np.ndarray | None = None, n_bins: int = 10
) -> np.ndarray:
    """Per-finding ECE, [K]: the count-weighted mean |observed frequency - mean probability| over bins.

    Probabilities outside [0, 1] (logits passed by mistake) are refused: binning would clip them silently.
    """
    y, p, m = as_matrices(y_true, y_prob, mask)
    outside = (p < 0) | (p > 1)
    if outside.any():
        row, k = np.argwhere(outside)[0]
        raise DataError(f'finding {k}: probability {p[row, k]} in row {row} is outside [0, 1]')
    out = np.full(y.shape[1], np.nan)
    for k in range(y.shape[1]):
        keep = m[:, k] > 0
        if keep.any():
            b = reliability_bins(y[keep, k], p[keep, k], n_bins)
            filled = b['count'] > 0
            out[k] = np.sum(b['count'][filled] * np.abs(b['frequency'][filled] - b['confidence'][filled])) / keep.sum()
    return out


def _nll(y: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    return -float(np.mean(y * log_expit(z) + (1 - y) * log_expit(-z)))


def fit_temperature(
    logits: np.ndarray, y_true: np.ndarray, mask: np.ndarray | None = None, bounds: tuple[float, float] = (0.05, 20.0)
) -> np.ndarray:
    """Per-finding temperatures [K] minimising the validation negative log-likelihood.

    The search runs on log T within `bounds`; a finding without both classes keeps T = 1
    (its likelihood has no finite optimum).
    """
    y, z, m = as_matrices(y_true, logits, mask)
    out = np.ones(y.shape[1])
    for k in range(y.shape[1]):
        keep = m[:, k] > 0
        yk, zk = y[keep, k], z[keep, k]
        if yk.size == 0 or yk.min() == yk.max():
            continue
        result = minimize_scalar(
            lambda log_t, yk=yk, zk=zk: _nll(yk, zk, np.exp(log_t)), method='bounded', bounds=tuple(np.log(bounds))
        )
        out[k] = float(np.exp(result.x))
    return out


def apply_temperature(logits: np.ndarray, temperatures: np.ndarray | None = None) -> np.ndarray:
    """Probabilities from logits [N, K], each finding's logit divided by its temperature first."""
    logits = np.asarray(logits, dtype=np.float64)
    return expit(logits if temperatures is None else logits / np.asarray(temperatures, dtype=np.float64))
