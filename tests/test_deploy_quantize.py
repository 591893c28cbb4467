"""`hybridmednet quantize`: a static int8 copy of an export, calibrated on training images, checked on the
validation split, and refused (nothing written) when its AUC drops too far."""

import json

import numpy as np
import onnx
import pytest
import torch
from test_deploy_export import OOD, make_checkpoint, store_entries

from hybridmednet import cli
from hybridmednet.commands import quantize as quantize_command
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.deploy.export import export_onnx
from hybridmednet.deploy.runtime import OnnxModel

pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('quantize')
    data = generate_sample_dataset(root / 'data', n=80, size=64, seed=0, workers=1)
    export_onnx(store_entries(make_checkpoint(root / 'model.pth', data=data), ood=OOD), root / 'model-onnx')
    return root / 'model-onnx'


def quantize(*args):
    return cli.main(['quantize', *map(str, args)])


def test_int8_copy_is_calibrated_checked_and_keeps_softmax_float(exported):
    out = exported.parent / 'int8'
    assert quantize('--model_path', exported, '--calibration-images', 24, '--max-auc-drop', 1, '--output_dir', out) == 0
    meta = json.loads((out / 'model.json').read_text())
    source = json.loads((exported / 'model.json').read_text())
    assert {k: v for k, v in meta.items() if k != 'quantization'} == source  # same classes, thresholds, config
    assert (out / meta['ood']['tensor_file']).read_bytes() == (exported / meta['ood']['tensor_file']).read_bytes()
    q = meta['quantization']
    assert q['calibration_images'] == 24
    assert (
        q['val_mean_auc']['images'] > 0 and np.isfinite([q['val_mean_auc']['float'], q['val_mean_auc']['int8']]).all()
    )
    graph = onnx.load(str(out / 'model.onnx')).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count('QuantizeLinear') > 10 and 'Softmax' in ops
    quantized_inputs = {i for n in graph.node if n.op_type == 'QuantizeLinear' for i in n.input}
    softmax_outputs = {n.output[0] for n in graph.node if n.op_type == 'Softmax'}
    assert not softmax_outputs & quantized_inputs  # the attention and fusion softmaxes stay float
    x = torch.randn(3, 3, 64, 64)
    fp32, int8 = OnnxModel(exported)(x), OnnxModel(out)(x)
    assert not torch.equal(fp32, int8)
    torch.testing.assert_close(int8, fp32, atol=0.1, rtol=0.1)  # int8 rounding, not another model


def test_an_auc_drop_past_the_limit_is_refused_unless_forced(exported, monkeypatch, capsys):
    # the float model scores 0.80, its int8 copy 0.70: a drop of 0.10
    monkeypatch.setattr(
        quantize_command, 'mean_auc', lambda model, data, batch: 0.80 if model.directory == exported else 0.70
    )
    out = exported.parent / 'refused'
    assert quantize('--model_path', exported, '--calibration-images', 8, '--output_dir', out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'from 0.8000 to 0.7000' in err[0] and '--force' in err[0]
    assert not out.exists() and not list(exported.parent.glob('.refused*'))
    assert quantize('--model_path', exported, '--calibration-images', 8, '--output_dir', out, '--force') == 0
    assert json.loads((out / 'model.json').read_text())['quantization']['val_mean_auc']['int8'] == 0.70


def test_quantize_without_calibration_images_is_one_line(exported, tmp_path, capsys):
    args = ['--model_path', exported, '--output_dir', tmp_path / 'out']
    assert quantize(*args, 'DATA.train_split=0.0', 'DATA.val_split=0.8', 'DATA.test_split=0.2') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no calibration images' in err[0] and '--calibration-data' in err[0]
    (tmp_path / 'empty').mkdir()
    assert quantize(*args, '--calibration-data', tmp_path / 'empty') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / 'empty') in err[0]
    assert not (tmp_path / 'out').exists()
