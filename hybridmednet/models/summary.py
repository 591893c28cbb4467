"""The registry as a table of parameter counts (built on the meta device: no memory, no time)."""

from __future__ import annotations

import torch

from hybridmednet.models.hybrid import create_model
from hybridmednet.models.registry import get_backbone_spec


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_row(name: str, **model_options) -> dict:
    """Backbone and whole-model parameter counts for the default attention settings."""
    spec = get_backbone_spec(name)
    row = {'backbone': name, 'family': spec.family, 'timm': spec.timm_name or '-', 'spec_m': spec.spec_params_m}
    with torch.device('meta'):
        model = create_model(name, **model_options)
    return {
        **row,
        'backbone_m': count_parameters(model.backbone) / 1e6,
        'model_m': count_parameters(model) / 1e6,
        'note': 'experimental' if spec.experimental else '',
    }


def format_table(rows: list[dict]) -> str:
    def num(v):
        return f'{v:8.1f}' if v is not None else f'{"-":>8}'

    lines = [
        f'{"backbone":18s} {"family":14s} {"backbone M":>10s} {"model M":>8s} {"SPEC M":>8s}  timm model / note',
        '-' * 96,
    ]
    for r in rows:
        lines.append(
            f'{r["backbone"]:18s} {r["family"]:14s} {num(r["backbone_m"]):>10s} {num(r["model_m"])} '
            f'{num(r["spec_m"])}  {r["note"] or r["timm"]}'
        )
    return '\n'.join(lines)
