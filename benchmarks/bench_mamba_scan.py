"""Chunked selective scan vs the sequential reference, in one run: speed and parity.

    .venv/bin/python benchmarks/bench_mamba_scan.py [--batch 2] [--d-inner 384] [--threads 1 2]

Vim-tiny sizes by default (d_inner 384, d_state 16) at 196 and 1,024 tokens, on one thread and
on all cores (PyTorch's default, what a user gets; the chunked scan's large steps use the cores,
the reference's small per-token steps cannot). Reports the
median wall time (ms) of forward and of forward+backward for each scan (the scans run in turns,
a few calls each, so all see the same machine load), the speed-up, and the largest difference of the output and
of every input gradient (fp32), absolute and relative to the largest reference value. Parity
passes when every difference is within TOLERANCE x max(1, largest reference value), the bound the
tests use.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch

from hybridmednet.models.selective_scan import selective_scan, selective_scan_ref

TOLERANCE = 1e-5


def make_inputs(batch: int, d: int, n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    # realistic ranges: delta after softplus around 0.001..0.1 plus a tail, A from the S4D-real init
    return [
        r(batch, d, length),
        r(batch, d, length) - 3.0,
        -torch.arange(1, n + 1.0).repeat(d, 1),
        r(batch, n, length),
        r(batch, n, length),
        torch.ones(d),
        r(batch, d, length),
        r(d) * 0.5,
    ]


def run(scan: Callable, inputs: list[torch.Tensor], grad: torch.Tensor | None, **options) -> torch.Tensor:
    u, delta, A, B, C, D, z, bias = inputs
    y = scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, **options)
    if grad is not None:
        y.backward(grad)
    return y


def tokens_first(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same values in the [b, l, d] / [b, l, n] layout (contiguous), as a Vim block holds them."""
    return [t.transpose(1, 2).contiguous() if t.dim() == 3 else t for t in tensors]


def median_ms(fns: list[Callable[[], object]], repeats: int, block: int = 3) -> list[float]:
    """Median time of each function over `repeats` rounds; in each round every function runs `block`
    times in a row, so each is timed with its own data in cache (as when timeit repeats it) while
    load from other jobs hits all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            for _ in range(block):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def parity(inputs: list[torch.Tensor]) -> tuple[float, float, bool]:
    """Worst absolute and relative difference over the output and all 8 input gradients, and
    whether each is within TOLERANCE x max(1, largest reference value)."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    y_ref = run(selective_scan_ref, leaves, None)
    y_fast = run(selective_scan, leaves, None)
    grad = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, leaves, grad)
    g_fast = torch.autograd.grad(y_fast, leaves, grad)
    worst_abs = worst_rel = 0.0
    ok = True
    for a, b in [(y_ref, y_fast), *zip(g_ref, g_fast)]:
        diff = (a - b).abs().max().item()
        scale = a.abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(scale, 1e-12))
        ok &= diff <= TOLERANCE * max(scale, 1.0)
    return worst_abs, worst_rel, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--d-inner', type=int, default=384)
    parser.add_argument('--d-state', type=int, default=16)
    parser.add_argument('--lengths', type=int, nargs='+', default=[196, 1024])
    parser.add_argument('--threads', type=int, nargs='+', default=sorted({1, torch.get_num_threads()}))
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    print(
        f'batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, fp32, '
        f'median of {args.repeats}; parity tolerance {TOLERANCE:g} x max(1, |ref|max)'
    )
    print(
        "fast: selective_scan with mamba-ssm's [b, d, l] layout (it transposes in and out); "
        'tf: the same scan on tokens-first inputs (tokens_first=True), as BiMamba calls it on CPU'
    )
    print(
        f'{"threads":>7} {"tokens":>6} | {"fwd ref":>8} {"fast":>6} {"x":>5} {"tf":>6} {"x":>5} | '
        f'{"f+b ref":>8} {"fast":>6} {"x":>5} {"tf":>6} {"x":>5} | {"max abs err":>11} {"max rel err":>11} parity'
    )
    for threads, length in itertools.product(args.threads, args.lengths):
        torch.set_num_threads(threads)
        inputs = make_inputs(args.batch, args.d_inner, args.d_state, length)
        err_abs, err_rel, ok = parity(inputs)
        leaves = [t.clone().requires_grad_() for t in inputs]
        leaves_tf = [t.requires_grad_() for t in tokens_first(inputs)]
        grad = torch.randn(args.batch, args.d_inner, length)
        grad_tf = grad.transpose(1, 2).contiguous()
        with torch.no_grad():
            fwd = median_ms(
                [
                    lambda inputs=inputs: run(selective_scan_ref, inputs, None),
                    lambda inputs=inputs: run(selective_scan, inputs, None),
                    lambda leaves_tf=leaves_tf: run(selective_scan, leaves_tf, None, tokens_first=True),
                ],
                args.repeats,
            )
        both = median_ms(
            [
                lambda leaves=leaves, grad=grad: run(selective_scan_ref, leaves, grad),
                lambda leaves=leaves, grad=grad: run(selective_scan, leaves, grad),
                lambda leaves_tf=leaves_tf, grad_tf=grad_tf: run(selective_scan, leaves_tf, grad_tf, tokens_first=True),
            ],
            args.repeats,
        )
        cells = lambda t: f'{t[0]:>8.1f} {t[1]:>6.1f} {t[0] / t[1]:>4.1f}x {t[2]:>6.1f} {t[0] / t[2]:>4.1f}x'
        print(
            f'{threads:>7} {length:>6} | {cells(fwd)} | {cells(both)} | {err_abs:>11.2e} {err_rel:>11.2e} '
            f'{"ok" if ok else "FAIL"}'
        )


if __name__ == '__main__':
    main()
