"""Checkout-compatible import path: `from models.hybrid_med_net import HybridMedNet`."""

from hybridmednet.models.hybrid import HybridMedNet, create_model

__all__ = ['HybridMedNet', 'create_model']
