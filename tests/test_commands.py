"""Every subcommand turns a typical user mistake into one line on stderr and exit status 2, never a traceback."""

import subprocess
import sys

import pytest
import torch

from hybridmednet import cli
from hybridmednet.checkpoint import save_checkpoint

MISTAKES = {
    'train': (['MODEL.backbone=convnext_tinyy'], "unknown backbone 'convnext_tinyy'"),
    'evaluate': (['--model_path', '{tmp}/missing.pth'], 'checkpoint not found'),
    'predict': (['--image_path', '{tmp}', '--model_path', '{tmp}/weights.pth'], 'bare state dict without a config'),
    'card': (['--model_path', '{tmp}/weights.pth'], 'bare state dict without a config'),
    'demo': (['TRAIN.epocs=1'], "unknown key TRAIN['epocs']; did you mean 'epochs'"),
    'sample-data': (['{tmp}/sample', '--n', '3'], 'n=3 is too small'),
    'check-data': (['DATA.data_dir={tmp}/nowhere'], 'is not a directory'),
    'cache': (['DATA.dataset=nih', 'DATA.data_dir={tmp}'], 'no labels file'),
    'models': (['--family', 'convnxt'], "no backbones in family 'convnxt'"),
}


@pytest.mark.parametrize('command', list(MISTAKES))
def test_a_mistake_is_one_line_on_stderr_and_status_2(command, tmp_path, capsys):
    save_checkpoint(tmp_path / 'weights.pth', {'model_state_dict': {'w': torch.zeros(1)}})  # no config inside
    args, message = MISTAKES[command]
    status = cli.main([command, *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith(f'hybridmednet {command}: error: ') and message in lines[0], err


def test_train_with_a_typo_in_the_backbone_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'hybridmednet.cli', 'train', 'MODEL.backbone=convnext_tinyy'],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr and "did you mean 'convnext_tiny'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_subcommand_suggests_the_close_one(capsys):
    assert cli.main(['evalute']) == 2
    assert "did you mean 'evaluate'" in capsys.readouterr().err
