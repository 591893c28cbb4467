"""`hybridmednet export`: ONNX Runtime must reproduce PyTorch for every backbone family and attention
mode, model.json must describe the model, and a failed export must leave nothing behind."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hybridmednet import cli
from hybridmednet.checkpoint import load_model, save_checkpoint, weights_hash
from hybridmednet.config import Config
from hybridmednet.deploy import export
from hybridmednet.deploy.runtime import OnnxModel, load_exported
from hybridmednet.models.hybrid import HybridMedNet

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

CLASSES = ['a', 'b', 'c']


def make_checkpoint(path, backbone='resnet18', image_size=64, data=None, seed=0, **model):
    """A tiny untrained HybridMedNet saved as a training checkpoint (3 classes unless `data` gives the NIH 14)."""
    names = CLASSES if data is None else None
    config = Config(
        MODEL={'backbone': backbone, 'pretrained': False, 'fusion_channels': 32, **model},
        DATA={'image_size': image_size, 'num_workers': 0, 'class_names': names, 'data_dir': data and str(data)},
    )
    config.MODEL['num_classes'] = len(config.class_names)
    config.validate()
    torch.manual_seed(seed)
    net = HybridMedNet(config)
    save_checkpoint(
        path, {'model_state_dict': net.state_dict(), 'config': config.to_dict(), 'class_names': config.class_names}
    )
    return path


HIERARCHICAL = {'hierarchical': True, 'num_coarse_classes': 2, 'coarse_groups': {'ab': ['a', 'b'], 'c': ['c']}}
CBAM = {'use_modern_attention': False}
SELF_ONLY = {'use_modern_attention': True, 'use_cross_scale_attention': False}
# Each family once, the attention modes spread over them; the slower exports (15-20 s each) are opt-in.
FAMILIES = [
    ('resnet18', {}),  # FPN, modern + cross-scale attention (the default)
    ('convnext_atto', CBAM),
    ('efficientnet_b0', SELF_ONLY),
    ('mambaout_femto', HIERARCHICAL),
    pytest.param('swin_tiny', {}, marks=pytest.mark.slow),
    pytest.param('efficientvim_m1', SELF_ONLY, marks=pytest.mark.slow),
    pytest.param('efficientnetv2_s', CBAM, marks=pytest.mark.slow),
]


@pytest.mark.parametrize('backbone, options', FAMILIES)
def test_onnx_runtime_reproduces_pytorch(tmp_path, backbone, options):
    ckpt = make_checkpoint(tmp_path / 'model.pth', backbone, **options)
    record = export.export_onnx(ckpt, tmp_path / 'onnx')
    model, _, _ = load_model(ckpt)
    onnx_model = OnnxModel(tmp_path / 'onnx')
    x = torch.randn(5, 3, 64, 64)  # a batch size the export never saw
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(onnx_model(x), expected, atol=1e-4, rtol=1e-3)
    assert record['exporter'] == 'dynamo'
    assert record['parity']['max_abs_diff'] < 1e-4
    assert json.loads((tmp_path / 'onnx' / 'model.json').read_text())['parity'] == record['parity']


THRESHOLDS = {'values': {'a': 0.3, 'b': 0.5, 'c': 0.7}, 'method': 'youden'}
OOD = {'mean': torch.zeros(32), 'precision': torch.eye(32), 'threshold': 3.0, 'quantile': 0.99, 'feature_dim': 32}


def store_entries(path, **entries):
    """Add what evaluate (thresholds) and training (OOD model) store with a model to a checkpoint."""
    state = torch.load(path, weights_only=True)
    save_checkpoint(path, {**state, **entries})
    return path


def test_model_json_describes_the_model(tmp_path):
    healthy = {'healthy_images': torch.zeros(2, 3, 64, 64, dtype=torch.float16), 'n_images': 2, 'images': 'x'}
    ckpt = store_entries(
        make_checkpoint(tmp_path / 'best.pth'), thresholds=THRESHOLDS, ood=OOD, heatmap_reference=healthy
    )
    assert cli.main(['export', '--model_path', str(ckpt)]) == 0
    out = tmp_path / 'best-onnx'  # the default: beside the checkpoint
    # no heatmaps' healthy images: an ONNX model gives no heatmaps
    assert sorted(p.name for p in out.iterdir()) == ['model.json', 'model.onnx', 'model.ood.safetensors']
    meta = json.loads((out / 'model.json').read_text())
    assert 'heatmap_reference' not in meta
    model, config, _ = load_model(ckpt)
    assert meta['class_names'] == CLASSES
    assert meta['thresholds'] == THRESHOLDS and meta['calibration'] is None
    assert meta['ood']['tensor_file'] == 'model.ood.safetensors' and meta['ood']['threshold'] == 3.0
    assert torch.equal(load_file(out / 'model.ood.safetensors')['precision'], OOD['precision'])
    assert torch.equal(load_exported(out)[2]['ood']['precision'], OOD['precision'])  # read back as load_model does
    assert meta['weights_hash'] == weights_hash(model.state_dict())
    assert meta['config'] == config.to_dict()
    assert meta['preprocessing']['image_size'] == 64
    assert meta['input']['shape'] == ['batch', 3, 64, 64]
    assert meta['opset'] >= 17
    assert not list(tmp_path.glob('.best-onnx*'))  # no staging directory left


def test_falls_back_to_the_torchscript_exporter_when_dynamo_fails(tmp_path, monkeypatch):
    real = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError('unsupported operator')
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, 'export', dynamo_fails)
    ckpt = make_checkpoint(tmp_path / 'model.pth', 'convnext_atto', **CBAM)  # TorchScript cannot pool 16 px to 7
    with pytest.warns(UserWarning, match='dynamo ONNX exporter failed'):
        record = export.export_onnx(ckpt, tmp_path / 'onnx')
    assert record['exporter'] == 'torchscript'
    assert json.loads((tmp_path / 'onnx' / 'model.json').read_text())['exporter'] == 'torchscript'
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(tmp_path / 'onnx')(x), load_model(ckpt)[0](x), atol=1e-4, rtol=1e-3)


def test_an_export_that_drifts_from_pytorch_is_refused_and_removed(tmp_path, monkeypatch, capsys):
    real = export._export

    def drifting_export(model, example, path, source):
        exporter = real(model, example, path, source)
        with torch.no_grad():  # the ONNX file now holds other weights than the model it is compared with
            model.head.fc.bias.add_(0.01)
        return exporter

    monkeypatch.setattr(export, '_export', drifting_export)
    ckpt = make_checkpoint(tmp_path / 'model.pth')
    out = tmp_path / 'onnx'
    assert cli.main(['export', '--model_path', str(ckpt), '--output_dir', str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'differ by up to' in err[0] and 'refused' in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pth']


def test_replacing_an_earlier_export_and_refusing_a_foreign_directory(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / 'model.pth')
    out = tmp_path / 'onnx'
    export.export_onnx(ckpt, out)
    make_checkpoint(ckpt, seed=1)
    record = export.export_onnx(ckpt, out)  # an earlier export is replaced
    assert json.loads((out / 'model.json').read_text())['weights_hash'] == record['weights_hash']
    foreign = tmp_path / 'notes'
    foreign.mkdir()
    (foreign / 'todo.txt').write_text('keep me')
    assert cli.main(['export', '--model_path', str(ckpt), '--output_dir', str(foreign)]) == 2
    assert 'is not an exported model' in capsys.readouterr().err
    assert (foreign / 'todo.txt').read_text() == 'keep me'
