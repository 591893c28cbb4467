"""Feature cache (TRAIN.feature_cache): epoch time of a dinov2_small linear probe at 224 px with and without it,
and whether the two runs train the same head.

One process, two Trainers built from the same seed (random weights: the cost does not depend on them) on the
same CSV dataset of PNG files: one runs the backbone every epoch on the unaugmented images, the other reads its
maps from the cache. Epochs alternate between the two, each with its own random streams swapped in, so a change
in machine load hits both and the dropout masks are each run's own. An epoch is training plus validation, as in
`Trainer.fit`. Prints seconds per epoch, the ratio, and the largest difference in validation metrics and weights.
First it counts floating-point operations (torch.utils.flop_counter): what the cache removes (the backbone's
forward pass) against what it cannot (attention, fusion and head, forward and backward), which bounds the
ratio whatever the machine, unless the head runs at a higher FLOP rate than the backbone.

    python benchmarks/bench_feature_cache.py                         # 96 train / 32 val images, 3 epochs
    python benchmarks/bench_feature_cache.py --train 256 --epochs 4
    python benchmarks/bench_feature_cache.py --attention cbam        # the lightest head: CBAM only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from hybridmednet.config import Config
from hybridmednet.data.datasets import build_datasets
from hybridmednet.data.transforms import build_transforms
from hybridmednet.engine.runtime import Dist, rng_state, set_rng_state
from hybridmednet.engine.trainer import Trainer


def write_dataset(folder: Path, n_train: int, n_val: int, size: int) -> None:
    """Noise images, label 'a' brighter, 'b' a bright left half; patient-level splits given in labels.csv."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train + n_val):
        a, b = rng.random() < 0.4, rng.random() < 0.3
        image = rng.normal(90 + 40 * a, 30, (size, size))
        image[:, : size // 2] += 30 * b
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f'{i}.png')
        labels = '|'.join(n for n, on in (('a', a), ('b', b)) if on) or 'No Finding'
        rows.append(f'{i}.png,{labels},p{i},{"train" if i < n_train else "val"}')
    (folder / 'labels.csv').write_text('image,labels,patient_id,split\n' + '\n'.join(rows) + '\n')


def make_config(data: Path, out: Path, cached: bool, batch_size: int, cbam_only: bool) -> Config:
    return Config(
        MODEL={
            'backbone': 'dinov2_small',
            'pretrained': False,
            'num_classes': 2,
            'finetune': 'linear',
            'use_modern_attention': not cbam_only,
            'use_cross_scale_attention': not cbam_only,
        },
        TRAIN={
            'batch_size': batch_size,
            'learning_rate': 1e-3,
            'warmup_epochs': 0,
            'lr_scheduler': 'none',
            'mixed_precision': False,
            'device': 'cpu',
            'feature_cache': cached,
        },
        DATA={
            'dataset': 'csv',
            'data_dir': str(data),
            'class_names': ['a', 'b'],
            'image_size': 224,
            'num_workers': 0,
            'train_split': 0.8,
            'val_split': 0.2,
            'test_split': 0.0,
        },
        CHECKPOINT={'dir': str(out / 'ckpt')},
        LOGGING={'log_dir': str(out / 'logs'), 'tensorboard': False},
    ).validate()


def flop_bound(model: torch.nn.Module, n_train: int, n_val: int) -> str:
    """The epoch's FLOPs without and with the cache, per image counted once on a 224 px input."""

    def flops(step) -> int:
        with FlopCounterMode(display=False) as counter:
            step()
        return counter.get_total_flops()

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = [m.detach() for m in model.backbone(x)]
        backbone = flops(lambda: model.backbone(x))
        head_eval = flops(lambda: model.forward_head(model.attention(maps)))
    modes = {module: module.training for module in model.modules()}  # a frozen backbone stays in eval mode
    model.train()
    head_train = flops(lambda: model.forward_head(model.attention(maps)).sum().backward())
    model.zero_grad(set_to_none=True)
    for module, training in modes.items():
        module.training = training
    plain = n_train * (backbone + head_train) + n_val * (backbone + head_eval)
    cached = n_train * head_train + n_val * head_eval
    return (
        f'FLOPs per image: backbone forward {backbone / 1e9:.2f} G (the cache removes it); attention + fusion + '
        f'head {head_train / 1e9:.3f} G training, {head_eval / 1e9:.3f} G validating (it stays): an epoch is at '
        f'most {plain / cached:.1f}x faster with the cache at equal FLOP rates'
    )


