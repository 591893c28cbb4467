"""Eval forward time and peak process memory: HybridMedNet vs the bare timm classifier, side by side.

Time: both models in this process, interleaved repetitions, medians and their ratio.
Memory: each model in a fresh subprocess (build + forward), peak resident set size.

    python benchmarks/bench_model_cost.py --backbone convnext_tiny --sizes 224 512 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import timm
import torch

from hybridmednet import create_model
from hybridmednet.models.backbones import timm_size_options
from hybridmednet.models.registry import get_backbone_spec


def build(kind: str, backbone: str, size: int, cross: bool) -> torch.nn.Module:
    if kind == 'timm':
        spec = get_backbone_spec(backbone)
        return timm.create_model(
            spec.timm_name, pretrained=False, num_classes=14, **timm_size_options(spec, size)
        ).eval()
    return create_model(
        backbone, num_classes=14, image_size=size, use_modern_attention=True, use_cross_scale_attention=cross
    ).eval()


def peak_memory(kind: str, backbone: str, size: int, batch: int, cross: bool) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and runs one forward."""
    code = (
        f"import torch, resource, sys; sys.path.insert(0, 'benchmarks');"
        f'from bench_model_cost import build;'
        f'm = build({kind!r}, {backbone!r}, {size}, {cross});'
        f'x = torch.randn({batch}, 3, {size}, {size});'
        f'torch.inference_mode().__enter__(); m(x); m(x);'
        f'print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--backbone', default='convnext_tiny')
    ap.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--no-cross', action='store_true', help='self-attention only')
    args = ap.parse_args()
    cross = not args.no_cross
    torch.manual_seed(0)
    rows = []
    for size in args.sizes:
        models = {k: build(k, args.backbone, size, cross) for k in ('timm', 'hybrid')}
        x = torch.randn(args.batch, 3, size, size)
        times = {k: [] for k in models}
        with torch.inference_mode():
            for m in models.values():
                m(x)  # warm-up
            for _ in range(args.repeats):
                for k, m in models.items():
                    t = time.perf_counter()
                    m(x)
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: peak_memory(k, args.backbone, size, args.batch, cross) for k in models}
        row = {
            'size': size,
            'batch': args.batch,
            'timm_s': med['timm'],
            'hybrid_s': med['hybrid'],
            'time_ratio': med['hybrid'] / med['timm'],
            'timm_mib': mem['timm'],
            'hybrid_mib': mem['hybrid'],
            'memory_ratio': mem['hybrid'] / mem['timm'],
        }
        rows.append(row)
        print(
            f'{args.backbone} {"modern+cross" if cross else "modern"} {size}px batch {args.batch}: '
            f'time {med["hybrid"]:.3f}s vs {med["timm"]:.3f}s = {row["time_ratio"]:.3f}x (median of {args.repeats}); '
            f'peak RSS {mem["hybrid"]:.0f} vs {mem["timm"]:.0f} MiB = {row["memory_ratio"]:.3f}x',
            flush=True,
        )
    print(json.dumps(rows))


if __name__ == '__main__':
    main()
