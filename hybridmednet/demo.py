"""`hybridmednet demo`: the main job on the built-in sample data, end to end and offline.

train (configs/quickstart.yaml) -> evaluate on the test split (metrics with confidence
intervals, thresholds fitted on validation) -> predict a few test images with Grad-CAM heatmaps.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hybridmednet.config import ConfigError, load_config

QUICKSTART = Path(__file__).resolve().parents[1] / 'configs' / 'quickstart.yaml'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog='hybridmednet demo', description=__doc__.splitlines()[0])
    ap.add_argument('--config', default=str(QUICKSTART), help='training config (default: configs/quickstart.yaml)')
    ap.add_argument('--out', default='outputs/demo', help='where checkpoints, logs, report and heatmaps go')
    ap.add_argument('--n_predict', type=int, default=6, help='test images to predict with heatmaps')
    ap.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='e.g. TRAIN.epochs=2')
    args = ap.parse_args(argv)
    out = Path(args.out)
    from hybridmednet.data.datasets import build_index
    from hybridmednet.engine.trainer import train
    from hybridmednet.evaluation import evaluate, predict
    try:
        config = load_config(args.config, [f'CHECKPOINT.dir={out / "checkpoints"}', f'LOGGING.log_dir={out / "logs"}',
                                           *args.overrides])
    except ConfigError as exc:
        print(f'hybridmednet demo: error: {exc}', file=sys.stderr)
        return 1

    print(f'[1/3] training {config.MODEL["backbone"]} on {config.DATA["data_dir"] or "sample"} data', flush=True)
    result = train(config)
    if result['interrupted']:
        return 130
    best = str(result['best_checkpoint'])

    print('\n[2/3] evaluating the best checkpoint on the test split', flush=True)
    if evaluate.main(['--model_path', best, '--save_results', '--output_dir', str(out / 'evaluation')]):
        return 1

    print(f'\n[3/3] predicting {args.n_predict} test images with Grad-CAM heatmaps', flush=True)
    records = build_index(config).records
    images = out / 'images'
    images.mkdir(parents=True, exist_ok=True)
    for path in records.loc[records['split'] == 'test', 'path'].head(args.n_predict):
        shutil.copy(path, images / Path(path).name)
    if predict.main(['--image_path', str(images), '--model_path', best, '--visualize',
                     '--save_dir', str(out / 'predictions')]):
        return 1
    print(f'\ndone. training curves: {out / "logs"}; report: {out / "evaluation"}; '
          f'heatmaps and predictions: {out / "predictions"}; model: {best}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
