"""read_image: exact values for every format, and errors that name the file; each test runs on the file and on
its bytes in memory (decode_image, what the server does with an upload)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from hybridmednet.data import io
from hybridmednet.data.io import ImageReadError, stores_more_than_8_bits


@pytest.fixture(params=['file', 'memory'])
def read_image(request):
    """io.read_image, or io.decode_image on the file's bytes named by its path (so messages name the file)."""
    if request.param == 'file':
        return io.read_image
    return lambda path, **kwargs: io.decode_image(Path(path).read_bytes(), str(path), **kwargs)


def write_dicom(path, pixels, syntax=ExplicitVRLittleEndian, pixel_data=None, **attrs):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixel_data if pixel_data is not None else pixels.astype(np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_png_8bit_exact(tmp_path, read_image):
    pixels = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'a.png')
    image = read_image(tmp_path / 'a.png')
    assert image.dtype == np.float32 and image.shape == (2, 2)
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-7)


def test_png_16bit_keeps_precision(tmp_path, read_image):
    pixels = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / 'a.png')
    np.testing.assert_allclose(read_image(tmp_path / 'a.png'), pixels / 65535.0, atol=1e-7)


def write_png16(path, pixels, significant_bits=None):
    """A 16-bit grey PNG, with an sBIT chunk when significant_bits is given."""
    info = PngInfo()
    if significant_bits is not None:
        info.add(b'sBIT', bytes([significant_bits]))
    Image.fromarray(pixels.astype(np.uint16)).save(path, pnginfo=info)
    return path


RAMP_12BIT = np.arange(0, 4096, 65, dtype=np.uint16).reshape(8, 8)  # 0 .. 4095


def test_png_sbit_12_bits_stored_as_is_reads_full_range(tmp_path, read_image):
    path = write_png16(tmp_path / 'a.png', RAMP_12BIT, significant_bits=12)
    image = read_image(path)
    assert image.max() == pytest.approx(1.0)
    np.testing.assert_allclose(image, RAMP_12BIT / 4095.0, atol=1e-7)


def test_png_sbit_with_samples_scaled_as_the_standard_says(tmp_path, read_image):
    scaled = RAMP_12BIT * 16  # 12-bit samples shifted up to 16 bits: the full range already
    np.testing.assert_allclose(
        read_image(write_png16(tmp_path / 'a.png', scaled, significant_bits=12)), scaled / 65535.0, atol=1e-7
    )


def test_png_12_bits_without_sbit_needs_the_bit_depth(tmp_path, read_image):
    path = write_png16(tmp_path / 'a.png', RAMP_12BIT)
    np.testing.assert_allclose(read_image(path), RAMP_12BIT / 65535.0, atol=1e-7)  # auto: 16-bit range
    np.testing.assert_allclose(read_image(path, intensity=12), RAMP_12BIT / 4095.0, atol=1e-7)
    np.testing.assert_allclose(read_image(path, intensity=10), np.minimum(RAMP_12BIT / 1023.0, 1.0), atol=1e-7)


def test_minmax_intensity_stretches_each_image(tmp_path, read_image):
    path = write_png16(tmp_path / 'a.png', np.array([[1000, 2000], [3000, 1500]]), significant_bits=12)
    np.testing.assert_allclose(read_image(path, intensity='minmax'), [[0.0, 0.5], [1.0, 0.25]], atol=1e-7)
    Image.fromarray(np.array([[50, 100], [150, 75]], np.uint8)).save(tmp_path / 'b.png')
    np.testing.assert_allclose(read_image(tmp_path / 'b.png', intensity='minmax'), [[0.0, 0.5], [1.0, 0.25]])


def test_more_than_8_bits_told_from_the_header(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'grey.png')
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'colour.jpg')
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / 'float.tif')
    write_png16(tmp_path / 'deep.png', RAMP_12BIT)
    write_dicom(tmp_path / 'a.dcm', np.zeros((2, 2)))
    (tmp_path / 'junk.png').write_bytes(b'junk')
    deep = {
        name: stores_more_than_8_bits(tmp_path / name)
        for name in ('grey.png', 'colour.jpg', 'float.tif', 'deep.png', 'a.dcm', 'junk.png')
    }
    assert deep == {
        'grey.png': False,
        'colour.jpg': False,
        'float.tif': True,
        'deep.png': True,
        'a.dcm': True,
        'junk.png': False,
    }


