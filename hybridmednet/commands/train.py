"""`hybridmednet train [--config FILE] [--resume PATH] [SECTION.key=value ...]` (and the root train.py)."""

from __future__ import annotations

from hybridmednet.checkpoint import load_checkpoint
from hybridmednet.commands import add_config, config_from, parser, run
from hybridmednet.config import Config
from hybridmednet.engine.trainer import train

INTERRUPTED = 130  # the shell's status for Ctrl-C: a resumable checkpoint was written


def main(argv: list[str] | None = None, base: type[Config] = Config) -> int:
    p = parser('train', 'Train a HybridMedNet. Without DATA.data_dir it trains on the built-in sample dataset.')
    add_config(p)
    p.add_argument(
        '--resume',
        metavar='PATH',
        help="continue exactly from a checkpoint (with the checkpoint's own config unless --config is given)",
    )
    args = p.parse_args(argv)

    def body() -> int:
        if args.resume and not args.config:
            config = base.from_dict(load_checkpoint(args.resume)['config']).apply_overrides(args.overrides).validate()
        else:
            config = config_from(args, base)
        return INTERRUPTED if train(config, args.resume)['interrupted'] else 0

    return run('train', body)
