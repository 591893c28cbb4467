"""A model card from a checkpoint and its evaluation results (`hybridmednet card`).

Everything on the card comes from files: the checkpoint (config, epoch, thresholds) and the
results.json that `evaluate --save_results` wrote (data, split hashes, metrics with intervals).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from hybridmednet.checkpoint import load_model, weights_hash
from hybridmednet.errors import DataError
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.evaluation.report import (
    Section,
    Table,
    default_output_dir,
    evaluation_sections,
    fmt,
    fmt_ci,
    to_markdown,
)
from hybridmednet.models.summary import count_parameters

CARD_SECTIONS_FROM_REPORT = ('Discrimination', 'At the chosen thresholds', 'Calibration')

_INTENDED_USE = (
    'Research on multi-label {what} classification: comparing architectures, studying errors, and '
    'producing heatmaps for inspection. Not a medical device: it must not be used to diagnose, triage or '
    'treat patients, and its outputs need review by a qualified reader.'
)
INPUTS = {
    2: 'Inputs are expected to be frontal chest radiographs; other images still receive scores, which mean nothing.',
    3: 'Inputs are expected to be volumes like the training ones (modality, body region, orientation, intensity '
    'window); other volumes still receive scores, which mean nothing.',
}

LIMITS = [
    'Metrics hold for the test split named above; performance on other hospitals, scanners, populations or '
    'label definitions is unknown until measured there. Thresholds fitted on one site often give far too many '
    'or too few positives on another: re-fit them on local validation data (`hybridmednet evaluate`).',
    'Labels of public chest X-ray datasets are mined from reports and are noisy; the metrics inherit that noise.',
    'Findings with few positive test cases have wide intervals; rare findings may not have been learned.',
    'Heatmaps show where the evidence for a score lies, coarsely; they are not segmentations and '
    'can highlight shortcuts (text markers, devices) rather than pathology.',
]


def intended_use(spatial_dims: int = 2) -> str:
    """The card's intended-use paragraph, for images (2) or volumes (3)."""
    return _INTENDED_USE.format(what='chest X-ray' if spatial_dims == 2 else '3D volume (CT, MRI)')


