"""`hybridmednet demo`: the main job on the built-in sample data, end to end and offline.

train (the shipped quickstart config) -> evaluate on the test split (metrics with confidence
intervals, thresholds fitted on validation) -> predict a few test images with heatmaps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hybridmednet.checkpoint import load_model
from hybridmednet.commands import add_config, config_from, parser, run
from hybridmednet.commands.train import INTERRUPTED
from hybridmednet.data.datasets import build_index
from hybridmednet.engine.trainer import train
from hybridmednet.evaluation.evaluate import evaluate_model, summary_table
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.evaluation.predict import list_images, predict_files, write_predictions


def main(argv: list[str] | None = None) -> int:
    p = parser('demo', __doc__.splitlines()[0])
    add_config(p, 'training config (default: quickstart, shipped with the package)')
    p.add_argument(
        '--output_dir',
        '--out',
        dest='output_dir',
        default='outputs/demo',
        metavar='DIR',
        help='where checkpoints, logs, report and heatmaps go (default outputs/demo)',
    )
    p.add_argument('--n_predict', type=int, default=6, help='test images to predict with heatmaps')
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    args.config = args.config or 'quickstart'
    args.overrides = [f'CHECKPOINT.dir={out / "checkpoints"}', f'LOGGING.log_dir={out / "logs"}', *args.overrides]

    def body() -> int:
        config = config_from(args)
        print(f'[1/3] training {config.MODEL["backbone"]} on {config.DATA["data_dir"] or "sample"} data', flush=True)
        result = train(config)
        if result['interrupted']:
            return INTERRUPTED
        best = result['best_checkpoint']

        print('\n[2/3] evaluating the best checkpoint on the test split', flush=True)
        results = evaluate_model(best, out_dir=out / 'evaluation')
        print(summary_table(results))

        print(f'\n[3/3] predicting {args.n_predict} test images with heatmaps', flush=True)
        records = build_index(config).records
        images = out / 'images'
        images.mkdir(parents=True, exist_ok=True)
        for path in records.loc[records['split'] == 'test', 'path'].head(args.n_predict):
            shutil.copy(path, images / Path(path).name)
        model, model_config, meta = load_model(best)
        op = OperatingPoint.of_model(meta)
        predictions = predict_files(
            model, model_config, op, list_images(images), images, heatmap_dir=out / 'predictions' / 'heatmaps'
        )
        write_predictions(predictions, op, str(best), out / 'predictions')
        for pred in predictions.images:
            print(f'{Path(pred.path).name}: {", ".join(pred.positive_findings) or "no finding"}')
        print(
            f'\ndone. training curves: {out / "logs"}; report: {out / "evaluation"}; '
            f'heatmaps and predictions: {out / "predictions"}; model: {best}'
        )
        return 0

    return run('demo', body)
