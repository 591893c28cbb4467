"""Forward time and peak memory against image size: vim_tiny vs swin_tiny vs a ViT of similar size.

    .venv/bin/python benchmarks/bench_mamba_scaling.py [--sizes 224 448 896] [--threads 1]

Whole classifiers (ImageNet heads), random weights, batch 1, fp32, no grad, CPU. Each
(model, size) runs in a fresh subprocess so its peak memory is its own: peak RSS during
the forward passes minus RSS just before them (activations and workspace, not weights).
Time is the median of `--repeats` forwards after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    'vim_tiny': 'Vision Mamba tiny (this repo, chunked scan)',
    'swin_tiny': 'timm swin_tiny_patch4_window7_224',
    'vit_tiny': 'timm vit_tiny_patch16_224 (DeiT-tiny architecture)',
}


def build(name: str, size: int):
    import timm

    from hybridmednet.models.mamba import VisionMamba

    if name == 'vim_tiny':
        return VisionMamba(img_size=size, embed_dim=192, num_classes=1000)
    if name == 'swin_tiny':
        return timm.create_model('swin_tiny_patch4_window7_224', img_size=size)
    return timm.create_model('vit_tiny_patch16_224', img_size=size)


def rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str, size: int, repeats: int, threads: int) -> dict:
    import torch

    from hybridmednet.models.summary import count_parameters

    torch.set_num_threads(threads)
    model = build(name, size).eval()
    x = torch.randn(1, 3, size, size)
    params = count_parameters(model) / 1e6
    before = rss_mb()
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t = time.perf_counter()
            model(x)
            if i:
                times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {
        'model': name,
        'size': size,
        'params_m': params,
        'ms': statistics.median(times) * 1e3,
        'peak_mb': peak,
        'tokens': (size // 16) ** 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 448, 896])
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--one', nargs=2, metavar=('MODEL', 'SIZE'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats, args.threads)))
        return
    print(f'batch 1, fp32, no grad, {args.threads} thread(s), median of {args.repeats}')
    for name in args.models:
        print(f'  {name}: {MODELS[name]}')
    rows = []
    for size in args.sizes:
        for name in args.models:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    '--one',
                    name,
                    str(size),
                    '--repeats',
                    str(args.repeats),
                    '--threads',
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f'{r["size"]:>4} px  {r["model"]:<10} {r["params_m"]:5.1f}M params  {r["ms"]:9.1f} ms  '
                f'{r["peak_mb"]:8.1f} MB',
                flush=True,
            )
    print('\ngrowth from the smallest size (time x, memory x); 4x the pixels per step:')
    base = {r['model']: r for r in rows if r['size'] == args.sizes[0]}
    for r in rows:
        b = base[r['model']]
        print(
            f'{r["size"]:>4} px  {r["model"]:<10} time x{r["ms"] / b["ms"]:6.1f}   '
            f'memory x{r["peak_mb"] / max(b["peak_mb"], 1e-9):6.1f}'
        )


if __name__ == '__main__':
    main()
