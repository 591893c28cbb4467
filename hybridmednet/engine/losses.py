"""Multi-label losses. Each takes logits, targets and a label mask (0 = label unknown).

Unknown labels (CheXpert "uncertain" under U-Ignore, findings a dataset never reports)
must not pull the model either way, so every loss is an element-wise term, multiplied
by the mask and averaged over the known labels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridmednet.config import Config
from hybridmednet.errors import ConfigError
from hybridmednet.models.heads import coarse_groups, group_matrix


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the known labels; 0 when a batch has none (the step then carries no signal)."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class MultiLabelLoss(nn.Module):
    """BCE-with-logits, focal (Lin et al. 2017) or asymmetric (Ridnik et al. 2021), with pos_weight.

    `pos_weight[k]` multiplies the positive term of finding k, as in BCEWithLogitsLoss, so rare
    findings (Hernia: 0.2% of NIH) are not drowned by negatives in every variant.
    """

    pos_weight: torch.Tensor | None  # buffer [K]

    def __init__(
        self,
        kind: str = 'bce',
        pos_weight: torch.Tensor | None = None,
        focal_gamma: float = 2.0,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
    ):
        super().__init__()
        if kind not in ('bce', 'focal', 'asymmetric'):
            raise ValueError(f"unknown loss type {kind!r}; choose 'bce', 'focal' or 'asymmetric'")
        self.kind, self.focal_gamma = kind, focal_gamma
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip
        self.register_buffer(
            'pos_weight', None if pos_weight is None else torch.as_tensor(pos_weight).float(), persistent=False
        )

    def elementwise(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.kind == 'asymmetric':
            return self._asymmetric(logits, target)
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction='none')
        if self.kind == 'focal':
            p = torch.sigmoid(logits)
            p_true = p * target + (1 - p) * (1 - target)
            loss = loss * (1 - p_true).pow(self.focal_gamma)
        return loss

    def _asymmetric(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Negatives: probability shifted down by `clip` (easy negatives vanish) and focused harder.
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        pos = F.logsigmoid(logits) * (1 - p).pow(self.gamma_pos)
        if self.pos_weight is not None:
            pos = pos * self.pos_weight
        neg = torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg.pow(self.gamma_neg)
        return -(target * pos + (1 - target) * neg)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_mean(self.elementwise(logits, target), mask)


class HierarchicalLoss(nn.Module):
    """fine + coarse + consistency, weighted by LOSS['fine_weight'/'coarse_weight'/'consistency_weight'].

    A group is positive when any known finding in it is; its label is known when a finding in it
    is known positive or all its findings are known. Consistency asks the coarse probability to
    match the noisy-OR of its group's findings, 1 - prod(1 - p_k): the probability that any of them
    is present if they were independent (the group's maximum is only a lower bound on it), so the
    two heads tell one story.
    """

    groups: torch.Tensor  # buffer [G, K]

    def __init__(
        self,
        fine_loss: MultiLabelLoss,
        coarse_loss: MultiLabelLoss,
        groups: torch.Tensor,
        fine_weight: float = 1.0,
        coarse_weight: float = 0.5,
        consistency_weight: float = 0.1,
    ):
        super().__init__()
        self.fine_loss, self.coarse_loss = fine_loss, coarse_loss
        self.register_buffer('groups', groups.float(), persistent=False)
        self.weights = (fine_weight, coarse_weight, consistency_weight)

    def forward(
        self, outputs: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        fine, coarse = outputs
        mask = torch.ones_like(target) if mask is None else mask
        known_pos = (target * mask) @ self.groups.T > 0
        all_known = (1 - mask) @ self.groups.T == 0
        coarse_target = known_pos.float()
        coarse_mask = (known_pos | all_known).float()
        # Noisy-OR over each group's members: log(1 - p) summed over the group, in log space for stability.
        log_absent = F.logsigmoid(-fine.float()) @ self.groups.T
        consistency = (torch.sigmoid(coarse.float()) - (1 - log_absent.exp())).pow(2).mean()
        w_fine, w_coarse, w_cons = self.weights
        return (
            w_fine * self.fine_loss(fine, target, mask)
            + w_coarse * self.coarse_loss(coarse, coarse_target, coarse_mask)
            + w_cons * consistency
        )


def build_loss(config: Config, pos_weight: torch.Tensor | None = None) -> nn.Module:
    """The loss the config asks for; `pos_weight` (e.g. from the training set) overrides LOSS['pos_weight']."""
    loss_cfg = config.LOSS
    if pos_weight is None and isinstance(loss_cfg['pos_weight'], (list, tuple)):
        pos_weight = torch.tensor(loss_cfg['pos_weight'], dtype=torch.float32)
    if pos_weight is not None and len(pos_weight) != config.MODEL['num_classes']:
        raise ConfigError(f"LOSS['pos_weight'] has {len(pos_weight)} values for {config.MODEL['num_classes']} classes")
    options = (loss_cfg['focal_gamma'], loss_cfg['asl_gamma_pos'], loss_cfg['asl_gamma_neg'], loss_cfg['asl_clip'])
    fine = MultiLabelLoss(loss_cfg['type'], pos_weight, *options)
    if not config.MODEL['hierarchical']:
        return fine
    return HierarchicalLoss(
        fine,
        MultiLabelLoss(loss_cfg['type'], None, *options),
        group_matrix(config.class_names, coarse_groups(config)),
        loss_cfg['fine_weight'],
        loss_cfg['coarse_weight'],
        loss_cfg['consistency_weight'],
    )
