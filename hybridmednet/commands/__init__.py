"""The command layer: one module per `hybridmednet` subcommand.

Each module parses its arguments, loads the config once, calls library functions and prints what
they return. Nothing below this package parses arguments or prints errors: the library raises a
`HybridMedNetError`, and `run` turns it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from hybridmednet.config import Config, load_config
from hybridmednet.errors import HybridMedNetError

USAGE_ERROR = 2  # argparse's own status for a bad command line; ours for every user mistake


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f'hybridmednet {prog}', description=description)


def add_config(p: argparse.ArgumentParser, config_help: str = 'YAML file applied over the defaults') -> None:
    """--config FILE and SECTION.key=value overrides: the same meaning in every command."""
    p.add_argument('--config', metavar='FILE', help=config_help)
    p.add_argument(
        'overrides',
        nargs='*',
        metavar='SECTION.key=value',
        help='config overrides, e.g. DATA.data_dir=/data/nih TRAIN.epochs=5',
    )


def add_model(p: argparse.ArgumentParser) -> None:
    """--model_path, --device and --batch_size: the same meaning in every command that runs a model."""
    p.add_argument(
        '--model_path',
        required=True,
        metavar='PATH',
        help='training checkpoint (.pth) or .safetensors export (with its .json)',
    )
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (default cpu)')
    p.add_argument(
        '--batch_size', type=int, metavar='N', help="images per batch (default: the model's TRAIN.batch_size)"
    )


def config_from(args: argparse.Namespace, base: type[Config] = Config) -> Config:
    return load_config(args.config, args.overrides, base=base)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    print(f'warning: {message}', file=sys.stderr)


def run(name: str, body: Callable[[], int | None]) -> int:
    """Run a command body: user mistakes become one line on stderr and exit status 2; warnings one line each."""
    with warnings.catch_warnings():
        warnings.simplefilter('default', UserWarning)
        warnings.showwarning = _show_warning
        try:
            return body() or 0
        except HybridMedNetError as exc:
            print(f'hybridmednet {name}: error: {" ".join(str(exc).split())}', file=sys.stderr)
            return USAGE_ERROR


def print_rows(rows: Sequence[str], limit: int = 20) -> None:
    for row in rows[:limit]:
        print(row)
    if len(rows) > limit:
        print(f'... and {len(rows) - limit} more')