@pytest.mark.parametrize('intensity', ['bogus', 'AUTO', 0, 17, 12.0, True, None])
def test_unknown_intensity_names_the_accepted_values(tmp_path, intensity, read_image):
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / 'a.png')
    with pytest.raises(ValueError, match=r"intensity must be 'auto', 'minmax' or a bit depth from 1 to 16"):
        read_image(tmp_path / 'a.png', intensity=intensity)


@pytest.mark.parametrize('mode', ['RGB', 'RGBA'])
def test_colour_png_becomes_luminance(tmp_path, mode, read_image):
    grey = np.array([[10, 200], [90, 255]], dtype=np.uint8)
    channels = [grey] * 3 + ([np.zeros_like(grey)] if mode == 'RGBA' else [])
    Image.fromarray(np.stack(channels, -1), mode).save(tmp_path / 'a.png')
    np.testing.assert_allclose(read_image(tmp_path / 'a.png'), grey / 255.0, atol=1 / 255)


def test_jpeg(tmp_path, read_image):
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp_path / 'a.jpg', quality=95)
    image = read_image(tmp_path / 'a.jpg')
    assert image.shape == (16, 16) and abs(image.mean() - 100 / 255) < 2 / 255


def test_dicom_without_window_is_min_max_scaled(tmp_path, read_image):
    path = write_dicom(tmp_path / 'a.dcm', np.array([[0, 100, 200]]))
    np.testing.assert_allclose(read_image(path), [[0.0, 0.5, 1.0]])


def test_dicom_monochrome1_is_inverted(tmp_path, read_image):
    path = write_dicom(tmp_path / 'a.dcm', np.array([[0, 100, 200]]), PhotometricInterpretation='MONOCHROME1')
    np.testing.assert_allclose(read_image(path), [[1.0, 0.5, 0.0]])


def test_dicom_window_centre_width(tmp_path, read_image):
    path = write_dicom(tmp_path / 'a.dcm', np.array([[0, 50, 100, 150, 200]]), WindowCenter=100.5, WindowWidth=101)
    np.testing.assert_allclose(read_image(path), [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-6)


def test_dicom_rescale_then_window_in_physical_units(tmp_path, read_image):
    # stored 0, 512, 1024 -> -1024, 0, 1024 after slope 2 / intercept -1024; window [-1024, 1024]
    path = write_dicom(
        tmp_path / 'a.dcm',
        np.array([[0, 512, 1024]]),
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=0.5,
        WindowWidth=2049,
    )
    np.testing.assert_allclose(read_image(path), [[0.0, 0.5, 1.0]], atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path, read_image):
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]  # 4 entries, first stored value 0, 8-bit output
    lut.LUTData = np.array([0, 51, 102, 255], np.uint16).tobytes()
    path = write_dicom(tmp_path / 'a.dcm', np.array([[0, 1, 2, 3]]), VOILUTSequence=[lut])
    np.testing.assert_allclose(read_image(path), [[0.0, 0.2, 0.4, 1.0]], atol=1e-6)


BODY = np.array([[100, 200, 300, 250]])  # min-max: 0, 0.5, 1, 0.75


def with_padding(value, pixels=BODY):
    """The body with a padding border of `value` around it."""
    return np.pad(pixels, 1, constant_values=value)


@pytest.mark.parametrize('padding', [0, 4095, 65535])
@pytest.mark.parametrize('photometric', ['MONOCHROME2', 'MONOCHROME1'])
def test_dicom_padding_is_left_out_of_min_max_and_black(tmp_path, padding, photometric, read_image):
    path = write_dicom(
        tmp_path / 'a.dcm', with_padding(padding), PixelPaddingValue=padding, PhotometricInterpretation=photometric
    )
    body = np.array([[0.0, 0.5, 1.0, 0.75]])
    np.testing.assert_allclose(read_image(path), with_padding(0.0, body if photometric == 'MONOCHROME2' else 1 - body))


def test_dicom_padding_range_limit(tmp_path, read_image):
    pixels = with_padding(40, BODY)
    pixels[0, :3] = [0, 10, 50]  # PixelPaddingValue 50 .. PixelPaddingRangeLimit 0, either order
    path = write_dicom(tmp_path / 'a.dcm', pixels, PixelPaddingValue=50, PixelPaddingRangeLimit=0)
    np.testing.assert_allclose(read_image(path), with_padding(0.0, np.array([[0.0, 0.5, 1.0, 0.75]])))


