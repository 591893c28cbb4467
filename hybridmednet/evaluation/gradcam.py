"""Grad-CAM on the model's attended feature pyramid, for every backbone family.

`HybridMedNet.forward_features` returns the four scales as NCHW maps after attention, Swin and
Mamba included (each backbone converts its token layout at its own boundary), so no
reshape_transform per family and no pytorch-grad-cam are needed. Grad-CAM weighs each map's
channels by the mean gradient of one finding's logit and keeps the positive evidence. The fused
head draws on every scale, so the heatmap averages the scales, each normalised first: otherwise
the coarsest map's larger values drown the finer maps, which localise best. Maps fewer than
`MIN_SIDE` cells across cannot place anything and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw

from hybridmednet.data.transforms import square_box

MIN_SIDE = 4


def grad_cam(
    model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], scales: Sequence[int] | None = None
) -> np.ndarray:
    """Heatmaps [len(classes), H, W] in [0, 1] for one preprocessed image [3, H, W].

    `scales` picks pyramid levels (0 = stride 4 ... 3 = stride 32); by default every level at least
    `MIN_SIDE` cells across (the finest alone when none is). A class with no positive evidence
    gets an all-zero map.
    """
    x = image.unsqueeze(0) if image.dim() == 3 else image
    if x.shape[0] != 1:
        raise ValueError(f'grad_cam takes one image, got a batch of {x.shape[0]}')
    size = x.shape[-2:]
    # An input that requires grad gives the maps a graph even when every weight is frozen.
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        maps = model.forward_features(x)
        if scales is None:
            scales = [i for i, m in enumerate(maps) if min(m.shape[-2:]) >= MIN_SIDE] or [0]
        chosen = [maps[i] for i in scales]
        logits = model.forward_head(maps)
        cams = []
        for c in classes:
            grads = torch.autograd.grad(logits[0, c], chosen, retain_graph=True)
            per_scale = torch.cat(
                [
                    F.interpolate(
                        F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)),
                        size=size,
                        mode='bilinear',
                        align_corners=False,
                    )
                    for a, g in zip(chosen, grads)
                ]
            )[:, 0]
            cams.append(_unit_max(per_scale).mean(0).detach())
    out = torch.stack(cams) if cams else torch.zeros(0, *size)
    return _unit_max(out).cpu().numpy()


def _unit_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map [N, H, W] divided by its maximum (all-zero maps stay zero)."""
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def overlay(
    image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, label: str | None = None, max_side: int = 1024
) -> Image.Image:
    """The grey image [H, W] in [0, 1] with the heatmap blended on top in 'jet'.

    The heatmap covers the letterboxed square the model saw (transforms.fit_square): the part over the
    image is cut out before it is resized onto the image. Images larger than `max_side` (a 3000-pixel
    DICOM) are shrunk first: the heatmap has far less detail.
    """
    cam = np.asarray(cam, dtype=np.float32)
    top, left, ch, cw = square_box(image.shape[0], image.shape[1], cam.shape[-1])
    cam = cam[top : top + ch, left : left + cw]
    if max(image.shape) > max_side:
        scale = max_side / max(image.shape)
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = np.asarray(Image.fromarray(image.astype(np.float32), mode='F').resize(size, Image.BILINEAR))
    h, w = image.shape
    cam = (
        F.interpolate(
            torch.from_numpy(np.ascontiguousarray(cam))[None, None], size=(h, w), mode='bilinear', align_corners=False
        )[0, 0]
        .clamp(0, 1)
        .numpy()
    )
    heat = colormaps['jet'](cam)[..., :3]
    grey = np.repeat(image[..., None], 3, axis=2)
    blended = (1 - alpha * cam[..., None]) * grey + alpha * cam[..., None] * heat
    picture = Image.fromarray(np.clip(blended * 255, 0, 255).astype(np.uint8))
    if label:
        draw = ImageDraw.Draw(picture)
        draw.rectangle((0, 0, 8 + 7 * len(label), 16), fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255))
    return picture


def save_overlays(
    model: torch.nn.Module,
    tensor: torch.Tensor,
    image: np.ndarray,
    classes: Sequence[int],
    labels: Sequence[str],
    paths: Sequence[str | Path],
) -> list[Path]:
    """One overlay PNG per class: `labels[i]` is written on it, `paths[i]` is where it goes."""
    cams = grad_cam(model, tensor, classes)
    out = []
    for cam, label, path in zip(cams, labels, paths):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        overlay(image, cam, label=label).save(path)
        out.append(path)
    return out
