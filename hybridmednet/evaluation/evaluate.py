"""Evaluate a checkpoint (`hybridmednet evaluate`): the numbers a paper can state, with their uncertainty.

Thresholds (and temperatures, when asked) are fitted on the validation split, stored with the
model for predict, and applied unchanged to the test split. Every interval resamples patients
when patient IDs exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hybridmednet.checkpoint import load_model, weights_hash, write_thresholds
from hybridmednet.data.datasets import ChestXrayDataset, build_datasets
from hybridmednet.data.synthetic import BOX_FILE
from hybridmednet.errors import ConfigError, DataError
from hybridmednet.evaluation import metrics
from hybridmednet.evaluation.calibration import Calibration, apply_temperature, expected_calibration_error
from hybridmednet.evaluation.gradcam import heatmap_kind
from hybridmednet.evaluation.inference import dataset_outputs
from hybridmednet.evaluation.localization import localization_scores
from hybridmednet.evaluation.ood import OodModel
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.evaluation.plots import plot_pr_curves, plot_reliability, plot_roc_curves
from hybridmednet.evaluation.report import RATES, fmt, fmt_ci, report_paths, write_report
from hybridmednet.models.hybrid import HybridMedNet

AGE_BANDS = (0, 20, 40, 60, 80, 200)
SUBGROUP_COLUMNS = ('view', 'sex', 'age_band')
MIN_SUBGROUP_IMAGES = 20
N_BINS = 10
# (path, map_location=...) -> (model, Config, meta), like checkpoint.load_model
ModelLoader = Callable[..., tuple[Any, Any, dict[str, Any]]]


def age_band(age: pd.Series) -> pd.Series:
    labels = [f'{lo}-{hi - 1}' if hi < 200 else f'{lo}+' for lo, hi in zip(AGE_BANDS[:-1], AGE_BANDS[1:])]
    return pd.cut(pd.to_numeric(age, errors='coerce'), AGE_BANDS, right=False, labels=labels).astype(str)


def split_hash(records: pd.DataFrame, root: str | Path | None = None) -> str:
    """A short fingerprint of which images (and patients) a split holds, independent of where the data lives."""
    paths = records['path'].astype(str)
    if root is not None:
        paths = paths.map(lambda p: os.path.relpath(p, root))
    lines = sorted(f'{p}\t{q}' for p, q in zip(paths, records['patient_id'].astype(str)))
    return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16]


def _plain(part: str, value: Any) -> int | float:
    """A statistic's entry as JSON wants it: counts as ints, the rest as floats."""
    return int(value) if part == 'resamples_used' else float(value)


def per_finding(stats: dict, class_names: Sequence[str]) -> dict[str, dict]:
    """metrics.evaluate_predictions output ({stat: arrays over findings}) as {finding: {stat: ...}}."""
    out = {}
    for k, name in enumerate(class_names):
        row: dict[str, Any] = {
            'n_pos': int(stats['n_pos'][k]),
            'n_neg': int(stats['n_neg'][k]),
            'n_pos_units': int(stats['n_pos_units'][k]),
            'few_positives': bool(stats['few_positives'][k]),
        }
        for key, value in stats.items():
            if isinstance(value, dict) and np.ndim(value['value']) == 1:
                row[key] = {part: _plain(part, v[k]) for part, v in value.items()}
        out[name] = row
    return out


def subgroup_tables(
    records: pd.DataFrame,
    y: np.ndarray,
    probs: np.ndarray,
    mask: np.ndarray,
    class_names: Sequence[str],
    n_boot: int,
    level: float,
    seed: int,
    interval: str = 'percentile',
) -> dict[str, dict]:
    """Per-finding AUC and mean AUC (with its interval) in each view / sex / age band with enough images."""
    frame = records.copy()
    if 'age' in frame:
        frame['age_band'] = age_band(frame['age'])
    tables = {}
    for column in SUBGROUP_COLUMNS:
        if column not in frame:
            continue
        values = frame[column].astype(str)
        groups = {}
        for value in sorted(values.unique()):
            keep = (values == value).to_numpy()
            if value in ('nan', 'None', '') or keep.sum() < MIN_SUBGROUP_IMAGES:
                continue
            stats = metrics.evaluate_predictions(
                y[keep],
                probs[keep],
                mask[keep],
                None,
                frame['patient_id'][keep].to_numpy(),
                n_boot,
                level,
                seed,
                interval,
            )
            groups[value] = {
                'n_images': int(keep.sum()),
                'n_patients': int(frame['patient_id'][keep].nunique()),
                'mean_auc': stats['mean_auc'],
                'auc': dict(zip(class_names, stats['auc']['value'].tolist())),
            }
        if len(groups) > 1:
            tables[column] = groups
    return tables


