"""Fine-tuning modes (MODEL.finetune: full | linear | partial) and layer-wise learning-rate decay (TRAIN.layer_decay),
on small backbones of each kind: resnet18 (BatchNorm), convnext_atto (timm stages), Vim and DINOv2 (isotropic)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay
from torch.utils.data import TensorDataset

from hybridmednet import create_model
from hybridmednet.config import Config
from hybridmednet.engine.runtime import setup_device
from hybridmednet.engine.trainer import Trainer, train
from hybridmednet.errors import ConfigError
from hybridmednet.models.mamba import VIM_VARIANTS
from hybridmednet.models.registry import build_backbone

NAMES = ['a', 'b', 'c']
SMALL_VIT = dict(embed_dim=64, depth=4, num_heads=2)


def tiny_dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = (x[:, :, :16].mean((2, 3)) > 0).float()
    return TensorDataset(x, y, torch.ones_like(y))


def config(tmp_path, backbone: str, model: dict | None = None, **train_options) -> Config:
    return Config(
        MODEL={
            'backbone': backbone,
            'num_classes': 3,
            'pretrained': False,
            'fusion_channels': 32,
            'fpn_channels': 32,
            **(model or {}),
        },
        TRAIN={
            'batch_size': 4,
            'epochs': 1,
            'learning_rate': 1e-2,
            'warmup_epochs': 0,
            'lr_scheduler': 'none',
            'mixed_precision': False,
            'device': 'cpu',
            'max_steps_per_epoch': 3,
            **train_options,
        },
        DATA={'class_names': NAMES, 'image_size': 32, 'num_workers': 0},
        CHECKPOINT={'dir': str(tmp_path / 'ckpt')},
        LOGGING={'log_dir': str(tmp_path / 'logs'), 'tensorboard': False},
    ).validate()


def run(cfg: Config):
    model = create_model(cfg.MODEL['backbone'], 3, False, 32, NAMES, fusion_channels=32, fpn_channels=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(cfg, model=model, datasets={'train': tiny_dataset(16, 0), 'val': tiny_dataset(8, 1)})
    return model, before


@pytest.fixture
def vim_4_blocks(monkeypatch):
    monkeypatch.setitem(VIM_VARIANTS, 'vim_tiny', dict(embed_dim=64, depth=4))  # same wiring, fewer weights


def test_linear_mode_leaves_the_backbone_bit_identical_and_in_eval_mode(tmp_path):
    model, before = run(config(tmp_path, 'resnet18', {'finetune': 'linear'}))
    after = model.state_dict()
    backbone = [k for k in before if k.startswith('backbone.')]
    assert any(k.endswith('running_mean') for k in backbone)  # BatchNorm statistics must not move either
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    assert not torch.equal(before['head.fc.weight'], after['head.fc.weight'])
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not any(m.training for m in model.backbone.modules()) and model.head.training


def test_partial_mode_trains_the_last_blocks():
    """convnext_atto's last 2 blocks are stage 3 (its downsampling goes with its first block); the frozen
    stages stay in eval mode when the model trains."""
    backbone = build_backbone('convnext_atto', img_size=32)
    backbone.freeze(2, 'convnext_atto')
    trains = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in backbone.named_parameters() if n.startswith('model.stages.3.')}
    backbone.train()
    assert not backbone.model.stages[2].training and backbone.model.stages[3].training


def test_partial_mode_trains_what_the_pyramid_adds(vim_4_blocks):
    """Vim's last block with norm_f train, and so do the adapter's deconvolutions."""
    backbone = build_backbone('vim_tiny', img_size=32)
    backbone.freeze(1, 'vim_tiny')
    trains = {n for n, p in backbone.named_parameters() if p.requires_grad}
    expected = ('trunk.layers.3.', 'trunk.norm_f.', 'resample.')
    assert trains == {n for n, _ in backbone.named_parameters() if n.startswith(expected)}


def test_more_trainable_blocks_than_the_backbone_has_names_both(tmp_path, vim_4_blocks):
    with pytest.raises(ConfigError, match=r'MODEL.trainable_blocks = 5 but vim_tiny has 4 blocks'):
        run(config(tmp_path, 'vim_tiny', {'finetune': 'partial', 'trainable_blocks': 5}))


@pytest.mark.parametrize('model', [{'finetune': 'partial'}, {'finetune': 'linear', 'trainable_blocks': 2}])
def test_trainable_blocks_goes_with_partial_only(tmp_path, model):
    with pytest.raises(ConfigError, match='set both'):
        run(config(tmp_path, 'resnet18', model))


@pytest.mark.parametrize(
    'section,key,value',
    [
        ('MODEL', 'finetune', 'frozen'),
        ('MODEL', 'trainable_blocks', -1),
        ('TRAIN', 'layer_decay', 0),
        ('TRAIN', 'layer_decay', 1.5),
    ],
)
def test_config_rules(section, key, value):
    with pytest.raises(ConfigError, match=key):
        Config(**{section: {key: value}}).validate()


def _timm_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """Each parameter's rate scale from timm's own param_groups_layer_decay (BEiT's rule)."""
    return {
        name: group['lr_scale']
        for group in param_groups_layer_decay(model, layer_decay=decay)
        for param in group['params']
        for name, p in model.named_parameters()
        if p is param
    }


def test_layer_decay_rates_are_timms_for_a_convnext(tmp_path, capsys):
    """convnext_atto: the stem and 12 blocks of 4 stages. timm's full classifier, whose head stands where ours
    (attention, fusion, head) does, says what every trunk parameter's rate is; the rest train at the full rate."""
    cfg = config(tmp_path, 'convnext_atto', layer_decay=0.75)
    model = create_model('convnext_atto', 3, False, 32, NAMES, fusion_channels=32)
    trainer = Trainer(cfg, *setup_device(cfg), model, {'train': tiny_dataset(16, 0), 'val': tiny_dataset(8, 1)})
    trainer.optimizer_step(True, 1.0)  # sets every group's rate for step 0 (factor 1: no schedule)
    rates = {id(p): g['lr'] for g in trainer.optimizer.param_groups for p in g['params']}
    expected = _timm_scales(timm.create_model('convnext_atto'), 0.75)
    assert min(expected.values()) == pytest.approx(0.75**13)
    for name, param in trainer.model.named_parameters():
        trunk = name.removeprefix('backbone.model.')
        scale = expected[trunk] if trunk != name else 1.0
        assert rates[id(param)] == pytest.approx(1e-2 * scale), name
    assert trainer.optimizer.param_groups[0]['lr'] == 1e-2  # the logged rate is the head's
    assert 'layer-wise LR decay 0.75: convnext_atto stem x0.0238, blocks 1..12' in capsys.readouterr().out


def test_layer_decay_formula_on_an_isotropic_backbone(vim_4_blocks):
    """Vim's stem and 4 blocks: decay ** (5 - depth); norm_f goes with the last block; the pyramid's layers are
    not the trunk's."""
    backbone = build_backbone('vim_tiny', img_size=32)
    scales = backbone.lr_scales(0.5)
    for name, _ in backbone.named_parameters():
        if name.startswith('trunk.layers.'):
            assert scales[name] == 0.5 ** (4 - int(name.split('.')[2])), name
        elif name.startswith(('trunk.patch_embed.', 'trunk.pos_embed', 'trunk.cls_token')):
            assert scales[name] == 0.5**5, name
        elif name.startswith('trunk.norm_f.'):
            assert scales[name] == 0.5, name
        else:
            assert name.startswith('resample.') and name not in scales, name


def test_dinov2_groups_are_timms():
    """DINOv2 through the isotropic adapter decays exactly as timm decays its own ViT classifier (registers
    included), whose head stands where ours does."""
    backbone = build_backbone('dinov2_small_reg', img_size=56, **SMALL_VIT)
    ours = {name.removeprefix('trunk.'): s for name, s in backbone.lr_scales(0.75).items()}
    reference = timm.create_model('vit_small_patch14_reg4_dinov2', img_size=56, num_classes=3, **SMALL_VIT)
    theirs = {name: s for name, s in _timm_scales(reference, 0.75).items() if not name.startswith('head.')}
    assert ours == pytest.approx(theirs) and 'reg_token' in ours and ours['norm.weight'] == 0.75


def test_training_prepares_images_as_the_encoders_weights_were_trained():
    from hybridmednet.engine.trainer import prepare_for_backbone

    medsam = Config(MODEL={'backbone': 'medsam_vit_b', 'pretrained': False}).validate()
    changes = prepare_for_backbone(medsam)
    assert (medsam.DATA['intensity'], medsam.DATA['image_size']) == ('minmax', 1024) and len(changes) == 2
    assert medsam.DATA['mean'] == [0.0] * 3 and medsam.DATA['std'] == [1.0] * 3

    rad_dino = Config(MODEL={'backbone': 'rad_dino', 'pretrained': False}, DATA={'image_size': 448}).validate()
    assert prepare_for_backbone(rad_dino) == []  # a size the config gives is kept; RAD-DINO has no intensity mode
    assert rad_dino.DATA['image_size'] == 448 and rad_dino.DATA['mean'] == [0.5307] * 3
    default_size = Config(MODEL={'backbone': 'rad_dino', 'pretrained': False}).validate()
    assert prepare_for_backbone(default_size) and default_size.DATA['image_size'] == 518

    plain = Config(MODEL={'backbone': 'resnet18', 'pretrained': False}).validate()
    assert prepare_for_backbone(plain) == [] and plain.DATA['image_size'] == 224 and plain.DATA['intensity'] == 'auto'
