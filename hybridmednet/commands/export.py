"""`hybridmednet export --model_path CHECKPOINT [--format onnx] [--output_dir DIR]`."""

from __future__ import annotations

from hybridmednet.commands import parser, run
from hybridmednet.deploy.export import export_onnx
from hybridmednet.deploy.hub import save_pretrained


def main(argv: list[str] | None = None) -> int:
    p = parser(
        'export',
        'Export a checkpoint to a directory that predict and evaluate accept: ONNX (model.onnx + model.json), '
        'refused unless ONNX Runtime reproduces PyTorch on test images; or a Hugging Face model package '
        '(config.json + model.safetensors + README.md model card) for hybridmednet.from_pretrained and push_to_hub.',
    )
    p.add_argument(
        '--model_path',
        required=True,
        metavar='PATH',
        help='training checkpoint (.pth) or .safetensors export (with its .json)',
    )
    p.add_argument('--format', default='onnx', choices=('onnx', 'hf'))
    p.add_argument('--output_dir', metavar='DIR', help='default: <checkpoint name>-onnx (or -hf) beside the checkpoint')
    p.add_argument(
        '--results', metavar='PATH', help="hf: the results.json the model card reports (default: evaluate's)"
    )
    args = p.parse_args(argv)

    def body() -> None:
        if args.format == 'hf':
            folder = save_pretrained(args.model_path, args.output_dir, args.results)
            print(f'wrote the model package {folder} (config.json, model.safetensors, README.md)')
            return
        record = export_onnx(args.model_path, args.output_dir)
        check = record['parity']
        print(
            f'exported {args.model_path} to {record["output_dir"]} ({record["exporter"]} exporter, opset '
            f'{record["opset"]}); ONNX Runtime vs PyTorch max |diff| {check["max_abs_diff"]:.2e} at batches '
            f'{", ".join(map(str, check["batches"]))}'
        )

    return run('export', body)
