"""Deployment: ONNX export verified against PyTorch (`export`), the ONNX Runtime model that predict and
evaluate accept in place of a checkpoint (`runtime`), static int8 (`quantize`) and structured channel
pruning (`prune`).

onnx, onnxruntime, onnxscript and torch-pruning are the `deploy` extra: imported where used, and
their absence is a one-line `DeployError` naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hybridmednet.errors import HybridMedNetError

EXTRA_HINT = "pip install 'hybridmednet[deploy]'"


class DeployError(HybridMedNetError, RuntimeError):
    """A model that cannot be exported, quantised or pruned as asked; the message names the file and the fix."""


def require(module: str) -> ModuleType:
    """Import an optional dependency of the deploy extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DeployError(f'{module} is not installed; it comes with the deploy extra: {EXTRA_HINT}') from None
