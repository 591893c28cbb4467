"""`hybridmednet prune --model_path CHECKPOINT --ratio R [--epochs N] [--output_dir DIR] [SECTION.key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from hybridmednet.checkpoint import load_model, preprocessing, save_checkpoint, write_model_entries
from hybridmednet.commands import add_config, parser, run
from hybridmednet.deploy.export import default_output_dir
from hybridmednet.deploy.prune import check_prunable, cost, prune_backbone
from hybridmednet.engine.trainer import train
from hybridmednet.errors import ConfigError
from hybridmednet.models.hybrid import HybridMedNet


def main(argv: list[str] | None = None) -> int:
    p = parser(
        'prune',
        'Remove a fraction of the channels of every backbone layer (attention, fusion and head follow), '
        'fine-tune, and write a checkpoint every command reads.',
    )
    p.add_argument('--model_path', required=True, metavar='PATH', help='training checkpoint (.pth) or .safetensors')
    p.add_argument('--ratio', type=float, required=True, help='fraction of channels to remove, e.g. 0.5')
    p.add_argument('--epochs', type=int, default=3, help="fine-tuning epochs on the model's data (0: none)")
    p.add_argument('--output_dir', metavar='DIR', help='default: <checkpoint name>-pruned beside the checkpoint')
    add_config(p, "YAML applied over the checkpoint's config for fine-tuning (e.g. TRAIN.learning_rate)")
    args = p.parse_args(argv)

    def body() -> None:
        loaded, config, meta = load_model(args.model_path)
        model = cast(HybridMedNet, loaded)
        trained_as = dict(config.MODEL)
        if args.config:
            config.merge_yaml(args.config)
        config.apply_overrides(args.overrides).validate()
        if config.MODEL != trained_as:
            raise ConfigError('prune takes the model from the checkpoint; override TRAIN or DATA settings only')
        check_prunable(config.MODEL['backbone'], args.ratio)
        out = Path(args.output_dir) if args.output_dir else default_output_dir(args.model_path, 'pruned')
        before = cost(model)
        history = (meta.get('pruning') or {}).get('history', []) + prune_backbone(model, args.ratio)
        after = cost(model)
        record: dict[str, Any] = {
            'history': history,
            'ratio': args.ratio,
            'source': str(args.model_path),
            **{key: {'before': before[key], 'after': after[key]} for key in ('params', 'macs')},
        }
        for key, unit, scale in (('params', 'M', 1e6), ('macs', 'G', 1e9), ('latency_ms', ' ms', 1.0)):
            print(
                f'{key:11s} {before[key] / scale:8.2f}{unit} -> {after[key] / scale:8.2f}{unit} '
                f'({before[key] / after[key]:.2f}x smaller)'
            )
        if args.epochs == 0:
            path = save_checkpoint(
                out / 'pruned_model.pth',
                {
                    'model_state_dict': model.state_dict(),
                    'config': config.to_dict(),
                    'class_names': config.class_names,
                    'preprocessing': preprocessing(config),
                    'pruning': record,
                    # the heatmaps' healthy films are inputs, as valid for the pruned model; what was fitted
                    # on the outputs (thresholds, calibration, OOD model) is not
                    'heatmap_reference': meta.get('heatmap_reference'),
                },
            )
            print(f'pruned model (not fine-tuned; thresholds are fitted again by evaluate): {path}')
            return
        config.TRAIN['epochs'] = args.epochs
        config.CHECKPOINT['dir'] = str(out)
        config.LOGGING['log_dir'] = str(out / 'logs')
        result = train(config.validate(), model=model)
        for path in (result['best_checkpoint'], result['last_checkpoint']):
            if Path(path).is_file():
                write_model_entries(path, {'pruning': record})
        print(f'pruned and fine-tuned for {result["epochs"]} epoch(s): {result["best_checkpoint"]} (+ .safetensors)')

    return run('prune', body)
