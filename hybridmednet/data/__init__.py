"""Data layer: one image reader and one volume reader, datasets for NIH / CheXpert / CSV / folders /
MedMNIST-3D, transforms, sample data (images and volumes)."""

from hybridmednet.data.datasets import (
    ChestXrayDataset,
    DataIndex,
    VolumeDataset,
    build_datasets,
    build_index,
    compute_pos_weight,
    make_weighted_sampler,
    positive_counts,
    resolve_data_dir,
)
from hybridmednet.data.io import decode_image, read_image
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.data.synthetic_volumes import generate_sample_volumes
from hybridmednet.data.transforms import build_transforms
from hybridmednet.data.volumes import Volume, read_volume

__all__ = [
    'ChestXrayDataset',
    'DataIndex',
    'Volume',
    'VolumeDataset',
    'build_datasets',
    'build_index',
    'build_transforms',
    'decode_image',
    'compute_pos_weight',
    'generate_sample_dataset',
    'generate_sample_volumes',
    'make_weighted_sampler',
    'positive_counts',
    'read_image',
    'read_volume',
    'resolve_data_dir',
]
