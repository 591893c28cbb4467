"""`hybridmednet predict --image_path FILE_OR_DIR --model_path PATH [--visualize] [--output_dir DIR]`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from hybridmednet.commands import add_model, parser, print_rows, run
from hybridmednet.deploy import DeployError
from hybridmednet.deploy.runtime import load_any_model
from hybridmednet.errors import DataError
from hybridmednet.evaluation.ood import OodModel
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.evaluation.predict import list_images, predict_files, write_predictions
from hybridmednet.models.hybrid import HybridMedNet

NOTHING_SCORED = 1


def main(argv: list[str] | None = None) -> int:
    p = parser(
        'predict',
        'Probabilities and positive findings per image (PNG, JPEG, DICOM), at the thresholds stored with the model.',
    )
    p.add_argument('--image_path', required=True, help='an image file or a folder (searched recursively)')
    add_model(p)
    p.add_argument('--visualize', action='store_true', help='a heatmap overlay per positive finding')
    p.add_argument(
        '--output_dir',
        '--save_dir',
        dest='output_dir',
        default='predictions',
        metavar='DIR',
        help='where predictions.csv/.json and heatmaps go (default predictions)',
    )
    p.add_argument(
        '--tta',
        action=argparse.BooleanOptionalAction,
        default=None,
        help='test-time augmentation (default: as when the stored thresholds were fitted, else EVAL.tta)',
    )
    args = p.parse_args(argv)

    def body() -> int:
        model, config, meta = load_any_model(args.model_path, map_location=args.device)
        if args.visualize and not isinstance(model, HybridMedNet):
            raise DeployError(
                f'{args.model_path} is an exported ONNX model, which gives no heatmaps; run --visualize '
                f'with the checkpoint it was exported from'
            )
        op = OperatingPoint.of_model(meta)
        volumes = config.DATA['spatial_dims'] == 3
        files = list_images(args.image_path, volumes)
        if not files:
            what = 'NIfTI files or DICOM series' if volumes else 'PNG, JPEG or DICOM files'
            raise DataError(f'no {what} in {args.image_path}')
        out = Path(args.output_dir)
        image_path = Path(args.image_path)
        root = image_path if image_path.is_dir() else image_path.parent
        fitted_with = (op.fitted_on or {}).get('tta')  # thresholds fit the outputs they were fitted on
        tta = (config.EVAL['tta'] if fitted_with is None else fitted_with) if args.tta is None else args.tta
        if fitted_with is not None and tta != fitted_with:
            warnings.warn(
                f'the thresholds were fitted with test-time augmentation {"on" if fitted_with else "off"}; '
                f'predicting with it {"on" if tta else "off"} moves the probabilities they were chosen for',
                stacklevel=1,
            )
        ood = OodModel.from_state(meta['ood']) if meta.get('ood') and isinstance(model, HybridMedNet) else None
        result = predict_files(
            model,
            config,
            op,
            files,
            root,
            args.batch_size or 16,
            args.device,
            tta,
            out / 'heatmaps' if args.visualize else None,
            ood,
        )
        written = write_predictions(result, op, args.model_path, out)
        print_rows(
            [
                f'{pred.path}: '
                + (', '.join(f'{n} ({pred.probabilities[n]:.2f})' for n in pred.positive_findings) or 'no finding')
                for pred in result.images
            ]
        )
        print(
            f'{len(result.images)} image(s) scored, {len(result.errors)} skipped; {written["csv"]}, '
            f'{written["json"]}' + (f', heatmaps in {out / "heatmaps"}' if args.visualize else '')
        )
        if result.errors:
            print('skipped (unreadable): ' + '; '.join(e['path'] for e in result.errors), file=sys.stderr)
        return 0 if result.images else NOTHING_SCORED

    return run('predict', body)
