"""HybridMedNet: backbone pyramid -> attention -> dynamic fusion -> multi-label head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hybridmednet.config import Config
from hybridmednet.models.attention import PyramidAttention
from hybridmednet.models.fusion import DynamicFusion
from hybridmednet.models.heads import HierarchicalHead, MultiLabelHead, coarse_groups
from hybridmednet.models.registry import get_backbone_spec


class HybridMedNet(nn.Module):
    def __init__(self, config: Config | None = None):
        super().__init__()
        config = (config or Config()).validate()
        m = config.MODEL
        self.config = config
        self.class_names = config.class_names
        spec = get_backbone_spec(m['backbone'])
        options = {'fpn_channels': m['fpn_channels']} if spec.family == 'resnet' else {}
        self.backbone = spec.build(
            pretrained=m['pretrained'],
            img_size=config.DATA['image_size'],
            drop_path_rate=m['drop_path_rate'],
            **options,
        )
        channels = self.backbone.channels
        self.attention = PyramidAttention(
            channels,
            self.backbone.reductions,
            m['use_modern_attention'],
            m['use_cross_scale_attention'],
            m['num_heads'],
            m['attention_pool_size'],
        )
        self.fusion = DynamicFusion(channels, m['fusion_channels'])
        self.head: HierarchicalHead | MultiLabelHead
        if m['hierarchical']:
            self.head = HierarchicalHead(m['fusion_channels'], self.class_names, coarse_groups(config), m['dropout'])
        else:
            self.head = MultiLabelHead(m['fusion_channels'], m['num_classes'], m['dropout'])

    @property
    def hierarchical(self) -> bool:
        return isinstance(self.head, HierarchicalHead)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 4 NCHW maps after attention (where Grad-CAM looks)."""
        return self.attention(self.backbone(x))

    def forward_head(self, maps: list[torch.Tensor], return_coarse: bool = False):
        out = self.head(self.fusion(maps))
        if self.hierarchical:
            return out if return_coarse else out[0]
        if return_coarse:
            raise ValueError("return_coarse=True needs MODEL['hierarchical'] = True")
        return out

    def forward(self, x: torch.Tensor, return_coarse: bool = False):
        """Logits [B, K]; with return_coarse (hierarchical head) a (fine, coarse) pair."""
        return self.forward_head(self.forward_features(x), return_coarse)


def create_model(
    name: str,
    num_classes: int = 14,
    pretrained: bool | str = False,
    image_size: int = 224,
    class_names: list[str] | None = None,
    **model_options: Any,
) -> HybridMedNet:
    """Build a HybridMedNet without writing a Config: `create_model('convnext_tiny', num_classes=14)`."""
    config = Config()
    config.update(
        {
            'MODEL': {'backbone': name, 'num_classes': num_classes, 'pretrained': pretrained, **model_options},
            'DATA': {'image_size': image_size, 'class_names': class_names},
        }
    )
    if class_names is None and num_classes != len(config.class_names):
        config.DATA['class_names'] = [f'class_{i}' for i in range(num_classes)]
    return HybridMedNet(config)
