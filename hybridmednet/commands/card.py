"""`hybridmednet card --model_path PATH [--results results.json] [--output CARD.md]`."""

from __future__ import annotations

from hybridmednet.commands import parser, run
from hybridmednet.evaluation.card import write_card


def main(argv: list[str] | None = None) -> int:
    p = parser('card', 'Write a model card from a checkpoint and its evaluation results.')
    p.add_argument(
        '--model_path',
        required=True,
        metavar='PATH',
        help='training checkpoint (.pth) or .safetensors export (with its .json)',
    )
    p.add_argument(
        '--results', help='results.json from `evaluate --save_results` (default: results/<model name>/results.json)'
    )
    p.add_argument('--output', metavar='CARD.md', help='default: <model name>_card.md beside the model')
    args = p.parse_args(argv)

    def body() -> None:
        print(f'model card: {write_card(args.model_path, args.results, args.output)}')

    return run('card', body)
