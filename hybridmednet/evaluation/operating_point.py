"""The operating point stored with a model: per-finding thresholds and temperatures, on calibrated logits.

Fitted on the validation split by `evaluate`; `to_meta()` is the record that
`checkpoint.write_thresholds` writes into the model files, so that
`load_model(...)[2]['thresholds']` returns it and `predict` needs no other file.

The model's own calibration (Platt scaling fitted at the end of training, `meta['calibration']`)
comes first: probabilities = sigmoid((a * logit + b) / temperature), and the thresholds are chosen
on those. The record names the calibration its thresholds were fitted on, and `of_model` refuses a
record that does not match the model's, since its thresholds would sit on other probabilities.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridmednet.errors import CheckpointError
from hybridmednet.evaluation.calibration import Calibration, apply_temperature, fit_temperature
from hybridmednet.evaluation.metrics import choose_thresholds

DEFAULT_THRESHOLD = 0.5


@dataclass
class OperatingPoint:
    class_names: list[str]
    thresholds: np.ndarray  # [K]; positive iff probability >= threshold
    temperatures: np.ndarray | None = None  # [K]; logits are divided by these before the sigmoid
    method: str = 'default'  # youden | f1 | sensitivity | default (0.5, nothing fitted)
    target_sensitivity: float | None = None
    fitted_on: dict[str, Any] | None = None  # the split it was fitted on: name, images, hash
    calibration: Calibration | None = None  # the model's Platt scaling, applied before the temperatures

    @property
    def fitted(self) -> bool:
        return self.method != 'default'

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Raw model logits [N, K] -> the probabilities the thresholds apply to (calibration applied here only)."""
        if self.calibration is not None:
            logits = self.calibration.logits(logits)
        return apply_temperature(logits, self.temperatures)

    def positives(self, probabilities: np.ndarray) -> np.ndarray:
        return np.asarray(probabilities) >= self.thresholds

    @classmethod
    def default(cls, class_names: Sequence[str]) -> OperatingPoint:
        return cls(list(class_names), np.full(len(class_names), DEFAULT_THRESHOLD))

    @classmethod
    def fit(
        cls,
        logits: np.ndarray,
        y_true: np.ndarray,
        mask: np.ndarray | None,
        class_names: Sequence[str],
        method: str = 'youden',
        target_sensitivity: float = 0.9,
        temperature_scaling: bool = False,
        fitted_on: dict[str, Any] | None = None,
        calibration: Calibration | None = None,
    ) -> OperatingPoint:
        """On raw `logits`: the model's `calibration` first, then temperatures (when asked), then thresholds
        on the probabilities predict will report."""
        calibrated = logits if calibration is None else calibration.logits(logits)
        temperatures = fit_temperature(calibrated, y_true, mask) if temperature_scaling else None
        probs = apply_temperature(calibrated, temperatures)
        thresholds = choose_thresholds(y_true, probs, mask, method, target_sensitivity, DEFAULT_THRESHOLD, class_names)
        return cls(
            list(class_names),
            thresholds,
            temperatures,
            method,
            target_sensitivity if method == 'sensitivity' else None,
            fitted_on,
            calibration,
        )

    # -- the record stored with the model ----------------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        by_name = lambda values: {n: float(v) for n, v in zip(self.class_names, values)}
        return {
            'values': by_name(self.thresholds),
            'temperatures': None if self.temperatures is None else by_name(self.temperatures),
            'method': self.method,
            'target_sensitivity': self.target_sensitivity,
            'fitted_on': self.fitted_on,
            'calibration': None if self.calibration is None else self.calibration.to_meta(),
        }

    @classmethod
    def from_meta(cls, record: Any, class_names: Sequence[str]) -> OperatingPoint:
        """From a model's meta['thresholds']: our record, a plain list of K floats, or None (0.5 each)."""
        if record is None:
            return cls.default(class_names)
        if isinstance(record, (list, tuple)):
            if len(record) != len(class_names):
                raise CheckpointError(
                    f'the stored thresholds have {len(record)} values for {len(class_names)} '
                    f'classes; re-run evaluate for this model'
                )
            record = {'values': dict(zip(class_names, record)), 'method': 'stored list'}
        values, temps = record.get('values') or {}, record.get('temperatures')
        missing = [n for n in class_names if n not in values or (temps and n not in temps)]
        if missing:
            raise CheckpointError(f'the stored thresholds lack the classes {missing}; re-run evaluate for this model')
        return cls(
            list(class_names),
            np.array([values[n] for n in class_names], dtype=np.float64),
            None if not temps else np.array([temps[n] for n in class_names], dtype=np.float64),
            record.get('method', 'stored'),
            record.get('target_sensitivity'),
            record.get('fitted_on'),
            Calibration.from_meta(record.get('calibration'), class_names),
        )

    @classmethod
    def of_model(cls, meta: dict[str, Any]) -> OperatingPoint:
        """The operating point in `load_model`'s meta, with the model's calibration; warns when none was fitted."""
        names = meta['class_names']
        calibration = Calibration.from_meta(meta.get('calibration'), names)
        op = cls.from_meta(meta.get('thresholds'), names)
        if not op.fitted:
            op.calibration = calibration
        elif _record(op.calibration) != _record(calibration):
            raise CheckpointError(
                f'the stored thresholds were fitted on other probabilities than this model gives (thresholds: '
                f'{_describe(op.calibration)}; model: {_describe(calibration)}); re-run evaluate for this model'
            )
        if not op.fitted:
            warnings.warn(
                'this model has no fitted thresholds (run `hybridmednet evaluate` on it); '
                f'using {DEFAULT_THRESHOLD} for every finding',
                stacklevel=2,
            )
        return op


def _record(calibration: Calibration | None) -> dict[str, Any] | None:
    return None if calibration is None else calibration.to_meta()


def _describe(calibration: Calibration | None) -> str:
    return 'uncalibrated' if calibration is None else f'Platt scaling fitted on {calibration.fitted_on}'