def compare_with(
    other_path: str | Path,
    paths: Sequence[str],
    y: np.ndarray,
    mask: np.ndarray,
    probs: np.ndarray,
    patient_ids: np.ndarray | None,
    class_names: Sequence[str],
    n_boot: int,
    level: float,
    seed: int,
    interval: str = 'percentile',
) -> dict[str, Any]:
    """Paired bootstrap against another evaluate run's results.json, on the images both runs scored."""
    if not Path(other_path).is_file():
        raise DataError(f'--compare: {other_path} not found (give the results.json of `evaluate --save_results`)')
    other = json.loads(Path(other_path).read_text())
    pred = other.get('predictions')
    if not pred:
        raise DataError(f'{other_path} holds no per-image predictions (was it written by `evaluate --save_results`?)')
    if list(other['model']['class_names']) != list(class_names):
        raise DataError(f'{other_path} scores other findings: {other["model"]["class_names"]}')
    row = {p: i for i, p in enumerate(pred['path'])}
    mine = np.array([i for i, p in enumerate(paths) if p in row])
    if len(mine) == 0:
        raise DataError(f'{other_path} scored none of these images; compare runs on the same split')
    theirs = np.array([row[paths[i]] for i in mine])
    other_labels = np.asarray(pred['labels'], dtype=np.float64)[theirs]
    if not np.array_equal(other_labels * mask[mine], y[mine] * mask[mine]):
        raise DataError(f'{other_path} has other labels for the same images; the runs used different label files')
    other_probs = np.asarray(pred['probabilities'], dtype=np.float64)[theirs]
    groups = None if patient_ids is None else patient_ids[mine]
    out = metrics.compare_mean_auc(y[mine], probs[mine], other_probs, mask[mine], groups, n_boot, level, seed, interval)
    out['auc_diff'] = {
        n: {part: _plain(part, v[k]) for part, v in out['auc_diff'].items()} for k, n in enumerate(class_names)
    }
    return {'other': str(other_path), 'other_model': other['model']['path'], 'n_images': int(len(mine)), **out}


def has_ood(model: Any, meta: dict[str, Any]) -> bool:
    """Whether the model carries an OOD model and gives the features it scores (an export has no feature maps)."""
    return bool(meta.get('ood')) and isinstance(model, HybridMedNet)


def ood_check(meta: dict[str, Any], features: np.ndarray | None) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """The split's out-of-distribution scores against the model's stored OOD model: a summary and the
    per-image scores ((None, None) without features: see `has_ood`)."""
    if features is None:
        return None, None
    ood = OodModel.from_state(meta['ood'])
    scores = ood.score(features)
    flagged = scores > ood.threshold
    summary = {
        'threshold': ood.threshold,
        'quantile': ood.quantile,
        'n_flagged': int(flagged.sum()),
        'rate': float(flagged.mean()),
        'expected_rate': 1.0 - ood.quantile,
    }
    return summary, scores


def localization_check(model: Any, data: ChestXrayDataset) -> dict[str, Any] | None:
    """Heatmaps scored against the dataset's lesion boxes (NIH's BBox_List_2017.csv in its folder), when it
    has the file and the model has gradients (an ONNX export has none)."""
    boxes = Path(data.data_dir) / BOX_FILE
    if not boxes.is_file() or not isinstance(model, HybridMedNet):
        return None
    model.eval()
    reference = model.heatmap_reference
    heatmaps = heatmap_kind(model, data[0][0]) if len(data) else 'plain'
    if heatmaps == 'other size':
        model.heatmap_reference = None  # evaluated at another input size than trained: HiResCAM
    try:
        scores = localization_scores(model, data, boxes)
    finally:
        model.heatmap_reference = reference
    return {**scores, 'boxes': str(boxes), 'heatmaps': heatmaps} if scores['n_images'] else None


