"""`python test_modern_models.py [--full] [--size N] [--backbones ...]`

Builds every available backbone in each attention mode, runs a forward and a
backward pass, checks shapes and gradients, and prints a parameter table.
The default uses small inputs so the sweep takes a few minutes on 2 CPU cores;
--full runs at 224 px.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from hybridmednet import create_model, list_backbones
from hybridmednet.models.summary import count_parameters

MODES = {'cbam': (False, False), 'self-attention': (True, False), 'cross-scale': (True, True)}


def check(name: str, size: int, batch: int) -> list[str]:
    """Forward + backward in each attention mode; returns result lines (raises on failure)."""
    lines = []
    for mode, (modern, cross) in MODES.items():
        torch.manual_seed(0)
        model = create_model(
            name, num_classes=14, image_size=size, use_modern_attention=modern, use_cross_scale_attention=cross
        )
        start = time.perf_counter()
        out = model(torch.randn(batch, 3, size, size))
        assert out.shape == (batch, 14), f'{name}/{mode}: output {tuple(out.shape)}'
        out.float().mean().backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not no_grad, f'{name}/{mode}: no gradient for {no_grad[:3]}'
        lines.append(
            f'  {mode:15s} out {tuple(out.shape)}  params {count_parameters(model) / 1e6:7.2f}M  '
            f'fwd+bwd {time.perf_counter() - start:5.2f}s'
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--full', action='store_true', help='224 px inputs (slower)')
    ap.add_argument('--size', type=int, help='input size (multiple of 32); default 64, or 224 with --full')
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--backbones', nargs='+', default=None, help='default: every registered backbone')
    args = ap.parse_args()
    size = args.size or (224 if args.full else 64)
    failures = []
    for name in args.backbones or list_backbones():
        try:
            lines = check(name, size, args.batch)
        except Exception as exc:  # report every backbone, then fail at the end
            failures.append(name)
            print(f'{name}: FAILED: {type(exc).__name__}: {exc}')
            continue
        print(f'{name}: ok at {size}px', *lines, sep='\n')
    from hybridmednet.models.summary import format_table, parameter_row

    print('\nParameter counts (modern + cross-scale attention, 14 classes):')
    print(format_table([parameter_row(n) for n in args.backbones or list_backbones()]))
    print(f'\n{len(failures)} failed: {failures or ""}')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
