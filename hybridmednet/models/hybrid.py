"""HybridMedNet: backbone pyramid -> attention -> dynamic fusion -> multi-label head.

The backbone's spec says whether the model takes images [B, C, H, W] or volumes [B, C, D, H, W];
everything after the backbone works on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hybridmednet.config import Config
from hybridmednet.errors import ConfigError
from hybridmednet.models.attention import PyramidAttention
from hybridmednet.models.fusion import DynamicFusion
from hybridmednet.models.heads import HierarchicalHead, MultiLabelHead, coarse_groups
from hybridmednet.models.registry import get_backbone_spec


class HybridMedNet(nn.Module):
    # Healthy training images [N, C, *spatial] as the model sees them, from whose nearest to an image its heatmaps
    # integrate gradients (evaluation/gradcam.py); stored beside the weights, attached by checkpoint.load_model.
    heatmap_reference: torch.Tensor | None

    def __init__(self, config: Config | None = None):
        super().__init__()
        self.heatmap_reference = None
        config = (config or Config()).validate()
        m = config.MODEL
        self.config = config
        self.class_names = config.class_names
        spec = get_backbone_spec(m['backbone'])
        self.spatial_dims = spec.spatial_dims
        dims = config.DATA.get('spatial_dims', 2)  # DATA's 3D keys: spatial_dims, volume_size
        if dims != spec.spatial_dims:
            kind = 'volumes' if spec.spatial_dims == 3 else 'images'
            raise ConfigError(
                f"MODEL['backbone'] = {m['backbone']!r} takes {kind}: set DATA.spatial_dims = {spec.spatial_dims} "
                f'(it is {dims}) or choose a {dims}D backbone'
            )
        size = config.DATA.get('volume_size') if spec.spatial_dims == 3 else config.DATA['image_size']
        options = {'fpn_channels': m['fpn_channels']} if spec.family == 'resnet' else {}
        self.backbone = spec.build(
            pretrained=m['pretrained'],
            img_size=size,
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
            spec.spatial_dims,
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
        """The 4 maps after attention, NCHW (NCDHW for volumes)."""
        if x.dim() != self.spatial_dims + 2:
            wanted = 'volumes [B, C, D, H, W]' if self.spatial_dims == 3 else 'images [B, C, H, W]'
            raise ValueError(f'{self.config.MODEL["backbone"]} takes {wanted}, got shape {tuple(x.shape)}')
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
    volume_size: Sequence[int] | None = None,
    **model_options: Any,
) -> HybridMedNet:
    """Build a HybridMedNet without writing a Config: `create_model('convnext_tiny', num_classes=14)`, or for
    volumes `create_model('resnet3d_18', pretrained=False, volume_size=[64, 64, 64])`."""
    data: dict[str, Any] = {'image_size': image_size, 'class_names': class_names}
    if get_backbone_spec(name).spatial_dims == 3:
        data['spatial_dims'] = 3
        if volume_size is not None:
            data['volume_size'] = list(volume_size)
    config = Config()
    config.update(
        {
            'MODEL': {'backbone': name, 'num_classes': num_classes, 'pretrained': pretrained, **model_options},
            'DATA': data,
        }
    )
    if class_names is None and num_classes != len(config.class_names):
        config.DATA['class_names'] = [f'class_{i}' for i in range(num_classes)]
    return HybridMedNet(config)
