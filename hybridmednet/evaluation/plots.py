"""ROC, precision-recall and reliability figures as PNG files.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never pyplot: no display is
needed and an interactive session that imports this module keeps its own backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from hybridmednet.evaluation.calibration import reliability_bins
from hybridmednet.evaluation.metrics import as_matrices


def _grid(n: int, title: str) -> tuple[Figure, list]:
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes[:n])


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _labelled(y: np.ndarray, s: np.ndarray, m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One finding's labelled images, or None when a class is missing (no curve can be drawn)."""
    keep = m[:, k] > 0
    yk = y[keep, k]
    return (yk, s[keep, k]) if yk.size and 0 < yk.sum() < yk.size else None


def _curve_panels(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray | None,
    class_names: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
) -> tuple[Figure, list]:
    """A panel per finding; returns the figure and (k, axis, labelled data) for findings with both classes."""
    y, s, m = as_matrices(y_true, y_score, mask)
    fig, axes = _grid(len(class_names), title)
    panels = []
    for k, (ax, name) in enumerate(zip(axes, class_names)):
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
        data = _labelled(y, s, m, k)
        if data is None:
            ax.text(0.5, 0.5, 'one class only', ha='center')
        else:
            panels.append((k, ax, data))
    return fig, panels


def plot_roc_curves(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray | None,
    class_names: Sequence[str],
    path: str | Path,
    thresholds: Sequence[float] | np.ndarray | None = None,
    split: str = 'test',
) -> Path:
    """One ROC panel per finding, with its AUC and (when given) the chosen operating point."""
    fig, panels = _curve_panels(
        y_true, y_score, mask, class_names, f'ROC curves ({split} split)', '1 - specificity', 'sensitivity'
    )
    for ax in fig.axes[: len(class_names)]:
        ax.plot([0, 1], [0, 1], ls=':', c='grey', lw=1)
    for k, ax, (yk, sk) in panels:
        fpr, tpr, _ = roc_curve(yk, sk)
        ax.plot(fpr, tpr, lw=1.5, label=f'AUC {np.trapezoid(tpr, fpr):.3f}')
        if thresholds is not None:
            pred = sk >= thresholds[k]
            ax.plot(pred[yk == 0].mean(), pred[yk == 1].mean(), 'o', c='C3', label='threshold')
        ax.legend(loc='lower right', fontsize=8)
    return _save(fig, path)


def plot_pr_curves(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray | None,
    class_names: Sequence[str],
    path: str | Path,
    split: str = 'test',
) -> Path:
    """One precision-recall panel per finding; the dotted line is the prevalence (a random model)."""
    fig, panels = _curve_panels(
        y_true, y_score, mask, class_names, f'Precision-recall curves ({split} split)', 'recall', 'precision'
    )
    for _, ax, (yk, sk) in panels:
        precision, recall, _ = precision_recall_curve(yk, sk)
        ax.step(recall, precision, where='post', lw=1.5)
        ax.axhline(yk.mean(), ls=':', c='grey', lw=1)
    return _save(fig, path)


def plot_reliability(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    mask: np.ndarray | None,
    class_names: Sequence[str],
    path: str | Path,
    n_bins: int = 10,
    split: str = 'test',
) -> Path:
    """Reliability diagram per finding: observed frequency against mean predicted probability per bin."""
    y, p, m = as_matrices(y_true, y_prob, mask)
    fig, axes = _grid(len(class_names), f'Reliability ({split} split)')
    for k, (ax, name) in enumerate(zip(axes, class_names)):
        keep = m[:, k] > 0
        bins = reliability_bins(y[keep, k], p[keep, k], n_bins)
        filled = bins['count'] > 0
        ax.plot([0, 1], [0, 1], ls=':', c='grey', lw=1)
        ax.plot(bins['confidence'][filled], bins['frequency'][filled], 'o-', ms=3)
        ax.set(
            title=name, xlabel='mean predicted probability', ylabel='observed frequency', xlim=(0, 1), ylim=(0, 1.02)
        )
    return _save(fig, path)


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [h['epoch'] for h in history]
    fig = Figure(figsize=(10, 4))
    loss_ax, auc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h['train_loss'] for h in history], marker='o', label='train')
    loss_ax.plot(epochs, [h['val_loss'] for h in history], marker='o', label='validation')
    loss_ax.set(xlabel='epoch', ylabel='loss', title='Loss')
    loss_ax.legend()
    auc_ax.plot(epochs, [h['val_mean_auc'] for h in history], marker='o', color='tab:green')
    auc_ax.set(xlabel='epoch', ylabel='mean ROC AUC', title='Validation mean AUC')
    for ax in (loss_ax, auc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
