"""The evaluation report: one results dict, written as JSON (every number), Markdown and HTML.

Markdown and HTML come from the same list of sections (headings, paragraphs, tables, figures),
so the two can never disagree.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridmednet.evaluation.localization import localization_rows
from hybridmednet.evaluation.metrics import FEW_POSITIVES

RATES = ('sensitivity', 'specificity', 'ppv', 'npv', 'f1')
RATE_LABELS = {'sensitivity': 'Sensitivity', 'specificity': 'Specificity', 'ppv': 'PPV', 'npv': 'NPV', 'f1': 'F1'}


# What the localisation section says of the heatmaps it scored (evaluate.localization_check's 'heatmaps').
HEATMAP_KINDS = {
    'nearest': 'Heatmaps: integrated gradients from the mean of the healthy training images nearest to each '
    'image (stored with the model), smoothed.',
    'integrated': 'Heatmaps: integrated gradients from the mean of healthy training images (stored with the '
    'model), smoothed.',
    'plain': 'Heatmaps: HiResCAM on the backbone trunk (the model file holds no healthy reference images; a model '
    'trained now stores them).',
    'other size': 'Heatmaps: HiResCAM on the backbone trunk (the images were evaluated at another input size '
    'than the model was trained at, which its healthy reference images do not fit).',
    # results.json written before 2026-12-01, which a model card still reads
    'relative': 'Heatmaps: HiResCAM on the backbone trunk, relative to its mean maps over healthy training images.',
}


def jsonable(obj: Any) -> Any:
    """Numpy values to plain Python; NaN and infinities to None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=1, allow_nan=False))
    return path


# -- formatting -------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 3) -> str:
    return '—' if value is None or (isinstance(value, float) and not math.isfinite(value)) else f'{value:.{digits}f}'


def fmt_ci(stat: dict | None, digits: int = 3) -> str:
    """'0.812 (0.790–0.833)', or '—' for a statistic the data cannot define."""
    if not stat or fmt(stat.get('value')) == '—':
        return '—'
    return f'{fmt(stat["value"], digits)} ({fmt(stat.get("ci_low"), digits)}–{fmt(stat.get("ci_high"), digits)})'


INTERVAL_NAMES = {'percentile': 'percentile', 'bca': 'bias-corrected and accelerated (BCa)'}


# -- document model ---------------------------------------------------------------------------------
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative path)


def to_markdown(title: str, sections: list[Section]) -> str:
    def cell(text: str) -> str:
        return str(text).replace('|', '\\|')

    lines = [f'# {title}', '']
    for s in sections:
        lines += [f'## {s.title}', '']
        for p in s.paragraphs:
            lines += [p, '']
        for t in s.tables:
            lines.append('| ' + ' | '.join(map(cell, t.header)) + ' |')
            lines.append('|' + '---|' * len(t.header))
            lines += ['| ' + ' | '.join(map(cell, row)) + ' |' for row in t.rows]
            lines.append('')
        for caption, src in s.figures:
            lines += [f'![{caption}]({src})', '']
    return '\n'.join(lines)


