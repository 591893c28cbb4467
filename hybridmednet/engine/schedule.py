"""The learning-rate schedule: a pure function of the optimizer step, so a resumed run sees the
same rates as an uninterrupted one."""

from __future__ import annotations

import math
import warnings
from typing import TypedDict

from hybridmednet.config import Config


class ScheduleState(TypedDict):
    scale: float
    best: float
    bad_epochs: int


class LRSchedule:
    """Learning-rate factor per optimizer step: linear warmup, then cosine / step decay, or plateau cuts.

    A pure function of the step (plus the plateau bookkeeping in `state_dict`), so a resumed run
    sees the same rates as an uninterrupted one.
    """

    def __init__(
        self,
        kind: str,
        total_steps: int,
        warmup_steps: int,
        steps_per_epoch: int,
        step_size: int = 10,
        gamma: float = 0.1,
        patience: int = 3,
    ):
        self.kind, self.total, self.steps_per_epoch = kind, max(total_steps, 1), max(steps_per_epoch, 1)
        self.warmup = min(warmup_steps, self.total - 1) if kind != 'none' else 0
        self.step_size, self.gamma, self.patience = step_size, gamma, patience
        self.scale, self.best, self.bad_epochs = 1.0, -math.inf, 0

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == 'cosine':
            progress = (step - self.warmup) / max(self.total - self.warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if self.kind == 'step':
            return self.gamma ** (step // (self.step_size * self.steps_per_epoch))
        return self.scale  # plateau (cut in epoch_end) or none

    def epoch_end(self, metric: float) -> None:
        """Plateau: cut the rate by `gamma` after `patience` epochs without a better metric."""
        if self.kind != 'plateau':
            return
        if metric > self.best:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.scale, self.bad_epochs = self.scale * self.gamma, 0

    def state_dict(self) -> ScheduleState:
        return {'scale': self.scale, 'best': self.best, 'bad_epochs': self.bad_epochs}

    def load_state_dict(self, state: ScheduleState) -> None:
        self.scale, self.best, self.bad_epochs = state['scale'], state['best'], state['bad_epochs']


def build_schedule(config: Config, steps_per_epoch: int) -> LRSchedule:
    """TRAIN's schedule; warmup as long as the run or longer is cut to a tenth of it, with a warning
    (otherwise the rate would reach its peak at the last step)."""
    t = config.TRAIN
    total, warmup = t['epochs'] * steps_per_epoch, round(t['warmup_epochs'] * steps_per_epoch)
    if t['lr_scheduler'] != 'none' and warmup >= total > 1:
        warnings.warn(
            f'TRAIN.warmup_epochs ({t["warmup_epochs"]}) is not shorter than the run '
            f'({t["epochs"]} epochs): warmup shortened to {max(total // 10, 1)} steps',
            stacklevel=2,
        )
        warmup = max(total // 10, 1)
    return LRSchedule(
        t['lr_scheduler'], total, warmup, steps_per_epoch, t['step_size'], t['gamma'], t['plateau_patience']
    )
