"""Data layer: one image reader, datasets for NIH / CheXpert / CSV / folders, transforms, sample data."""

from hybridmednet.data.datasets import (
    ChestXrayDataset,
    DataIndex,
    build_datasets,
    build_index,
    compute_pos_weight,
    make_weighted_sampler,
    positive_counts,
    resolve_data_dir,
)
from hybridmednet.data.io import read_image
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.data.transforms import build_transforms

__all__ = [
    'ChestXrayDataset',
    'DataIndex',
    'build_datasets',
    'build_index',
    'build_transforms',
    'compute_pos_weight',
    'generate_sample_dataset',
    'make_weighted_sampler',
    'positive_counts',
    'read_image',
    'resolve_data_dir',
]