def test_dicom_padding_is_black_through_a_window_too(tmp_path, read_image):
    path = write_dicom(
        tmp_path / 'a.dcm', with_padding(4095), PixelPaddingValue=4095, WindowCenter=200.5, WindowWidth=201
    )
    np.testing.assert_allclose(read_image(path), with_padding(0.0, np.array([[0.0, 0.5, 1.0, 0.75]])), atol=1e-6)


def lut_item(descriptor, entries):
    lut = Dataset()
    lut.LUTDescriptor = descriptor
    lut.LUTData = np.asarray(entries, np.uint16).tobytes()
    return lut


@pytest.mark.parametrize(
    'attrs, expected',
    [
        ({'WindowCenter': '', 'WindowWidth': ''}, [0.0, 0.5, 1.0]),  # min-max
        ({'WindowCenter': 150.5, 'WindowWidth': ''}, [0.0, 0.5, 1.0]),
        ({'WindowCenter': 150.5, 'WindowWidth': 0}, [0.0, 0.5, 1.0]),
        (
            {'WindowCenter': '', 'WindowWidth': '', 'VOILUTSequence': [lut_item([201, 0, 8], np.arange(201) // 2)]},
            [0.0, 50 / 255, 100 / 255],
        ),
        ({'VOILUTSequence': [], 'WindowCenter': 150.5, 'WindowWidth': 101}, [0.0, 0.0, 1.0]),  # the window
    ],
)
def test_dicom_empty_window_or_lut_falls_back_to_the_next(tmp_path, attrs, expected, read_image):
    path = write_dicom(tmp_path / 'a.dcm', np.array([[0, 100, 200]]), **attrs)
    np.testing.assert_allclose(read_image(path), [expected], atol=1e-6)


def test_dicom_8_bit_voi_lut_with_more_than_256_entries(tmp_path, read_image):
    table = np.arange(4096) * 255 // 4095  # 12-bit input, 8-bit output
    pixels = np.arange(0, 4096, 64).reshape(8, 8)
    path = write_dicom(tmp_path / 'a.dcm', pixels, VOILUTSequence=[lut_item([4096, 0, 8], table)])
    image = read_image(path)
    assert image.max() == pytest.approx(table[4032] / 255)
    np.testing.assert_allclose(image, table[pixels] / 255.0, atol=1e-6)


def test_dicom_found_by_marker_without_suffix(tmp_path, read_image):
    path = write_dicom(tmp_path / 'IM0001', np.array([[0, 10]]))
    np.testing.assert_allclose(read_image(path), [[0.0, 1.0]])


def test_dicom_multiframe_refused(tmp_path, read_image):
    path = write_dicom(tmp_path / 'a.dcm', np.zeros((2, 2, 2)), NumberOfFrames=2)
    with pytest.raises(ImageReadError, match=r'a\.dcm: multi-frame'):
        read_image(path)


def test_compressed_dicom_without_decoders_names_the_extra(tmp_path, read_image):
    if importlib.util.find_spec('pylibjpeg') is not None:
        pytest.skip('pylibjpeg is installed')
    from pydicom.encaps import encapsulate

    path = write_dicom(
        tmp_path / 'a.dcm',
        np.zeros((2, 2)),
        syntax=JPEG2000Lossless,
        pixel_data=encapsulate([b'\xff\x4f\xff\x51' + b'\x00' * 12]),
    )
    with pytest.raises(ImageReadError, match=r'a\.dcm: compressed DICOM .*hybridmednet\[dicom\]'):
        read_image(path)


def test_bad_files_name_the_file(tmp_path, read_image):
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / 'full.png')
    data = (tmp_path / 'full.png').read_bytes()
    (tmp_path / 'truncated.png').write_bytes(data[: len(data) // 2])
    (tmp_path / 'empty.png').write_bytes(b'')
    (tmp_path / 'text.png').write_text('not an image')
    for name, why in [
        ('truncated.png', 'cannot read'),
        ('empty.png', 'empty'),
        ('text.png', 'not a recognised'),
    ]:
        with pytest.raises(ImageReadError, match=f'{name}: .*{why}'):
            read_image(tmp_path / name)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ImageReadError, match='missing.png: file not found'):
        io.read_image(tmp_path / 'missing.png')
