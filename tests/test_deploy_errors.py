"""Mistakes around deployment are one line on stderr, exit status 2, naming the file and what to do."""

import json
import sys

import pytest
import torch
from test_deploy_export import make_checkpoint

from hybridmednet import cli
from hybridmednet.deploy import DeployError
from hybridmednet.deploy.export import export_onnx
from hybridmednet.deploy.runtime import OnnxModel

pytest.importorskip('onnxruntime')


def one_error_line(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('errors')
    export_onnx(make_checkpoint(root / 'model.pth'), root / 'onnx')
    return root / 'onnx'


def test_exporting_what_is_not_a_hybridmednet_checkpoint(tmp_path, capsys):
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    assert str(text) in one_error_line(capsys, ['export', '--model_path', str(text)])
    bare = tmp_path / 'bare.pth'
    torch.save({'weight': torch.zeros(2)}, bare)
    line = one_error_line(capsys, ['export', '--model_path', str(bare)])
    assert str(bare) in line and 'without a config' in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bare.pth', 'notes.pth']


def test_a_model_neither_exporter_handles(tmp_path, capsys, monkeypatch):
    def fails(*args, dynamo=True, **kwargs):
        raise RuntimeError(f'no {"dynamo" if dynamo else "torchscript"} today')

    monkeypatch.setattr(torch.onnx, 'export', fails)
    ckpt = make_checkpoint(tmp_path / 'model.pth')
    line = one_error_line(capsys, ['export', '--model_path', str(ckpt)])
    assert line.endswith('(dynamo: RuntimeError: no dynamo today; TorchScript: RuntimeError: no torchscript today)')
    assert str(ckpt) in line and not (tmp_path / 'model-onnx').exists()


@pytest.mark.parametrize('command', ['predict', 'evaluate', 'quantize'])
def test_a_directory_without_model_json(tmp_path, capsys, command):
    folder = tmp_path / 'folder'
    folder.mkdir()
    argv = [command, '--model_path', str(folder)] + (['--image_path', str(tmp_path)] if command == 'predict' else [])
    line = one_error_line(capsys, argv)
    assert f'{folder}: no model.json' in line and 'hybridmednet export --model_path' in line


def test_an_onnx_file_of_another_size_than_model_json(exported, tmp_path, capsys):
    meta = json.loads((exported / 'model.json').read_text())
    meta['preprocessing']['image_size'] = 96  # as if model.onnx were swapped for another export
    meta['preprocessing']['input_shape'] = [3, 96, 96]
    (exported / 'model.json').write_text(json.dumps(meta))
    try:
        line = one_error_line(capsys, ['predict', '--image_path', str(tmp_path), '--model_path', str(exported)])
    finally:
        meta['preprocessing']['image_size'] = 64
        meta['preprocessing']['input_shape'] = [3, 64, 64]
        (exported / 'model.json').write_text(json.dumps(meta))
    assert str(exported / 'model.onnx') in line and '[3, 96, 96]' in line and 're-export' in line


def test_images_of_another_size_than_the_export(exported):
    with pytest.raises(DeployError, match=r'takes inputs \[B, 3, 64, 64\], got \[1, 3, 96, 96\].*image_size=64'):
        OnnxModel(exported)(torch.zeros(1, 3, 96, 96))


def test_missing_onnxruntime_names_the_extra(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails as when not installed
    line = one_error_line(capsys, ['predict', '--image_path', str(tmp_path), '--model_path', str(exported)])
    assert "pip install 'hybridmednet[deploy]'" in line
