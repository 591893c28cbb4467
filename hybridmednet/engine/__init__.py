"""Training engine: the loop (`train`), checkpoints (`load_model`) and losses (`build_loss`)."""
from hybridmednet.engine.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from hybridmednet.engine.losses import build_loss
from hybridmednet.engine.trainer import TrainingError, train

__all__ = ['CheckpointError', 'TrainingError', 'build_loss', 'load_checkpoint', 'load_model', 'save_checkpoint',
           'train']
