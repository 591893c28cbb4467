"""The training loop on a tiny stand-in model: schedules, accumulation, early stopping, NaN, Ctrl-C resume.

`TinyNet` and `tiny_datasets` are also imported by the subprocess and DDP tests (test_engine_resume.py).
"""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from hybridmednet.checkpoint import load_checkpoint
from hybridmednet.config import Config
from hybridmednet.engine.schedule import LRSchedule
from hybridmednet.engine.trainer import train
from hybridmednet.errors import ConfigError, TrainingError

K = 3


class TinyNet(nn.Module):
    """[B,3,H,W] -> logits [B,K]; no BatchNorm or dropout, so batch splits give the same gradients."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def tiny_dataset(n: int, seed: int) -> TensorDataset:
    """Learnable: finding k is present when channel k is bright in the top half."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, :, :4].mean((2, 3)) > 0).float()
    return TensorDataset(x, y, torch.ones_like(y))


def tiny_datasets() -> dict[str, Dataset]:
    return {'train': tiny_dataset(48, 0), 'val': tiny_dataset(24, 1)}


def tiny_config(tmp_path, num_workers: int = 0, **train) -> Config:
    return Config(
        TRAIN={
            'batch_size': 4,
            'epochs': 2,
            'learning_rate': 1e-2,
            'warmup_epochs': 1,
            'mixed_precision': False,
            'device': 'cpu',
            'seed': 0,
            **train,
        },
        MODEL={'num_classes': K},
        DATA={'class_names': ['a', 'b', 'c'], 'num_workers': num_workers},
        CHECKPOINT={'dir': str(tmp_path / 'ckpt')},
        LOGGING={'log_dir': str(tmp_path / 'logs'), 'tensorboard': False},
    )


def run(tmp_path, datasets=None, resume=None, num_workers=0, **train_options):
    model = TinyNet()
    result = train(
        tiny_config(tmp_path, num_workers, **train_options), resume, model=model, datasets=datasets or tiny_datasets()
    )
    return result, model


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=0, atol=atol), f'{name} differs by {(x - y).abs().max()}'


