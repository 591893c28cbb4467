# ruff: noqa: E402 (OMP_WAIT_POLICY must be set before torch is imported)
"""CPU latency of the deployment paths: eager PyTorch, ONNX Runtime fp32 and int8, and the pruned model.

For each backbone, HybridMedNet (modern + cross-scale attention, 14 classes, random weights) is
exported (`deploy.export`), quantised (`deploy.quantize`, calibrated on random images: latency does
not depend on the ranges) and pruned (`deploy.prune`, eager PyTorch). The four run interleaved in one
process, round after round, so load from other jobs falls on all of them alike; medians, as ratios to
eager. Threads: --threads for PyTorch and ONNX Runtime alike, and waiting threads sleep in both
(OMP_WAIT_POLICY=PASSIVE unless set otherwise; ONNX Runtime sessions are made without spinning by
`deploy.export.session`): with spinning threads, 2 threads on a machine busy with other jobs measured
the load, not the model (eager resnet50, batch 1: 1,242 ms spinning, 200 ms passive).

    .venv/bin/python benchmarks/bench_deploy.py [--backbones resnet50 convnext_tiny efficientnetv2_s] [--ratio 0.5]
"""

from __future__ import annotations

import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # read when torch's OpenMP starts: before `import torch`

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hybridmednet import create_model
from hybridmednet.checkpoint import save_checkpoint
from hybridmednet.deploy.export import export_onnx
from hybridmednet.deploy.prune import cost, prune_backbone
from hybridmednet.deploy.quantize import quantize_int8
from hybridmednet.deploy.runtime import OnnxModel


def medians(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each runner, timed in turn within every round (after one warm-up each)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def variants(backbone: str, size: int, ratio: float, threads: int, root: Path) -> tuple[dict, dict]:
    """The four models of one backbone, and their parameter / MAC counts."""
    torch.manual_seed(0)
    model = create_model(
        backbone, num_classes=14, image_size=size, use_modern_attention=True, use_cross_scale_attention=True
    ).eval()
    ckpt = save_checkpoint(
        root / f'{backbone}.pth',
        {'model_state_dict': model.state_dict(), 'config': model.config.to_dict(), 'class_names': model.class_names},
    )
    export_onnx(ckpt, root / f'{backbone}-onnx')
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, 3, size, size, generator=generator).numpy() for _ in range(4)]
    quantize_int8(root / f'{backbone}-onnx', root / f'{backbone}-int8', calibration)
    pruned = copy.deepcopy(model)
    prune_backbone(pruned, ratio)
    models = {
        'eager': model,
        'onnx fp32': OnnxModel(root / f'{backbone}-onnx', threads),
        'onnx int8': OnnxModel(root / f'{backbone}-int8', threads),
        'pruned': pruned,
    }
    counts = {'eager': cost(model, 1), 'pruned': cost(pruned, 1)}
    return models, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--backbones', nargs='+', default=['resnet50', 'convnext_tiny', 'efficientnetv2_s'])
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--batches', type=int, nargs='+', default=[1, 8])
    ap.add_argument('--ratio', type=float, default=0.5, help='pruning ratio (fraction of channels removed)')
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--threads', type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            models, counts = variants(backbone, args.size, args.ratio, args.threads, Path(tmp))
            for batch in args.batches:
                x = torch.randn(batch, 3, args.size, args.size)
                with torch.inference_mode():
                    t = medians({name: (lambda m=m, x=x: m(x)) for name, m in models.items()}, args.rounds)
                rows.append(
                    f'| {backbone} | {batch} | {1000 * t["eager"]:.0f} ms | '
                    + ' | '.join(
                        f'{1000 * t[name]:.0f} ms ({t["eager"] / t[name]:.2f}x)'
                        for name in ('onnx fp32', 'onnx int8', 'pruned')
                    )
                    + f' | {t["onnx fp32"] / t["onnx int8"]:.2f}x |'
                )
                print(rows[-1], flush=True)
            before, after = counts['eager'], counts['pruned']
            print(
                f'{backbone}: params {before["params"] / 1e6:.1f}M -> {after["params"] / 1e6:.1f}M, '
                f'MACs {before["macs"] / 1e9:.2f}G -> {after["macs"] / 1e9:.2f}G (ratio {args.ratio})',
                flush=True,
            )
    print(
        '\n| backbone | batch | eager | ONNX fp32 (vs eager) | ONNX int8 (vs eager) | pruned (vs eager) '
        '| int8 vs fp32 |\n|---|---|---|---|---|---|---|'
    )
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
