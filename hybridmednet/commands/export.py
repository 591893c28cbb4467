"""`hybridmednet export --model_path CHECKPOINT [--format onnx] [--output_dir DIR]`."""

from __future__ import annotations

from hybridmednet.commands import parser, run
from hybridmednet.deploy.export import export_onnx


def main(argv: list[str] | None = None) -> int:
    p = parser(
        'export',
        'Export a checkpoint to a directory (model.onnx + model.json) that predict and evaluate accept; '
        'refused unless ONNX Runtime reproduces PyTorch on test images.',
    )
    p.add_argument(
        '--model_path',
        required=True,
        metavar='PATH',
        help='training checkpoint (.pth) or .safetensors export (with its .json)',
    )
    p.add_argument('--format', default='onnx', choices=('onnx',))
    p.add_argument('--output_dir', metavar='DIR', help='default: <checkpoint name>-onnx beside the checkpoint')
    args = p.parse_args(argv)

    def body() -> None:
        record = export_onnx(args.model_path, args.output_dir)
        check = record['parity']
        print(
            f'exported {args.model_path} to {record["output_dir"]} ({record["exporter"]} exporter, opset '
            f'{record["opset"]}); ONNX Runtime vs PyTorch max |diff| {check["max_abs_diff"]:.2e} at batches '
            f'{", ".join(map(str, check["batches"]))}'
        )

    return run('export', body)
