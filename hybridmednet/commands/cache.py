"""`hybridmednet cache [--config FILE] [--size S] [SECTION.key=value ...]`: write the memory-mapped image cache."""

from __future__ import annotations

import json
import os

from hybridmednet.commands import add_config, config_from, parser, run
from hybridmednet.data.cache import cache_dir, write_cache
from hybridmednet.data.datasets import build_index


def main(argv: list[str] | None = None) -> int:
    p = parser('cache', 'Write the memory-mapped image cache for a dataset.')
    add_config(p)
    p.add_argument('--size', type=int, default=256, help='cached image side in pixels (default 256)')
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    def body() -> None:
        config = config_from(args)
        index = build_index(config)
        root = write_cache(
            list(dict.fromkeys(index.records['path'])),
            index.data_dir,
            cache_dir(config, index.data_dir),
            args.size,
            args.workers,
            config.DATA['skip_bad_images'],
            config.DATA['intensity'],
        )
        meta = json.loads((root / 'meta.json').read_text())
        print(
            f'cached {meta["count"]} images at {args.size} px in {root}'
            + (f' ({meta["skipped"]} unreadable skipped)' if meta['skipped'] else '')
        )

    return run('cache', body)
