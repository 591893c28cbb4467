"""Patient-level splits: no patient ever has images in two of train / val / test.

Images of one patient are near-duplicates (same anatomy, follow-ups), so an
image-level split leaks and inflates validation AUC.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SPLITS = ('train', 'val', 'test')


def patient_split(patient_ids: Sequence, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assign 'train' / 'val' / 'test' per row, whole patients at a time, seeded.

    Patients are shuffled and cut where the running share of *images* crosses the
    fractions, so splits hit their image fractions even when patients have many images.
    The result depends only on the set of patient IDs, their image counts and the seed.
    """
    ids = pd.Series(patient_ids, dtype=str).to_numpy()
    if len(ids) == 0:
        return np.array([], dtype=object)
    patients, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    start = np.empty(len(patients))
    start[order] = (np.cumsum(counts[order]) - counts[order]) / counts.sum()
    total = float(sum(fractions))
    bounds = np.cumsum(np.asarray(fractions, dtype=float) / total)[:-1]
    return np.array(SPLITS, dtype=object)[np.searchsorted(bounds, start, side='right')][inverse]


def official_split(
    image_names: Sequence[str],
    patient_ids: Sequence,
    train_val: set[str],
    test: set[str],
    val_fraction: float,
    seed: int,
) -> np.ndarray:
    """NIH official lists: test as published; val carved from train_val by patient.

    Images in neither list get '' (left out). A patient with images in both lists
    would leak, so that patient's train_val images are left out too (test stays as published).
    """
    names = pd.Series(image_names, dtype=str)
    pids = pd.Series(patient_ids, dtype=str)
    in_test = names.isin(test).to_numpy()
    in_train_val = names.isin(train_val).to_numpy() & ~in_test
    neither = int((~in_test & ~in_train_val).sum())
    leaked = set(pids[in_test]) & set(pids[in_train_val])
    if leaked:
        drop = pids.isin(leaked).to_numpy() & in_train_val
        log.warning(
            '%d patient(s) appear in both train_val_list and test_list (e.g. %s); '
            'their %d train_val image(s) are left out',
            len(leaked),
            ', '.join(sorted(leaked)[:5]),
            int(drop.sum()),
        )
        in_train_val &= ~drop
    if neither:
        log.warning('%d image(s) are in neither train_val_list nor test_list and are left out', neither)
    split = np.full(len(names), '', dtype=object)
    split[in_test] = 'test'
    split[in_train_val] = patient_split(pids[in_train_val], (1.0 - val_fraction, val_fraction, 0.0), seed)
    return split


def patient_leaks(patient_ids: Sequence, splits: Sequence[str]) -> dict[str, list[str]]:
    """Patients whose images fall in more than one split -> the splits they are in."""
    frame = pd.DataFrame(
        {'patient': pd.Series(patient_ids, dtype=str).to_numpy(), 'split': np.asarray(splits, dtype=object)}
    )
    frame = frame[frame['split'] != '']
    groups = frame.groupby('patient')['split'].unique()
    return {p: sorted(s) for p, s in groups.items() if len(s) > 1}
