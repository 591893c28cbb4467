"""Do the heatmaps point at the finding? Heatmap methods scored against the sample's lesion boxes.

Trains nothing: give it the demo model, trained once with

    .venv/bin/hybridmednet train --config quickstart CHECKPOINT.dir=/tmp/loc/ckpt LOGGING.log_dir=/tmp/loc/logs
    .venv/bin/python benchmarks/bench_localization.py /tmp/loc/ckpt/best_model.pth [--methods ...]

Every method is scored by evaluation.localization.localization_scores on the test split's images
(--split) that have a box (BBox_List_2017.csv, written by the sample generator): pointing game and IoBB accuracy per
finding, each beside the class-blind map (the mean of all 14 classes' maps). Prints one line per
method, then the per-finding tables of the heatmap shipped first (Grad-CAM on the attended pyramid),
of the shipped one and of fine occlusion, the slow perturbation reference. The integrated-gradients
methods need the model's healthy reference images (stored by training; --fit-reference for an older
model, or one storing only their mean). The `lib-*` methods need pytorch-grad-cam (pip install grad-cam)
and the demo's ResNet trunk.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hybridmednet.checkpoint import load_model
from hybridmednet.data.datasets import build_datasets
from hybridmednet.data.synthetic import BOX_FILE
from hybridmednet.data.transforms import build_transforms
from hybridmednet.evaluation.gradcam import (
    NEIGHBOURS,
    REFERENCE_IMAGES,
    SMOOTHING,
    STEPS,
    grad_cam,
    integrated_gradients,
    nearest_reference,
    reference_entry,
    select_references,
    trunk,
)
from hybridmednet.evaluation.localization import localization_scores, localization_table, read_boxes

LEVEL_SIDE = 4  # the variants use every level at least this many cells across, their ring kept

Cam = Callable[[torch.nn.Module, torch.Tensor, Sequence[int]], np.ndarray]


def _unit(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def pyramid_cam(
    model: torch.nn.Module,
    image: torch.Tensor,
    classes: Sequence[int],
    where: str,
    method: str,
    levels: Sequence[int] | None = None,
    combine: str = 'unit',
    contrast: bool = False,
) -> np.ndarray:
    """A CAM on one set of maps: 'attended' (forward_features), 'pyramid' (backbone(x), before attention)
    or 'trunk' (grad_cam's maps); 'gradcam', 'hirescam' or 'gradcam++'; levels normalised each to its
    maximum and averaged ('unit') or summed as they are, per input pixel ('evidence'); with `contrast`, of the
    class's logit minus the mean logit (what sets this finding apart from the others)."""
    x = image[None].detach().requires_grad_(True)
    size = x.shape[-2:]
    with torch.enable_grad():
        if where == 'trunk':
            captured: list = []
            hook = trunk(model).register_forward_hook(lambda module, args, out: captured.append(list(out)))
            try:
                logits = model(x)
            finally:
                hook.remove()
            maps = captured[0]
        else:
            pyramid = model.backbone(x)
            attended = model.attention(pyramid)
            logits = model.forward_head(attended)
            maps = attended if where == 'attended' else pyramid
        if levels is None:
            levels = [i for i, m in enumerate(maps) if min(m.shape[-2:]) >= LEVEL_SIDE] or [0]
        chosen = [maps[i] for i in levels]
        out = []
        for c in classes:
            per_level = []
            target = logits[0, c] - logits[0].mean() if contrast else logits[0, c]
            for a, g in zip(chosen, torch.autograd.grad(target, chosen, retain_graph=True)):
                if method == 'gradcam':
                    cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)
                elif method == 'hirescam':
                    cam = (g * a).sum(1, keepdim=True)
                else:  # Grad-CAM++ (Chattopadhay et al. 2018), with the exponential-of-the-score simplification
                    denominator = 2 * g**2 + a.sum((2, 3), keepdim=True) * g**3
                    alpha = g**2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
                    cam = ((alpha * F.relu(g)).sum((2, 3), keepdim=True) * a).sum(1, keepdim=True)
                up = F.interpolate(F.relu(cam), size=size, mode='bilinear', align_corners=False)[0]
                per_level.append(up * (a.shape[-1] * a.shape[-2]) if combine == 'evidence' else up)
            stacked = torch.cat(per_level)
            out.append(_unit(stacked).mean(0) if combine == 'unit' else stacked.sum(0))
    return _unit(torch.stack(out)).detach().numpy()


