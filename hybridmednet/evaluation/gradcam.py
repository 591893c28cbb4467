"""Heatmaps of where a finding's evidence lies: integrated gradients from a healthy reference image, for every
backbone family; HiResCAM on the backbone's trunk for a model stored without one.

Chosen by measurement against the sample's lesion boxes (evaluation/localization.py,
benchmarks/bench_localization.py, docs/benchmarks.md). On the demo model the pointing game went from
0.06 (Grad-CAM on the attended pyramid, shipped first) to 0.37 (HiResCAM on the trunk relative to healthy
maps) to 0.78 (integrated gradients from the mean healthy image) to 0.80 (from the healthy images nearest
to each image; class-blind map 0.64).

- Integrated gradients (Sundararajan et al. 2017) from a healthy reference image: the gradient averaged
  along the straight path from that image to this one, times their difference, per pixel. The attributions
  add up to the logit's change from the healthy image to this one, so what a normal film has counts for
  nothing and the evidence is credited to the pixels that differ where the model responds to them.
- Gradient methods on feature maps could not do this: the maps' cells see most of a small image, and the
  evidence gathered where the model stores it (below the diaphragm), not at the lesion.
- The reference is the mean of the `NEIGHBOURS` healthy films nearest to this image (mean squared
  difference) among up to 256 training images without a finding, stored with the model as the model sees
  them (fitted at the end of training). A film like this one, not the mean of all, leaves less of the
  patient's own build, position and exposure in the difference: on the demo model's validation boxes the
  pointing game rose from 0.76 to 0.81. Inputs so large that fewer than `MIN_FILMS` films fit in
  `REFERENCE_VALUES` values get the mean of up to 256 films, one reference for every image (measured 0.78).
- `STEPS` points on the path, one batch through the model, one backward pass per finding.
- Positive evidence only, smoothed by a Gaussian of `SMOOTHING` times the image's side (pixel attributions
  sit on edges and speckle; the peak of the smoothed map sits on the region), each map scaled to its maximum.

A model stored without a reference image (before 2026-12-01) gets plain HiResCAM on the trunk's maps:

- The trunk's stage outputs (the ResNet under the FPN, `backbone.body`, else the backbone's own pyramid):
  their gradients carry the evidence at fine resolution, unlike the attended pyramid, whose fusion weighs
  almost only the stride-32 map.
- HiResCAM (Draelos & Carin 2020): gradient times activation per location, summed over channels; each level
  at least `MIN_SIDE` cells across scaled to its maximum, the levels averaged.
- The outer ring of cells of each level is left out: those cells see the convolutions' zero padding, and on
  the demo model half of the heatmaps peaked on the image's edge, outside the body.
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
from scipy.ndimage import gaussian_filter

from hybridmednet.data.datasets import ChestXrayDataset
from hybridmednet.data.transforms import square_box

MIN_SIDE = 6  # cells across a level must have to be used by HiResCAM: 4 once the outer ring is left out
REFERENCE_IMAGES = 256  # training images without a finding stored with the model for the heatmaps' reference
REFERENCE_VALUES = 2**23  # at most this many values of them (16 MiB in float16): fewer images when they are large
MIN_FILMS = 32  # fewer fit: the model stores their mean alone (the nearest of 32 or 55 point about as well as it)
NEIGHBOURS = 4  # an image's reference is the mean of this many stored healthy images nearest to it
STEPS = 4  # points on the integration path: the pointing game 0.78 as with 8 or 24 on the demo model, 0.76 with 1
SMOOTHING = 1 / 48  # the heatmap's Gaussian sigma as a share of the image's side: 2 px at 96


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output maps HiResCAM is computed on: the ResNet under an FPN, else the backbone."""
    backbone = model.get_submodule('backbone')
    return getattr(backbone, 'body', backbone)


def grad_cam(
    model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], pool: Executor | None = None
) -> np.ndarray:
    """Heatmaps [len(classes), *spatial] in [0, 1] for one preprocessed image [C, H, W] or volume [C, D, H, W]:
    integrated gradients from the nearest of the model's `heatmap_reference` images when it has them (load_model
    attaches the stored ones), else HiResCAM on its trunk. A class with no positive evidence gets an all-zero
    map. With `pool`, the classes' backward passes run on its threads side by side (the server uses it where it
    measures faster)."""
    if image.dim() not in (3, 4):
        raise ValueError(f'grad_cam takes one image [C, H, W] or volume [C, D, H, W], got shape {tuple(image.shape)}')
    if model.training:  # batch statistics would mix the integration path's points, dropout would add noise
        raise ValueError('heatmaps need the model in eval mode: call model.eval() first')
    references = reference_of(model)
    if references is not None:
        return integrated_gradients(model, image, classes, nearest_reference(references, image), pool)
    return hirescam(model, image, classes, pool)


