"""Heatmaps of where a finding's evidence lies: HiResCAM on the backbone's trunk, for every backbone family.

Chosen by measurement against the sample's lesion boxes (evaluation/localization.py,
benchmarks/bench_localization.py, docs/benchmarks.md). On the demo model the pointing game went from
0.06 (Grad-CAM on the attended pyramid, which this replaces) to 0.37 (class-blind map 0.29).

- The trunk's stage outputs, not the attended pyramid. The trained fusion puts almost all its weight on
  the stride-32 map (3 x 3 cells at 96 px), so the finer attended maps get near-zero gradients and their
  heatmaps are noise that looked the same for every finding. The trunk's finer stages feed its coarser
  ones, so their gradients carry the finding's evidence at fine resolution. The trunk is the ResNet
  under the FPN (`backbone.body`), else the backbone's own pyramid (for CNNs, the stages' outputs).
- HiResCAM (Draelos & Carin 2020): gradient times activation per location, summed over channels,
  instead of Grad-CAM's gradient averaged over the map: the fusion max-pools each channel, so evidence
  sits at particular places, and averaging the gradient spreads it over the whole map (Grad-CAM on the
  same maps: 0.05).
- Positive evidence only; each level is normalised to its maximum and the levels averaged (weighting
  them by their summed evidence measured worse). Maps fewer than `MIN_SIDE` cells across cannot place
  anything and are left out.
- Evidence relative to a healthy reference: the gradient times the activations' difference from their
  mean over training images without a finding (stored with the model at the end of training, `reference`),
  not times the activations themselves. Gradient times activation attributes the whole logit, and most
  of it lies in anatomy every film has (diaphragm, heart border); the difference keeps what this image
  has that a normal one lacks. Pointing game 0.24 -> 0.37 on the demo model, 0.27 -> 0.39 on the
  CBAM-only one. A model stored without a reference gets plain HiResCAM.
- The outer ring of cells of each level is left out. Those cells see the convolutions' zero padding,
  and their activations (and the evidence through them) are about the image as a whole, not a place:
  on the demo model half of the heatmaps peaked on the image's edge (in its outer 4 px of 96), outside the body.
  Leaving the ring out raised the pointing game from 0.17 to 0.24 (class-blind map 0.18).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw

from hybridmednet.data.transforms import square_box

MIN_SIDE = 6  # cells across a level must have to be used: 4 once the outer ring is left out
REFERENCE_IMAGES = 256  # training images without a finding averaged into the heatmaps' reference


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output maps the heatmaps are computed on: the ResNet under an FPN, else the backbone."""
    backbone = model.get_submodule('backbone')
    return getattr(backbone, 'body', backbone)


def grad_cam(
    model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], scales: Sequence[int] | None = None
) -> np.ndarray:
    """Heatmaps [len(classes), *spatial] in [0, 1] for one preprocessed image [C, H, W] or volume [C, D, H, W].

    `scales` picks the trunk's levels (0 = stride 4 ... 3 = stride 32); by default every level at least
    `MIN_SIDE` cells across, without its outer ring of cells (the finest, whole, when none is that large). A
    class with no positive evidence gets an all-zero map. Relative to the model's `heatmap_reference` when it
    has one (load_model attaches the stored one).
    """
    if image.dim() not in (3, 4):
        raise ValueError(f'grad_cam takes one image [C, H, W] or volume [C, D, H, W], got shape {tuple(image.shape)}')
    logits, maps = forward_with_trunk(model, model, image.unsqueeze(0))
    return cams_of_row(logits, maps, 0, classes, image.shape[1:], scales, reference=reference_of(model))


def reference_of(model: torch.nn.Module | None) -> list[torch.Tensor] | None:
    """The trunk maps' healthy reference attached to `model` (checkpoint.load_model attaches the stored one)."""
    return getattr(model, 'heatmap_reference', None)


def reference_rows(labels: np.ndarray, mask: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, str]:
    """Which images of a split ([N, K] labels and mask) the healthy reference averages, and what they are: up to
    `REFERENCE_IMAGES` evenly spaced ones whose every finding is known and negative (a 'No Finding' class
    aside), or, when fewer than a tenth of that are (every image has a class), as many of all images."""
    findings = [k for k, name in enumerate(class_names) if name != 'No Finding']
    healthy = np.flatnonzero((mask[:, findings] > 0).all(1) & (labels[:, findings] < 0.5).all(1))
    if len(healthy) >= REFERENCE_IMAGES // 10:
        rows, what = healthy, 'without a finding'
    else:
        rows, what = np.arange(len(labels)), 'all (too few without a finding)'
    if len(rows) > REFERENCE_IMAGES:
        rows = rows[np.linspace(0, len(rows) - 1, REFERENCE_IMAGES).round().astype(int)]
    return rows, what


