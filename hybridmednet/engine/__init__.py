"""Training: the loop (`train`), its schedule, runtime and losses."""

from hybridmednet.engine.losses import build_loss
from hybridmednet.engine.trainer import train

__all__ = ['build_loss', 'train']
