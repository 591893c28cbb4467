"""Exactness across process boundaries: resume after SIGKILL, and DDP on 2 gloo processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_engine_train import TinyNet, assert_same_weights, run, tiny_config, tiny_datasets

from hybridmednet.engine.trainer import train
from hybridmednet.errors import TrainingError

TESTS = Path(__file__).parent

KILLED_RUN = f"""
import signal, sys
sys.path.insert(0, {str(TESTS)!r})
from test_engine_train import SignalAt, run, tiny_datasets
from pathlib import Path
data = tiny_datasets()
# 48 images, batch 4: item 48 + 4*7 + 1 is read in the middle of epoch 2.
data['train'] = SignalAt(data['train'], at=48 + 4 * 7 + 1, sig=signal.SIGKILL)
run(Path(sys.argv[1]), datasets=data, epochs=3)
"""


def test_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    _, reference = run(tmp_path / 'ref', epochs=3)
    proc = subprocess.run([sys.executable, '-c', KILLED_RUN, str(tmp_path / 'run')], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    last = tmp_path / 'run' / 'ckpt' / 'last_model.pth'
    assert torch.load(last, weights_only=True)['epoch'] == 1  # the epoch-1 checkpoint survived the kill
    result, resumed = run(tmp_path / 'run', resume=last, epochs=3)
    assert result['epochs'] == 3 and len(result['history']) == 3
    assert_same_weights(resumed, reference)


CTRL_C_WITH_WORKERS = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from test_engine_train import SignalAt, run, tiny_datasets
from pathlib import Path
data = tiny_datasets()
data['train'] = SignalAt(data['train'], at=10, group=True)     # read in a DataLoader worker
result, _ = run(Path(sys.argv[1]), datasets=data, epochs=3, num_workers=1, gradient_accumulation_steps=4)
print('interrupted', result['interrupted'])
"""


def test_ctrl_c_in_a_terminal_with_dataloader_workers(tmp_path):
    # The whole process group gets SIGINT, workers included; the run must still stop cleanly.
    proc = subprocess.run(
        [sys.executable, '-c', CTRL_C_WITH_WORKERS, str(tmp_path)],
        capture_output=True,
        text=True,
        start_new_session=True,
    )
    assert proc.returncode == 0 and 'interrupted True' in proc.stdout, proc.stderr
    ckpt = torch.load(tmp_path / 'ckpt' / 'last_model.pth', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['batch_in_epoch'] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, model_class: type, batch_size: int) -> None:
    """One torchrun-like gloo process training `model_class()` on the tiny data."""
    os.environ.update(
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME='lo',
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    train(tiny_config(Path(out), batch_size=batch_size, epochs=2), model=model_class(), datasets=tiny_datasets())


def test_ddp_two_processes_match_one_process(tmp_path):
    single, model = run(tmp_path / 'one', batch_size=8, epochs=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / 'two'), TinyNet, 4), nprocs=2, join=True)
    ckpt = torch.load(tmp_path / 'two' / 'ckpt' / 'last_model.pth', weights_only=True)
    assert ckpt['world_size'] == 2 and ckpt['step'] == single['steps']
    ddp_model = TinyNet()
    ddp_model.load_state_dict(ckpt['model_state_dict'])
    assert_same_weights(ddp_model, model, atol=1e-5)
    # Validation metrics are gathered from both ranks: the same images, the same AUC.
    for a, b in zip(ckpt['history'], single['history']):
        assert abs(a['val_mean_auc'] - b['val_mean_auc']) < 1e-6
        assert abs(a['train_loss'] - b['train_loss']) < 1e-5


class BatchNormNet(torch.nn.Module):
    """TinyNet with BatchNorm: each rank updates its running statistics from its own half-batches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.norm = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_ddp_validates_with_the_batchnorm_statistics_it_saves(tmp_path):
    # Without syncing, rank 1 would score its half of the validation set with its own running statistics,
    # and the reported val loss would not be the saved model's.
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), BatchNormNet, 4), nprocs=2, join=True)
    ckpt = torch.load(tmp_path / 'ckpt' / 'last_model.pth', weights_only=True)
    model = BatchNormNet()
    model.load_state_dict(ckpt['model_state_dict'])
    images, targets, _mask = tiny_datasets()['val'].tensors
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.eval()(images), targets).item()
    assert abs(ckpt['history'][-1]['val_loss'] - loss) < 1e-5, (ckpt['history'][-1]['val_loss'], loss)


def test_resume_from_weights_of_another_model_is_one_clear_error(tmp_path):
    result, _ = run(tmp_path / 'a', epochs=1)
    other = TinyNet()
    other.conv = torch.nn.Conv2d(3, 4, 3, stride=2)  # as a pruned model's weights would be: fewer channels
    other.fc = torch.nn.Linear(4, other.fc.out_features)
    with pytest.raises(TrainingError, match=r'do not fit the model this config builds \(.*conv.weight'):
        train(
            tiny_config(tmp_path / 'b', 0, epochs=2), result['last_checkpoint'], model=other, datasets=tiny_datasets()
        )
    weights_only = tmp_path / 'weights.pth'
    torch.save({'model_state_dict': TinyNet().state_dict()}, weights_only)
    with pytest.raises(TrainingError, match='holds no training state'):
        train(tiny_config(tmp_path / 'c', 0, epochs=2), weights_only, model=TinyNet(), datasets=tiny_datasets())
