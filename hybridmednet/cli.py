"""`hybridmednet SUBCOMMAND ...`: a thin dispatcher; each subcommand is a `main(argv)` a user can call from Python."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    'train': ('hybridmednet.engine.trainer:main', 'train a model from a config'),
    'evaluate': ('hybridmednet.evaluation.evaluate:main', 'metrics with confidence intervals, thresholds, report'),
    'predict': ('hybridmednet.evaluation.predict:main', 'score images (PNG/JPEG/DICOM), optional heatmaps'),
    'card': ('hybridmednet.evaluation.card:main', 'write a model card from a checkpoint'),
    'demo': ('hybridmednet.demo:main', 'train -> evaluate -> predict with heatmaps on the sample data'),
    'sample-data': ('hybridmednet.data.synthetic:main', 'write the synthetic sample dataset (NIH layout)'),
    'check-data': ('hybridmednet.data.check:main', 'scan a dataset: missing/corrupt files, labels, splits'),
    'cache': ('hybridmednet.data.cache:main', 'write a memory-mapped image cache for fast loading'),
    'models': ('hybridmednet.models.summary:main', 'list the backbones with parameter counts'),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print('usage: hybridmednet SUBCOMMAND [options]   (hybridmednet SUBCOMMAND --help)\n')
        for name, (_, text) in COMMANDS.items():
            print(f'  {name:12s} {text}')
        return 0 if argv else 2
    if argv[0] in ('-V', '--version'):
        from hybridmednet import __version__
        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ''
        print(f"hybridmednet: unknown subcommand {argv[0]!r}{hint} (see hybridmednet --help)", file=sys.stderr)
        return 2
    module_name, _, func = COMMANDS[argv[0]][0].partition(':')
    return getattr(importlib.import_module(module_name), func)(argv[1:]) or 0


if __name__ == '__main__':
    sys.exit(main())
