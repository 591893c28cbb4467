"""The training loop: `train(config)` on one machine or many, read top to bottom in one sitting.

One process: `hybridmednet train [--config FILE] [KEY=VALUE ...]`. Several (DDP, NCCL on GPUs,
gloo on CPUs): `torchrun --nproc_per_node=N train.py ...`; TRAIN.batch_size is per process.
Where the run executes (devices, precision, processes, signals) is engine/runtime.py; the
learning rate is engine/schedule.py.

Exactness is designed in, not tested in afterwards:
- the data order of an epoch is a function of (seed, epoch) alone, and every random stream is
  saved in the checkpoint, so a run resumed from an epoch-end checkpoint repeats the
  uninterrupted run bit for bit on CPU;
- the learning rate is a pure function of the optimizer step (plus the plateau state, saved);
- under DDP each rank takes a strided shard of the same permutation and the loss is a mean, so
  2 processes with batch b/2 step exactly like 1 process with batch b.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from hybridmednet.checkpoint import (
    FORMAT,
    export_weights,
    load_checkpoint,
    preprocessing,
    save_checkpoint,
    write_model_entries,
)
from hybridmednet.config import Config
from hybridmednet.data.datasets import ChestXrayDataset, build_datasets, compute_pos_weight, make_weighted_sampler
from hybridmednet.data.transforms import build_transforms
from hybridmednet.engine.feature_cache import FromMaps, Shapes, cache_features, check_config
from hybridmednet.engine.losses import build_loss
from hybridmednet.engine.runtime import (
    Dist,
    init_worker,
    precision,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_device,
    stop_on_sigint,
)
from hybridmednet.engine.schedule import build_schedule
from hybridmednet.errors import ConfigError, TrainingError
from hybridmednet.evaluation.calibration import Calibration, apply_temperature, expected_calibration_error
from hybridmednet.evaluation.gradcam import NEIGHBOURS, reference_entry, select_references
from hybridmednet.evaluation.metrics import roc_auc
from hybridmednet.evaluation.ood import OodModel, fit_ood, ood_features
from hybridmednet.evaluation.plots import plot_roc_curves, plot_training_curves
from hybridmednet.models.backbones import FeaturePyramid, backbone_preprocessing, state_dict_mismatch
from hybridmednet.models.hybrid import HybridMedNet
from hybridmednet.models.summary import count_parameters

OOM_REMEDIES = """CUDA ran out of memory (TRAIN.batch_size={batch}, MODEL.backbone={backbone}). Remedies:
  - a smaller batch with the same effective batch: TRAIN.batch_size={half} TRAIN.gradient_accumulation_steps={accum2}
  - a smaller backbone: MODEL.backbone=convnext_tiny (or efficientnetv2_s)
  - cross-scale attention off: MODEL.use_cross_scale_attention=false
  - mixed precision on (if off): TRAIN.mixed_precision=true"""
OOD_MAX_TRAIN_IMAGES = 20_000  # evenly spaced training images for the OOD Gaussian: plenty for its covariance


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Everything about where the run is, saved in each checkpoint (plain values only)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (skipped NaN steps included)
    batch_in_epoch: int = 0  # micro-batches of the current epoch done (non-zero after Ctrl-C)
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sum, count in the current epoch
    best_auc: float = -math.inf
    bad_epochs: int = 0  # epochs without a better val AUC (early stopping)
    bad_steps: int = 0  # steps with a NaN/Inf loss or gradient, skipped, in all
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_for_backbone(config: Config) -> list[str]:
    """Prepare images as the backbone's pretrained weights were trained, where the config leaves it open:
    DATA.mean/std when None; DATA.intensity 'auto' -> the weights' own mode (MedSAM: per-image min-max);
    DATA.image_size at its default -> the weights' own size (RAD-DINO 518 px, MedSAM 1024 px; any other size
    the config gives is kept). Returns a line for the log per setting it chose, other than mean/std."""
    expected = backbone_preprocessing(config.MODEL['backbone'])
    data, changes = config.DATA, []
    if data['mean'] is None or data['std'] is None:
        data['mean'], data['std'] = list(expected['mean']), list(expected['std'])
    if data['spatial_dims'] != 2:
        return changes
    name = config.MODEL['backbone']
    if 'intensity' in expected and data['intensity'] == 'auto':
        data['intensity'] = expected['intensity']
        changes.append(f'{name}: DATA.intensity auto -> {expected["intensity"]}, as its weights were trained')
    if 'image_size' in expected and data['image_size'] == Config.DATA['image_size'] != expected['image_size']:
        data['image_size'] = expected['image_size']
        changes.append(
            f'{name}: DATA.image_size {Config.DATA["image_size"]} (the default) -> {expected["image_size"]}, the '
            f'size its weights were trained at; set DATA.image_size to another value to use that instead'
        )
    return changes


PRECISE_BN_IMAGES = 1024  # as pycls' precise BN: enough for stable statistics, a fraction of a large epoch


class Trainer:
    """Holds the pieces of one run; `fit()` is the loop. Build it through `train()`."""

    def __init__(
        self,
        config: Config,
        dist_info: Dist,
        device: torch.device,
        model: nn.Module | None = None,
        datasets: dict[str, Dataset] | None = None,
    ):
        self.config, t = config, config.TRAIN
        self.dist, self.device = dist_info, device
        for change in prepare_for_backbone(config):  # saved with the model from here on
            self.log(change)
        check_config(config)
        seed_everything(t['seed'] + self.dist.rank)
        self.datasets = datasets or self._build_datasets()
        if len(self.datasets['val']) == 0:  # found now, not after a whole epoch of training
            raise TrainingError(
                'the validation split is empty: validation picks the best model and drives early '
                'stopping. Set DATA.val_split > 0 (e.g. 0.1, with train/test adjusted to sum to 1), '
                "or give rows with split 'val' in a CSV dataset"
            )
        names = getattr(self.datasets['train'], 'class_names', None)
        if config.DATA['class_names'] is None and names and list(names) != config.class_names:
            config.DATA['class_names'] = list(names)  # CheXpert, CSV, folders: the data's own labels
            config.validate()
        self.model = (model or self._build_model()).to(self.device)
        self._freeze()  # before DDP, which registers only the parameters that train
        self.map_shapes: Shapes | None = None  # TRAIN.feature_cache: the data are the backbone's maps
        if t['feature_cache']:
            self._cache_features()
        self.net = self.runner(self.model)
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.hierarchical = bool(config.MODEL['hierarchical'])
        self.criterion = build_loss(config, self._pos_weight()).to(self.device)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=t['learning_rate'], weight_decay=t['weight_decay'])
        self.autocast, self.scaler = precision(t['mixed_precision'], self.device, self.log)
        self.batch_size, self.accum = t['batch_size'], t['gradient_accumulation_steps']
        shard = len(self.datasets['train']) // self.dist.world
        self.steps_per_epoch = (shard // self.batch_size) // self.accum
        if t['max_steps_per_epoch']:
            self.steps_per_epoch = min(self.steps_per_epoch, t['max_steps_per_epoch'])
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f'the training set ({len(self.datasets["train"])} images) is smaller than one '
                f'step (batch {self.batch_size} x accumulation {self.accum} x {self.dist.world} '
                f'processes); lower TRAIN.batch_size'
            )
        self.schedule = build_schedule(config, self.steps_per_epoch)
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if t['ema_decay'] > 0 else None
        self.progress = Progress()
        self.ckpt_dir = Path(config.CHECKPOINT['dir'])
        self.log_dir = Path(config.LOGGING['log_dir'])
        self.writer = None
        self.stop_requested = False
        self.bad_in_a_row = 0  # consecutive steps skipped for a NaN/Inf loss or gradient

    # -- building ----------------------------------------------------------------------------------
    def _build_datasets(self) -> dict[str, Dataset]:
        # Rank 0 first: it may generate the sample dataset, which the others then read.
        if not self.dist.is_main:
            self.dist.barrier()
        datasets = build_datasets(self.config)
        if self.dist.is_main:
            self.dist.barrier()
        return datasets

    def _build_model(self) -> nn.Module:
        return HybridMedNet(self.config)

    def _cache_features(self) -> None:
        if not self.dist.is_main:  # rank 0 computes the maps, the others then read them
            self.dist.barrier()
        self.datasets, self.map_shapes = cache_features(self.config, self.model, self.datasets, self.device, self.log)
        if self.dist.is_main:
            self.dist.barrier()

    def runner(self, model: nn.Module) -> nn.Module:
        """What runs a batch: the model, or with the feature cache the model from attention on."""
        return model if self.map_shapes is None else FromMaps(model, self.map_shapes)

    def _backbone(self, needs: str) -> FeaturePyramid:
        backbone = getattr(self.model, 'backbone', None)
        if not isinstance(backbone, FeaturePyramid):
            raise ConfigError(f'{needs} needs a HybridMedNet (a registry backbone), not a {type(self.model).__name__}')
        return backbone

    def _freeze(self) -> None:
        """MODEL.finetune: linear freezes the backbone, partial its stem and all but its last trainable_blocks blocks.
        Frozen parts stay in eval mode (FeaturePyramid.train), so their outputs do not change from step to step."""
        m = self.config.MODEL
        mode, blocks = m['finetune'], m['trainable_blocks']
        if (mode == 'partial') != (blocks is not None):
            raise ConfigError(
                f'MODEL.finetune = {mode} with MODEL.trainable_blocks = {blocks}: the block count goes with partial '
                'fine-tuning only; set both (e.g. MODEL.finetune=partial MODEL.trainable_blocks=4) or neither'
            )
        if mode == 'full':
            return
        self._backbone(f'MODEL.finetune = {mode}').freeze(blocks, m['backbone'])
        frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        what = 'backbone frozen' if blocks is None else f'the last {blocks} backbone blocks train'
        self.log(
            f'fine-tuning: {mode} ({what}): {frozen / 1e6:.2f}M of '
            f'{count_parameters(self.model) / 1e6:.2f}M parameters frozen'
        )

    def _param_groups(self) -> list[dict[str, Any]]:
        """The parameters that train. With TRAIN.layer_decay < 1, one group per depth of the backbone, its rate
        scaled by `lr_scale` (BEiT's layer-wise decay); the group at the full rate (head, attention, fusion, layers
        the pyramid adds) comes first, so its rate is the one logged."""
        decay = self.config.TRAIN['layer_decay']
        params = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if decay == 1.0:
            return [{'params': [p for _, p in params]}]
        backbone = self._backbone('TRAIN.layer_decay')
        scales = {f'backbone.{name}': scale for name, scale in backbone.lr_scales(decay).items()}
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in params:
            groups.setdefault(scales.get(name, 1.0), []).append(param)
        blocks = len(backbone.layer_groups()) - 1
        self.log(
            f'layer-wise LR decay {decay}: {self.config.MODEL["backbone"]} stem x{decay ** (blocks + 1):.3g}, '
            f'blocks 1..{blocks} x{decay**blocks:.3g}..x{decay:.3g}, the rest x1 ({len(groups)} groups train)'
        )
        return [{'params': group, 'lr_scale': scale} for scale, group in sorted(groups.items(), reverse=True)]

    def _pos_weight(self) -> torch.Tensor | None:
        if self.config.LOSS['pos_weight'] != 'auto':
            return None
        return compute_pos_weight(self.datasets['train'])

    def request_stop(self, signum: int) -> None:
        """Ctrl-C / SIGTERM: finish this step, then write a resumable checkpoint (see runtime.stop_on_sigint)."""
        if not self.stop_requested:
            self.log(
                f'\n{signal.Signals(signum).name}: finishing this step, then writing a resumable '
                f'checkpoint (kill -9 aborts at once)'
            )
        self.stop_requested = True

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The full checkpoint: tensors and plain values only (weights_only-loadable)."""
        rng = [rng_state()]
        if self.dist.world > 1:  # every rank's streams (dropout differs per rank)
            rng = [None] * self.dist.world
            dist.all_gather_object(rng, rng_state())
        return {
            'format': FORMAT,
            'model_state_dict': self.model.state_dict(),
            'optimizer_state_dict': self.optimizer.state_dict(),
            'scheduler_state_dict': self.schedule.state_dict(),
            'scaler_state_dict': self.scaler.state_dict(),
            'ema_state_dict': self.ema,
            **asdict(self.progress),
            'rng_states': rng,
            'world_size': self.dist.world,
            'config': self.config.to_dict(),
            'class_names': self.config.class_names,
            'preprocessing': preprocessing(self.config),
        }

    def save(self, path: Path) -> None:
        state = self.state()  # collective under DDP: every rank builds it, rank 0 writes
        if self.dist.is_main:
            save_checkpoint(path, state)

    def resume(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path, 'cpu')  # RNG states must stay on the CPU; weights are copied over
        if 'optimizer_state_dict' not in ckpt:
            raise TrainingError(f'{path} holds no training state (optimizer, schedule); resume from last_model.pth')
        problems = state_dict_mismatch(self.model.state_dict(), ckpt['model_state_dict'])
        if problems:
            raise TrainingError(
                f'{path}: its weights do not fit the model this config builds ({problems}); resume with the '
                f"config the run started with (a pruned model's fine-tuning cannot be resumed: run prune again)"
            )
        self.model.load_state_dict(ckpt['model_state_dict'], strict=True)
        self.optimizer.load_state_dict(ckpt['optimizer_state_dict'])
        self.schedule.load_state_dict(ckpt['scheduler_state_dict'])
        self._load_scaler(ckpt['scaler_state_dict'], path)
        if (self.ema is None) != (ckpt['ema_state_dict'] is None):
            raise TrainingError(f'{path}: TRAIN.ema_decay must stay on/off as it was when the checkpoint was written')
        self.ema = ckpt['ema_state_dict'] and {k: v.to(self.device) for k, v in ckpt['ema_state_dict'].items()}
        self.progress = Progress(**{k: ckpt[k] for k in Progress.__dataclass_fields__})
        if ckpt['world_size'] == self.dist.world:
            set_rng_state(ckpt['rng_states'][self.dist.rank])
        else:
            self.log(
                f'note: {path} was written by {ckpt["world_size"]} processes, this run has '
                f'{self.dist.world}: the data order is kept, random augmentations are reseeded'
            )
            seed_everything(self.config.TRAIN['seed'] + 1000 * self.progress.epoch + self.dist.rank)
        self.log(f'resumed from {path}: epoch {self.progress.epoch}, step {self.progress.step}')

    def _load_scaler(self, state: dict[str, Any], path: str | Path) -> None:
        """The loss scale carries over only between runs that both use it (fp16 on CUDA); a CPU run
        continued on a GPU, or the reverse, starts or drops the scale instead of failing."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
        elif state or self.scaler.is_enabled():
            self.log(
                f'note: {path} was written with TRAIN.mixed_precision='
                f'{"on" if state else "off"}; this run has it {"on" if self.scaler.is_enabled() else "off"}: '
                f'the fp16 loss scale {"starts fresh" if self.scaler.is_enabled() else "is not needed"}'
            )

    # -- data ----------------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's training images for `epoch`: a function of (seed, epoch, rank) only."""
        ds, seed = self.datasets['train'], self.config.TRAIN['seed']
        if self.config.TRAIN['weighted_sampler']:
            order = list(make_weighted_sampler(ds, seed=seed + epoch))
            usable = len(order) - len(order) % self.dist.world
            return order[self.dist.rank : usable : self.dist.world]
        sampler = DistributedSampler(ds, self.dist.world, self.dist.rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def loader(self, dataset: Dataset, indices: list[int], drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=indices,
            drop_last=drop_last,
            num_workers=self.config.DATA['num_workers'],
            worker_init_fn=init_worker,
            pin_memory=self.device.type == 'cuda',
        )

    def forward(self, net: nn.Module, images: torch.Tensor):
        return net(images, return_coarse=True) if self.hierarchical else net(images)

    # -- one epoch of training -----------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> float | None:
        """Train one epoch; the mean training loss, or None when a stop was requested mid-epoch."""
        p, t = self.progress, self.config.TRAIN
        n_micro = self.steps_per_epoch * self.accum
        indices = self.epoch_indices(epoch)[p.batch_in_epoch * self.batch_size : n_micro * self.batch_size]
        self.net.train()
        seed_epoch = getattr(self.datasets['train'], 'set_epoch', None)
        if seed_epoch is not None:  # augmentation drawn per (seed, epoch, image): resumes repeat it exactly
            seed_epoch(t['seed'] * 100_003 + epoch)
        bar = _progress_bar(len(indices) * self.dist.world, f'epoch {epoch + 1}/{t["epochs"]}', self.dist.is_main)
        group_ok, group_known = True, 0.0
        for micro, (images, target, mask) in enumerate(
            self.loader(self.datasets['train'], indices, True), start=p.batch_in_epoch
        ):
            images, target, mask = (x.to(self.device, non_blocking=True) for x in (images, target, mask))
            last_micro = (micro + 1) % self.accum == 0
            # Under DDP, gradients are all-reduced only on the last micro-batch of a step.
            sync = self.net.no_sync() if self.dist.world > 1 and not last_micro else nullcontext()
            with sync:
                with self.autocast():
                    loss = self.criterion(self.forward(self.net, images), target, mask)
                finite = self.dist.all_reduce([float(torch.isfinite(loss))], dist.ReduceOp.MIN)[0] == 1.0
                # The loss is a mean over this micro-batch's known labels; backward takes their sum, and
                # the step divides by the known labels of the whole effective batch (all ranks, all
                # micro-batches), so k micro-batches step exactly like one batch k times larger.
                known = float(mask.sum())
                group_known += known
                if finite:
                    self.scaler.scale(loss * known).backward()
                    p.epoch_loss = [p.epoch_loss[0] + loss.item(), p.epoch_loss[1] + 1]
                group_ok &= finite
            p.batch_in_epoch = micro + 1
            bar.update(images.shape[0] * self.dist.world)
            if not last_micro:
                continue
            self.optimizer_step(group_ok, self.dist.all_reduce([group_known])[0] / self.dist.world)
            group_ok, group_known = True, 0.0
            if p.step % self.config.LOGGING['log_freq'] == 0 and p.epoch_loss[1]:
                self.log_scalars(
                    {
                        'train/loss_running': p.epoch_loss[0] / p.epoch_loss[1],
                        'train/lr': self.optimizer.param_groups[0]['lr'],
                    },
                    p.step,
                )
                bar.set_postfix(
                    loss=f'{p.epoch_loss[0] / p.epoch_loss[1]:.4f}', lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}'
                )
            if self.dist.all_reduce([float(self.stop_requested)], dist.ReduceOp.MAX)[0]:
                bar.close()
                return None
        bar.close()
        total, count = self.dist.all_reduce(p.epoch_loss)
        return total / max(count, 1)

    def optimizer_step(self, ok: bool, known_labels: float) -> None:
        """One optimizer step at the scheduled rate, or a counted skip when a loss was NaN/Inf, or, in full
        precision, a gradient was (a finite loss can have one, e.g. through a square root at 0: stepped on, it
        turns every weight NaN; with mixed precision the GradScaler skips such steps itself and lowers its scale).

        The gradients hold sums over labels; `known_labels` (per rank: DDP averages) turns them into the mean."""
        p, t = self.progress, self.config.TRAIN
        for group in self.optimizer.param_groups:
            group['lr'] = t['learning_rate'] * self.schedule.factor(p.step) * group.get('lr_scale', 1.0)
        p.step += 1
        if ok:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.div_(max(known_labels, 1.0))
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), t['grad_clip_norm'] or math.inf)
            ok = self.scaler.is_enabled() or bool(torch.isfinite(norm))
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
            p.bad_steps += 1
            self.bad_in_a_row += 1
            self.log(
                f'warning: NaN/Inf loss or gradient at step {p.step}: step skipped ({self.bad_in_a_row} in a row, '
                f'{p.bad_steps} in all)'
            )
            if self.bad_in_a_row >= t['max_bad_steps']:
                raise TrainingError(
                    f'{self.bad_in_a_row} steps in a row had a NaN/Inf loss or gradient (step {p.step}); the run is '
                    f'diverging. Lower TRAIN.learning_rate, keep TRAIN.grad_clip_norm > 0, or try '
                    f'TRAIN.mixed_precision=false, then resume from the last checkpoint.'
                )
            return
        self.bad_in_a_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for key, value in self.model.state_dict().items():
                    if value.is_floating_point():
                        self.ema[key].lerp_(value, 1.0 - t['ema_decay'])
                    else:
                        self.ema[key].copy_(value)

    # -- validation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def precise_bn(self, epoch: int) -> None:
        """Recompute the running statistics of every BatchNorm that trains, as the plain average over up to
        PRECISE_BN_IMAGES un-augmented training images under the weights the epoch ended with ('precise BN',
        Wu & Johnson 2021). Running averages over a small-batch epoch lag the changing weights and mix in
        augmented images: on the 3D quickstart they made the validation AUC jump between 0.45 and 0.88."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if not norms:
            return
        plain = copy.copy(self.datasets['train'])
        if hasattr(plain, 'transform'):
            plain.transform = build_transforms(self.config, train=False)
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        net = self.runner(self.model)
        limit = max(self.batch_size, PRECISE_BN_IMAGES // self.dist.world)
        for images, _, _ in self.loader(plain, self.epoch_indices(epoch)[:limit], True):
            with self.autocast():
                self.forward(net, images.to(self.device, non_blocking=True))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum

    def eval_model(self, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The model to validate: the live one, or a copy holding `weights` (EMA, best)."""
        weights = weights if weights is not None else self.ema
        model = self.model
        if weights is not None:
            model = copy.deepcopy(self.model)
            model.load_state_dict(weights, strict=True)
        if self.dist.world > 1:  # BatchNorm statistics drift apart per rank: validate with rank 0's, the saved ones
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        return model

    @torch.no_grad()
    def collect_outputs(self, model: nn.Module, dataset: Dataset, features: bool = False) -> dict[str, torch.Tensor]:
        """Logits (with `features`: the OOD model's features instead), targets and masks for a whole dataset,
        gathered from every rank in dataset order."""
        indices = list(range(self.dist.rank, len(dataset), self.dist.world))
        model = self.runner(model)
        model.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        for images, target, mask in self.loader(dataset, indices, False):
            with self.autocast():
                if features:
                    outputs = {'features': ood_features(model, images.to(self.device))}
                else:
                    out = self.forward(model, images.to(self.device))
                    outputs = dict(zip(('logits', 'coarse'), out if self.hierarchical else (out,)))
            for key, value in {**outputs, 'target': target, 'mask': mask}.items():
                parts.setdefault(key, []).append(value.float().cpu())
        result = {k: torch.cat(v) for k, v in parts.items()}
        result['index'] = torch.tensor(indices)
        if self.dist.world > 1:
            gathered: list[Any] = [None] * self.dist.world
            dist.all_gather_object(gathered, result)
            order = torch.cat([g['index'] for g in gathered]).argsort()
            result = {k: torch.cat([g[k] for g in gathered])[order] for k in result}
        return result

    @torch.no_grad()
    def score_validation(self, model: nn.Module) -> dict[str, Any]:
        """Loss, per-finding and mean AUC of `model` on the validation split."""
        out = self.collect_outputs(model, self.datasets['val'])
        dev = self.device
        outputs = (out['logits'].to(dev), out['coarse'].to(dev)) if self.hierarchical else out['logits'].to(dev)
        loss = self.criterion(outputs, out['target'].to(dev), out['mask'].to(dev))
        probs = torch.sigmoid(out['logits']).numpy()
        aucs = roc_auc(out['target'].numpy(), probs, out['mask'].numpy())
        valid = aucs[np.isfinite(aucs)]
        return {
            'loss': float(loss),
            'mean_auc': float(valid.mean()) if len(valid) else math.nan,
            'aucs': aucs,
            'logits': out['logits'].numpy(),
            'probs': probs,
            'target': out['target'].numpy(),
            'mask': out['mask'].numpy(),
        }

    # -- logging ------------------------------------------------------------------------------------------
    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def record_epoch(self, row: dict[str, Any]) -> None:
        """History in the checkpoint, history.json / history.csv and TensorBoard."""
        self.progress.history.append(row)
        if not self.dist.is_main:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / 'history.json').write_text(json.dumps(self.progress.history, indent=1))
        with open(self.log_dir / 'history.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.progress.history)
        self.log_scalars({f'epoch/{k}': v for k, v in row.items() if k != 'epoch'}, self.progress.step)

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t, p = self.config.TRAIN, self.progress
        names = self.config.class_names
        if self.dist.is_main and self.config.LOGGING['tensorboard']:
            self.writer = SummaryWriter(str(self.log_dir), purge_step=p.step or None)
        n_params = count_parameters(self.model)
        self.log(
            f'training {type(self.model).__name__} ({n_params / 1e6:.2f}M params) on {self.device} '
            f'x{self.dist.world}: {len(self.datasets["train"])} train / {len(self.datasets["val"])} val '
            f'images, {self.steps_per_epoch} steps/epoch, {t["epochs"]} epochs'
        )
        best_path, last_path = self.ckpt_dir / 'best_model.pth', self.ckpt_dir / 'last_model.pth'
        stopped_early = interrupted = False
        with stop_on_sigint(self.request_stop):
            while p.epoch < t['epochs'] and not stopped_early:
                epoch, start = p.epoch, time.perf_counter()
                train_loss = self.train_epoch(epoch)
                if train_loss is None:
                    interrupted = True
                    self.save(last_path)
                    self.log(
                        f'interrupted: resumable checkpoint {last_path}\n'
                        f'  continue with: hybridmednet train --resume {last_path}'
                    )
                    break
                if t['precise_bn']:
                    self.precise_bn(epoch)
                val = self.score_validation(self.eval_model())
                self.schedule.epoch_end(val['mean_auc'])
                score = val['mean_auc'] if math.isfinite(val['mean_auc']) else -1.0
                improved = score > p.best_auc + t['early_stopping_min_delta']
                p.best_auc, p.bad_epochs = (score, 0) if improved else (p.best_auc, p.bad_epochs + 1)
                p.epoch, p.batch_in_epoch, p.epoch_loss = epoch + 1, 0, [0.0, 0.0]
                seconds = time.perf_counter() - start
                self.record_epoch(
                    {
                        'epoch': epoch + 1,
                        'train_loss': train_loss,
                        'val_loss': val['loss'],
                        'val_mean_auc': val['mean_auc'],
                        'lr': self.optimizer.param_groups[0]['lr'],
                        'seconds': round(seconds, 2),
                        'bad_steps': p.bad_steps,
                        **{f'auc_{n}': float(a) for n, a in zip(names, val['aucs'])},
                    }
                )
                self.log(
                    f'epoch {epoch + 1}/{t["epochs"]}  train {train_loss:.4f}  val {val["loss"]:.4f}  '
                    f'mean AUC {val["mean_auc"]:.4f}{"  (best)" if improved else ""}  {seconds:.1f}s'
                )
                patience = t['early_stopping_patience']
                stopped_early = bool(patience) and p.bad_epochs >= patience
                if improved:
                    self.save(best_path)
                    if self.dist.is_main:
                        export_weights(
                            best_path.with_suffix('.safetensors'),
                            self.ema or self.model.state_dict(),
                            self.config,
                            {'epoch': p.epoch, 'val_mean_auc': val['mean_auc']},
                        )
                freq = self.config.CHECKPOINT['save_freq']  # 0: only at the end
                if (freq and p.epoch % freq == 0) or p.epoch == t['epochs'] or stopped_early:
                    self.save(last_path)
                if stopped_early:
                    self.log(f'early stopping: no better val mean AUC for {patience} epochs (best {p.best_auc:.4f})')
        if not interrupted:
            self.finish(best_path)
        if self.writer is not None:
            self.writer.close()
        return {
            'history': p.history,
            'best_auc': p.best_auc,
            'best_checkpoint': best_path,
            'last_checkpoint': last_path,
            'best_export': best_path.with_suffix('.safetensors'),
            'epochs': p.epoch,
            'steps': p.step,
            'bad_steps': p.bad_steps,
            'stopped_early': stopped_early,
            'interrupted': interrupted,
        }

    def finish(self, best_path: Path) -> None:
        """On the best weights: training_curves.png, roc_curves.png on the validation set, and what is stored
        with the model for inference: its calibration and (for a HybridMedNet) its OOD model and heatmap reference."""
        self.dist.barrier()
        if not best_path.is_file():
            return
        best = load_checkpoint(best_path, self.device)
        model = self.eval_model(best['ema_state_dict'] or best['model_state_dict'])
        val = self.score_validation(model)
        calibration = self.fit_calibration(val)
        ood = self.fit_ood(model) if isinstance(model, HybridMedNet) else None
        if self.dist.is_main:
            reference = self.fit_heatmap_reference() if isinstance(model, HybridMedNet) else None
            entries = {'calibration': calibration.to_meta(), 'ood': ood and ood.to_state()}
            write_model_entries(best_path, {**entries, 'heatmap_reference': reference})
            plot_training_curves(self.progress.history, self.log_dir / 'training_curves.png')
            plot_roc_curves(
                val['target'],
                val['probs'],
                val['mask'],
                self.config.class_names,
                self.log_dir / 'roc_curves.png',
                split='validation',
            )
            self.log(f'best val mean AUC {val["mean_auc"]:.4f}: {best_path} (+ .safetensors); plots in {self.log_dir}')

    def fit_calibration(self, val: dict[str, Any]) -> Calibration:
        """Platt scaling per finding on the validation split. Probabilities straight from a sigmoid are off
        whenever the loss weights positives (LOSS.pos_weight shifts every logit) and often otherwise."""
        y, mask = val['target'], val['mask']
        calibration = Calibration.fit(
            val['logits'], y, mask, self.config.class_names, {'split': 'val', 'n_images': len(y)}
        )
        before = expected_calibration_error(y, apply_temperature(val['logits']), mask)
        after = expected_calibration_error(y, calibration.probabilities(val['logits']), mask)
        self.log(
            f'calibration (Platt scaling on the validation split): mean ECE {np.nanmean(before):.3f} -> '
            f'{np.nanmean(after):.3f} on those images'
        )
        return calibration

    def unaugmented(self, train: Dataset) -> Dataset:
        """The training images as validation sees them (no augmentation); cached maps stay as they are."""
        if isinstance(train, ChestXrayDataset):
            train = copy.copy(train)
            train.transform, train.epoch_seed = build_transforms(self.config, train=False), None
        return train

    def fit_ood(self, model: HybridMedNet) -> OodModel:
        """The OOD model: a Gaussian over the pooled features of the training images (as validation sees
        them: no augmentation), its threshold from the validation images."""
        train = self.unaugmented(self.datasets['train'])
        if len(train) > OOD_MAX_TRAIN_IMAGES:
            train = Subset(train, np.linspace(0, len(train) - 1, OOD_MAX_TRAIN_IMAGES).round().astype(int).tolist())
        ood = fit_ood(
            self.collect_outputs(model, train, features=True)['features'],
            self.collect_outputs(model, self.datasets['val'], features=True)['features'],
        )
        self.log(
            f'out-of-distribution model: {ood.n_train} training images, threshold {ood.threshold:.2f} '
            f'(the {ood.quantile:.0%} quantile of {ood.n_val} validation distances)'
        )
        return ood

    def fit_heatmap_reference(self) -> dict[str, Any]:
        """The heatmaps' healthy references (evaluation/gradcam.py): up to 256 unaugmented training images
        without a finding, from the images even when training read cached maps."""
        train = getattr(self.datasets['train'], 'source', self.datasets['train'])
        unaugmented = self.unaugmented(train)
        rows, what, mean = select_references(train, unaugmented[0][0].shape)
        batches = (images for images, _, _ in self.loader(unaugmented, rows.tolist(), False))
        entry = reference_entry(batches, what, mean=mean)
        use = 'their mean' if mean else f'each heatmap starts from the mean of the {NEIGHBOURS} nearest to its image'
        self.log(f'heatmap reference: {entry["n_images"]} training images ({what}); {use}')
        return entry


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """tqdm in images, so its rate is throughput (img/s) and its ETA is the epoch's."""
    return tqdm(
        total=total, desc=desc, unit='img', disable=not enabled, leave=False, dynamic_ncols=True, mininterval=1.0
    )


# -- entry points --------------------------------------------------------------------------------------------
def train(
    config: Config,
    resume: str | Path | None = None,
    *,
    model: nn.Module | None = None,
    datasets: dict[str, Dataset] | None = None,
) -> dict[str, Any]:
    """Train from `config` (any nn.Module mapping [B,3,H,W] to logits when `model` is given).

    Returns the history, best/last checkpoint paths and how the run ended. Under torchrun
    (WORLD_SIZE > 1) every process calls this; only rank 0 writes files.
    """
    dist_info, device = setup_device(config)
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        if device.type == 'cpu':
            torch.use_deterministic_algorithms(True, warn_only=True)
        trainer = Trainer(config, dist_info, device, model, datasets)
        if resume:
            trainer.resume(resume)
        return trainer.fit()
    except torch.OutOfMemoryError as exc:
        t = config.TRAIN
        raise TrainingError(
            OOM_REMEDIES.format(
                batch=t['batch_size'],
                backbone=config.MODEL['backbone'],
                half=max(t['batch_size'] // 2, 1),
                accum=t['gradient_accumulation_steps'],
                accum2=2 * t['gradient_accumulation_steps'],
            )
        ) from exc
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if dist_info.owns_group:
            dist.destroy_process_group()
