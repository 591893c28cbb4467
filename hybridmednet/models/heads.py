"""Classifier heads. They return logits; the loss and `predict` apply the sigmoid."""

from __future__ import annotations

import torch
from torch import nn

from hybridmednet.config import NIH_FINDINGS, Config

# Coarse groups for the hierarchical head on the 14 NIH findings.
NIH_COARSE_GROUPS = {
    'lung_parenchyma': [
        'Atelectasis',
        'Infiltration',
        'Mass',
        'Nodule',
        'Pneumonia',
        'Consolidation',
        'Edema',
        'Emphysema',
        'Fibrosis',
    ],
    'pleura': ['Effusion', 'Pneumothorax', 'Pleural_Thickening'],
    'cardiomediastinal': ['Cardiomegaly', 'Hernia'],
}


class MultiLabelHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class HierarchicalHead(nn.Module):
    """Coarse group logits first; the fine logits read the features and the coarse probabilities.

    `group_matrix[g, k]` is 1 when finding k belongs to group g (the loss builds
    coarse targets and its consistency term from the same matrix).
    """

    group_matrix: torch.Tensor  # buffer [G, K]

    def __init__(self, in_features: int, class_names: list[str], groups: dict[str, list[str]], dropout: float):
        super().__init__()
        self.register_buffer('group_matrix', group_matrix(class_names, groups), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.coarse = nn.Linear(in_features, len(groups))
        self.fine = nn.Linear(in_features + len(groups), len(class_names))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dropout(x)
        coarse = self.coarse(x)
        return self.fine(torch.cat([x, torch.sigmoid(coarse)], dim=1)), coarse


def group_matrix(class_names: list[str], groups: dict[str, list[str]]) -> torch.Tensor:
    """[G, K] membership: 1 where finding k belongs to coarse group g; every finding in exactly one group."""
    matrix = torch.zeros(len(groups), len(class_names))
    for g, (group, members) in enumerate(groups.items()):
        for name in members:
            if name not in class_names:
                raise ValueError(
                    f"MODEL['coarse_groups'] group {group!r} names {name!r}, "
                    f'which is not a class ({", ".join(class_names)})'
                )
            matrix[g, list(class_names).index(name)] = 1.0
    orphans = [n for n, col in zip(class_names, matrix.sum(0)) if col != 1]
    if orphans:
        raise ValueError(f"MODEL['coarse_groups'] must put every class in exactly one group: {orphans}")
    return matrix


def coarse_groups(config: Config) -> dict[str, list[str]]:
    """MODEL['coarse_groups'], else the NIH grouping: the hierarchical head and its loss both take theirs from here."""
    m = config.MODEL
    groups = m['coarse_groups']
    if not groups:
        if sorted(config.class_names) != sorted(NIH_FINDINGS) or m['num_coarse_classes'] != len(NIH_COARSE_GROUPS):
            raise ValueError(
                "MODEL['hierarchical'] with classes other than the 14 NIH findings (or a "
                "num_coarse_classes other than 3) needs MODEL['coarse_groups'] = {group: [class, ...]}"
            )
        groups = NIH_COARSE_GROUPS
    if len(groups) != m['num_coarse_classes']:
        raise ValueError(
            f"MODEL['num_coarse_classes'] is {m['num_coarse_classes']} but "
            f"MODEL['coarse_groups'] has {len(groups)} groups"
        )
    return groups