def reference_entry(model: torch.nn.Module, batches: Iterable[torch.Tensor], what: str) -> dict[str, Any]:
    """The healthy reference to store with a model: its trunk maps averaged over the images of `batches`
    ([B, C, *spatial], as validation sees them: `reference_rows` picks which), `what` saying which they are."""
    total: list[torch.Tensor] | None = None
    n = 0
    for images in batches:
        sums = [m.float().sum(0, keepdim=True) for m in trunk_maps(model, images)]
        total, n = (sums if total is None else [t + m for t, m in zip(total, sums)]), n + len(images)
    if total is None:
        raise ValueError('the heatmap reference needs at least one image')
    return {**{f'level_{i}': (m / n).cpu() for i, m in enumerate(total)}, 'n_images': n, 'images': what}


def reference_fits(model: torch.nn.Module, image: torch.Tensor) -> bool:
    """Whether the model's healthy reference has the trunk maps of `image` [C, *spatial] (the input size it was
    fitted at); True for a model without one."""
    reference = reference_of(model)
    return reference is None or _shapes(reference) == _shapes(trunk_maps(model, image.unsqueeze(0)))


def _shapes(maps: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """Each map's shape but the batch dimension: what a reference and an image's trunk maps must share."""
    return [tuple(m.shape[1:]) for m in maps]


def forward_with_trunk(
    model: torch.nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor
) -> tuple[Any, list[torch.Tensor]]:
    """`run(x)` with gradients on, and the trunk's maps it computed (with their graph): one pass that serves
    both the scores and the heatmaps of a batch."""
    # An input that requires grad gives the maps a graph even when every weight is frozen.
    with torch.enable_grad():
        return _run_with_trunk(model, run, x.detach().requires_grad_(True))


def trunk_maps(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The trunk's maps of inputs [B, C, *spatial], without gradients (the model runs whole: the trunk may be
    a module inside its backbone)."""
    with torch.no_grad():
        return _run_with_trunk(model, model, x)[1]


def _run_with_trunk(
    model: torch.nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor
) -> tuple[Any, list[torch.Tensor]]:
    """`run(x)` and the maps the model's trunk output on the way."""
    captured: list[list[torch.Tensor]] = []
    hook = trunk(model).register_forward_hook(lambda module, args, out: captured.append(list(out)))
    try:
        out = run(x)
    finally:
        hook.remove()
    return out, captured[0]


def cams_of_row(
    logits: torch.Tensor,
    maps: list[torch.Tensor],
    row: int,
    classes: Sequence[int],
    size: Sequence[int],
    scales: Sequence[int] | None = None,
    pool: Executor | None = None,
    reference: Sequence[torch.Tensor] | None = None,
) -> np.ndarray:
    """HiResCAM maps [len(classes), *size] of image `row` of a batch, from `forward_with_trunk`'s logits [B, K]
    and trunk maps (the images of a batch do not mix in eval mode, so the other rows get no gradient).

    With `pool`, the classes' backward passes run on its threads side by side (autograd allows concurrent
    passes over one retained graph); the server uses it where it measures faster (serve/inference.py).
    With `reference` (the trunk maps [1, C, *cells] of `reference_entry`), the gradient multiplies the
    activations' difference from it."""
    mode = 'bilinear' if len(size) == 2 else 'trilinear'
    if scales is None:
        scales = [i for i, m in enumerate(maps) if min(m.shape[2:]) >= MIN_SIDE] or [0]
    chosen = [maps[i] for i in scales]
    if reference is not None and _shapes(reference) != _shapes(maps):
        raise ValueError(
            f'the heatmap reference has maps {_shapes(reference)} but this image gives {_shapes(maps)}: '
            'heatmaps need the input size the model was trained at'
        )
    activations = [  # of this row only: a server calls this once per row of its batch
        m[row : row + 1].detach() - (reference[i].to(m.device, m.dtype) if reference is not None else 0)
        for i, m in zip(scales, chosen)
    ]
    inner = [_inner_cells(m.shape[2:], m.device) if min(m.shape[2:]) >= MIN_SIDE else 1.0 for m in chosen]

    def cam_of(c: int) -> torch.Tensor:
        with torch.enable_grad():  # the caller's grad mode is not a pool thread's: the same in both
            target = logits[row, c]
        grads = torch.autograd.grad(target, chosen, retain_graph=True)
        with torch.no_grad():
            per_scale = torch.cat(
                [
                    F.interpolate(
                        F.relu((g[row : row + 1] * a).sum(1, keepdim=True)) * ring,
                        size=list(size),
                        mode=mode,
                        align_corners=False,
                    )
                    for a, g, ring in zip(activations, grads, inner)
                ]
            )[:, 0]
            return _unit_max(per_scale).mean(0)

    cams = list(pool.map(cam_of, classes)) if pool is not None and len(classes) > 1 else [cam_of(c) for c in classes]
    out = torch.stack(cams) if cams else torch.zeros(0, *size)
    return _unit_max(out).detach().cpu().numpy()


def _inner_cells(cells: Sequence[int], device: torch.device) -> torch.Tensor:
    """1 on a level's cells [*cells] except its outermost ring, 0 there (where the zero padding shows)."""
    mask = torch.zeros(*cells, device=device)
    mask[tuple(slice(1, -1) for _ in cells)] = 1.0
    return mask


def _unit_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map [N, *spatial] divided by its maximum (all-zero maps stay zero)."""
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (maps.dim() - 1))


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
    image = shrink(image, max_side)
    h, w = image.shape
    cam = (
        F.interpolate(
            torch.from_numpy(np.ascontiguousarray(cam))[None, None], size=(h, w), mode='bilinear', align_corners=False
        )[0, 0]
        .clamp(0, 1)
        .numpy()
    )
    return _blend(image, cam, alpha, label)


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """The grey image [H, W] at most `max_side` pixels on its longer side (bilinear), else as it is."""
    if max(image.shape) <= max_side:
        return image
    scale = max_side / max(image.shape)
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image.astype(np.float32), mode='F').resize(size, Image.Resampling.BILINEAR))


def _blend(image: np.ndarray, cam: np.ndarray, alpha: float, label: str | None) -> Image.Image:
    """A grey image [H, W] in [0, 1] and a heatmap of the same size -> RGB picture, `label` top left."""
    # in float32, broadcasting the grey image: 3 ms for 512 x 512 instead of 12 (a server's answer waits on it)
    weight = alpha * np.asarray(cam, dtype=np.float32)[..., None]
    heat = colormaps['jet'](cam)[..., :3].astype(np.float32)
    blended = (1 - weight) * np.asarray(image, dtype=np.float32)[..., None] + weight * heat
    picture = Image.fromarray(np.clip(blended * 255, 0, 255).astype(np.uint8))
    if label:
        draw = ImageDraw.Draw(picture)
        draw.rectangle((0, 0, 8 + 7 * len(label), 16), fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255))
    return picture


def volume_montage(
    volume: np.ndarray, cam: np.ndarray, alpha: float = 0.45, label: str | None = None, panel: int = 256
) -> Image.Image:
    """Axial, coronal and sagittal slices through the heatmap's peak, side by side, heatmap blended on,
    each slice enlarged (bilinear) to `panel` pixels on its longer side.

    `volume` [D, H, W] is the model's input grid in RAS order (data/volumes.py: D inferior->superior,
    H posterior->anterior, W patient left->right), `cam` the heatmap on the same grid or a coarser one.
    Slices are shown as radiologists read them: superior and anterior up, the patient's right on the left.
    """
    volume = np.asarray(volume, dtype=np.float32)
    low, high = float(volume.min()), float(volume.max())
    volume = (volume - low) / (high - low) if high > low else np.zeros_like(volume)
    cam = (
        F.interpolate(
            torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None],
            size=volume.shape,
            mode='trilinear',
            align_corners=False,
        )[0, 0]
        .clamp(0, 1)
        .numpy()
    )
    z, y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    views = [  # (image, heatmap) per plane, flipped for display
        (lambda a: np.flipud(np.fliplr(a[z])), 'axial'),
        (lambda a: np.flipud(np.fliplr(a[:, y, :])), 'coronal'),
        (lambda a: np.flipud(np.fliplr(a[:, :, x])), 'sagittal'),
    ]
    panels = [
        _blend(*_enlarge(view(volume), view(cam), panel), alpha, f'{label} {name}' if label else name)
        for view, name in views
    ]
    montage = Image.new('RGB', (sum(p.width for p in panels), max(p.height for p in panels)))
    left = 0
    for picture in panels:
        montage.paste(picture, (left, 0))
        left += picture.width
    return montage


def _enlarge(image: np.ndarray, cam: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A slice and its heatmap resized together so that the longer side is `side` pixels."""
    scale = side / max(image.shape)
    size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    both = torch.from_numpy(np.stack([image, cam]).astype(np.float32))[None]
    out = F.interpolate(both, size=size, mode='bilinear', align_corners=False)[0].clamp(0, 1).numpy()
    return out[0], out[1]


def save_overlays(
    model: torch.nn.Module,
    tensor: torch.Tensor,
    image: np.ndarray,
    classes: Sequence[int],
    labels: Sequence[str],
    paths: Sequence[str | Path],
) -> list[Path]:
    """One overlay PNG per class: `labels[i]` is written on it, `paths[i]` is where it goes. A volume's
    heatmap is drawn on the model's input grid (`tensor`) as a three-plane montage through its peak."""
    cams = grad_cam(model, tensor, classes)
    out = []
    for cam, label, path in zip(cams, labels, paths):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if cam.ndim == 3:
            volume_montage(tensor[0].detach().cpu().numpy(), cam, label=label).save(path)
        else:
            overlay(image, cam, label=label).save(path)
        out.append(path)
    return out
