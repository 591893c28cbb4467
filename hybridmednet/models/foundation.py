"""Foundation encoders as pyramids, all through the isotropic adapter: DINOv2 and RAD-DINO (timm's ViT), SAM and
MedSAM (timm's SAM image encoder).

DINOv2 and SAM weights come from timm's hub or cache (MODEL.pretrained = True) or a local file in timm's or
the original layout. RAD-DINO and MedSAM come only as local files in their publishers' layouts: a
transformers `Dinov2Model` (microsoft/rad-dino's model.safetensors) and a segment_anything checkpoint
(medsam_vit_b.pth), mapped onto timm's names here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import checkpoint_filter_fn as sam_checkpoint_filter
from torch import Tensor, nn

from hybridmednet.errors import PretrainedWeightsError
from hybridmednet.models.backbones import (
    StateDict,
    create_timm_model,
    load_local_weights,
    load_timm_state,
    timm_features,
)
from hybridmednet.models.isotropic import IsotropicPyramid, check_image_size


class TimmIsotropicPyramid(IsotropicPyramid):
    """A timm ViT (DINOv2) or SAM image encoder. With `normalise` every tap passes through the final LayerNorm,
    as in DINOv2's own get_intermediate_layers(norm=True); SAM has no final norm (its neck narrows the width,
    so it is dropped) and its taps are the blocks' outputs, as in ViTDet."""

    def __init__(self, model: nn.Module, normalise: bool):
        dim = timm_features(model).feature_info[-1]['num_chs']
        super().__init__(model, dim, 'blocks', 'norm' if normalise else None)
        self.normalise = normalise
        timm_features(model).prune_intermediate_layers(self._indices, prune_norm=not normalise, prune_head=True)

    @property
    def _indices(self) -> list[int]:
        return [i - 1 for i in self.indices]  # timm counts blocks from 0

    def taps(self, x: Tensor) -> list[Tensor]:
        return timm_features(self.trunk).forward_intermediates(
            x, indices=self._indices, norm=self.normalise, intermediates_only=True, output_fmt='NCHW'
        )


# -- DINOv2 and RAD-DINO ----------------------------------------------------------------------------------------
def build_dinov2(
    spec: Any, pretrained: bool | str = False, img_size: int = 224, drop_path_rate: float = 0.0, **options: Any
) -> TimmIsotropicPyramid:
    """DINOv2 at any multiple of 14 px; pretrained weights (trained at 518) have their position table resized
    once, on load. Other sizes at run time are resized on the fly."""
    check_image_size(spec.name, img_size, 14)
    model = create_timm_model(
        spec.timm_name, pretrained, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path_rate, **options
    )
    return TimmIsotropicPyramid(model, normalise=True)


def build_rad_dino(
    spec: Any, pretrained: bool | str = False, img_size: int = 518, drop_path_rate: float = 0.0, **options: Any
) -> TimmIsotropicPyramid:
    """RAD-DINO: DINOv2-B's architecture, weights from a local transformers file."""
    if pretrained is True:
        raise PretrainedWeightsError(
            f'{spec.name}: there is no hub source here for RAD-DINO; download model.safetensors from '
            "https://huggingface.co/microsoft/rad-dino and set MODEL['pretrained'] = '/path/to/model.safetensors', "
            "or MODEL['pretrained'] = False"
        )
    check_image_size(spec.name, img_size, 14)
    model = create_timm_model(
        spec.timm_name, False, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path_rate, **options
    )
    if pretrained:
        load_local_weights(model, pretrained, dinov2_from_transformers)
    return TimmIsotropicPyramid(model, normalise=True)


_TRANSFORMERS_DINOV2 = (  # transformers Dinov2Model name -> timm VisionTransformer name (query/key/value: qkv)
    (r'embeddings\.cls_token$', 'cls_token'),
    (r'embeddings\.position_embeddings$', 'pos_embed'),
    (r'embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$', r'blocks.\1.ls\2.gamma'),
    (r'encoder\.layer\.(\d+)\.attention\.output\.dense\.', r'blocks.\1.attn.proj.'),
    (r'encoder\.layer\.(\d+)\.(norm[12]|mlp\.fc[12])\.', r'blocks.\1.\2.'),
    (r'layernorm\.', 'norm.'),
)


def dinov2_from_transformers(state: StateDict, source: str) -> StateDict:
    """A transformers `Dinov2Model` state dict (RAD-DINO's) under timm's names: query, key and value stacked into
    qkv, the mask token (used only in masked pretraining) dropped. Keys that map to nothing are kept as they
    are, and a block missing one of query/key/value keeps the others' names, so a mismatch names them."""
    if 'embeddings.patch_embeddings.projection.weight' not in state:
        raise PretrainedWeightsError(
            f"{source} is not in the transformers Dinov2Model layout of RAD-DINO's model.safetensors (no "
            f"'embeddings.patch_embeddings.projection.weight'; {_layout(state)}); use model.safetensors from "
            'https://huggingface.co/microsoft/rad-dino'
        )
    out: StateDict = {}
    qkv: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        if key == 'embeddings.mask_token':
            continue
        attention = re.fullmatch(r'encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)', key)
        if attention:
            block, part, kind = attention.groups()
            qkv.setdefault(f'blocks.{block}.attn.qkv.{kind}', {})[part] = (key, value)
            continue
        for pattern, name in _TRANSFORMERS_DINOV2:
            renamed, found = re.subn('^' + pattern, name, key)
            if found:
                out[renamed] = value
                break
        else:
            out[key] = value
    for key, parts in qkv.items():
        if len(parts) == 3:
            out[key] = torch.cat([parts[p][1] for p in ('query', 'key', 'value')])
        else:
            out.update(dict(parts.values()))
    return out