def reference_of(model: torch.nn.Module | None) -> torch.Tensor | None:
    """The healthy reference images [N, C, *spatial] attached to `model` (checkpoint.load_model attaches the
    stored ones)."""
    return getattr(model, 'heatmap_reference', None)


def nearest_reference(references: torch.Tensor, image: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """The reference [C, *spatial] for one image: the mean of the `neighbours` images of `references`
    [N, C, *spatial] nearest to it in mean squared difference (all of them when there are no more; one image
    [C, *spatial] is the reference itself)."""
    stored = _stacked(references, image)
    _check_reference(stored.shape[1:], image)
    probe = image.detach().to(stored.device, torch.float32)  # searched where the films are: only 4 of them move
    distance = torch.stack([(r.float() - probe).square().mean() for r in stored])
    nearest = distance.topk(min(neighbours, len(stored)), largest=False).indices
    return stored[nearest].float().mean(0).to(image.device, image.dtype)


def stored_images(shape: Sequence[int]) -> int:
    """How many healthy images of `shape` [C, *spatial] a model stores: `REFERENCE_IMAGES`, fewer when they
    would hold more than `REFERENCE_VALUES` values; 0 when fewer than `MIN_FILMS` fit (it stores their mean)."""
    fit = min(REFERENCE_IMAGES, REFERENCE_VALUES // int(np.prod(shape)))
    return fit if fit >= MIN_FILMS else 0


def select_references(train: Any, shape: Sequence[int], films: int | None = None) -> tuple[np.ndarray, str, bool]:
    """(rows, what they are, whether only their mean is stored) of the training images that become a model's
    healthy references, for images of `shape` [C, *spatial]: as many films as `stored_images` allows (or
    `films`; 0: their mean alone). A dataset without a label table (train(config, datasets=...)) gives its first."""
    films = stored_images(shape) if films is None else films
    limit = films or REFERENCE_IMAGES
    if isinstance(train, ChestXrayDataset):
        rows, what = reference_rows(train.labels, train.mask, train.class_names, limit)
    else:
        rows, what = np.arange(min(len(train), limit)), 'all (the first; a dataset without a label table)'
    return rows, what, not films


def reference_rows(
    labels: np.ndarray, mask: np.ndarray, class_names: Sequence[str], limit: int = REFERENCE_IMAGES
) -> tuple[np.ndarray, str]:
    """Which images of a split ([N, K] labels and mask) the healthy references are, and what they are: up to
    `limit` evenly spaced ones whose every finding is known and negative (a 'No Finding' class aside), or,
    when fewer than a tenth of `REFERENCE_IMAGES` are (every image has a class), as many of all images."""
    findings = [k for k, name in enumerate(class_names) if name != 'No Finding']
    healthy = np.flatnonzero((mask[:, findings] > 0).all(1) & (labels[:, findings] < 0.5).all(1))
    if len(healthy) >= REFERENCE_IMAGES // 10:
        rows, what = healthy, 'without a finding'
    else:
        rows, what = np.arange(len(labels)), 'all (too few without a finding)'
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    return rows, what


def reference_entry(batches: Iterable[torch.Tensor], what: str, mean: bool = False) -> dict[str, Any]:
    """The healthy references to store with a model: the images of `batches` ([B, C, *spatial], preprocessed
    as validation sees them: `reference_rows` picks which), or with `mean` their mean alone; in float16 unless
    their values do not fit it. `what` says which images they are, 'n_images' how many."""
    kept: list[torch.Tensor] = []
    total: torch.Tensor | None = None
    n = 0
    for batch in batches:
        batch = batch.detach().to('cpu', torch.float32)
        n += len(batch)
        if mean:
            total = batch.sum(0) + (0 if total is None else total)
        else:
            kept.append(batch)
    if n == 0:
        raise ValueError('the heatmap reference needs at least one image')
    images = (total / n)[None] if total is not None else torch.cat(kept)
    half = images.half()
    return {'healthy_images': half if torch.isfinite(half).all() else images, 'n_images': n, 'images': what}


def reference_fits(model: torch.nn.Module, image: torch.Tensor) -> bool:
    """Whether the model's healthy references have the shape of `image` [C, *spatial] (the input size they
    were stored at); True for a model without them."""
    return heatmap_kind(model, image) != 'other size'


def heatmap_kind(model: torch.nn.Module, image: torch.Tensor) -> str:
    """Which heatmap `grad_cam` draws for images like `image`: 'nearest' (integrated gradients from the nearest
    stored healthy films), 'integrated' (from their mean, one reference), 'plain' (HiResCAM: no references) or
    'other size' (HiResCAM: the references were stored at another input size, so the caller detaches them)."""
    references = reference_of(model)
    if references is None:
        return 'plain'
    stored = _stacked(references, image)
    if tuple(stored.shape[1:]) != tuple(image.shape):
        return 'other size'
    return 'nearest' if len(stored) > 1 else 'integrated'


def integrated_gradients(
    model: torch.nn.Module,
    image: torch.Tensor,
    classes: Sequence[int],
    reference: torch.Tensor,
    pool: Executor | None = None,
    steps: int = STEPS,
    smoothing: float = SMOOTHING,
) -> np.ndarray:
    """Heatmaps [len(classes), *spatial] of one image [C, *spatial]: integrated gradients from `reference` (same
    shape) over `steps` midpoints, positive part, smoothed (sigma `smoothing` times the side), each scaled to
    its maximum."""
    _check_reference(reference.shape, image)
    if not classes:
        return np.zeros((0, *image.shape[1:]), np.float32)
    start = reference.to(image.device, image.dtype)
    delta = image.detach() - start
    along = ((torch.arange(steps, device=image.device, dtype=image.dtype) + 0.5) / steps).view(-1, *[1] * image.dim())
    with torch.enable_grad():
        path = (start + along * delta).requires_grad_(True)  # midpoints of `steps` stretches from reference to image
        logits = model(path)

    def attribution(c: int) -> torch.Tensor:
        with torch.enable_grad():  # the caller's grad mode is not a pool thread's: the same in both
            target = logits[:, c].sum()  # the path's points do not mix in eval mode
        (grad,) = torch.autograd.grad(target, path, retain_graph=True)
        return (grad.mean(0) * delta).sum(0).detach()

    positive = F.relu(torch.stack(_per_class(attribution, classes, pool))).float().cpu().numpy()
    sigma = smoothing * float(np.mean(image.shape[1:]))
    smooth = gaussian_filter(positive, sigma=(0, *[sigma] * (image.dim() - 1)), mode='nearest')
    return _unit_max(torch.from_numpy(smooth)).numpy()


def hirescam(
    model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], pool: Executor | None = None
) -> np.ndarray:
    """HiResCAM maps [len(classes), *spatial] of one image [C, *spatial] on the model's trunk: its levels at least
    `MIN_SIDE` cells across without their outer ring of cells (the finest, whole, when none is that large)."""
    captured: list[list[torch.Tensor]] = []
    hook = trunk(model).register_forward_hook(lambda module, args, out: captured.append(list(out)))
    try:  # an input that requires grad gives the maps a graph even when every weight is frozen
        with torch.enable_grad():
            logits = model(image.detach().unsqueeze(0).requires_grad_(True))
    finally:
        hook.remove()
    size = list(image.shape[1:])
    mode = 'bilinear' if len(size) == 2 else 'trilinear'
    chosen = [m for m in captured[0] if min(m.shape[2:]) >= MIN_SIDE] or captured[0][:1]
    inner = [_inner_cells(m.shape[2:], m.device) if min(m.shape[2:]) >= MIN_SIDE else 1.0 for m in chosen]

    def cam_of(c: int) -> torch.Tensor:
        with torch.enable_grad():
            target = logits[0, c]
        grads = torch.autograd.grad(target, chosen, retain_graph=True)
        with torch.no_grad():
            per_scale = torch.cat(
                [
                    F.interpolate(
                        F.relu((g * a).sum(1, keepdim=True)) * ring, size=size, mode=mode, align_corners=False
                    )
                    for a, g, ring in zip(chosen, grads, inner)
                ]
            )[:, 0]
            return _unit_max(per_scale).mean(0)

    cams = _per_class(cam_of, classes, pool)
    out = torch.stack(cams) if cams else torch.zeros(0, *size)
    return _unit_max(out).detach().cpu().numpy()


def _stacked(references: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """References as [N, C, *spatial]: one image [C, *spatial] (set by hand) is one reference."""
    return references[None] if references.dim() == image.dim() else references


def _check_reference(shape: Sequence[int], image: torch.Tensor) -> None:
    if tuple(shape) != tuple(image.shape):
        raise ValueError(
            f'the heatmap reference has shape {tuple(shape)} but the image {tuple(image.shape)}: '
            'heatmaps need the input size the model was trained at'
        )


def _per_class(compute: Callable[[int], torch.Tensor], classes: Sequence[int], pool: Executor | None) -> list:
    """`compute(c)` for each class, on the pool's threads side by side when there is a pool (autograd allows
    concurrent backward passes over one retained graph), else one after the other."""
    if pool is not None and len(classes) > 1:
        return list(pool.map(compute, classes))
    return [compute(c) for c in classes]


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
