from pathlib import Path

import pytest

from configs.default_config import Config as DefaultConfig
from hybridmednet import Config, ConfigError, HybridMedNet, load_config


def test_instances_do_not_share_sections():
    a, b = Config(), Config()
    a.MODEL['backbone'] = 'swin_tiny'
    a.TRAIN['batch_size'] = 3
    assert b.MODEL['backbone'] == 'convnext_base' and b.TRAIN['batch_size'] == 32
    assert Config.MODEL['backbone'] == 'convnext_base'
    c = DefaultConfig()
    c.MODEL['backbone'] = 'resnet50'
    assert DefaultConfig().MODEL['backbone'] == 'convnext_base'


def test_spec_defaults():
    c = Config()
    assert c.MODEL['fusion_channels'] == 512 and c.MODEL['dropout'] == 0.5 and c.MODEL['fpn_channels'] == 256
    assert c.MODEL['hierarchical'] is False and c.MODEL['num_coarse_classes'] == 3
    assert c.TRAIN['lr_scheduler'] == 'cosine' and c.TRAIN['warmup_epochs'] == 5
    assert c.DATA['image_size'] == 224 and c.DATA['use_albumentations'] is False
    assert len(c.class_names) == 14 and c.class_names[-1] == 'Hernia'


def test_unknown_key_suggests_close_match():
    c = Config()
    c.MODEL['use_modern_atention'] = True
    with pytest.raises(ConfigError, match="use_modern_atention.*did you mean 'use_modern_attention'"):
        HybridMedNet(c)


def test_unknown_backbone_lists_close_matches():
    c = Config()
    c.MODEL['backbone'] = 'convnext_tinyy'
    with pytest.raises(ValueError, match="unknown backbone 'convnext_tinyy'.*convnext_tiny"):
        c.validate()


@pytest.mark.parametrize(
    'section,key,value,match',
    [
        ('TRAIN', 'lr_scheduler', 'linear', "lr_scheduler.*'linear'"),
        ('TRAIN', 'batch_size', 0, 'batch_size.*positive integer'),
        ('MODEL', 'num_classes', 5, 'num_classes.*5.*14 names'),
        ('DATA', 'train_split', 0.9, 'sum to 1'),
    ],
)
def test_bad_values_are_named(section, key, value, match):
    c = Config()
    getattr(c, section)[key] = value
    with pytest.raises(ConfigError, match=match):
        c.validate()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / 'exp.yaml'
    path.write_text('MODEL:\n  backbone: swin_tiny\nTRAIN:\n  learning_rate: 3e-4\n  weight_decay: 1.0e-2\n')
    c = load_config(
        path, ['MODEL.backbone=convnext_tiny', 'TRAIN.epochs=3', 'DATA.view_positions=[PA]', 'MODEL.pretrained=false']
    )
    assert c.MODEL['backbone'] == 'convnext_tiny' and c.TRAIN['learning_rate'] == 3e-4
    assert c.TRAIN['weight_decay'] == 1e-2
    assert load_config(None, ['TRAIN.learning_rate=1e-3']).TRAIN['learning_rate'] == 1e-3
    assert c.TRAIN['epochs'] == 3 and c.DATA['view_positions'] == ['PA'] and c.MODEL['pretrained'] is False
    round_trip = tmp_path / 'saved.yaml'
    c.to_yaml(round_trip)
    assert load_config(round_trip).to_dict() == c.to_dict()


def test_yaml_errors_name_file_and_key(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('MODEL:\n  backbon: swin_tiny\n')
    with pytest.raises(ConfigError, match=r"bad.yaml.*backbon.*did you mean 'backbone'"):
        load_config(bad)
    with pytest.raises(ConfigError, match='not found'):
        load_config(tmp_path / 'missing.yaml')
    with pytest.raises(ConfigError, match='SECTION.key=value'):
        load_config(None, ['backbone=resnet50'])
    with pytest.raises(ConfigError, match="unknown config section 'MODLE'.*'MODEL'"):
        load_config(None, ['MODLE.backbone=resnet50'])


def test_dict_round_trip_is_plain():
    import json

    c = Config()
    c.MODEL['backbone'] = 'resnet50'
    d = c.to_dict()
    json.dumps(d)
    assert Config.from_dict(d).MODEL['backbone'] == 'resnet50'


@pytest.mark.parametrize(
    'override,match',
    [
        ('TRAIN.grad_clip_norm=-1', r'grad_clip_norm.*\[0.0'),
        ('TRAIN.ema_decay=1.0', r'ema_decay.*\[0.0, 1.0\)'),
        ('TRAIN.early_stopping_patience=-1', 'early_stopping_patience.*integer >= 0'),
        ('LOGGING.log_freq=0', 'log_freq.*positive integer'),
        ('TRAIN.step_size=0', 'step_size.*positive integer'),
        ('EVAL.target_sensitivity=90', r'target_sensitivity.*\(0.0, 1.0\)'),
        ('EVAL.confidence_level=95', r'confidence_level.*\(0.0, 1.0\)'),
        ('EVAL.confidence_level=1.5', r'confidence_level.*\(0.0, 1.0\)'),
        ('LOSS.pos_weight=sometimes', "pos_weight.*'auto'"),
        ('MODEL.use_modern_attention=yes please', 'use_modern_attention.*true or false'),
        ('DATA.intensity=17', r'intensity.*\[1, 16\]'),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_values_are_read_as_meant():
    c = load_config(
        None,
        [
            'LOSS.pos_weight=Auto',
            'DATA.view_positions=PA',
            'DATA.class_names=Atelectasis',
            'MODEL.num_classes=1',
            'CHECKPOINT.dir=~/runs',
            'DATA.intensity=12',
        ],
    )
    assert c.LOSS['pos_weight'] == 'auto'  # was silently dropped
    assert c.DATA['view_positions'] == ['PA']  # was ['P', 'A']
    assert c.DATA['class_names'] == ['Atelectasis']  # was 11 one-letter names
    assert c.CHECKPOINT['dir'] == str(Path.home() / 'runs')  # '~' expanded in every path key
    assert c.DATA['intensity'] == 12


def test_a_section_given_twice_in_yaml_is_an_error(tmp_path):
    path = tmp_path / 'twice.yaml'
    path.write_text('TRAIN:\n  epochs: 3\nMODEL:\n  backbone: resnet50\nTRAIN:\n  batch_size: 8\n')
    with pytest.raises(ConfigError, match="twice.yaml.*'TRAIN' is given twice"):
        load_config(path)


def test_warmup_longer_than_the_run_is_shortened_with_a_warning():
    from hybridmednet.engine.schedule import build_schedule

    config = load_config(None, ['TRAIN.epochs=2', 'TRAIN.warmup_epochs=5'])
    with pytest.warns(UserWarning, match='warmup shortened'):
        schedule = build_schedule(config, steps_per_epoch=10)
    assert schedule.warmup == 2 and schedule.factor(19) < 0.05  # the rate decays by the end of the run
