"""The image cache: rebuilds never disturb the cache in use, and a cache that does not add up is refused."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from hybridmednet.config import Config
from hybridmednet.data import cache
from hybridmednet.data.io import read_image
from hybridmednet.data.transforms import fit_square
from hybridmednet.errors import DataError, ImageReadError


def make_images(folder, n=6, size=(40, 40)):
    """n grey PNGs, image i filled with 20 * i; their paths."""
    paths = []
    for i in range(n):
        Image.fromarray(np.full(size[::-1], 20 * i, np.uint8)).save(folder / f'{i}.png')
        paths.append(str(folder / f'{i}.png'))
    return paths


def cached(opened, path):
    """The cached image of one path (its row must exist)."""
    row = int(opened.rows([path])[0])
    assert row >= 0, f'{path} is not cached'
    return opened.image(row)


def test_failed_rebuild_leaves_the_old_cache(tmp_path):
    paths = make_images(tmp_path)
    root = cache.write_cache(paths, tmp_path, tmp_path / 'cache', size=20)
    files = sorted(os.listdir(root))
    (tmp_path / 'junk.png').write_bytes(b'junk')  # images 0-2 are written before the rebuild fails
    with pytest.raises(ImageReadError, match='junk.png'):
        cache.write_cache([*paths[:3], str(tmp_path / 'junk.png'), *paths[3:]], tmp_path, root, size=24)
    assert sorted(os.listdir(root)) == files  # nothing left behind
    opened = cache.ImageCache(root, tmp_path)
    assert opened.size == 20
    for i in (0, 3, 5):
        np.testing.assert_allclose(cached(opened, paths[i]), np.full((20, 20), 20 * i / 255, np.float32))


def test_rebuild_does_not_change_what_running_jobs_read(tmp_path):
    paths = make_images(tmp_path)
    root = cache.write_cache(paths, tmp_path, tmp_path / 'cache', size=20)
    running = cache.ImageCache(root, tmp_path)
    cache.write_cache(paths[::-1], tmp_path, root, size=20)  # same size, every row moves
    cache.write_cache(paths[:4], tmp_path, root, size=24)
    for i in range(6):
        np.testing.assert_allclose(cached(running, paths[i]), np.full((20, 20), 20 * i / 255, np.float32))
    rebuilt = cache.ImageCache(root, tmp_path)
    assert rebuilt.size == 24 and list(rebuilt.rows(paths)) == [0, 1, 2, 3, -1, -1]
    assert len(list(root.glob('images-*.npy'))) == 1 and len(list(root.glob('index-*.csv'))) == 1


def test_worker_started_after_a_rebuild_is_refused(tmp_path):
    paths = make_images(tmp_path, n=2)
    root = cache.write_cache(paths, tmp_path, tmp_path / 'cache', size=8)
    state = pickle.dumps(cache.ImageCache(root, tmp_path))  # as a spawn-started DataLoader worker gets it
    cache.write_cache(paths[::-1], tmp_path, root, size=8)
    with pytest.raises(DataError, match=r'images-\w+\.npy is missing.*hybridmednet cache'):
        pickle.loads(state)


def test_cache_that_does_not_match_meta_is_refused(tmp_path):
    paths = make_images(tmp_path, n=3)
    root = cache.write_cache(paths, tmp_path, tmp_path / 'cache', size=8)
    meta = json.loads((root / 'meta.json').read_text())
    images, index = root / meta['images'], root / meta['index']
    np.save(images, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=rf'{images.name}: holds uint8 \(2, 8, 8\).*\(3, 8, 8\).*hybridmednet cache'):
        cache.ImageCache(root, tmp_path)
    np.save(images, np.zeros((3, 8, 8), np.uint8))
    cache.ImageCache(root, tmp_path)
    index.write_text('\n'.join(index.read_text().splitlines()[:-1]) + '\n')
    with pytest.raises(DataError, match=rf'{index.name}: 2 rows.*3 images.*hybridmednet cache'):
        cache.ImageCache(root, tmp_path)


def test_cache_from_an_older_version_must_be_rebuilt(tmp_path):
    paths = make_images(tmp_path, n=2)
    root = tmp_path / 'cache'
    root.mkdir()
    np.save(root / 'images.npy', np.zeros((2, 8, 8), np.uint8))  # the unversioned layout
    (root / 'index.csv').write_text('path\n0.png\n1.png\n')
    (root / 'meta.json').write_text(json.dumps({'size': 8, 'count': 2, 'skipped': 0}))
    with pytest.raises(DataError, match='meta.json: cache written by an older version.*hybridmednet cache'):
        cache.ImageCache(root, tmp_path)
    cache.write_cache(paths, tmp_path, root, size=8)
    assert not (root / 'images.npy').exists() and not (root / 'index.csv').exists()
    np.testing.assert_allclose(cached(cache.ImageCache(root, tmp_path), paths[1]), np.full((8, 8), 20 / 255))


@pytest.mark.parametrize('change', ['content', 'size only', 'mtime only'])
def test_file_changed_since_caching_is_not_served_from_the_cache(tmp_path, change, caplog):
    paths = make_images(tmp_path, n=3)
    root = cache.write_cache(paths, tmp_path, tmp_path / 'cache', size=8)
    before = os.stat(paths[1])
    if change == 'mtime only':  # same bytes, touched
        os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    else:
        noise = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
        Image.fromarray(noise).save(paths[1])
        assert os.stat(paths[1]).st_size != before.st_size
        if change == 'size only':  # a copy that kept the old modification time
            os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    os.unlink(paths[2])  # a missing file is still served from the cache
    opened = cache.ImageCache(root, tmp_path)
    assert list(opened.rows(paths)) == [0, -1, 2]
    assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [
        f'1 of 3 cached images changed since the cache {root} was written: reading those files instead '
        f'(rebuild it with `hybridmednet cache`)'
    ]


def write_12bit_ramp(path, significant_bits=12):
    """A 128 px 16-bit PNG holding every 12-bit grey level (0..4095), each 4 times."""
    info = PngInfo()
    if significant_bits:
        info.add(b'sBIT', bytes([significant_bits]))
    Image.fromarray((np.arange(128 * 128) // 4).reshape(128, 128).astype(np.uint16)).save(path, pnginfo=info)
    return str(path)


def test_cache_keeps_the_grey_levels_of_12_bit_images(tmp_path):
    path = write_12bit_ramp(tmp_path / 'ramp.png')
    root = cache.write_cache([path], tmp_path, tmp_path / 'cache', size=64)
    opened = cache.ImageCache(root, tmp_path)
    assert opened.meta['dtype'] == 'uint16' and opened.images.dtype == np.uint16
    image = cached(opened, path)
    assert len(np.unique(image)) > 1000 and image.max() > 0.95  # 0.0625 if read as 16-bit
    np.testing.assert_allclose(image, fit_square(read_image(path), 64), atol=1e-5)


def test_cache_of_8_bit_images_stays_uint8(tmp_path):
    paths = make_images(tmp_path, n=2)
    opened = cache.ImageCache(cache.write_cache(paths, tmp_path, tmp_path / 'cache', size=8), tmp_path)
    assert opened.meta['dtype'] == 'uint8' and opened.images.dtype == np.uint8
    np.testing.assert_allclose(cached(opened, paths[1]), np.full((8, 8), 20 / 255, np.float32))


def test_cache_is_written_and_used_with_one_intensity(tmp_path, caplog):
    path = write_12bit_ramp(tmp_path / 'ramp.png', significant_bits=None)
    root = cache.write_cache([path], tmp_path, tmp_path / 'cache', size=16, intensity=12)
    assert cached(cache.ImageCache(root, tmp_path), path).max() > 0.95  # 0.0625 if read as 16-bit
    config = Config()
    config.DATA.update(cache_dir=str(root), image_size=16, intensity=12)
    assert cache.open_cache(config, tmp_path) is not None
    config.DATA['intensity'] = 'auto'
    assert cache.open_cache(config, tmp_path) is None
    assert 'written with DATA.intensity=12, not auto' in caplog.text
