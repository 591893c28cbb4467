"""Calibration: expected calibration error, reliability bins, per-finding temperature and Platt scaling.

Temperature scaling divides each finding's logit by a temperature fitted on the validation split;
Platt scaling maps it to a * logit + b. Both leave every ranking (and so every AUC) unchanged and
only make the probabilities honest, which matters when a clinician reads "0.8" as a risk. Platt's
shift b is what undoes a loss with positive weights (LOSS.pos_weight), which moves every logit of a
finding by about log(pos_weight): a temperature alone cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit

from hybridmednet.errors import CheckpointError, DataError
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


def _platt_nll(params: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of sigmoid(a z + b) against soft targets y, and its gradient in (a, b)."""
    a, b = params
    s = a * z + b
    nll = -np.mean(y * log_expit(s) + (1 - y) * log_expit(-s))
    residual = expit(s) - y
    return float(nll), np.array([np.mean(residual * z), np.mean(residual)])


def fit_platt(logits: np.ndarray, y_true: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-finding (a [K], b [K]) minimising the validation negative log-likelihood of sigmoid(a z + b).

    The targets are Platt's (1999) smoothed labels, (n+ + 1) / (n+ + 2) and 1 / (n- + 2): a finding the
    logits separate perfectly still gets a finite slope. a stays positive, so rankings (AUCs) are kept.
    A finding without both classes keeps a = 1, b = 0.
    """
    y, z, m = as_matrices(y_true, logits, mask)
    a, b = np.ones(y.shape[1]), np.zeros(y.shape[1])
    for k in range(y.shape[1]):
        keep = m[:, k] > 0
        yk, zk = y[keep, k], z[keep, k]
        n_pos = yk.sum()
        n_neg = yk.size - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        soft = np.where(yk > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        result = minimize(
            _platt_nll,
            np.array([1.0, 0.0]),
            args=(soft, zk),
            jac=True,
            method='L-BFGS-B',
            bounds=[(1e-3, None), (None, None)],
        )
        a[k], b[k] = result.x
    return a, b


@dataclass
class Calibration:
    """Per-finding Platt scaling stored with a model: probability = sigmoid(a * logit + b).

    Fitted on the validation split at the end of training; `OperatingPoint` applies it before
    thresholds (and any temperatures) so that predict and evaluate report calibrated probabilities.
    """

    class_names: list[str]
    a: np.ndarray  # [K] slopes
    b: np.ndarray  # [K] shifts
    fitted_on: dict[str, Any] | None = None  # the split it was fitted on

    @classmethod
    def fit(
        cls,
        logits: np.ndarray,
        y_true: np.ndarray,
        mask: np.ndarray | None,
        class_names: Sequence[str],
        fitted_on: dict[str, Any] | None = None,
    ) -> Calibration:
        a, b = fit_platt(logits, y_true, mask)
        return cls(list(class_names), a, b, fitted_on)

    def logits(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits [N, K]: what the sigmoid (or a temperature) is applied to."""
        return self.a * np.asarray(logits, dtype=np.float64) + self.b

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return expit(self.logits(logits))

    def to_meta(self) -> dict[str, Any]:
        return {
            'method': 'platt',
            'a': {n: float(v) for n, v in zip(self.class_names, self.a)},
            'b': {n: float(v) for n, v in zip(self.class_names, self.b)},
            'fitted_on': self.fitted_on,
        }

    @classmethod
    def from_meta(cls, record: dict[str, Any] | None, class_names: Sequence[str]) -> Calibration | None:
        """From a model's meta['calibration'] (None: the model was stored uncalibrated)."""
        if record is None:
            return None
        if record.get('method') != 'platt':
            raise CheckpointError(f"the stored calibration has method {record.get('method')!r}; expected 'platt'")
        missing = [n for n in class_names if n not in record['a'] or n not in record['b']]
        if missing:
            raise CheckpointError(f'the stored calibration lacks the classes {missing}; retrain or re-fit it')
        return cls(
            list(class_names),
            np.array([record['a'][n] for n in class_names], dtype=np.float64),
            np.array([record['b'][n] for n in class_names], dtype=np.float64),
            record.get('fitted_on'),
        )
