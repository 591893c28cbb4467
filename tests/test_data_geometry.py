"""One geometry on every path: a non-square image keeps its aspect ratio in the cache, in evaluation and
in training (letterboxed by fit_square), so a model is scored on the shapes it was trained on."""

import numpy as np
import pytest
import torch
from PIL import Image

from hybridmednet.config import Config
from hybridmednet.data import cache
from hybridmednet.data.io import read_image
from hybridmednet.data.transforms import MEAN, STD, build_transforms, fit_square, square_box


def disc(height=320, width=390, radius=80):
    """A bright disc centred on a black CheXpert-sized (390 wide x 320 high) image."""
    y, x = np.mgrid[:height, :width]
    return (((x - width / 2 + 0.5) ** 2 + (y - height / 2 + 0.5) ** 2) <= radius**2).astype(np.float32)


def aspect(image):
    """Width / height of the bright region."""
    bright = np.asarray(image) > np.asarray(image).max() / 2
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    return (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1)


def grey(tensor):
    """A transform's normalised [3, S, S] output back to the grey [S, S] image."""
    return (tensor[0] * STD[0] + MEAN[0]).numpy()


def config(size=224, **data):
    config = Config()
    config.DATA.update(image_size=size, **data)
    return config


def test_fit_square_keeps_the_aspect_ratio_and_pads_centred():
    out = fit_square(np.ones((320, 390), np.float64), 128)  # 390 -> 128 wide, 320 -> 105 high
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (128, 128)
    assert (out[:11] == 0).all() and (out[116:] == 0).all()
    np.testing.assert_allclose(out[11:116], 1.0, atol=1e-6)
    channels = fit_square(torch.ones(3, 40, 20), 16)  # tensors too, any leading dimensions
    assert isinstance(channels, torch.Tensor) and channels.shape == (3, 16, 16)
    assert (channels[:, :, :4] == 0).all() and (channels[:, :, 12:] == 0).all()
    torch.testing.assert_close(channels[:, :, 4:12], torch.ones(3, 16, 8))


def test_square_box_locates_the_image_inside_the_square():
    assert square_box(320, 390, 128) == (11, 0, 105, 128)
    out = fit_square(np.ones((40, 20), np.float32), 16)
    top, left, height, width = square_box(40, 20, 16)
    assert out.sum() == pytest.approx(height * width) and out[top : top + height, left : left + width].min() > 0.99


def test_fit_square_is_antialiased():
    stripes = np.tile([0.0, 1.0], (64, 32))  # 1 px stripes: without antialiasing a 4x shrink keeps one phase
    np.testing.assert_allclose(fit_square(stripes, 16), 0.5, atol=0.04)


def test_eval_transform_keeps_the_aspect_ratio():
    out = build_transforms(config(), train=False)(disc())
    assert out.shape == (3, 224, 224)
    assert aspect(grey(out)) == pytest.approx(1.0, abs=0.03)  # a stretch to the square gives 1.22


def test_train_transform_keeps_the_aspect_ratio_within_its_crop_ratios():
    transform = build_transforms(config(), train=True)
    ratios = [aspect(grey(transform(disc()))) for _ in range(20)]
    assert all(0.88 <= r <= 1.12 for r in ratios), ratios  # RandomResizedCrop ratio (0.9, 1.1)


def test_albumentations_pipeline_letterboxes_first():
    pytest.importorskip('albumentations')
    transform = build_transforms(config(use_albumentations=True), train=True)
    transform.pipeline.set_random_seed(0)
    ratios = [aspect(grey(transform(disc()))) for _ in range(41)]
    assert np.median(ratios) == pytest.approx(1.0, abs=0.06)  # its affine scales x and y apart; 1.22 if stretched


def test_cache_keeps_the_aspect_ratio_and_evaluates_like_the_file(tmp_path):
    Image.fromarray((disc() * 255).astype(np.uint8)).save(tmp_path / 'disc.png')
    root = cache.write_cache([str(tmp_path / 'disc.png')], tmp_path, tmp_path / 'cache', size=256)
    cached = cache.ImageCache(root, tmp_path).image(0)
    assert cached.shape == (256, 256) and aspect(cached) == pytest.approx(1.0, abs=0.03)
    transform = build_transforms(config(), train=False)
    from_file, from_cache = grey(transform(read_image(tmp_path / 'disc.png'))), grey(transform(cached))
    difference = np.abs(from_file - from_cache)  # only where an edge lands a fraction of a pixel apart
    assert difference.mean() < 0.005 and np.percentile(difference, 99) < 0.05
