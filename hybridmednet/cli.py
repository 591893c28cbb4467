"""`hybridmednet SUBCOMMAND ...`: maps each name to its module in hybridmednet/commands/ (only the
chosen one is imported)."""

from __future__ import annotations

import difflib
import importlib
import sys

from hybridmednet import __version__

COMMANDS = {
    'train': 'train a model from a config',
    'evaluate': 'metrics with confidence intervals, thresholds, report',
    'predict': 'score images (PNG/JPEG/DICOM), optional heatmaps',
    'card': 'write a model card from a checkpoint',
    'demo': 'train -> evaluate -> predict with heatmaps on the sample data',
    'sample-data': 'write the synthetic sample dataset (NIH layout)',
    'check-data': 'scan a dataset: missing/corrupt files, labels, splits',
    'cache': 'write a memory-mapped image cache for fast loading',
    'models': 'list the backbones with parameter counts',
    'export': 'export a checkpoint to ONNX, checked against PyTorch',
    'quantize': 'static int8 ONNX model, refused when validation AUC drops',
    'prune': 'remove channels from the backbone, fine-tune, write a checkpoint',
    'serve': 'HTTP API and web page that score uploaded images',
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print('usage: hybridmednet SUBCOMMAND [options]   (hybridmednet SUBCOMMAND --help)\n')
        for name, text in COMMANDS.items():
            print(f'  {name:12s} {text}')
        return 0 if argv else 2
    if argv[0] in ('-V', '--version'):
        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f'; did you mean {close[0]!r}?' if close else ''
        print(f'hybridmednet: unknown subcommand {argv[0]!r}{hint} (see hybridmednet --help)', file=sys.stderr)
        return 2
    module = importlib.import_module(f'hybridmednet.commands.{argv[0].replace("-", "_")}')
    return module.main(argv[1:])


if __name__ == '__main__':
    sys.exit(main())
