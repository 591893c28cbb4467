"""Volumes through the same commands as images: train learns the sample volumes, evaluate reports them, predict
scores NIfTI files and DICOM series folders and draws three-plane heatmaps."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip('monai')
nib = pytest.importorskip('nibabel')

from hybridmednet.checkpoint import load_model  # noqa: E402
from hybridmednet.commands import evaluate as evaluate_command  # noqa: E402
from hybridmednet.commands import predict as predict_command  # noqa: E402
from hybridmednet.commands import train as train_command  # noqa: E402
from hybridmednet.data.synthetic_volumes import generate_sample_volumes  # noqa: E402
from hybridmednet.data.volumes import read_volume  # noqa: E402
from hybridmednet.evaluation.predict import list_images  # noqa: E402


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('volumes')
    data = generate_sample_volumes(root / 'data', n=200, size=32, seed=0)
    overrides = [
        'MODEL.backbone=resnet3d_10',
        'MODEL.pretrained=false',
        'MODEL.num_classes=4',
        'MODEL.fusion_channels=32',
        'DATA.spatial_dims=3',
        'DATA.dataset=csv',
        f'DATA.data_dir={data}',
        'DATA.class_names=[sphere,shell,tube,texture]',
        'DATA.volume_size=[32,32,32]',
        'DATA.intensity_window=[-1000,400]',
        'DATA.num_workers=0',
        'TRAIN.epochs=8',
        'TRAIN.batch_size=16',
        'TRAIN.precise_bn=true',
        'TRAIN.learning_rate=2e-3',
        'TRAIN.warmup_epochs=0',
        'TRAIN.device=cpu',
        f'CHECKPOINT.dir={root / "ckpt"}',
        f'LOGGING.log_dir={root / "logs"}',
    ]
    assert train_command.main(overrides) == 0
    return {'root': root, 'data': data, 'model': root / 'ckpt' / 'best_model.pth'}


def test_training_on_volumes_learns(trained):
    rows = list(csv_rows(trained['root'] / 'logs' / 'history.csv'))
    losses = [float(r['train_loss']) for r in rows]
    assert losses[-1] < losses[0]
    assert float(rows[-1]['val_mean_auc']) > 0.65  # 4 findings, chance is 0.5
    model, config, meta = load_model(trained['model'])
    assert config.DATA['spatial_dims'] == 3 and meta['ood'] is not None and meta['calibration'] is not None


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_evaluate_and_predict_on_volumes_agree(trained, tmp_path):
    out = tmp_path / 'eval'
    assert (
        evaluate_command.main(['--model_path', str(trained['model']), '--save_results', '--output_dir', str(out)]) == 0
    )
    results = json.loads((out / 'results.json').read_text())
    assert results['data']['n_images'] > 0 and 'ood' in results
    paths = results['predictions']['path'][:2]
    probs = np.asarray(results['predictions']['probabilities'])[:2]

    # the same volumes, one as its NIfTI file, one as a DICOM series folder: the same probabilities
    inputs = tmp_path / 'in'
    inputs.mkdir()
    (inputs / 'a.nii.gz').write_bytes(open(paths[0], 'rb').read())
    write_series(paths[1], inputs / 'series_1.2.840')
    assert list_images(inputs, volumes=True) == [inputs / 'a.nii.gz', inputs / 'series_1.2.840']
    assert list_images(inputs / 'series_1.2.840', volumes=True) == [inputs / 'series_1.2.840']
    pred = tmp_path / 'pred'
    assert (
        predict_command.main(
            [
                '--image_path',
                str(inputs),
                '--model_path',
                str(trained['model']),
                '--output_dir',
                str(pred),
                '--visualize',
            ]
        )
        == 0
    )
    scored = json.loads((pred / 'predictions.json').read_text())['images']
    names = results['model']['class_names']
    got = np.array([[image['probabilities'][n] for n in names] for image in scored])
    np.testing.assert_allclose(got, probs, atol=1e-4)
    heatmaps = [h for image in scored for h in image['heatmaps'].values()]
    assert all(h.endswith('.png') for h in heatmaps)
    assert len(heatmaps) == sum(len(image['positive_findings']) for image in scored)


def write_series(nifti_path, folder):
    """The volume of a NIfTI file as an axial CT series (HU, 1.5 mm), slices in shuffled file order."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    volume = read_volume(nifti_path)  # only for its shape and spacing
    image = nib.as_closest_canonical(nib.load(nifti_path))
    hu = np.asarray(image.get_fdata()).transpose(2, 1, 0)  # [D, H, W], D inferior -> superior
    folder.mkdir()
    series = generate_uid()
    spacing = volume.spacing
    order = np.random.default_rng(0).permutation(hu.shape[0])
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f'{k}.dcm'), {}, file_meta=meta, preamble=b'\0' * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = (
            CTImageStorage,
            meta.MediaStorageSOPInstanceUID,
            series,
        )
        ds.Modality = 'CT'
        # DICOM's patient coordinates are LPS: rows run posterior (+y) and columns to the patient's left (+x);
        # our [D, H, W] runs H posterior -> anterior and W left -> right, so the slice is flipped in both
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[0])]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(hu[k, ::-1, ::-1]).astype(np.int16).tobytes()
        ds.save_as(folder / f'{k}.dcm', enforce_file_format=True)
    assert torch.equal(torch.from_numpy(read_volume(folder).array), torch.from_numpy(read_volume(nifti_path).array)), (
        'the series must read back as the NIfTI volume'
    )


