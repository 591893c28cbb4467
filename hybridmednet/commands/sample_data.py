"""`hybridmednet sample-data OUT_DIR [--3d] [--n N] [--size S]`: write a synthetic sample dataset:
chest X-ray phantoms in the NIH layout, or with --3d CT-like volumes (NIfTI) in the CSV layout."""

from __future__ import annotations

import json
from pathlib import Path

from hybridmednet.commands import parser, run
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.data.synthetic_volumes import generate_sample_volumes


def main(argv: list[str] | None = None) -> int:
    p = parser('sample-data', 'Write a synthetic sample dataset (NIH ChestX-ray14 layout, or volumes with --3d).')
    p.add_argument('out_dir', type=Path)
    p.add_argument(
        '--3d',
        dest='volumes',
        action='store_true',
        help='volumes: NIfTI files and labels.csv (train with DATA.spatial_dims=3 DATA.dataset=csv)',
    )
    p.add_argument('--n', type=int, default=None, help='number of images (default 2000) or volumes (default 400)')
    p.add_argument('--size', type=int, default=None, help='side in pixels (default 256) or voxels (default 48)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=None, help='processes for images (default: up to 4)')
    args = p.parse_args(argv)

    def body() -> None:
        if args.volumes:
            out = generate_sample_volumes(args.out_dir, args.n or 400, args.size or 48, args.seed)
            unit = 'volumes'
        else:
            out = generate_sample_dataset(args.out_dir, args.n or 2000, args.size or 256, args.seed, args.workers)
            unit = 'images'
        info = json.loads((out / 'sample_info.json').read_text())
        print(f'wrote {info["n"]} {unit} of {info["patients"]} patients to {out}')
        print(f'{unit} per finding: ' + ', '.join(f'{k} {v}' for k, v in info['label_counts'].items()))

    return run('sample-data', body)
