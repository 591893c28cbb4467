"""HybridMedNet: multi-label medical image classification on modern backbones."""

from hybridmednet.config import NIH_FINDINGS, Config, load_config
from hybridmednet.errors import ConfigError, HybridMedNetError
from hybridmednet.models.hybrid import HybridMedNet, create_model
from hybridmednet.models.registry import list_backbones

__all__ = [
    'Config',
    'ConfigError',
    'HybridMedNet',
    'HybridMedNetError',
    'NIH_FINDINGS',
    'create_model',
    'list_backbones',
    'load_config',
]
__version__ = '0.1.0'
