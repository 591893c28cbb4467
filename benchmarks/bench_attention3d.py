"""Cost of the hybrid stages on volumes: HybridMedNet vs the bare 3D backbone, time and memory, one process.

The bare model is the backbone with global average pooling of its last map and a linear classifier (MedMNIST's
3D ResNet baseline); the hybrid adds attention on all 4 scales, dynamic fusion and the head. Both are built
once per volume size and timed in interleaved repetitions (medians), for a training step (forward and backward)
and an eval forward. Memory: the peak of the bytes allocated during one step, as torch's profiler records
them, plus the parameters (held before the step).

    python benchmarks/bench_attention3d.py --sizes 64 96 --batch 2 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from hybridmednet import create_model
from hybridmednet.models.registry import build_backbone


class BareClassifier(nn.Module):
    def __init__(self, backbone: str, num_classes: int, size: int):
        super().__init__()
        self.backbone = build_backbone(backbone, img_size=[size] * 3)  # the volume size, as create_model passes it
        self.fc = nn.Linear(self.backbone.channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)[-1].mean(dim=(2, 3, 4)))


def train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return step


def eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def peak_bytes(step: Callable[[], None]) -> int:
    """The running total of allocations minus frees over one step, at its highest (top-level profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.events() if e.cpu_parent is None and e.cpu_memory_usage), key=lambda e: e.time_range.start
    )
    total = peak = 0
    for e in events:
        total += e.cpu_memory_usage
        peak = max(peak, total)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--backbone', default='resnet3d_18')
    ap.add_argument('--sizes', type=int, nargs='+', default=[64, 96])
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--attention', choices=['cross', 'self', 'cbam'], default='cross')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modern, cross = {'cross': (True, True), 'self': (True, False), 'cbam': (False, False)}[args.attention]
    print(
        f'{args.backbone}, batch {args.batch}, {args.threads} thread(s), attention {args.attention}, '
        f'{args.repeats} interleaved repeats (medians); memory = parameters + peak allocated during the step'
    )
    print('size | step  | bare s | hybrid s | time x | bare MiB | hybrid MiB | memory x')
    for size in args.sizes:
        torch.manual_seed(0)
        models = {
            'bare': BareClassifier(args.backbone, 14, size).train(),
            'hybrid': create_model(
                args.backbone,
                num_classes=14,
                volume_size=[size] * 3,
                use_modern_attention=modern,
                use_cross_scale_attention=cross,
            ).train(),
        }
        x = torch.randn(args.batch, 1, size, size, size)
        for kind, make in (('train', train_step), ('eval', eval_step)):
            steps = {name: make(m.train(kind == 'train'), x) for name, m in models.items()}
            times: dict[str, list[float]] = {name: [] for name in steps}
            for step in steps.values():
                step()  # warm-up
            for _ in range(args.repeats):
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(t) for name, t in times.items()}
            mib = {
                name: (sum(p.numel() * p.element_size() for p in models[name].parameters()) + peak_bytes(step)) / 2**20
                for name, step in steps.items()
            }
            bare, hybrid = med['bare'], med['hybrid']
            print(
                f'{size:4d} | {kind:5s} | {bare:6.3f} | {hybrid:8.3f} | {hybrid / bare:6.3f} '
                f'| {mib["bare"]:8.1f} | {mib["hybrid"]:10.1f} | {mib["hybrid"] / mib["bare"]:8.3f}'
            )


if __name__ == '__main__':
    main()