def top1_accuracy(y: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> float | None:
    """The share of images whose most probable class is their one label: the ACC that multi-class
    benchmarks (MedMNIST) state beside AUC. None unless every image has exactly one label."""
    if len(y) == 0 or not (mask == 1).all() or not (y.sum(1) == 1).all():
        return None
    return float((probs.argmax(1) == y.argmax(1)).mean())


def threshold_source(op: OperatingPoint) -> str:
    """Where the thresholds of a stored operating point came from, in words for the report."""
    if not op.fitted:
        return f'none fitted: {op.thresholds[0]:g} for every finding'
    where = op.fitted_on or {}
    fitted = f'fitted on the {where["split"]} split ({where["n_images"]} images)' if 'split' in where else 'fitted'
    return f'stored with the model ({op.method} rule, {fitted} by an earlier evaluation)'


def evaluate_model(
    model_path: str | Path,
    overrides: Sequence[str] = (),
    config_file: str | None = None,
    split: str = 'test',
    eval_options: dict[str, Any] | None = None,
    device: str = 'cpu',
    batch_size: int | None = None,
    out_dir: str | Path | None = None,
    compare: str | Path | None = None,
    store_thresholds: bool = True,
    seed: int = 0,
    loader: ModelLoader = load_model,
) -> dict[str, Any]:
    """Evaluate a checkpoint on its dataset's `split`; returns the results dict (and writes files when asked).

    `eval_options` overrides the checkpoint's EVAL section. With `out_dir`, the report, figures
    and results.json go there. With `store_thresholds`, the operating point is written into the
    model files. `loader` reads `model_path` as `checkpoint.load_model` does; the command layer passes one
    that also reads exported ONNX directories (hybridmednet.deploy), which this package cannot import.
    """
    model, config, meta = loader(model_path, map_location=device)
    trained_as = dict(config.MODEL)
    if config_file:
        config.merge_yaml(config_file)
    config.apply_overrides(overrides)
    config.EVAL.update(eval_options or {})
    config.validate()
    config.MODEL['pretrained'] = False  # the weights come from the checkpoint whatever a config file says
    changed = sorted(k for k in trained_as if config.MODEL[k] != trained_as[k])
    if changed:
        raise ConfigError(
            f'evaluate takes the model from the checkpoint; MODEL settings cannot change '
            f'({", ".join(changed)}). Override DATA or EVAL settings only.'
        )
    ev, names = config.EVAL, meta['class_names']
    datasets = build_datasets(config, use_cache=False)  # the same pixels predict reads
    data, val = datasets[split], datasets['val']
    if list(data.class_names) != list(names):
        raise DataError(f"the dataset's findings {data.class_names} are not the model's {names}")
    if len(data) == 0:
        raise DataError(
            f'the {split} split of {data.data_dir} is empty; set DATA.{split}_split > 0 or give '
            f"rows with split '{split}'"
        )
    root = data.data_dir
    hashes = {s: split_hash(d.records, root) for s, d in datasets.items()}
    batch_size = batch_size or config.TRAIN['batch_size']

    ood = has_ood(model, meta)

    def run(ds, desc: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits, and the OOD features (from the same pass) when the model has an OOD model."""
        outputs = dataset_outputs(model, ds, batch_size, device, ev['tta'], config.DATA['num_workers'], desc, ood)
        if getattr(ds, 'bad_files', None):  # DATA.skip_bad_images served a neighbour in their place
            raise DataError(
                f'{len(ds.bad_files)} image(s) of the {desc} split could not be read, e.g. '
                f"{ds.bad_files[0]}; an evaluation needs each image's own prediction: fix or "
                f'remove them (hybridmednet check-data lists them)'
            )
        return outputs

    val_logits, val_features = run(val, 'validation') if len(val) else (None, None)
    if val_logits is not None:
        op = OperatingPoint.fit(
            val_logits,
            val.labels,
            val.mask,
            names,
            ev['threshold_method'],
            ev['target_sensitivity'],
            ev['temperature_scaling'],
            {'split': 'val', 'n_images': len(val), 'hash': hashes['val'], 'tta': ev['tta']},
            Calibration.from_meta(meta.get('calibration'), names),  # the model's own, fitted in training
        )
        source = f'fitted on the validation split ({len(val)} images) by this evaluation'
    else:
        warnings.warn('the validation split is empty; using the thresholds stored with the model', stacklevel=2)
        op = OperatingPoint.of_model(meta)
        source = threshold_source(op)
        stored_tta = (op.fitted_on or {}).get('tta')
        if stored_tta is not None and stored_tta != ev['tta']:
            warnings.warn(
                f'the stored thresholds were fitted with test-time augmentation {"on" if stored_tta else "off"}; '
                f'this evaluation has it {"on" if ev["tta"] else "off"} (EVAL.tta={str(stored_tta).lower()} matches)',
                stacklevel=2,
            )
    if split == 'val':
        warnings.warn(
            'thresholds are fitted on the split being evaluated; its operating-point metrics are optimistic',
            stacklevel=2,
        )
    # the validation images are scored once
    logits, features = (val_logits, val_features) if split == 'val' and val_logits is not None else run(data, split)
    probs = op.probabilities(logits)
    y, mask, records = data.labels.astype(np.float64), data.mask.astype(np.float64), data.records
    has_patients = 'patient_id' in records and records['patient_id'].notna().all()
    groups = records['patient_id'].astype(str).to_numpy() if has_patients else None
    n_boot, level = int(ev['bootstrap_samples']), float(ev['confidence_level'])

    stats = metrics.evaluate_predictions(y, probs, mask, op.thresholds, groups, n_boot, level, seed, ev['interval'])
    findings = per_finding(stats, names)
    for name, t in zip(names, op.thresholds):
        findings[name]['threshold'] = float(t)
    results: dict[str, Any] = {
        'model': {
            'path': str(model_path),
            'backbone': config.MODEL['backbone'],
            'class_names': names,
            'epoch': meta.get('epoch'),
            'weights_hash': meta.get('weights_hash') or weights_hash(model.state_dict()),  # an export's: its source's
        },
        'data': {
            'dataset': config.DATA['dataset'],
            'data_dir': str(root),
            'split': split,
            'n_images': len(data),
            'n_patients': int(records['patient_id'].nunique()) if has_patients else len(data),
            'resampling': 'patient' if has_patients else 'image',
            'split_hashes': hashes,
            'split_sizes': {s: len(d) for s, d in datasets.items()},
        },
        'settings': {**ev, 'bootstrap_samples': n_boot, 'confidence_level': level, 'seed': seed},
        'operating_point': {**op.to_meta(), 'source': source},
        'metrics': {
            'mean_auc': stats['mean_auc'],
            'per_finding': findings,
            'top1_accuracy': top1_accuracy(y, probs, mask),
        },
        'calibration': {
            'n_bins': N_BINS,
            'ece': dict(zip(names, expected_calibration_error(y, probs, mask, N_BINS))),
            'ece_uncalibrated': dict(
                zip(names, expected_calibration_error(y, apply_temperature(logits), mask, N_BINS))
            ),
        },
        'subgroups': subgroup_tables(records, y, probs, mask, names, n_boot, level, seed, ev['interval']),
        'figures': {},
    }
    ood_summary, ood_scores = ood_check(meta, features)
    if ood_summary is not None:
        results['ood'] = ood_summary
    localization = localization_check(model, data)
    if localization is not None:
        results['localization'] = localization
    if compare:
        results['comparison'] = compare_with(
            compare,
            records['path'].astype(str).tolist(),
            y,
            mask,
            probs,
            groups,
            names,
            n_boot,
            level,
            seed,
            ev['interval'],
        )
    if store_thresholds and op.fitted:
        results['stored_in'] = [str(p) for p in write_thresholds(model_path, op.to_meta())]
    if out_dir is not None:
        out_dir = Path(out_dir)
        figures = {
            'roc': plot_roc_curves(y, probs, mask, names, out_dir / 'roc_curves.png', op.thresholds, split),
            'pr': plot_pr_curves(y, probs, mask, names, out_dir / 'pr_curves.png', split),
            'reliability': plot_reliability(y, probs, mask, names, out_dir / 'reliability.png', N_BINS, split),
            'reliability_raw': plot_reliability(
                y, apply_temperature(logits), mask, names, out_dir / 'reliability_raw.png', N_BINS, split
            ),
        }
        results['figures'] = {k: p.name for k, p in figures.items()}
        results['predictions'] = {
            'path': records['path'].astype(str).tolist(),
            'patient_id': records['patient_id'].astype(str).tolist() if has_patients else None,
            'labels': y,
            'mask': mask,
            'probabilities': probs,
            'ood_score': ood_scores,
        }
        results['written'] = {k: str(p) for k, p in report_paths(out_dir).items()}
        write_report(results, out_dir)
    return results


def summary_table(results: dict) -> str:
    """Plain-text table for the terminal."""
    per, level = results['metrics']['per_finding'], round(100 * results['settings']['confidence_level'])
    head = f'{"finding":20s} {"n+":>5s} {"AUC (" + str(level) + "% CI)":>22s} {"thr":>6s} ' + ' '.join(
        f'{r[:4]:>5s}' for r in RATES
    )
    lines = [head, '-' * len(head)]
    for name, row in per.items():
        lines.append(
            f'{name:20s} {row["n_pos"]:5d} {fmt_ci(row["auc"]):>22s} {fmt(row["threshold"]):>6s} '
            + ' '.join(f'{fmt(row[r]["value"], 2):>5s}' for r in RATES)
        )
    lines.append(
        f'mean AUC {fmt_ci(results["metrics"]["mean_auc"])} over {results["data"]["n_images"]} images, '
        f'{results["data"]["n_patients"]} patients ({results["data"]["split"]} split)'
    )
    if results['metrics'].get('top1_accuracy') is not None:
        lines.append(f"one label per image: top-1 accuracy {fmt(results['metrics']['top1_accuracy'])} (MedMNIST's ACC)")
    if 'comparison' in results:
        d = results['comparison']['mean_auc_diff']
        lines.append(f'vs {results["comparison"]["other"]}: mean AUC difference {fmt_ci(d)}, p = {fmt(d["p_value"])}')
    return '\n'.join(lines)
