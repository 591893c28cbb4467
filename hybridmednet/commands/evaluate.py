"""`hybridmednet evaluate --model_path PATH [--save_results] [options] [SECTION.key=value ...]` (and evaluate.py)."""

from __future__ import annotations

import argparse

from hybridmednet.commands import add_config, add_model, parser, run
from hybridmednet.config import THRESHOLD_METHODS
from hybridmednet.deploy.runtime import load_any_model
from hybridmednet.evaluation.evaluate import evaluate_model, summary_table
from hybridmednet.evaluation.report import default_output_dir

EVAL_OPTIONS = (
    'threshold_method',
    'target_sensitivity',
    'bootstrap_samples',
    'confidence_level',
    'temperature_scaling',
    'tta',
)


def main(argv: list[str] | None = None) -> int:
    p = parser(
        'evaluate',
        'Per-finding AUC, AP and operating-point metrics with bootstrap confidence intervals; '
        'thresholds fitted on the validation split and stored with the model.',
    )
    add_model(p)
    add_config(p, "YAML applied over the checkpoint's config (e.g. other data)")
    p.add_argument('--save_results', action='store_true', help='write report (md, html), figures and results.json')
    p.add_argument('--output_dir', metavar='DIR', help='where --save_results writes (default results/<model name>)')
    p.add_argument('--split', default='test', choices=('test', 'val'))
    p.add_argument('--threshold_method', choices=THRESHOLD_METHODS)
    p.add_argument('--target_sensitivity', type=float)
    p.add_argument('--bootstrap_samples', type=int)
    p.add_argument('--confidence_level', type=float)
    p.add_argument('--temperature_scaling', action=argparse.BooleanOptionalAction, default=None)
    p.add_argument('--tta', action=argparse.BooleanOptionalAction, default=None, help='test-time augmentation')
    p.add_argument('--compare', metavar='OTHER_RESULTS.json', help='paired bootstrap against another run')
    p.add_argument('--no_store_thresholds', action='store_true', help='leave the model files untouched')
    p.add_argument('--seed', type=int, default=0, help='bootstrap seed')
    args = p.parse_args(argv)
    options = {k: getattr(args, k) for k in EVAL_OPTIONS if getattr(args, k) is not None}
    out_dir = (args.output_dir or default_output_dir(args.model_path)) if args.save_results else None

    def body() -> None:
        results = evaluate_model(
            args.model_path,
            args.overrides,
            args.config,
            args.split,
            options,
            args.device,
            args.batch_size,
            out_dir,
            args.compare,
            not args.no_store_thresholds,
            args.seed,
            loader=load_any_model,  # checkpoints, and exported ONNX directories
        )
        print(summary_table(results))
        if results.get('stored_in'):
            print(f'thresholds ({results["operating_point"]["method"]}) stored in: {", ".join(results["stored_in"])}')
        if out_dir is not None:
            print(f'report: {results["written"]["html"]} (+ .md, results.json, figures) in {out_dir}')

    return run('evaluate', body)
