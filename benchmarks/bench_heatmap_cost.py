"""What a heatmap costs: the shipped integrated gradients against HiResCAM, on one image, interleaved.

    .venv/bin/python benchmarks/bench_heatmap_cost.py                      # convnext_tiny, 224 px, 2 findings
    .venv/bin/python benchmarks/bench_heatmap_cost.py --backbone resnet18 --image-size 96

An untrained model (the cost does not depend on the weights) with as many random healthy reference films as
training stores at that size (`stored_images`). Each round times every method once, in turn; the table gives
each method's median over the rounds and its ratio to HiResCAM, the heatmap of a model stored without
reference films.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hybridmednet import create_model
from hybridmednet.evaluation.gradcam import (
    grad_cam,
    hirescam,
    integrated_gradients,
    nearest_reference,
    stored_images,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbone', default='convnext_tiny')
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--classes', type=int, default=2, help='heatmaps per image (findings shown)')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.backbone, num_classes=14, image_size=args.image_size).eval()
    image = torch.randn(3, args.image_size, args.image_size)
    films = stored_images(image.shape)
    model.heatmap_reference = torch.randn(films, *image.shape).half()
    classes = list(range(args.classes))
    reference = nearest_reference(model.heatmap_reference, image)
    methods: dict[str, Callable[[], object]] = {
        'shipped: integrated gradients from the 4 nearest films, 4 steps': lambda: grad_cam(model, image, classes),
        'integrated gradients, 1 step': lambda: integrated_gradients(model, image, classes, reference, steps=1),
        'integrated gradients, 8 steps': lambda: integrated_gradients(model, image, classes, reference, steps=8),
        'HiResCAM on the trunk (no reference films)': lambda: hirescam(model, image, classes),
        'finding the 4 nearest films alone': lambda: nearest_reference(model.heatmap_reference, image),
    }
    for run in methods.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times['HiResCAM on the trunk (no reference films)'])
    print(
        f'{args.backbone} at {args.image_size} px, {args.classes} heatmaps, {films} stored films, '
        f'{args.threads} threads, median of {args.rounds} rounds'
    )
    print('| method | ms | x HiResCAM |\n|---|---|---|')
    for name, values in times.items():
        median = statistics.median(values)
        print(f'| {name} | {median * 1000:.0f} | {median / base:.2f} |')


if __name__ == '__main__':
    main()