def test_a_volume_model_exports_to_onnx_and_scores_the_same(trained, tmp_path):
    pytest.importorskip('onnxruntime')
    from hybridmednet.commands import export as export_command
    from hybridmednet.deploy.runtime import load_exported

    out = tmp_path / 'onnx'
    assert export_command.main(['--model_path', str(trained['model']), '--output_dir', str(out)]) == 0
    onnx, config, meta = load_exported(out)
    assert meta['preprocessing']['input_shape'] == [1, 32, 32, 32]
    model, _, _ = load_model(trained['model'])
    x = torch.rand(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(onnx(x).numpy(), model(x).numpy(), atol=1e-4)
    with pytest.raises(Exception, match=r'takes inputs \[B, 1, 32, 32, 32\]'):
        onnx(torch.rand(1, 1, 48, 48, 48))


def test_medmnist_recipe_trains_on_a_published_layout_file_and_reports_auc_and_acc(tmp_path):
    """configs/medmnist3d.yaml on an .npz in MedMNIST's layout (11 organ classes, one label per volume)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (('train', 44), ('val', 22), ('test', 22)):
        labels = (np.arange(n) % 11)[:, None].astype(np.uint8)
        arrays[f'{split}_images'] = rng.integers(0, 255, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f'{split}_labels'] = labels
    np.savez_compressed(tmp_path / 'organmnist3d.npz', **arrays)
    short = [
        f'DATA.data_dir={tmp_path}',
        'MODEL.backbone=resnet3d_10',
        'MODEL.fusion_channels=32',
        'TRAIN.epochs=1',
        'TRAIN.batch_size=11',
        'DATA.num_workers=0',
        f'CHECKPOINT.dir={tmp_path / "ckpt"}',
        f'LOGGING.log_dir={tmp_path / "logs"}',
    ]
    assert train_command.main(['--config', 'medmnist3d', *short]) == 0
    model, config, meta = load_model(tmp_path / 'ckpt' / 'best_model.pth')
    assert meta['class_names'][0] == 'liver' and len(meta['class_names']) == 11
    out = tmp_path / 'eval'
    model_path = str(tmp_path / 'ckpt' / 'best_model.pth')
    assert evaluate_command.main(['--model_path', model_path, '--save_results', '--output_dir', str(out)]) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['data']['n_images'] == 22  # MedMNIST's own test split
    probs = np.asarray(results['predictions']['probabilities'])
    labels = np.asarray(results['predictions']['labels'])
    assert results['metrics']['top1_accuracy'] == pytest.approx((probs.argmax(1) == labels.argmax(1)).mean())
    assert 'top-1 accuracy' in (out / 'report.md').read_text()


def test_the_model_card_of_a_volume_model_describes_volumes(trained, tmp_path):
    from hybridmednet.evaluation.card import write_card

    text = write_card(trained['model'], output=tmp_path / 'card.md').read_text()
    assert '3D volume (CT, MRI) classification' in text and 'frontal chest radiographs' not in text
    assert '32 x 32 x 32, 1 channel(s): volume [D, H, W] in RAS order' in text and 'ImageNet' not in text
    assert 'out-of-distribution score' in text  # the model carries an OOD model
