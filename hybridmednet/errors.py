"""One error family: every mistake a user can make raises a `HybridMedNetError` whose message names
the file, row, key or value and says what to do. The command layer catches this base class once and
prints one line; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class HybridMedNetError(Exception):
    """Base of every error caused by input (configs, data, weight files), not by a bug."""


class ConfigError(HybridMedNetError, ValueError):
    """A configuration key or value that cannot be used, named in the message."""


class DataError(HybridMedNetError, ValueError):
    """Dataset files that do not match their format; the message names the file, row or value."""


class ImageReadError(HybridMedNetError, OSError):
    """An image file that cannot be decoded; the message names the file."""


class CheckpointError(HybridMedNetError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


class PretrainedWeightsError(HybridMedNetError, RuntimeError):
    """Pretrained weights that cannot be had or do not fit; the message names the fixes."""


class TrainingError(HybridMedNetError, RuntimeError):
    """A run that cannot go on; the message says what to change."""
