"""Out-of-distribution score: how far an image's features lie from those of the training images.

A chest X-ray classifier gives confident-looking probabilities for any input, a holiday photo
included. The features are the attention maps pooled as the fusion pools them (average and max over
space per scale, concatenated: [B, 2 * sum(channels)]), not the fused vector the head reads: the
fusion's LayerNorm-ed projections discard the activation magnitudes that give a photograph or noise
away (on the quickstart model the fused vector flagged 5 of 14 photographs and 2 of 28 noise images;
the pooled maps flag all of them, and 6 of 380 held-out X-rays, 1.6 %).

The training images' features are modelled as one Gaussian with a Ledoit-Wolf shrinkage covariance
(a plain sample covariance is singular or noisy when the images are not many times the feature
dimension); an image's score is its Mahalanobis distance to that Gaussian. The threshold is a high
quantile of the validation images' distances, not the training images', whose distances are shrunk
by having been fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from hybridmednet.errors import CheckpointError, DataError
from hybridmednet.models.hybrid import HybridMedNet

DEFAULT_QUANTILE = 0.99
FEATURES = 'pooled attention maps (avg, max)'  # stored with the model: a stored Gaussian fits these only


@torch.no_grad()
def ood_features(model: HybridMedNet, x: torch.Tensor) -> torch.Tensor:
    """Features [B, 2 * sum(channels)] (float32, on x's device) of model inputs [B, C, *spatial]: each attention
    map's average and max over space, as DynamicFusion pools them, scale after scale."""
    return pooled_features(model.forward_features(x))


def pooled_features(maps: list[torch.Tensor]) -> torch.Tensor:
    """`ood_features` from attention maps already computed (the one forward pass of inference.batch_outputs and of
    a server); 2D or 3D maps."""
    pooled = [torch.cat([m.flatten(2).mean(2), m.flatten(2).amax(2)], 1) for m in maps]
    return torch.cat(pooled, 1).float()


def _matrix(features: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or not np.isfinite(f).all():
        raise DataError(f'{what}: expected a finite [N, D] feature matrix, got shape {f.shape}')
    return f


@dataclass
class OodModel:
    """A Gaussian over `ood_features` and the distance above which an image is flagged."""

    mean: np.ndarray  # [D]
    precision: np.ndarray  # [D, D], inverse of the shrunk covariance
    threshold: float  # distances above it are flagged
    quantile: float  # of the validation distances, that gave the threshold
    n_train: int = 0
    n_val: int = 0

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    def score(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mahalanobis distance [N] of each row of `features` [N, D] to the training features."""
        f = _matrix(features, 'OodModel.score')
        if f.shape[1] != self.feature_dim:
            raise DataError(f'OodModel.score: features have {f.shape[1]} dimensions, the model {self.feature_dim}')
        d = f - self.mean
        return np.sqrt(np.maximum(np.einsum('nd,de,ne->n', d, self.precision, d), 0.0))

    def flag(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """True [N] where an image lies further from the training images than `threshold`."""
        return self.score(features) > self.threshold

    # -- the record stored with the model: tensors and plain values, no pickle ------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            'mean': torch.from_numpy(self.mean.copy()),
            'precision': torch.from_numpy(self.precision.copy()),
            'threshold': float(self.threshold),
            'quantile': float(self.quantile),
            'feature_dim': self.feature_dim,
            'features': FEATURES,
            'n_train': int(self.n_train),
            'n_val': int(self.n_val),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> OodModel:
        """From `load_model(...)[2]['ood']` (which is None for models stored without one: check first)."""
        mean = torch.as_tensor(state['mean']).double().cpu().numpy()
        precision = torch.as_tensor(state['precision']).double().cpu().numpy()
        dim = int(state['feature_dim'])
        if state.get('features') != FEATURES:
            raise CheckpointError(
                f'the stored OOD model reads features {state.get("features")!r}, this version computes '
                f'{FEATURES!r}; retrain the model (or fit_ood on its training images) to score it'
            )
        if mean.shape != (dim,) or precision.shape != (dim, dim):
            raise CheckpointError(
                f'the stored OOD model is inconsistent: feature_dim {dim}, mean {tuple(mean.shape)}, '
                f'precision {tuple(precision.shape)}'
            )
        return cls(
            mean,
            precision,
            float(state['threshold']),
            float(state['quantile']),
            int(state.get('n_train', 0)),
            int(state.get('n_val', 0)),
        )


def fit_ood(
    features: np.ndarray | torch.Tensor, val_features: np.ndarray | torch.Tensor, quantile: float = DEFAULT_QUANTILE
) -> OodModel:
    """Gaussian on the training `features` [N, D]; threshold = `quantile` of the `val_features` distances."""
    train, val = _matrix(features, 'fit_ood: training features'), _matrix(val_features, 'fit_ood: validation features')
    if train.shape[0] < 2 or val.shape[0] == 0:
        raise DataError(
            f'fit_ood needs at least 2 training and 1 validation feature rows, got {train.shape[0]} and {val.shape[0]}'
        )
    if not 0.0 < quantile < 1.0:
        raise DataError(f'fit_ood: quantile {quantile} must lie in (0, 1)')
    shrunk = LedoitWolf().fit(train)
    model = OodModel(shrunk.location_, shrunk.precision_, 0.0, quantile, train.shape[0], val.shape[0])
    model.threshold = float(np.quantile(model.score(val), quantile))
    return model
