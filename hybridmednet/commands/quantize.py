"""`hybridmednet quantize --model_path EXPORT_DIR [--calibration-data DIR] [--max-auc-drop 0.005] [--force]`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.special import expit

from hybridmednet.commands import add_config, parser, run
from hybridmednet.data.datasets import ChestXrayDataset, build_datasets
from hybridmednet.data.transforms import build_transforms
from hybridmednet.deploy import DeployError
from hybridmednet.deploy.export import default_output_dir, write_directory, write_meta
from hybridmednet.deploy.quantize import calibration_batches, quantize_int8
from hybridmednet.deploy.runtime import OnnxModel, load_exported
from hybridmednet.errors import DataError
from hybridmednet.evaluation.inference import dataset_outputs
from hybridmednet.evaluation.metrics import roc_auc


def mean_auc(model: OnnxModel, dataset: ChestXrayDataset, batch_size: int) -> float:
    """Mean ROC AUC over the findings that have both classes in `dataset` (NaN when none has)."""
    probs = expit(dataset_outputs(model, dataset, batch_size, desc='scoring')[0])
    aucs = roc_auc(dataset.labels, probs, dataset.mask)
    return float(np.mean(aucs[np.isfinite(aucs)])) if np.isfinite(aucs).any() else math.nan


def main(argv: list[str] | None = None) -> int:
    p = parser(
        'quantize',
        'Static int8 copy of an exported model (ONNX Runtime, calibrated on training images); refused when the '
        'validation mean AUC drops by more than --max-auc-drop.',
    )
    p.add_argument('--model_path', required=True, metavar='DIR', help='a directory written by `hybridmednet export`')
    p.add_argument(
        '--calibration-data',
        metavar='DIR',
        help="dataset folder whose train split calibrates and val split is scored (default: the model's DATA.data_dir)",
    )
    p.add_argument('--calibration-images', type=int, default=256, metavar='N', help='first N training images')
    p.add_argument('--max-auc-drop', type=float, default=0.005, help='largest validation mean AUC loss accepted')
    p.add_argument('--force', action='store_true', help='write the int8 model whatever the AUC says')
    p.add_argument('--batch_size', type=int, default=16, metavar='N')
    p.add_argument('--output_dir', metavar='DIR', help='default: <export dir>-int8')
    add_config(p, "YAML applied over the model's DATA settings (e.g. another labels file)")
    args = p.parse_args(argv)

    def body() -> None:
        source = Path(args.model_path)
        model, config, _ = load_exported(source)
        if args.config:
            config.merge_yaml(args.config)
        config.apply_overrides(args.overrides)
        if args.calibration_data:
            config.DATA['data_dir'] = args.calibration_data
        config.validate()
        if not config.DATA['data_dir']:
            raise DataError(f'{source} names no dataset; give the calibration images with --calibration-data DIR')
        datasets = build_datasets(config)
        train, val = datasets['train'], datasets['val']
        if len(train) == 0 or args.calibration_images < 1:
            raise DataError(
                f'no calibration images: the train split of {train.data_dir} is empty (or '
                f'--calibration-images < 1); give a dataset with training images with --calibration-data DIR'
            )
        if len(val) == 0 and not args.force:
            raise DataError(
                f'the val split of {val.data_dir} is empty, so the AUC cannot be checked; give data with a '
                f'validation split, or --force to quantise unchecked'
            )
        train.transform = build_transforms(config, train=False)  # calibrate on the images as predict sees them
        before = mean_auc(model, val, args.batch_size) if len(val) else math.nan
        out = Path(args.output_dir) if args.output_dir else default_output_dir(source.resolve(), 'int8')

        def fill(directory: Path) -> dict:
            record = quantize_int8(source, directory, calibration_batches(train, args.calibration_images))
            after = mean_auc(OnnxModel(directory), val, args.batch_size) if len(val) else math.nan
            drop = before - after
            if not args.force and not drop <= args.max_auc_drop:
                raise DeployError(
                    f'{source}: int8 lowers the validation mean AUC from {before:.4f} to {after:.4f} (drop '
                    f'{drop:.4f} > --max-auc-drop {args.max_auc_drop}); nothing was written. Calibrate on more '
                    f'images (--calibration-images), or --force to keep it anyway'
                )
            record['quantization']['val_mean_auc'] = {'float': before, 'int8': after, 'images': len(val)}
            write_meta(directory, record)
            return record

        record = write_directory(out, fill)
        auc = record['quantization']['val_mean_auc']
        print(
            f'int8 model: {out} ({record["quantization"]["calibration_images"]} calibration images); validation '
            f'mean AUC {auc["float"]:.4f} -> {auc["int8"]:.4f} on {auc["images"]} images'
        )

    return run('quantize', body)