# -- SAM and MedSAM -----------------------------------------------------------------------------------------------
def build_sam(
    spec: Any, pretrained: bool | str = False, img_size: int = 1024, drop_path_rate: float = 0.0, **options: Any
) -> TimmIsotropicPyramid:
    """SAM's image encoder at any multiple of 16 px: weights from timm's hub or cache, or a local file in timm's
    or segment_anything's layout."""
    return _sam_pyramid(spec, pretrained, img_size, drop_path_rate, options, segment_anything_only=False)


def build_medsam(
    spec: Any, pretrained: bool | str = False, img_size: int = 1024, drop_path_rate: float = 0.0, **options: Any
) -> TimmIsotropicPyramid:
    """MedSAM: SAM-B's encoder, weights from a local segment_anything checkpoint (medsam_vit_b.pth)."""
    if pretrained is True:
        raise PretrainedWeightsError(
            f'{spec.name}: there is no hub source here for MedSAM; download medsam_vit_b.pth (linked from '
            "https://github.com/bowang-lab/MedSAM) and set MODEL['pretrained'] = '/path/to/medsam_vit_b.pth', "
            "or MODEL['pretrained'] = False"
        )
    return _sam_pyramid(spec, pretrained, img_size, drop_path_rate, options, segment_anything_only=True)


def _sam_pyramid(
    spec: Any,
    pretrained: bool | str,
    img_size: int,
    drop_path_rate: float,
    options: dict[str, Any],
    segment_anything_only: bool,
) -> TimmIsotropicPyramid:
    """Built for `img_size`, so a smaller size is faster: the weights' position table and global-attention
    relative positions (trained at 1024 px) are resized on load, as SAM resizes them at run time."""
    check_image_size(spec.name, img_size, 16)
    # segment_anything's blocks normalise with eps 1e-6; timm's SAM keeps LayerNorm's 1e-5 unless told
    kwargs = {'drop_path_rate': drop_path_rate, 'norm_layer': partial(nn.LayerNorm, eps=1e-6), **options}
    model = create_timm_model(spec.timm_name, False, img_size=img_size, **kwargs)
    if pretrained is True:  # timm's weights load at their own 1024 px, then move to this size
        native = create_timm_model(spec.timm_name, True, **kwargs)
        load_timm_state(model, fit_sam_positions(native.state_dict(), model), f"timm's {spec.timm_name} weights")
    elif pretrained:
        load_local_weights(model, pretrained, sam_converter(model, segment_anything_only))
    return TimmIsotropicPyramid(model, normalise=False)


def sam_converter(model: nn.Module, segment_anything_only: bool) -> Callable[[StateDict, str], StateDict]:
    """The conversion of a SAM weights file for `model`: a segment_anything checkpoint (`image_encoder.*`; the
    prompt encoder and mask decoder are ignored, and counted) or timm's layout, positions fitted to the model."""

    def convert(state: StateDict, source: str) -> StateDict:
        encoder = sum(key.startswith('image_encoder.') for key in state)
        if segment_anything_only and not encoder:
            raise PretrainedWeightsError(
                f'{source} is not a segment_anything checkpoint like medsam_vit_b.pth (no image_encoder.* keys; '
                f'{_layout(state)})'
            )
        if encoder and encoder < len(state):
            ignored = len(state) - encoder
            print(f'{source}: {ignored} keys outside image_encoder.* (prompt encoder, mask decoder) ignored')
        return fit_sam_positions(sam_checkpoint_filter(state, model), model)

    return convert


def fit_sam_positions(state: StateDict, model: nn.Module) -> StateDict:
    """SAM's position tables resized to the model's grid, with the operations SAM itself applies at run time to
    another size: bicubic for the absolute table, linear for the global blocks' relative positions."""
    own = model.state_dict()
    fitted = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape or target.ndim != value.ndim:
            continue  # a mismatch that is not a resizing is check_fits' to report
        if key == 'pos_embed':
            fitted[key] = resample_abs_pos_embed_nhwc(value, list(target.shape[1:3]))
        elif key.endswith(('.attn.rel_pos_h', '.attn.rel_pos_w')):
            length = target.shape[0]
            rows = F.interpolate(value.reshape(1, value.shape[0], -1).permute(0, 2, 1), size=length, mode='linear')
            fitted[key] = rows.reshape(-1, length).permute(1, 0)
    return fitted


def _layout(state: StateDict) -> str:
    """What a weights file holds, in words, pointing to the backbone that reads it where it is one of ours."""
    if 'embeddings.patch_embeddings.projection.weight' in state:
        return 'it is a transformers Dinov2Model such as RAD-DINO: use MODEL.backbone = rad_dino'
    if any(key.startswith('image_encoder.') for key in state):
        return 'it is a segment_anything checkpoint such as MedSAM: use MODEL.backbone = medsam_vit_b'
    return f'its keys begin {sorted(state)[:3]}'
