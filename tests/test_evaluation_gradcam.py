"""Heatmaps (integrated gradients from a healthy reference, HiResCAM without one): follow a bright object, tell
classes apart, have the input's shape for every backbone family, overlay."""

import threading
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from hybridmednet import create_model
from hybridmednet.checkpoint import load_model, save_checkpoint
from hybridmednet.evaluation.gradcam import (
    grad_cam,
    hirescam,
    integrated_gradients,
    nearest_reference,
    overlay,
    reference_entry,
    reference_fits,
    reference_rows,
    stored_images,
    volume_montage,
)


class PooledImage(nn.Module):
    """A backbone whose four maps are the image's first channel average-pooled at strides 4 to 32."""

    def forward(self, x):
        return [nn.functional.avg_pool2d(x[:, :1], s) for s in (4, 8, 16, 32)]


class BrightSpotNet(nn.Module):
    """Logit = pooled brightness: the finding's evidence is wherever the image is bright, so a correct
    heatmap must peak there."""

    def __init__(self):
        super().__init__()
        self.backbone = PooledImage()

    def forward(self, x):
        return torch.stack([m.mean((1, 2, 3)) for m in self.backbone(x)], 1).sum(1, keepdim=True) * torch.ones(1, 2)


class QuadrantNet(nn.Module):
    """Class 0 reads only the top-left quadrant of every map, class 1 only the bottom-right one, through the
    same channels (as a max-pooling head reads particular places). A heatmap built from the activations
    alone, or one map for every class, cannot put each class's peak in its own quadrant."""

    def __init__(self):
        super().__init__()
        self.backbone = PooledImage()

    def forward(self, x):
        maps = self.backbone(x)
        top_left = sum(m[:, :, : m.shape[2] // 2, : m.shape[3] // 2].mean((1, 2, 3)) for m in maps)
        bottom_right = sum(m[:, :, m.shape[2] // 2 :, m.shape[3] // 2 :].mean((1, 2, 3)) for m in maps)
        return torch.stack([top_left, bottom_right], 1)


class PaddedMaps(nn.Module):
    """PooledImage's maps with their outer ring of cells strongly active whatever the image, as zero padding
    makes a convolution's border cells."""

    def forward(self, x):
        maps = []
        for m in PooledImage()(x):
            ring = torch.full_like(m, 4.0)
            ring[:, :, 1:-1, 1:-1] = 0.0
            maps.append(m + ring)
        return maps


class PaddedEdgeNet(nn.Module):
    """Logit = the maps' mean: gradient times activation is largest on the ring, which says nothing about
    where the object is; only the bright object moves the logit from image to image."""

    def __init__(self):
        super().__init__()
        self.backbone = PaddedMaps()

    def forward(self, x):
        return torch.stack([m.mean((1, 2, 3)) for m in self.backbone(x)], 1).sum(1, keepdim=True)


def square_image(row: int, col: int, size: int = 128, side: int = 16) -> torch.Tensor:
    x = torch.zeros(3, size, size)
    x[:, row : row + side, col : col + side] = 1.0
    return x


def peak(cam: np.ndarray) -> tuple[int, int]:
    return np.unravel_index(int(cam.argmax()), cam.shape)


def test_heatmap_follows_the_object():
    model = BrightSpotNet().eval()
    for row, col in ((8, 8), (8, 100), (96, 40), (60, 60)):
        cam = grad_cam(model, square_image(row, col), [0])[0]
        r, c = peak(cam)
        assert row - 8 <= r < row + 24 and col - 8 <= c < col + 24
        inside = cam[row : row + 16, col : col + 16].mean()
        assert inside > 3 * cam.mean()


def test_heatmap_leaves_out_the_ring_of_cells_that_sees_the_padding():
    for row, col in ((56, 56), (20, 90)):
        cam = grad_cam(PaddedEdgeNet().eval(), square_image(row, col), [0])[0]
        r, c = peak(cam)
        assert row <= r < row + 16 and col <= c < col + 16, (row, col, r, c)
        assert cam[:4].max() == 0 and cam[:, -4:].max() == 0  # the finest level's ring: 4 px


def film(lesion: tuple[int, int] | None, size: int = 128, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """A 'film' whose anatomy (a brighter block every image has) outweighs the lesion, if any."""
    x = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * noise
    x[:, 72:112, 72:112] += 2.0
    if lesion is not None:
        x[:, lesion[0] : lesion[0] + 16, lesion[1] : lesion[1] + 16] += 1.0
    return x


def test_heatmap_from_the_healthy_reference_finds_what_a_normal_film_lacks():
    model = PaddedEdgeNet().eval()
    x = film((24, 24))
    r, c = peak(grad_cam(model, x, [0])[0])
    assert 72 <= r < 112 and 72 <= c < 112  # HiResCAM, gradient times activation: the anatomy outweighs the lesion
    healthy = torch.stack([film(None, noise=0.1, seed=i) for i in range(30)])
    entry = reference_entry(healthy.split(8), 'without a finding')
    assert entry['n_images'] == 30 and entry['images'] == 'without a finding'
    torch.testing.assert_close(entry['healthy_images'], healthy.half())  # stored in float16
    model.heatmap_reference = entry['healthy_images']
    assert reference_fits(model, x) and not reference_fits(model, film((24, 24), size=96))
    cam = grad_cam(model, x, [0])[0]
    r, c = peak(cam)
    assert 24 <= r < 40 and 24 <= c < 40, (r, c)
    assert cam[72:112, 72:112].max() < 0.2  # what every film has is no evidence
    with pytest.raises(ValueError, match='input size the model was trained at'):
        grad_cam(model, film((24, 24), size=96), [0])


def test_heatmap_starts_from_the_healthy_films_most_like_this_one():
    """Patients of two builds: the anatomy block sits low on 4 healthy films and high on 26. From the mean of all
    of them this low-build film differs most where its anatomy is; from the films like it, only at the lesion."""

    def build(low: bool, seed: int, lesion: bool = False) -> torch.Tensor:
        x = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(seed)) * 0.1
        x[:, 72:112, 72:112] += 2.0 if low else 0.0
        x[:, 8:48, 72:112] += 0.0 if low else 2.0
        if lesion:
            x[:, 24:40, 24:40] += 0.5  # fainter than the anatomy
        return x

    healthy = torch.stack([build(i < 4, i) for i in range(30)])
    references = reference_entry([healthy], 'without a finding')['healthy_images']
    x = build(True, 99, lesion=True)
    torch.testing.assert_close(nearest_reference(references, x), healthy[:4].half().float().mean(0))
    model = PaddedEdgeNet().eval()
    r, c = peak(integrated_gradients(model, x, [0], references.float().mean(0))[0])
    assert 72 <= r < 112 and 72 <= c < 112  # from the mean of all: the build outweighs the lesion
    model.heatmap_reference = references
    cam = grad_cam(model, x, [0])[0]
    r, c = peak(cam)
    assert 24 <= r < 40 and 24 <= c < 40, (r, c)
    assert cam[76:108, 76:108].max() < 0.2


def test_a_model_stores_fewer_healthy_films_when_they_are_large_and_their_mean_when_too_few_fit():
    assert stored_images((3, 96, 96)) == 256  # 13.5 MiB in float16
    assert stored_images((3, 224, 224)) == 55  # at most 2**23 values: 16 MiB
    assert stored_images((1, 64, 64, 64)) == 32
    assert stored_images((3, 512, 512)) == 0  # 10 would fit: fewer than MIN_FILMS, so their mean alone
    films = torch.rand(6, 1, 8, 8, 8)
    entry = reference_entry(films.split(4), 'without a finding', mean=True)
    assert entry['n_images'] == 6 and entry['healthy_images'].shape == (1, 1, 8, 8, 8)
    torch.testing.assert_close(entry['healthy_images'].float(), films.mean(0, keepdim=True), atol=1e-3, rtol=0)
    raw = reference_entry([torch.full((2, 1, 4, 4), 7e4)], 'raw intensities')['healthy_images']
    assert raw.dtype == torch.float32 and raw.max() == 7e4  # beyond float16: kept in float32, not inf


def test_nearest_reference_of_volumes_and_of_one_image_set_by_hand():
    volumes = torch.stack([torch.full((1, 8, 8, 8), float(v)) for v in (0, 1, 2, 3, 10, 11)])
    x = torch.full((1, 8, 8, 8), 10.5)
    torch.testing.assert_close(nearest_reference(volumes, x), torch.full_like(x, 6.5))  # 2, 3, 10, 11
    one = torch.rand(3, 16, 16)
    assert torch.equal(nearest_reference(one, torch.rand(3, 16, 16)), one)


def test_a_checkpoint_with_the_mean_healthy_image_alone_starts_every_heatmap_from_it(tmp_path):
    """Models stored in the morning of 2026-12-01 hold the mean of the healthy films, not the films."""
    model = create_model('resnet18', num_classes=2, image_size=32, class_names=['a', 'b']).eval()
    mean = torch.rand(3, 32, 32)
    state = {'model_state_dict': model.state_dict(), 'config': model.config.to_dict(), 'class_names': ['a', 'b']}
    save_checkpoint(tmp_path / 'm.pth', {**state, 'heatmap_reference': {'image': mean, 'n_images': 30, 'images': 'x'}})
    loaded, _, _ = load_model(tmp_path / 'm.pth')
    torch.testing.assert_close(loaded.heatmap_reference, mean[None])
    x = torch.randn(3, 32, 32)
    expected = integrated_gradients(loaded, x, [0, 1], mean)
    np.testing.assert_allclose(grad_cam(loaded, x, [0, 1]), expected, atol=1e-6)
    loaded.heatmap_reference = mean  # one image set by hand, as before the films were stored: the same
    assert reference_fits(loaded, x)
    np.testing.assert_allclose(grad_cam(loaded, x, [0, 1]), expected, atol=1e-6)


class SaturatingNet(nn.Module):
    """Logit = 10 min(mean of region A, 0.2) + mean of region B: A's evidence saturates. At the image (A and B
    both 1) the gradient is zero on A, yet A moved the logit twice as much as B from the black reference."""

    def forward(self, x):
        a = x[:, 0, 8:24, 8:24].mean((1, 2))
        b = x[:, 0, 40:56, 40:56].mean((1, 2))
        return (10 * a.clamp(max=0.2) + b)[:, None]


def test_heatmap_integrates_the_gradient_along_the_path_from_the_reference():
    model = SaturatingNet().eval()
    model.heatmap_reference = torch.zeros(1, 3, 64, 64)
    x = torch.zeros(3, 64, 64)
    x[:, 8:24, 8:24] = 1.0
    x[:, 40:56, 40:56] = 1.0
    cam = grad_cam(model, x, [0])[0]
    r, c = peak(cam)
    assert 8 <= r < 24 and 8 <= c < 24, (r, c)  # the gradient at the image alone would point at B
    # midpoint sums over 4 steps (or 8): A gets 10 x 1/4 (2/8) of its pixels' change, B 1, each over 256 pixels
    assert cam[44:52, 44:52].mean() == pytest.approx(1 / 2.5, abs=0.02)


def test_heatmaps_refuse_a_model_in_training_mode():
    model = SaturatingNet()
    model.heatmap_reference = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match='eval mode'):
        grad_cam(model, torch.ones(3, 64, 64), [0])


def test_a_checkpoint_with_the_trunk_maps_stored_before_reference_images_gets_hirescam(tmp_path):
    """Models stored on 2026-11-30 hold the trunk's mean maps as their heatmap reference, not an image."""
    model = create_model('resnet18', num_classes=2, image_size=32, class_names=['a', 'b']).eval()
    maps = {f'level_{i}': torch.rand(1, 64, 8 // 2**i or 1, 8 // 2**i or 1) for i in range(4)}
    state = {'model_state_dict': model.state_dict(), 'config': model.config.to_dict(), 'class_names': ['a', 'b']}
    save_checkpoint(tmp_path / 'old.pth', {**state, 'heatmap_reference': {**maps, 'n_images': 30, 'images': 'x'}})
    loaded, _, meta = load_model(tmp_path / 'old.pth')
    assert loaded.heatmap_reference is None and 'level_0' in meta['heatmap_reference']
    x = torch.randn(3, 32, 32)
    np.testing.assert_allclose(grad_cam(loaded, x, [0, 1]), hirescam(loaded, x, [0, 1]))


def test_heatmaps_from_the_reference_are_the_same_on_a_pool_and_in_place():
    torch.manual_seed(0)
    model = create_model('resnet18', num_classes=3, image_size=64).eval()
    model.heatmap_reference = torch.zeros(1, 3, 64, 64)
    x = torch.randn(3, 64, 64)
    one_by_one = grad_cam(model, x, [2, 0, 1])
    with ThreadPoolExecutor(2) as pool:
        side_by_side = grad_cam(model, x, [2, 0, 1], pool=pool)
    np.testing.assert_allclose(side_by_side, one_by_one, atol=1e-5)
    assert min(np.abs(one_by_one[i] - one_by_one[j]).max() for i in range(3) for j in range(i)) > 0.05
    assert not any(p.grad is not None for p in model.parameters())  # no gradients left behind


def test_the_reference_averages_films_whose_every_finding_is_known_and_negative():
    names = ['Effusion', 'No Finding', 'Mass']
    labels = np.zeros((300, 3), np.float32)
    mask = np.ones((300, 3), np.float32)
    labels[:40, 0] = 1  # a finding
    labels[40:80, 1] = 1  # 'No Finding' set: healthy
    mask[80:120, 2] = 0  # Mass unknown (CheXpert U-Ignore): not known to be healthy
    rows, what = reference_rows(labels, mask, names)
    assert what == 'without a finding' and list(rows) == [*range(40, 80), *range(120, 300)]
    labels[120:, 2] = 1  # 40 healthy films left: still at least a tenth of REFERENCE_IMAGES
    rows, what = reference_rows(labels, mask, names)
    assert what == 'without a finding' and list(rows) == list(range(40, 80))
    labels[40:80, 0] = 1  # none healthy: as many of all the films, evenly spaced
    rows, what = reference_rows(labels, mask, names)
    assert what.startswith('all') and len(rows) == 256 and rows[0] == 0 and rows[-1] == 299


@pytest.mark.parametrize('reference', [None, 'healthy'], ids=['HiResCAM', 'integrated gradients'])
def test_each_class_heatmap_peaks_where_that_class_looks(reference):
    model = QuadrantNet().eval()
    model.heatmap_reference = None if reference is None else torch.full((1, 3, 128, 128), 0.1)
    for dim_corner in ('top_left', 'bottom_right'):  # the dimmer square is the one an activation map would miss
        x = torch.zeros(3, 128, 128)
        x[:, 16:40, 16:40] = 0.5 if dim_corner == 'top_left' else 1.0
        x[:, 88:112, 88:112] = 0.5 if dim_corner == 'bottom_right' else 1.0
        top_left, bottom_right = grad_cam(model, x, [0, 1])
        r, c = peak(top_left)
        assert 16 <= r < 40 and 16 <= c < 40, (dim_corner, r, c)
        r, c = peak(bottom_right)
        assert 88 <= r < 112 and 88 <= c < 112, (dim_corner, r, c)


@pytest.mark.parametrize(
    'backbone,size', [('resnet18', 64), ('convnext_atto', 64), ('efficientnet_b0', 64), ('swin_tiny', 224)]
)
def test_heatmap_shape_for_every_family(backbone, size):
    torch.manual_seed(0)
    model = create_model(backbone, num_classes=3, image_size=size).eval()
    cams = grad_cam(model, torch.randn(3, size, size), [0, 2])
    assert cams.shape == (2, size, size)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() == pytest.approx(1.0)
    assert not any(p.grad is not None for p in model.parameters())  # no gradients left behind


def test_heatmaps_computed_side_by_side_on_a_pool_equal_those_computed_one_after_the_other():
    """hirescam(pool=...) runs the classes' backward passes on the pool's threads at once."""
    torch.manual_seed(0)
    model = create_model('resnet18', num_classes=4, image_size=64).eval()
    x = torch.randn(3, 64, 64)
    threads_seen = set()
    real_grad = torch.autograd.grad

    def recording_grad(*args, **kwargs):
        threads_seen.add(threading.get_ident())
        return real_grad(*args, **kwargs)

    one_by_one = hirescam(model, x, [3, 0, 2, 1])
    with ThreadPoolExecutor(2) as pool, mock.patch.object(torch.autograd, 'grad', recording_grad):
        side_by_side = hirescam(model, x, [3, 0, 2, 1], pool=pool)
    np.testing.assert_allclose(side_by_side, one_by_one, atol=1e-5)
    assert min(np.abs(one_by_one[i] - one_by_one[j]).max() for i in range(4) for j in range(i)) > 0.05  # in order
    assert threading.get_ident() not in threads_seen and len(threads_seen) >= 1  # on the pool's threads


def test_heatmaps_under_no_grad_behave_the_same_alone_and_side_by_side():
    model = create_model('resnet18', num_classes=2, image_size=64).eval()
    x = torch.randn(3, 64, 64)
    with torch.no_grad(), ThreadPoolExecutor(2) as pool:
        alone = hirescam(model, x, [1])
        together = hirescam(model, x, [0, 1], pool=pool)
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)


def test_overlay_keeps_the_image_size_and_shrinks_huge_ones():
    image = np.random.default_rng(0).random((300, 200)).astype(np.float32)
    cam = np.zeros((7, 7))
    cam[0, 0] = 1
    picture = overlay(image, cam, label='Effusion p=0.91')
    assert picture.size == (200, 300) and picture.mode == 'RGB'
    assert overlay(np.zeros((3000, 2000), np.float32), cam).size == (683, 1024)


@pytest.mark.slow
def test_trained_model_heatmap_moves_with_the_object():
    """A real HybridMedNet trained to detect a bright square: the heatmap peak follows the square."""
    torch.manual_seed(0)
    size, side = 48, 10
    model = create_model('resnet18', num_classes=1, image_size=size, class_names=['square'], dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        x = torch.rand(12, 1, size, size, generator=g) * 0.3
        y = (torch.rand(12, generator=g) < 0.5).float()
        corner = torch.randint(0, size - side, (12, 2), generator=g)
        for i in torch.nonzero(y).flatten().tolist():
            x[i, 0, corner[i, 0] : corner[i, 0] + side, corner[i, 1] : corner[i, 1] + side] = 1.0
        loss = nn.functional.binary_cross_entropy_with_logits(model(x.expand(-1, 3, -1, -1))[:, 0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    g = torch.Generator().manual_seed(1)
    for row, col in ((3, 3), (3, 35), (35, 3), (35, 35), (18, 18), (10, 30), (30, 10)):
        x = torch.rand(1, size, size, generator=g) * 0.3
        x[0, row : row + side, col : col + side] = 1.0
        cam = grad_cam(model, x.expand(3, -1, -1), [0])[0]
        r, c = peak(cam)
        assert abs(r - (row + side / 2)) <= side and abs(c - (col + side / 2)) <= side, (row, col, r, c)
        assert cam[row : row + side, col : col + side].mean() > 1.5 * cam.mean()


class PooledVolume(nn.Module):
    def forward(self, x):
        return [nn.functional.avg_pool3d(x[:, :1], s) for s in (2, 4, 8, 16)]


class BrightSpotNet3d(nn.Module):
    """Class 0 reads the brightness of the front half of the volume (low depth index), class 1 the back half."""

    def __init__(self):
        super().__init__()
        self.backbone = PooledVolume()

    def forward(self, x):
        maps = self.backbone(x)
        front = sum(m[:, :, : m.shape[2] // 2].mean((1, 2, 3, 4)) for m in maps)
        back = sum(m[:, :, m.shape[2] // 2 :].mean((1, 2, 3, 4)) for m in maps)
        return torch.stack([front, back], 1)


@pytest.mark.parametrize('reference', [None, 'healthy'], ids=['HiResCAM', 'integrated gradients'])
def test_volume_heatmaps_peak_at_each_class_object_and_the_montage_cuts_through_the_peak(reference):
    x = torch.zeros(1, 32, 32, 32)
    x[:, 4:10, 20:26, 6:12] = 1.0  # class 0's object (front half)
    x[:, 22:28, 4:10, 18:24] = 1.0  # class 1's object (back half)
    model = BrightSpotNet3d().eval()
    model.heatmap_reference = None if reference is None else torch.full_like(x, 0.1)[None]
    front, back = grad_cam(model, x, [0, 1])
    assert front.shape == (32, 32, 32)
    z, y, w = np.unravel_index(front.argmax(), front.shape)
    assert 4 <= z < 10 and 20 <= y < 26 and 6 <= w < 12
    z, y, w = np.unravel_index(back.argmax(), back.shape)
    assert 22 <= z < 28 and 4 <= y < 10 and 18 <= w < 24
    montage = np.asarray(volume_montage(x[0].numpy(), front, panel=256))
    assert montage.shape == (256, 3 * 256, 3)
    # the axial panel (8x enlarged) shows the slice through the object, flipped for display (anterior up,
    # the patient's right on the left): the object's centre (y, w) = (22.5, 8.5) lands at row
    # (31 - 22.5 + 0.5) * 8 = 72, column (31 - 8.5 + 0.5) * 8 = 184; the mirror column 56 is empty
    axial = montage[:, :256].astype(float).mean(2)
    assert axial[72, 184] > 100 and axial[72, 56] < 20
