"""Volumes read the same whatever the file: RAS, [D, H, W] = (inferior->superior, posterior->anterior,
left->right), HU windowed to [0, 1]. Markers placed at known patient coordinates must land where the
world says, not where the file order or the array layout would put them."""

import random

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hybridmednet.data.volumes import apply_window, read_medmnist, read_volume
from hybridmednet.errors import DataError, ImageReadError

ROWS, COLS, SLICES = 6, 5, 4
AXIAL = [1, 0, 0, 0, 1, 0]  # rows run along +x (to the patient's left), columns down +y (posterior)


def write_slice(path, pixels, position, orientation=AXIAL, spacing=(0.8, 0.6), series=None, instance=1):
    """A minimal CT slice: stored = (HU - intercept) / slope."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = 'CT'
    ds.SeriesInstanceUID = series or SERIES
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.PixelData = ((pixels + 1024) / 2).astype('<i2').tobytes()
    ds.save_as(path, enforce_file_format=True)


SERIES = generate_uid()


def axial_series(folder, hu, step=2.5, origin=(-10.0, -20.0, 30.0), skip=(), shuffle=True):
    """hu[k] is slice k at z = origin_z + k * step; written under shuffled names, InstanceNumber reversed."""
    folder.mkdir(parents=True, exist_ok=True)
    ks = [k for k in range(len(hu)) if k not in skip]
    names = [f'IM{n:03d}.dcm' for n in range(len(ks))]
    if shuffle:
        random.Random(1).shuffle(names)
    for name, k in zip(names, ks):
        position = (origin[0], origin[1], origin[2] + k * step)
        write_slice(folder / name, hu[k], position, instance=len(hu) - k)
    return folder


def test_dicom_series_marker_lands_where_the_patient_coordinates_say(tmp_path):
    hu = np.full((SLICES, ROWS, COLS), -1000.0)
    hu[2, 1, 3] = 400.0  # slice 2, row 1 (y small: anterior), column 3 (x large: toward the patient's left)
    volume, spacing = read_volume(axial_series(tmp_path / 'ct', hu), window=(-1000, 400))
    assert volume.shape == (SLICES, ROWS, COLS) and volume.dtype == np.float32
    # D: superior grows with z -> d = 2; H: posterior->anterior, row 1 -> ROWS-1-1; W: left->right, column 3 -> COLS-1-3
    assert np.argwhere(volume == 1.0).tolist() == [[2, ROWS - 2, COLS - 4]]
    assert volume.sum() == 1.0  # everything else is air at the window's floor
    assert spacing == pytest.approx((2.5, 0.8, 0.6))


def test_dicom_series_sorted_along_the_normal_not_z_nor_names(tmp_path):
    """A coronal series: slices stack along y, all at the same z. Sorting by z or by file name scrambles it."""
    coronal = [1, 0, 0, 0, 0, -1]  # rows along +x, columns down -z; normal = row x column = +y (posterior)
    folder = tmp_path / 'coronal'
    folder.mkdir()
    order = [3, 0, 2, 1]
    for n, k in enumerate(order):
        pixels = np.full((ROWS, COLS), -1000.0)
        pixels[0, 0] = -1000.0 + 100.0 * (k + 1)  # slice k carries its number in one voxel
        write_slice(folder / f'{n}.dcm', pixels, (0.0, 5.0 * k, 0.0), orientation=coronal, instance=n)
    volume, spacing = read_volume(folder, window=(-1000, -600))
    # RAS: the slice axis (y, posterior) becomes H reversed; column 0 row 0 is the top-right voxel.
    # D: rows run down -z, so row 0 is the most superior: d = ROWS - 1; W: column 0 is the patient's right: w = COLS-1.
    marks = volume[ROWS - 1, :, COLS - 1]
    np.testing.assert_allclose(marks, [1.0, 0.75, 0.5, 0.25])  # posterior->anterior: slice 3 (y=15) first
    assert spacing == pytest.approx((0.8, 5.0, 0.6))


def test_dicom_rescale_and_window(tmp_path):
    hu = np.array([[-1000.0, -300.0, 400.0, 1000.0, 50.0]] * ROWS)[None].repeat(2, axis=0)
    volume, _ = read_volume(axial_series(tmp_path / 'ct', hu), window=(-1000, 400))
    row = volume[0, 0, ::-1]  # W is reversed against the columns (left->right)
    np.testing.assert_allclose(row, [0.0, 0.5, 1.0, 1.0, 1050 / 1400], atol=1e-6)


def test_series_with_a_gap_names_the_neighbouring_files(tmp_path):
    folder = axial_series(tmp_path / 'gap', np.zeros((6, ROWS, COLS)), skip=(3,), shuffle=False)
    with pytest.raises(DataError, match=r'gap: 1 slice\(s\) missing between slice files IM002.dcm and IM003.dcm'):
        read_volume(folder)


def test_uneven_spacing_and_duplicate_slices(tmp_path):
    folder = axial_series(tmp_path / 'uneven', np.zeros((4, ROWS, COLS)), shuffle=False)
    write_slice(folder / 'IM003.dcm', np.zeros((ROWS, COLS)), (-10.0, -20.0, 30.0 + 2 * 2.5 + 1.0))
    with pytest.raises(DataError, match='inconsistent slice spacing: slice files IM002.dcm and IM003.dcm'):
        read_volume(folder)
    write_slice(folder / 'IM003.dcm', np.zeros((ROWS, COLS)), (-10.0, -20.0, 30.0 + 2 * 2.5))
    with pytest.raises(DataError, match='IM002.dcm and IM003.dcm lie at the same position'):
        read_volume(folder)


def test_two_series_and_mixed_orientation_name_a_slice(tmp_path):
    folder = axial_series(tmp_path / 'mixed', np.zeros((3, ROWS, COLS)), shuffle=False)
    write_slice(folder / 'other.dcm', np.zeros((ROWS, COLS)), (0, 0, 99), series='1.2.3.4')
    with pytest.raises(DataError, match=r'mixed: 2 series in one folder .*slice file other.dcm is of series 1.2.3.4'):
        read_volume(folder)
    (folder / 'other.dcm').unlink()
    write_slice(folder / 'tilted.dcm', np.zeros((ROWS, COLS)), (-10, -20, 37.5), orientation=[1, 0, 0, 0, 0.9, 0.436])
    with pytest.raises(DataError, match='mixed: mixed orientations: slice file tilted.dcm'):
        read_volume(folder)


def test_not_dicom_and_not_a_volume(tmp_path):
    folder = axial_series(tmp_path / 's', np.zeros((2, ROWS, COLS)))
    (folder / 'notes.txt').write_text('hello')
    with pytest.raises(DataError, match='s: slice file notes.txt is not a readable DICOM'):
        read_volume(folder)
    with pytest.raises(ImageReadError, match='not found'):
        read_volume(tmp_path / 'nothing.nii.gz')
    (tmp_path / 'x.png').write_bytes(b'x')
    with pytest.raises(ImageReadError, match=r'x.png: not a volume'):
        read_volume(tmp_path / 'x.png')
    (tmp_path / 'broken.nii.gz').write_bytes(b'not gzip')
    with pytest.raises(ImageReadError, match='broken.nii.gz: cannot read NIfTI'):
        read_volume(tmp_path / 'broken.nii.gz')


def test_nifti_with_permuted_flipped_affine_is_turned_to_ras(tmp_path):
    """Voxel axis 0 runs to the feet (-S), axis 1 to the patient's right (+R), axis 2 to the back (-A)."""
    data = np.zeros((7, 5, 3), np.int16)
    data[1, 3, 0] = 100
    affine = np.array(
        [
            [0.0, 2.0, 0.0, -4.0],  # x (R) from voxel axis 1, 2 mm
            [0.0, 0.0, -3.0, 6.0],  # y (A) from voxel axis 2 reversed, 3 mm
            [-1.5, 0.0, 0.0, 9.0],  # z (S) from voxel axis 0 reversed, 1.5 mm
            [0, 0, 0, 1],
        ]
    )
    nib.save(nib.Nifti1Image(data, affine), tmp_path / 'v.nii.gz')
    volume, spacing = read_volume(tmp_path / 'v.nii.gz', window=(0, 100))
    assert volume.shape == (7, 3, 5) and spacing == pytest.approx((1.5, 3.0, 2.0))
    # World position of the marker, then its index counted from the lowest corner of each RAS axis.
    world = affine @ [1, 3, 0, 1]
    corners = np.array([affine @ [i, j, k, 1] for i in (0, 6) for j in (0, 4) for k in (0, 2)])
    lowest = corners.min(axis=0)
    expected = [(world[2] - lowest[2]) / 1.5, (world[1] - lowest[1]) / 3.0, (world[0] - lowest[0]) / 2.0]
    assert np.argwhere(volume == 1.0).tolist() == [[round(e) for e in expected]] == [[5, 2, 3]]


