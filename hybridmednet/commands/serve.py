"""`hybridmednet serve --model_path CKPT_OR_DIR [--host 127.0.0.1] [--port 8000] [--workers N] [--token T]`."""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import warnings

from hybridmednet.commands import add_model, parser, run
from hybridmednet.serve import ServeError
from hybridmednet.serve.batching import GPU_MAX_BATCH

TOKEN_ENV = 'HYBRIDMEDNET_TOKEN'
# glibc's mallopt parameters, and the values the server runs with (also set in the environment for --workers)
MALLOC_SETTINGS = {
    'MALLOC_ARENA_MAX': (-8, 2),
    'MALLOC_MMAP_THRESHOLD_': (-3, 8 << 20),
    'MALLOC_TRIM_THRESHOLD_': (-1, 64 << 20),
}


def _tame_malloc() -> None:
    """Keep the server's memory flat without making it page-fault. Each request allocates and frees images
    and activations of 1-40 MB on one of several threads; glibc by default gives each thread its own arena
    and, once such a block is freed, raises its mmap threshold so that later ones come from the heap, where
    freed memory stays: RSS drifted from 1,234 to 1,333 MiB over 5,000 requests (resnet18, 224 px, 8 clients)
    with two arenas alone. A fixed threshold keeps the big blocks (a batch's activations, a DICOM's pixels)
    out of the heap; but fixing it also freezes the trim threshold at 128 KiB, and at a 1 MiB mmap threshold
    every batch-1 activation was a fresh mmap: a DICOM with heatmaps took 340-380 ms instead of 290 (convnext_tiny).
    8 MiB / 64 MiB (measured, convnext_tiny, 8 clients): RSS +2.6-3.6 % over 1,000 requests, flat after the
    first 250, at the speed of glibc's defaults."""
    for name, (_, value) in MALLOC_SETTINGS.items():
        os.environ.setdefault(name, str(value))
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc: nothing to tune
        return
    for name, (parameter, _) in MALLOC_SETTINGS.items():
        setting = os.environ[name]
        if not setting.isdigit():
            raise ServeError(f'${name} must be a whole number of bytes (or arenas), got {setting!r}')
        libc.mallopt(parameter, int(setting))


def _positive(kind: type[int] | type[float], what: str):
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f'{what} must be above 0, got {text}')
        return value

    return parse


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == 'localhost'


def main(argv: list[str] | None = None) -> int:
    p = parser(
        'serve',
        'An HTTP API and a web page that score uploaded chest X-rays (PNG, JPEG, DICOM) with one model: '
        'a checkpoint through PyTorch, or an exported ONNX folder through ONNX Runtime. Open http://HOST:PORT/.',
    )
    add_model(p)
    batch_help = (
        'most images in one forward pass (default: on the CPU 4 at 224 px and 1 from 320 px, as larger batches are '
        f'slower per image there; {GPU_MAX_BATCH} on a GPU)'
    )
    for action in p._actions:  # the shared --batch_size means the same here, with the server's default
        if action.dest == 'batch_size':
            action.help = batch_help
    p.add_argument('--max-batch', dest='batch_size', type=_positive(int, '--max-batch'), metavar='N', help=batch_help)
    p.add_argument(
        '--batch-wait-ms',
        type=float,
        default=5.0,
        metavar='MS',
        help='how long a batch waits for requests already arriving (default 5; 0: never waits)',
    )
    p.add_argument(
        '--host',
        default='127.0.0.1',
        help='address to listen on (default 127.0.0.1: this machine only; patient images should not cross a network '
        'without TLS in front)',
    )
    p.add_argument('--port', type=int, default=8000, help='port (default 8000)')
    p.add_argument(
        '--workers',
        type=_positive(int, '--workers'),
        default=1,
        metavar='N',
        help='server processes, each with its own copy of the model (default 1)',
    )
    p.add_argument(
        '--token',
        default=os.environ.get(TOKEN_ENV),
        help=f'require "Authorization: Bearer TOKEN" on the API (default: ${TOKEN_ENV}, which keeps it out of ps)',
    )
    p.add_argument(
        '--max-upload-mb',
        type=_positive(float, '--max-upload-mb'),
        default=50.0,
        metavar='MB',
        help='largest accepted upload (default 50)',
    )
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f'--batch_size must be above 0, got {args.batch_size}')
    if args.batch_wait_ms < 0:
        p.error(f'--batch-wait-ms must be 0 or more, got {args.batch_wait_ms}')
    if not 0 <= args.port <= 65535:
        p.error(f'--port must lie in 0..65535, got {args.port}')

    def body() -> int:
        try:
            import uvicorn

            from hybridmednet.serve.app import Settings, create_app, settings_environment
            from hybridmednet.serve.inference import ServedModel
        except ImportError as exc:
            raise ServeError(f"serve needs FastAPI and uvicorn: pip install 'hybridmednet[serve]' ({exc})") from None
        settings = Settings(
            model_path=args.model_path,
            device=args.device,
            token=args.token or None,
            max_upload_mb=args.max_upload_mb,
            max_batch=args.batch_size or 0,
            batch_wait_ms=args.batch_wait_ms,
        )
        if settings.token is None and not _is_loopback(args.host):
            warnings.warn(
                f'serving on {args.host} without a token: anyone who can reach the port can upload images '
                f'(set ${TOKEN_ENV})',
                stacklevel=1,
            )
        _tame_malloc()
        served = ServedModel.load(args.model_path, args.device)  # a bad model is one line and status 2, here
        backbone = served.config.MODEL['backbone']
        print(
            f'serving {served.name} ({backbone}, {served.runtime}, weights {served.weights_hash}) '
            f'on http://{args.host}:{args.port}/' + (' with a bearer token' if settings.token else '')
        )
        if served.heatmap_timing:
            mode = 'side by side' if served.heatmap_pool else 'one after the other'
            print(f'heatmaps computed {mode} ({served.heatmap_timing}, measured at load)')
        if args.workers == 1:
            uvicorn.run(create_app(settings, served), host=args.host, port=args.port, log_level='info')
        else:
            del served  # each worker process loads its own copy
            os.environ.update(settings_environment(settings))
            uvicorn.run(
                'hybridmednet.serve.app:app_from_environment',
                factory=True,
                host=args.host,
                port=args.port,
                workers=args.workers,
                log_level='info',
            )
        return 0

    return run('serve', body)
