"""HybridMedNet: multi-label medical image classification on modern backbones."""

from pathlib import Path
from typing import Any

from hybridmednet.config import NIH_FINDINGS, Config, load_config
from hybridmednet.errors import ConfigError, HybridMedNetError
from hybridmednet.models.hybrid import HybridMedNet, create_model
from hybridmednet.models.registry import list_backbones


def from_pretrained(path_or_repo_id: str | Path, **options: Any) -> HybridMedNet:
    """A model package folder or Hugging Face Hub repo id -> the model (deploy.hub.from_pretrained)."""
    from hybridmednet.deploy.hub import from_pretrained as load  # the deploy layer, imported when used

    return load(path_or_repo_id, **options)


def push_to_hub(folder: str | Path, repo_id: str, **options: Any) -> str:
    """Upload a model package folder to the Hugging Face Hub (deploy.hub.push_to_hub)."""
    from hybridmednet.deploy.hub import push_to_hub as push

    return push(folder, repo_id, **options)


__all__ = [
    'Config',
    'ConfigError',
    'HybridMedNet',
    'HybridMedNetError',
    'NIH_FINDINGS',
    'create_model',
    'from_pretrained',
    'list_backbones',
    'load_config',
    'push_to_hub',
]
__version__ = '0.1.0'