def to_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    body = [f'<h1>{e(title)}</h1>']
    for s in sections:
        body.append(f'<h2>{e(s.title)}</h2>')
        body += [f'<p>{e(p)}</p>' for p in s.paragraphs]
        for t in s.tables:
            head = ''.join(f'<th>{e(h)}</th>' for h in t.header)
            rows = ''.join('<tr>' + ''.join(f'<td>{e(str(c))}</td>' for c in row) + '</tr>' for row in t.rows)
            body.append(f'<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
        body += [
            f'<figure><img src="{e(src)}" alt="{e(cap)}"><figcaption>{e(cap)}</figcaption></figure>'
            for cap, src in s.figures
        ]
    style = (
        'body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}'
        'table{border-collapse:collapse;margin:1em 0;font-size:90%}'
        'td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}'
        'img{max-width:100%}'
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>'
        f'<style>{style}</style></head><body>\n' + '\n'.join(body) + '\n</body></html>\n'
    )


# -- the evaluation report --------------------------------------------------------------------------
def evaluation_sections(results: dict) -> list[Section]:
    """Sections of the evaluation report, from the results dict that evaluate.py writes as JSON."""
    results = jsonable({k: v for k, v in results.items() if k != 'predictions'})  # per-image arrays: JSON only
    settings, data, metrics = results['settings'], results['data'], results['metrics']
    level = round(100 * settings['confidence_level'])
    per = metrics['per_finding']
    names = list(per)
    unit = 'patients' if data['resampling'] == 'patient' else 'images'
    summary = Section(
        'Summary',
        [
            f'Model {results["model"]["path"]} ({results["model"]["backbone"]}), '
            f'evaluated on the {data["split"]} split '
            f'of {data["dataset"]}: {data["n_images"]} images from {data["n_patients"]} patients.',
            f'Mean ROC AUC over findings: {fmt_ci(metrics["mean_auc"])} ({level}% CI).'
            + (
                f' Every image has exactly one label: top-1 accuracy {fmt(metrics["top1_accuracy"])} (the '
                f'ACC multi-class benchmarks such as MedMNIST state beside the mean AUC).'
                if metrics.get('top1_accuracy') is not None
                else ''
            ),
            f'Intervals: {INTERVAL_NAMES[settings.get("interval", "percentile")]} bootstrap, '
            f'{settings["bootstrap_samples"]} resamples of {unit}'
            + (
                f'; the mean AUC interval rests on the {used} resamples in which every finding has positives '
                f'and negatives'
                if (used := metrics['mean_auc'].get('resamples_used', settings['bootstrap_samples']))
                < settings['bootstrap_samples']
                else ''
            )
            + '.',
            f'Thresholds: {results["operating_point"].get("method")} rule'
            + (
                f' (target sensitivity {settings["target_sensitivity"]})'
                if results['operating_point'].get('method') == 'sensitivity'
                else ''
            )
            + f', {results["operating_point"].get("source", "fitted on the validation split")}'
            + '; positive when probability >= threshold.',
        ],
    )
    ranking = Table(
        ['Finding', 'Positives', 'Negatives', f'ROC AUC ({level}% CI)', f'Average precision ({level}% CI)'],
        [
            [
                n + (' *' if per[n].get('few_positives') else ''),
                str(per[n]['n_pos']),
                str(per[n]['n_neg']),
                fmt_ci(per[n]['auc']),
                fmt_ci(per[n]['ap']),
            ]
            for n in names
        ],
    )
    operating = Table(
        ['Finding', 'Threshold', *(RATE_LABELS[r] for r in RATES)],
        [[n, fmt(per[n]['threshold']), *(fmt_ci(per[n][r]) for r in RATES)] for n in names],
    )
    sections = [
        summary,
        Section(
            'Discrimination',
            [
                f'Positives and negatives count labelled images of the {data["split"]} split. * marks a finding '
                f'with fewer than {FEW_POSITIVES} positive {unit}: its interval rests on very few cases; read it '
                f'as a rough range.'
            ],
            [ranking],
        ),
        Section('At the chosen thresholds', [f'Each cell: value ({level}% CI).'], [operating]),
    ]

    cal = results['calibration']
    temps = results['operating_point'].get('temperatures')
    platt = results['operating_point'].get('calibration')
    cal_rows = [
        [
            n,
            fmt(cal['ece_uncalibrated'][n]),
            fmt(cal['ece'][n]),
            *([fmt(platt['a'][n], 2), fmt(platt['b'][n], 2)] if platt else []),
            *([fmt(temps[n], 2)] if temps else []),
        ]
        for n in names
    ]
    how = []
    if platt:
        fitted = platt.get('fitted_on') or {}
        where = f' on the {fitted["split"]} split ({fitted["n_images"]} images)' if 'split' in fitted else ''
        how.append(f'Platt scaling fitted in training{where}: p = sigmoid(a * logit + b)')
    if temps:
        how.append('temperatures fitted on the validation split')
    sections.append(
        Section(
            'Calibration',
            [
                f'Expected calibration error over {cal["n_bins"]} equal-width bins (lower is better), of the raw '
                f'sigmoid outputs and of the probabilities this report and predict give; '
                + ('; '.join(how) if how else 'the model carries no calibration')
                + '.'
            ],
            [
                Table(
                    [
                        'Finding',
                        'ECE (raw)',
                        'ECE (reported probabilities)',
                        *(['Platt a', 'Platt b'] if platt else []),
                        *(['Temperature'] if temps else []),
                    ],
                    cal_rows,
                )
            ],
        )
    )

    if results.get('ood'):
        o = results['ood']
        sections.append(
            Section(
                'Out-of-distribution check',
                [
                    f'{o["n_flagged"]} of {data["n_images"]} images ({100 * o["rate"]:.1f} %) lie further from the '
                    f'training images than the threshold {fmt(o["threshold"], 1)} (Mahalanobis distance of the '
                    f'pooled feature maps; the {100 * o["quantile"]:g}th percentile of the validation images, so '
                    f'about {100 * o["expected_rate"]:.0f} % of images like the training ones are flagged). A much '
                    f'higher rate means this data differs from the training data (site, scanner, view, age, '
                    f'modality): read the metrics above with care. Per-image scores: results.json.'
                ],
            )
        )

    if results.get('localization'):
        loc = results['localization']
        head, rows = localization_rows(loc)
        sections.append(
            Section(
                'Localisation of the heatmaps',
                [
                    f'Heatmaps scored against the lesion boxes of {loc["n_images"]} images ({loc["boxes"]}). '
                    f'Pointing game: share of boxed findings whose heatmap peaks inside a box of that finding. '
                    f'IoBB > t: share of boxes covered by a detected region (heatmap >= {loc["threshold"]:g} of its '
                    f'maximum) with intersection over the detected box above t (Wang et al. 2017). In brackets: '
                    f"the same for the class-blind map (the mean of all findings' maps); a heatmap that does not "
                    f'beat it shows where something is abnormal, not which finding. '
                    + HEATMAP_KINDS[loc.get('heatmaps', 'plain')]
                ],
                [Table(head, rows)],
            )
        )

    for column, groups in results.get('subgroups', {}).items():
        labels = list(groups)
        header = ['', *labels]
        rows = [
            ['Images', *(str(groups[g]['n_images']) for g in labels)],
            ['Patients', *(str(groups[g]['n_patients']) for g in labels)],
            ['Mean AUC', *(fmt_ci(groups[g]['mean_auc']) for g in labels)],
        ]
        rows += [[n, *(fmt(groups[g]['auc'][n]) for g in labels)] for n in names]
        sections.append(
            Section(
                f'Subgroups by {column}',
                ['Per-finding ROC AUC in each subgroup (— where a subgroup lacks positives or negatives).'],
                [Table(header, rows)],
            )
        )

    if results.get('comparison'):
        c = results['comparison']
        d = c['mean_auc_diff']
        rows = [[n, fmt_ci(c['auc_diff'][n])] for n in names]
        sections.append(
            Section(
                'Comparison',
                [
                    f'This model against {c["other"]} on the same {c["n_images"]} images '
                    f'(paired bootstrap of {unit}): mean AUC {fmt(c["mean_auc_a"])} vs {fmt(c["mean_auc_b"])}, '
                    f'difference {fmt_ci(d)}, two-sided p = {fmt(d["p_value"])}.'
                ],
                [Table(['Finding', f'AUC difference ({level}% CI)'], rows)],
            )
        )

    captions = {
        'roc': 'ROC curves (dot: chosen threshold)',
        'pr': 'Precision-recall curves',
        'reliability': 'Reliability diagrams (reported probabilities)',
        'reliability_raw': 'Reliability diagrams (raw sigmoid outputs, before calibration)',
    }
    sections.append(Section('Figures', figures=[(captions.get(k, k), v) for k, v in results['figures'].items()]))
    return sections


def default_output_dir(model_path: str | Path, kind: str = 'results') -> Path:
    """Where a command writes for a model when no folder is given: <kind>/<model file stem>."""
    return Path(kind) / Path(model_path).stem


def report_paths(out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {'markdown': out_dir / 'report.md', 'html': out_dir / 'report.html', 'json': out_dir / 'results.json'}


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.md, report.html and results.json in `out_dir`; figure paths are relative to it."""
    out_dir = Path(out_dir)
    sections = evaluation_sections(results)
    title = f'HybridMedNet evaluation: {Path(results["model"]["path"]).name}'
    paths = report_paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths['markdown'].write_text(to_markdown(title, sections))
    paths['html'].write_text(to_html(title, sections))
    write_json(results, paths['json'])
    return paths
