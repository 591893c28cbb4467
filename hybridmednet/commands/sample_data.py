"""`hybridmednet sample-data OUT_DIR [--n N] [--size S]`: write the synthetic sample dataset (NIH layout)."""

from __future__ import annotations

import json
from pathlib import Path

from hybridmednet.commands import parser, run
from hybridmednet.data.synthetic import generate_sample_dataset


def main(argv: list[str] | None = None) -> int:
    p = parser('sample-data', 'Write the synthetic sample dataset (NIH ChestX-ray14 layout).')
    p.add_argument('out_dir', type=Path)
    p.add_argument('--n', type=int, default=2000, help='number of images (default 2000)')
    p.add_argument('--size', type=int, default=256, help='image side in pixels (default 256)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=None, help='processes (default: up to 4)')
    args = p.parse_args(argv)

    def body() -> None:
        out = generate_sample_dataset(args.out_dir, args.n, args.size, args.seed, args.workers)
        info = json.loads((out / 'sample_info.json').read_text())
        print(f'wrote {info["n"]} images of {info["patients"]} patients to {out}')
        print('images per finding: ' + ', '.join(f'{k} {v}' for k, v in info['label_counts'].items()))

    return run('sample-data', body)