# -- learning-rate schedules ----------------------------------------------------------------------------
def test_warmup_then_cosine_at_given_steps():
    s = LRSchedule('cosine', total_steps=100, warmup_steps=10, steps_per_epoch=10)
    assert [s.factor(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(55) == pytest.approx(0.5)  # half-way through the cosine
    assert s.factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_step_and_plateau_schedules():
    step = LRSchedule('step', total_steps=100, warmup_steps=0, steps_per_epoch=10, step_size=2, gamma=0.1)
    assert [step.factor(i) for i in (0, 19, 20, 40)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    plateau = LRSchedule('plateau', 100, 0, 10, gamma=0.5, patience=1)
    for auc in (0.7, 0.8, 0.8, 0.79):  # two epochs without a better AUC
        plateau.epoch_end(auc)
    assert plateau.factor(50) == 0.5


def test_learning_rate_applied_per_step(tmp_path):
    # 48 images / batch 4 = 12 steps per epoch; warmup 1 epoch; the last step of the run is step 23.
    result, _ = run(tmp_path, epochs=2, warmup_epochs=1)
    lrs = [h['lr'] for h in result['history']]
    assert lrs[0] == pytest.approx(1e-2)  # end of warmup: the full rate
    assert lrs[1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 11 / 12)))


# -- the loop ---------------------------------------------------------------------------------------------
def test_accumulation_of_k_steps_equals_one_large_batch(tmp_path):
    _, small = run(tmp_path / 'a', batch_size=4, gradient_accumulation_steps=3, grad_clip_norm=0.5)
    _, large = run(tmp_path / 'b', batch_size=12, gradient_accumulation_steps=1, grad_clip_norm=0.5)
    assert_same_weights(small, large, atol=1e-6)
    assert not torch.equal(small.fc.weight, TinyNet().fc.weight)


def test_early_stopping_on_val_auc(tmp_path):
    # lr 0: the validation AUC never improves after the first epoch.
    result, _ = run(tmp_path, epochs=20, learning_rate=0.0, early_stopping_patience=2)
    assert result['stopped_early'] and result['epochs'] == 3
    assert len(result['history']) == 3


def test_nan_loss_skips_the_step_and_is_counted(tmp_path):
    data = tiny_datasets()
    x, y, m = data['train'].tensors
    x = x.clone()
    x[5] = float('nan')  # one poisoned image: one bad step per epoch
    result, model = run(tmp_path, datasets={'train': TensorDataset(x, y, m), 'val': data['val']})
    assert result['bad_steps'] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(result['history'][-1]['train_loss'])


class NonFiniteGradientNet(TinyNet):
    """TinyNet plus the RMS of its feature maps: on a blank image the maps are all 0 (no bias), the logit and the
    loss stay finite, and the square root's gradient there makes the convolution's gradient NaN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(torch.relu(h).mean((2, 3))) + h.square().mean((1, 2, 3)).sqrt()[:, None]


@pytest.mark.parametrize('clip', [1.0, 0.0], ids=['clipped', 'not clipped'])
def test_a_nan_gradient_under_a_finite_loss_skips_the_step(tmp_path, clip):
    data = tiny_datasets()
    x, y, m = data['train'].tensors
    x = x.clone()
    x[5] = 0.0  # one blank image: one step per epoch with a NaN gradient
    model = NonFiniteGradientNet()
    datasets = {'train': TensorDataset(x, y, m), 'val': data['val']}
    result = train(tiny_config(tmp_path, grad_clip_norm=clip), model=model, datasets=datasets)
    assert result['bad_steps'] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.fc.weight, NonFiniteGradientNet().fc.weight)  # the other steps trained


def test_nan_losses_in_a_row_abort_with_a_clear_message(tmp_path):
    data = tiny_datasets()
    x, y, m = data['train'].tensors
    with pytest.raises(TrainingError, match='3 steps in a row had a NaN/Inf loss'):
        run(
            tmp_path,
            datasets={'train': TensorDataset(torch.full_like(x, float('nan')), y, m), 'val': data['val']},
            max_bad_steps=3,
        )


def test_checkpoint_contents_logs_and_plots(tmp_path):
    result, model = run(tmp_path, ema_decay=0.9, tensorboard=False)
    last = tmp_path / 'ckpt' / 'last_model.pth'
    ckpt = torch.load(last, weights_only=True)  # nothing but tensors and plain values
    for key in (
        'model_state_dict',
        'optimizer_state_dict',
        'scheduler_state_dict',
        'scaler_state_dict',
        'ema_state_dict',
        'epoch',
        'step',
        'rng_states',
        'config',
        'class_names',
        'history',
    ):
        assert key in ckpt, key
    assert ckpt['epoch'] == 2 and ckpt['step'] == 24 and ckpt['class_names'] == ['a', 'b', 'c']
    assert ckpt['config']['TRAIN']['ema_decay'] == 0.9
    assert isinstance(ckpt['rng_states'][0]['torch'], torch.Tensor)
    legacy = TinyNet(seed=1)
    legacy.load_state_dict(torch.load(last)['model_state_dict'])  # the SPEC's loading recipe
    assert_same_weights(legacy, model)
    assert not torch.equal(ckpt['ema_state_dict']['fc.weight'], ckpt['model_state_dict']['fc.weight'])
    best = load_checkpoint(tmp_path / 'ckpt' / 'best_model.pth')
    assert best['best_auc'] == max(h['val_mean_auc'] for h in result['history'])
    for name in ('best_model.safetensors', 'best_model.json'):
        assert (tmp_path / 'ckpt' / name).is_file()
    for name in ('history.csv', 'history.json', 'training_curves.png', 'roc_curves.png'):
        assert (tmp_path / 'logs' / name).stat().st_size > 0


class SignalAt(Dataset):
    """Sends this process (or its whole group, as a terminal's Ctrl-C does) `sig` when item `at` is read."""

    def __init__(self, base: Dataset, at: int, sig: int = signal.SIGINT, group: bool = False):
        self.base, self.at, self.sig, self.group, self.reads = base, at, sig, group, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            os.killpg(os.getpgid(0), self.sig) if self.group else os.kill(os.getpid(), self.sig)
        return self.base[i]


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(tmp_path):
    _, reference = run(tmp_path / 'ref', epochs=3, ema_decay=0.5)
    data = tiny_datasets()
    interrupted_data = {'train': SignalAt(data['train'], at=48 + 4 * 5 + 2), 'val': data['val']}
    result, _ = run(tmp_path / 'run', datasets=interrupted_data, epochs=3, ema_decay=0.5)
    assert result['interrupted']
    last = tmp_path / 'run' / 'ckpt' / 'last_model.pth'
    assert load_checkpoint(last)['batch_in_epoch'] == 6  # stopped after the step in progress
    resumed_result, resumed = run(tmp_path / 'run', resume=last, epochs=3, ema_decay=0.5)
    assert not resumed_result['interrupted'] and resumed_result['epochs'] == 3
    assert_same_weights(resumed, reference)


class _OutOfMemory(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')


def test_out_of_memory_names_the_remedies(tmp_path):
    with pytest.raises(TrainingError) as info:
        train(tiny_config(tmp_path, batch_size=8), model=_OutOfMemory(), datasets=tiny_datasets())
    message = str(info.value)
    for remedy in (
        'TRAIN.batch_size=4 TRAIN.gradient_accumulation_steps=2',
        'MODEL.backbone=convnext_tiny',
        'MODEL.use_cross_scale_attention=false',
    ):
        assert remedy in message


def test_class_names_come_from_the_data_when_not_configured(tmp_path):
    """A CSV dataset's own labels name the model's outputs (not the NIH defaults)."""
    import numpy as np
    from PIL import Image

    data = tmp_path / 'data'
    data.mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(data / f'{i}.png')
        rows.append(f'{i}.png,{("a", "b|c", "No Finding", "c")[i % 4]},p{i},{("train", "train", "val")[i % 3]}')
    (data / 'labels.csv').write_text('image,labels,patient_id,split\n' + '\n'.join(rows) + '\n')
    config = tiny_config(tmp_path, epochs=1)
    config.DATA.update(dataset='csv', data_dir=str(data), class_names=None, image_size=8)
    result = train(config, model=TinyNet())
    assert load_checkpoint(result['last_checkpoint'])['class_names'] == ['a', 'b', 'c']


class BatchNormNet(TinyNet):
    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_precise_bn_gives_the_training_images_own_statistics_under_the_final_weights(tmp_path):
    data = tiny_datasets()
    model = BatchNormNet()
    train(tiny_config(tmp_path, epochs=1, precise_bn=True), model=model, datasets=data)
    # every training image of the epoch (48, batches of 4), through the final conv: the plain mean of the batch
    # means, which equal batches make the mean over all images
    with torch.no_grad():
        images = torch.stack([data['train'][i][0] for i in range(len(data['train']))])
        outputs = model.conv(images)
    np.testing.assert_allclose(model.norm.running_mean.numpy(), outputs.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    assert model.norm.momentum == 0.1  # restored for the next epoch

    plain = BatchNormNet()
    train(tiny_config(tmp_path / 'plain', epochs=1), model=plain, datasets=tiny_datasets())
    with torch.no_grad():
        plain_outputs = plain.conv(images)
    gap = (plain.norm.running_mean - plain_outputs.mean((0, 2, 3))).abs().max()
    assert gap > 1e-3  # without it the running average lags: the test above would catch its absence


def test_precise_bn_with_weight_ema_is_refused(tmp_path):
    with pytest.raises(ConfigError, match='TRAIN.precise_bn'):
        tiny_config(tmp_path, precise_bn=True, ema_decay=0.99).validate()