def test_resampled_to_spacing_and_4d_single_frame(tmp_path):
    data = np.zeros((10, 10, 4, 1), np.float32)  # x, y at 1 mm; z at 3 mm
    data[..., 2, 0] = 1.0
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / 'v.nii')
    volume, spacing = read_volume(tmp_path / 'v.nii', spacing=(1.5, 2.0, 2.0), window=(0, 1))
    assert volume.shape == (8, 5, 5) and spacing == (1.5, 2.0, 2.0)
    profile = volume[:, 2, 2]
    assert 3 <= int(profile.argmax()) <= 5 and profile.max() > 0.5  # slice 2 (z = 6 mm) lands near d = 4
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / 't.nii')
    with pytest.raises(ImageReadError, match=r't.nii: a volume has 3 dimensions.*\(4, 4, 4, 2\)'):
        read_volume(tmp_path / 't.nii')


def test_default_intensity_is_percentile_stretch():
    values = np.linspace(0, 1000, 1001, dtype=np.float32).reshape(7, 11, 13)
    values[0, 0, 0] = 1e6  # one metal voxel does not set the range
    out = apply_window(values, None)
    lo, hi = np.percentile(values, (0.5, 99.5))
    np.testing.assert_allclose(out[3, 5, 6], (values[3, 5, 6] - lo) / (hi - lo), rtol=1e-5)
    assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32
    np.testing.assert_array_equal(apply_window(np.full((2, 2, 2), 5.0), None), 0.0)


