"""`hybridmednet models [--family F]`: the registered backbones with parameter counts."""

from __future__ import annotations

from hybridmednet.commands import parser, run
from hybridmednet.errors import ConfigError
from hybridmednet.models.registry import get_backbone_spec, list_backbones
from hybridmednet.models.summary import format_table, parameter_row


def main(argv: list[str] | None = None) -> int:
    p = parser('models', 'List backbones with parameter counts (modern + cross-scale attention, 14 classes).')
    p.add_argument('--family', help='only this family (e.g. convnext, swin, resnet)')
    args = p.parse_args(argv)

    def body() -> None:
        names = list_backbones(args.family)
        if not names:
            families = sorted({get_backbone_spec(n).family for n in list_backbones()})
            raise ConfigError(f'no backbones in family {args.family!r}; families: {", ".join(families)}')
        print(format_table([parameter_row(n) for n in names]))

    return run('models', body)
