"""Losses against their definitions: BCE with pos_weight, masking, focal, asymmetric, hierarchical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridmednet.config import Config
from hybridmednet.engine.losses import HierarchicalLoss, MultiLabelLoss, build_loss

torch.manual_seed(0)
LOGITS = torch.randn(6, 4) * 2
TARGET = (torch.rand(6, 4) < 0.4).float()


def test_bce_with_pos_weight_matches_torch():
    pw = torch.tensor([1.0, 2.0, 5.0, 0.5])
    expected = F.binary_cross_entropy_with_logits(LOGITS, TARGET, pos_weight=pw)
    assert torch.allclose(MultiLabelLoss('bce', pw)(LOGITS, TARGET), expected)


@pytest.mark.parametrize('kind', ['bce', 'focal', 'asymmetric'])
def test_masked_labels_do_not_count(kind):
    mask = torch.ones_like(TARGET)
    mask[:, 2] = 0
    loss = MultiLabelLoss(kind)
    flipped = TARGET.clone()
    flipped[:, 2] = 1 - flipped[:, 2]
    assert torch.allclose(loss(LOGITS, TARGET, mask), loss(LOGITS, flipped, mask))
    logits = LOGITS.clone().requires_grad_()
    loss(logits, TARGET, mask).backward()
    assert torch.all(logits.grad[:, 2] == 0) and torch.all(logits.grad[:, :2] != 0)


def test_focal_and_asymmetric_reduce_to_bce():
    bce = MultiLabelLoss('bce')(LOGITS, TARGET)
    assert torch.allclose(MultiLabelLoss('focal', focal_gamma=0.0)(LOGITS, TARGET), bce)
    assert torch.allclose(
        MultiLabelLoss('asymmetric', gamma_pos=0.0, gamma_neg=0.0, clip=0.0)(LOGITS, TARGET), bce, atol=1e-6
    )
    # Focusing down-weights easy examples: the focal loss is never above BCE.
    assert MultiLabelLoss('focal', focal_gamma=2.0)(LOGITS, TARGET) < bce


def test_hierarchical_loss_terms_and_consistency():
    groups = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    fine = torch.tensor([[4.0, -4.0, -4.0, -4.0]])
    loss = HierarchicalLoss(MultiLabelLoss(), MultiLabelLoss(), groups, 0.0, 0.0, 1.0)
    agreeing, disagreeing = torch.tensor([[4.0, -4.0]]), torch.tensor([[-4.0, 4.0]])
    assert loss((fine, agreeing), target) < 1e-3 < loss((fine, disagreeing), target)
    coarse_only = HierarchicalLoss(MultiLabelLoss(), MultiLabelLoss(), groups, 0.0, 1.0, 0.0)
    assert torch.allclose(
        coarse_only((fine, agreeing), target), F.binary_cross_entropy_with_logits(agreeing, torch.tensor([[1.0, 0.0]]))
    )


def test_build_loss_from_config():
    config = Config(LOSS={'type': 'focal', 'pos_weight': [1.0] * 14})
    assert isinstance(build_loss(config), MultiLabelLoss) and build_loss(config).kind == 'focal'
    config.MODEL['hierarchical'] = True
    assert isinstance(build_loss(config), HierarchicalLoss)
    with pytest.raises(ValueError, match='pos_weight'):
        build_loss(Config(LOSS={'pos_weight': [1.0, 2.0]}))


def test_consistency_targets_the_noisy_or_of_the_group():
    # Two members at p = 0.5 each: "any finding in the group" is 0.75, not the maximum 0.5.
    groups = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    fine = torch.tensor([[0.0, 0.0, -20.0]])
    loss = HierarchicalLoss(MultiLabelLoss(), MultiLabelLoss(), groups, 0.0, 0.0, 1.0)
    noisy_or = torch.logit(torch.tensor([[0.75, 1e-6]]))
    at_max = torch.logit(torch.tensor([[0.5, 1e-6]]))
    assert loss((fine, noisy_or), torch.zeros(1, 3)) < 1e-8
    assert loss((fine, at_max), torch.zeros(1, 3)) > 0.03