def write_medmnist(path, n=(6, 2, 3), side=28, classes=11, **replace):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(('train', 'val', 'test'), n):
        arrays[f'{split}_images'] = rng.integers(0, 256, (count, side, side, side), dtype=np.uint8)
        arrays[f'{split}_labels'] = rng.integers(0, classes, (count, 1))
    arrays.update(replace)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_medmnist_npz_read_as_published(tmp_path):
    arrays = write_medmnist(tmp_path / 'organmnist3d.npz')
    read = read_medmnist(tmp_path / 'organmnist3d.npz')
    for split in ('train', 'val', 'test'):
        np.testing.assert_array_equal(read[split][0], arrays[f'{split}_images'])
        np.testing.assert_array_equal(read[split][1], arrays[f'{split}_labels'])
    with pytest.raises(DataError, match='organmnist3d.npz: a .npz holds a whole MedMNIST dataset'):
        read_volume(tmp_path / 'organmnist3d.npz')


@pytest.mark.parametrize(
    'replace, match',
    [
        ({'val_labels': None}, 'missing array.*val_labels'),
        ({'train_images': np.zeros((6, 28, 28), np.uint8)}, r'train_images has shape \(6, 28, 28\).*2D MedMNIST'),
        ({'test_images': np.zeros((3, 4, 4, 4), np.float32)}, 'test_images is float32'),
        ({'val_labels': np.zeros((3, 1), np.int64)}, r'val_labels has shape \(3, 1\).*for 2 volumes'),
    ],
)
def test_medmnist_npz_errors_name_the_array(tmp_path, replace, match):
    write_medmnist(tmp_path / 'bad.npz', **replace)
    with pytest.raises(DataError, match=f'bad.npz: {match}'):
        read_medmnist(tmp_path / 'bad.npz')