def trainer(data: Path, out: Path, cached: bool, batch_size: int, cbam_only: bool) -> Trainer:
    config = make_config(data, out, cached, batch_size, cbam_only)
    datasets = build_datasets(config)
    datasets['train'].transform = build_transforms(config, train=False)  # the cache's run is unaugmented too
    return Trainer(config, Dist(), torch.device('cpu'), datasets=datasets)


def epoch(tr: Trainer, number: int) -> tuple[float, dict]:
    start = time.perf_counter()
    tr.train_epoch(number)
    val = tr.score_validation(tr.eval_model())
    tr.progress.batch_in_epoch, tr.progress.epoch_loss = 0, [0.0, 0.0]
    return time.perf_counter() - start, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--train', type=int, default=96)
    parser.add_argument('--val', type=int, default=32)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--attention',
        choices=['hybrid', 'cbam'],
        default='hybrid',
        help='hybrid: the default attention (CBAM, pooled self-attention, cross-scale); cbam: CBAM only, the '
        'lightest head a probe can train',
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as train() sets it on a CPU
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ['HYBRIDMEDNET_CACHE'] = str(root / 'cache')
        (root / 'data').mkdir()
        write_dataset(root / 'data', args.train, args.val, 256)
        cbam_only = args.attention == 'cbam'
        plain = trainer(root / 'data', root / 'plain', False, args.batch_size, cbam_only)
        streams = {'plain': rng_state()}
        start = time.perf_counter()
        cached = trainer(root / 'data', root / 'cached', True, args.batch_size, cbam_only)  # computes the maps
        build = time.perf_counter() - start
        streams['cached'] = rng_state()
        runs = {'plain': plain, 'cached': cached}
        print(
            f'dinov2_small, 224 px, random weights, finetune linear, attention {args.attention}, '
            f'batch {args.batch_size}, '
            f'{args.train} train / {args.val} val images, {args.threads} threads'
        )
        print(flop_bound(plain.model, args.train, args.val))
        print(f'cache build (backbone over {args.train + args.val} images, once): {build:.2f} s')
        print('epoch  without cache  with cache  ratio')
        last: dict[str, dict] = {}
        ratios = []
        for e in range(args.epochs):
            seconds = {}
            for name, tr in runs.items():
                set_rng_state(streams[name])
                seconds[name], last[name] = epoch(tr, e)
                streams[name] = rng_state()
            ratios.append(seconds['plain'] / seconds['cached'])
            print(f'{e + 1:5d}  {seconds["plain"]:11.2f} s  {seconds["cached"]:8.3f} s  {ratios[-1]:5.1f}x')
        print(f'ratio per epoch: median {np.median(ratios):.1f}x, min {min(ratios):.1f}x')
        first = seconds['plain'] / (build + seconds['cached'])
        print(f'first epoch with the cache (build + epoch) vs without: {first:.2f}x')
        diff_auc = np.nanmax(np.abs(last['plain']['aucs'] - last['cached']['aucs']))
        diff_loss = abs(last['plain']['loss'] - last['cached']['loss'])
        a, b = plain.model.state_dict(), cached.model.state_dict()
        diff_weights = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        print(
            f'after {args.epochs} epochs: val mean AUC {last["plain"]["mean_auc"]:.6f} vs '
            f'{last["cached"]["mean_auc"]:.6f}; max |AUC diff| {diff_auc:.2e}, |val loss diff| {diff_loss:.2e}, '
            f'max |weight diff| {diff_weights:.2e}'
        )


if __name__ == '__main__':
    main()