def occlusion(
    model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int], patch: int = 12, stride: int = 6
) -> np.ndarray:
    """The drop in each class's logit when a patch is replaced by a blurred copy, averaged per pixel over
    the patches covering it: one forward pass per patch position, all classes at once."""
    size = image.shape[-1]
    blurred = F.avg_pool2d(image[None], 17, 1, 8, count_include_pad=False)[0]
    starts = range(0, size - patch + 1, stride)
    positions = [(r, c) for r in starts for c in starts]
    batch = image.repeat(len(positions), 1, 1, 1)
    for k, (r, c) in enumerate(positions):
        batch[k, :, r : r + patch, c : c + patch] = blurred[:, r : r + patch, c : c + patch]
    with torch.no_grad():
        drop = model(image[None])[0] - torch.cat([model(b) for b in batch.split(64)])
    heat, count = torch.zeros(len(classes), size, size), torch.zeros(size, size)
    for k, (r, c) in enumerate(positions):
        heat[:, r : r + patch, c : c + patch] += drop[k, list(classes)][:, None, None]
        count[r : r + patch, c : c + patch] += 1
    return _unit(F.relu(heat / count.clamp_min(1))).numpy()


def without_reference(model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """The shipped heatmap with the model's healthy reference detached: HiResCAM on the trunk, ring left out."""
    reference, model.heatmap_reference = model.heatmap_reference, None
    try:
        return grad_cam(model, image, classes)
    finally:
        model.heatmap_reference = reference


def integrated(steps: int = STEPS, smoothing: float = SMOOTHING, neighbours: int = NEIGHBOURS) -> Cam:
    """The shipped integrated gradients with another number of steps, smoothing or nearest healthy images
    averaged into the reference (all of them: the mean healthy image, shipped in the morning of 2026-12-01)."""

    def cam(model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        reference = nearest_reference(model.heatmap_reference, image, neighbours)
        return integrated_gradients(model, image, classes, reference, steps=steps, smoothing=smoothing)

    return cam


def fit_reference(model: torch.nn.Module, config: Any, films: int | None = None) -> str:
    """Attach the healthy references computed as training stores them now, for a checkpoint written before:
    as many films as training stores, or `films` of them (0: their mean alone)."""
    train = build_datasets(config)['train']
    train.transform, train.epoch_seed = build_transforms(config, train=False), None
    rows, what, mean = select_references(train, train[0][0].shape, films)
    batches = (torch.stack([train[int(j)][0] for j in rows[i : i + 16]]) for i in range(0, len(rows), 16))
    entry = reference_entry(batches, what, mean=mean)
    model.heatmap_reference = entry['healthy_images']
    kept = 'their mean kept' if mean else f'{len(entry["healthy_images"])} films kept'
    return f'{entry["n_images"]} training images ({what}), {kept}'


def library_cam(kind: str, layers: Callable[[torch.nn.Module], list[torch.nn.Module]]) -> Cam:
    """pytorch-grad-cam's GradCAM / HiResCAM / GradCAMPlusPlus on the given layers (one pass per class)."""
    engines: dict[int, Any] = {}

    def cam(model: torch.nn.Module, image: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if id(model) not in engines:
            engines[id(model)] = getattr(pytorch_grad_cam, kind)(model=model, target_layers=layers(model))
        targets = [[ClassifierOutputTarget(int(c))] for c in classes]
        return np.stack([engines[id(model)](input_tensor=image[None], targets=t)[0] for t in targets])

    return cam


def resnet_stages(model: torch.nn.Module, stages: Sequence[int]) -> list[torch.nn.Module]:
    return [getattr(trunk(model).model, f'layer{i}') for i in stages]


METHODS: dict[str, Cam] = {
    'before: Grad-CAM, attended pyramid, levels >= 4 cells': partial(pyramid_cam, where='attended', method='gradcam'),
    'shipped: grad_cam (integrated gradients from the 4 nearest healthy images, 4 steps, smoothed)': grad_cam,
    'integrated gradients from the mean of all healthy images (shipped 2026-12-01 morning)': integrated(
        neighbours=REFERENCE_IMAGES
    ),
    'integrated gradients from the nearest healthy image': integrated(neighbours=1),
    'integrated gradients from the 8 nearest': integrated(neighbours=8),
    'integrated gradients from the 16 nearest': integrated(neighbours=16),
    'integrated gradients, 1 step (the gradient halfway times the difference)': integrated(steps=1),
    'integrated gradients, 2 steps': integrated(steps=2),
    'integrated gradients, 8 steps': integrated(steps=8),
    'integrated gradients, 24 steps': integrated(steps=24),
    'integrated gradients, not smoothed': integrated(smoothing=0.0),
    'integrated gradients, smoothed 2.5x more (sigma 5 px at 96)': integrated(smoothing=5 / 96),
    'HiResCAM, trunk, levels >= 6 cells, ring left out (shipped for a model without a reference image)': (
        without_reference
    ),
    'HiResCAM, trunk, levels >= 4 cells, ring kept (shipped before)': partial(
        pyramid_cam, where='trunk', method='hirescam'
    ),
    'HiResCAM, trunk, stride 4 only': partial(pyramid_cam, where='trunk', method='hirescam', levels=[0]),
    'HiResCAM, trunk, all 4 levels': partial(pyramid_cam, where='trunk', method='hirescam', levels=[0, 1, 2, 3]),
    'HiResCAM, trunk, levels weighted by evidence': partial(
        pyramid_cam, where='trunk', method='hirescam', combine='evidence'
    ),
    'HiResCAM, trunk, contrastive (logit minus the mean logit)': partial(
        pyramid_cam, where='trunk', method='hirescam', contrast=True
    ),
    'Grad-CAM, trunk': partial(pyramid_cam, where='trunk', method='gradcam'),
    'Grad-CAM++, trunk': partial(pyramid_cam, where='trunk', method='gradcam++'),
    'Grad-CAM, attended, stride 32 only': partial(pyramid_cam, where='attended', method='gradcam', levels=[3]),
    'Grad-CAM, attended, levels weighted by evidence': partial(
        pyramid_cam, where='attended', method='gradcam', combine='evidence'
    ),
    'HiResCAM, attended': partial(pyramid_cam, where='attended', method='hirescam'),
    'HiResCAM, pyramid before attention': partial(pyramid_cam, where='pyramid', method='hirescam'),
    'occlusion 12 px, stride 6 (225 forward passes)': occlusion,
    'occlusion 8 px, stride 4 (484 forward passes)': partial(occlusion, patch=8, stride=4),
    'lib-GradCAM, FPN outputs (stride 4-16)': library_cam(
        'GradCAM', lambda m: [m.backbone.fpn.layer_blocks[i] for i in range(3)]
    ),
    'lib-HiResCAM, ResNet stages 1-3': library_cam('HiResCAM', partial(resnet_stages, stages=[1, 2, 3])),
    'lib-GradCAMPlusPlus, ResNet stages 1-3': library_cam('GradCAMPlusPlus', partial(resnet_stages, stages=[1, 2, 3])),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('checkpoint')
    p.add_argument('--methods', nargs='*', help='prefixes of the method names to run (default: all)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--split', default='test', choices=['train', 'val', 'test'], help='whose boxes (default test)')
    p.add_argument(
        '--fit-reference',
        action='store_true',
        help='compute the healthy reference images as training stores them now (for a checkpoint stored without '
        'them, or with their mean alone)',
    )
    p.add_argument(
        '--films',
        type=int,
        help='with --fit-reference: keep this many healthy films, evenly spaced (default: as many as training '
        'stores; 0: their mean alone)',
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, config, _ = load_model(args.checkpoint)
    if args.fit_reference:
        print(f'healthy references fitted here: {fit_reference(model, config, args.films)}')
    elif model.heatmap_reference is None:
        print('this checkpoint stores no healthy reference images: the shipped heatmap is HiResCAM (--fit-reference)')
    test = build_datasets(config)[args.split]
    boxes = read_boxes(test.data_dir / BOX_FILE)
    tables = {}
    print('| method | pointing game (class-blind) | IoBB > 0.25 (class-blind) | IoBB > 0.5 (class-blind) | s / image |')
    print('|---|---|---|---|---|')
    for name, cam in METHODS.items():
        if args.methods and not any(name.startswith(m) for m in args.methods):
            continue
        if name.startswith('integrated') and model.heatmap_reference is None:
            print(f'| {name} | not run: no reference image (--fit-reference) | | | |')
            continue
        start = time.perf_counter()
        try:
            scores = localization_scores(model, test, boxes, cam=cam)
        except ImportError:
            print(f'| {name} | not run: pip install grad-cam | | | |')
            continue
        seconds = (time.perf_counter() - start) / scores['n_images']
        pooled, blind = scores['all'], scores['all']['class_blind']
        print(
            f'| {name} | {pooled["pointing_game"]:.3f} ({blind["pointing_game"]:.3f}) '
            f'| {pooled["iobb"]["0.25"]:.3f} ({blind["iobb"]["0.25"]:.3f}) '
            f'| {pooled["iobb"]["0.5"]:.3f} ({blind["iobb"]["0.5"]:.3f}) | {seconds:.2f} |',
            flush=True,
        )
        if name.startswith(('before', 'shipped', 'occlusion 8')):
            tables[name] = f'{scores["n_images"]} {args.split} images with boxes\n\n{localization_table(scores)}'
    for name, table in tables.items():
        print(f'\n{name}, {table}')


if __name__ == '__main__':
    main()
