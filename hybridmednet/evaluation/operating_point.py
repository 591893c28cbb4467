"""The operating point stored with a model: per-finding thresholds and temperatures.

Fitted on the validation split by `evaluate`; `to_meta()` is the record that
`checkpoint.write_thresholds` writes into the model files, so that
`load_model(...)[2]['thresholds']` returns it and `predict` needs no other file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridmednet.errors import CheckpointError
from hybridmednet.evaluation.calibration import apply_temperature, fit_temperature
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

    @property
    def fitted(self) -> bool:
        return self.method != 'default'

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
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
    ) -> OperatingPoint:
        """Temperatures first (when asked), then thresholds on the probabilities predict will report."""
        temperatures = fit_temperature(logits, y_true, mask) if temperature_scaling else None
        probs = apply_temperature(logits, temperatures)
        thresholds = choose_thresholds(y_true, probs, mask, method, target_sensitivity, DEFAULT_THRESHOLD, class_names)
        return cls(
            list(class_names),
            thresholds,
            temperatures,
            method,
            target_sensitivity if method == 'sensitivity' else None,
            fitted_on,
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
        )

    @classmethod
    def of_model(cls, meta: dict[str, Any]) -> OperatingPoint:
        """The operating point in `load_model`'s meta, warning when none was fitted."""
        op = cls.from_meta(meta.get('thresholds'), meta['class_names'])
        if not op.fitted:
            warnings.warn(
                'this model has no fitted thresholds (run `hybridmednet evaluate` on it); '
                f'using {DEFAULT_THRESHOLD} for every finding',
                stacklevel=2,
            )
        return op