def input_description(config, pre: dict[str, Any]) -> str:
    """What the model takes, from its stored preprocessing: the grid, how a file becomes it, its normalisation."""
    grid = ' x '.join(map(str, config.input_shape[1:]))
    norm = f'; mean {pre["mean"]}, std {pre["std"]}' if pre.get('mean') is not None else ''
    return f'{grid}, {config.input_shape[0]} channel(s): {pre["input"]}{norm}'


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def card_sections(
    model_path: str | Path, config, meta: dict[str, Any], n_params: int, results: dict | None
) -> list[Section]:
    m, names = config.MODEL, meta['class_names']
    op = OperatingPoint.from_meta(meta.get('thresholds'), names)
    details = Section(
        'Model details',
        tables=[
            Table(
                ['', ''],
                [
                    ['File', f'{Path(model_path).name} (sha256 {file_sha256(Path(model_path))[:16]})'],
                    [
                        'Architecture',
                        f'HybridMedNet, {m["backbone"]} backbone, '
                        + (
                            'modern self-attention'
                            + (' + cross-scale attention' if m['use_cross_scale_attention'] else '')
                            if m['use_modern_attention']
                            else 'CBAM attention'
                        )
                        + (', hierarchical head' if m['hierarchical'] else ''),
                    ],
                    ['Parameters', f'{n_params / 1e6:.1f}M'],
                    ['Input', input_description(config, meta['preprocessing'])],
                    ['Outputs', f'{len(names)} independent probabilities: {", ".join(names)}'],
                    [
                        'Training',
                        f'epoch {meta.get("epoch", "?")}'
                        + (
                            f', best validation mean AUC {fmt(meta["best_auc"])}'
                            if meta.get('best_auc') is not None
                            else ''
                        ),
                    ],
                ],
            )
        ],
    )
    dims = config.DATA['spatial_dims']
    sections = [details, Section('Intended use', [intended_use(dims)])]

    if results:
        d = results['data']
        rows = [[s, str(d['split_sizes'][s]), d['split_hashes'][s]] for s in d['split_hashes']]
        sections.append(
            Section(
                'Data',
                [
                    f'Dataset {d["dataset"]} at {d["data_dir"]}; patient-level splits (no patient in two splits). '
                    f'A split hash fingerprints the images and patient IDs it holds: '
                    f'the same hash means the same split.'
                ],
                [Table(['Split', 'Images', 'Hash'], rows)],
            )
        )
        sections.append(
            Section(
                'Evaluation',
                [
                    f'Mean ROC AUC on the {d["split"]} split: {fmt_ci(results["metrics"]["mean_auc"])} '
                    f'({round(100 * results["settings"]["confidence_level"])}% bootstrap CI over '
                    f'{"patients" if d["resampling"] == "patient" else "images"}; '
                    f'{d["n_images"]} images, {d["n_patients"]} patients).'
                ],
            )
        )
        sections += [s for s in evaluation_sections(results) if s.title in CARD_SECTIONS_FROM_REPORT]
    else:
        sections.append(
            Section(
                'Evaluation',
                [
                    'No evaluation results were found: run `hybridmednet evaluate --model_path ... --save_results` and '
                    'pass its results.json with --results. Until then this model has no measured performance.'
                ],
            )
        )

    fitted = (
        f'{op.method} rule, fitted on the {op.fitted_on["split"]} split ({op.fitted_on["n_images"]} images, '
        f'hash {op.fitted_on["hash"]})'
        if op.fitted and op.fitted_on
        else 'none fitted: predict uses 0.5 for every finding'
    )
    rows = [
        [n, fmt(t), fmt(op.temperatures[k], 2) if op.temperatures is not None else '—']
        for k, (n, t) in enumerate(zip(names, op.thresholds))
    ]
    sections.append(
        Section(
            'Thresholds stored with the model',
            [
                f'Operating point: {fitted}. A finding is reported when its probability >= its threshold; '
                f'temperatures (if any) divide the logits first.'
            ],
            [Table(['Finding', 'Threshold', 'Temperature'], rows)],
        )
    )
    limits = [*LIMITS, INPUTS[dims]]
    if meta.get('ood'):
        limits.append(
            'An out-of-distribution score (predict, evaluate, serve) flags inputs far from the training images; '
            'it catches gross mismatches (photographs, noise, other modalities), not subtle shifts.'
        )
    sections.append(Section('Limitations', [f'- {text}' for text in limits]))
    sections.append(
        Section('Configuration', ['```yaml\n' + yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip() + '\n```'])
    )
    return sections


def write_card(
    model_path: str | Path,
    results_path: str | Path | None = None,
    output: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """Write the model card (Markdown) and return its path (default: beside the model, <name>_card.md);
    `name`: what the title calls the model (default: the model file's name)."""
    model, config, meta = load_model(model_path)
    results_path = Path(results_path) if results_path else default_output_dir(model_path) / 'results.json'
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    if results and list(results['model']['class_names']) != list(meta['class_names']):
        raise DataError(f'{results_path} evaluates other findings than {model_path}')
    own_hash = weights_hash(model.state_dict())
    if results and results['model'].get('weights_hash') != own_hash:
        raise DataError(
            f'{results_path} was written for other weights than those in {model_path} (weights hash '
            f'{results["model"].get("weights_hash")} vs {own_hash}); evaluate this model '
            f'with `hybridmednet evaluate --model_path {model_path} --save_results`'
        )
    n_params = count_parameters(model)
    output = Path(output) if output else Path(model_path).with_name(f'{Path(model_path).stem}_card.md')
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        to_markdown(
            f'Model card: {name or Path(model_path).name}', card_sections(model_path, config, meta, n_params, results)
        )
    )
    return output
