"""`hybridmednet prune`: channels leave the backbone structurally, attention/fusion/head follow, and the
pruned checkpoint is read back by `load_model` (the pruning replayed) with the same outputs."""

import json

import pytest
import torch
from test_deploy_export import CBAM, HIERARCHICAL, SELF_ONLY, make_checkpoint

from hybridmednet import cli
from hybridmednet.checkpoint import load_model, save_checkpoint, weights_hash
from hybridmednet.data.synthetic import generate_sample_dataset
from hybridmednet.deploy.export import export_onnx
from hybridmednet.deploy.prune import cost, prune_backbone
from hybridmednet.deploy.runtime import OnnxModel
from hybridmednet.evaluation.gradcam import reference_entry
from hybridmednet.models.summary import count_parameters

pytest.importorskip('torch_pruning')


@pytest.mark.parametrize(
    'backbone, options',
    [
        ('resnet18', {}),
        ('resnet18', CBAM),
        ('resnet18', SELF_ONLY),
        ('resnet18', HIERARCHICAL),
        ('convnext_atto', {}),
        ('efficientnet_b0', {}),
    ],
)
def test_a_pruned_checkpoint_loads_back_with_the_same_outputs(tmp_path, backbone, options):
    model, config, _ = load_model(make_checkpoint(tmp_path / 'model.pth', backbone, **options))
    n_before = count_parameters(model)
    history = prune_backbone(model, 0.5)
    assert count_parameters(model) < 0.6 * n_before
    assert all(c % 8 == 0 for c in model.backbone.channels)  # the declared widths are the pruned ones
    path = save_checkpoint(
        tmp_path / 'pruned.pth',
        {
            'model_state_dict': model.state_dict(),
            'config': config.to_dict(),
            'class_names': config.class_names,
            'pruning': {'history': history},
        },
    )
    loaded, _, _ = load_model(path)
    assert weights_hash(loaded.state_dict()) == weights_hash(model.state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_prune_without_fine_tuning_reports_and_exports(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / 'model.pth')
    films = reference_entry([torch.rand(5, 3, 64, 64)], 'without a finding')
    save_checkpoint(ckpt, {**torch.load(ckpt, weights_only=True), 'heatmap_reference': films})
    assert cli.main(['prune', '--model_path', str(ckpt), '--ratio', '0.5', '--epochs', '0']) == 0
    out = capsys.readouterr().out
    assert 'macs' in out and 'latency_ms' in out and 'params' in out
    path = tmp_path / 'model-pruned' / 'pruned_model.pth'
    record = torch.load(path, weights_only=True)['pruning']
    assert record['ratio'] == 0.5 and record['macs']['after'] < 0.5 * record['macs']['before']
    model, _, _ = load_model(path)
    assert cost(model)['macs'] == record['macs']['after']
    assert torch.equal(model.heatmap_reference, films['healthy_images'])  # inputs: as valid for the pruned model
    again = tmp_path / 'again'  # a pruned checkpoint pruned again: both histories replay in order
    assert (
        cli.main(['prune', '--model_path', str(path), '--ratio', '0.5', '--epochs', '0', '--output_dir', str(again)])
        == 0
    )
    twice, _, _ = load_model(again / 'pruned_model.pth')
    assert count_parameters(twice) < 0.5 * count_parameters(model)
    export_onnx(path, tmp_path / 'onnx')  # a pruned checkpoint exports like any other
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(tmp_path / 'onnx')(x), model(x), atol=1e-4, rtol=1e-3)


def test_prune_fine_tunes_and_writes_checkpoints_every_command_reads(tmp_path, capsys):
    data = generate_sample_dataset(tmp_path / 'data', n=60, size=64, seed=0, workers=1)
    ckpt = make_checkpoint(tmp_path / 'model.pth', data=data)
    pruned_only = tmp_path / 'pruned_only'
    args = ['prune', '--model_path', str(ckpt), '--ratio', '0.25']
    assert cli.main([*args, '--epochs', '0', '--output_dir', str(pruned_only)]) == 0
    fine_tune = ['TRAIN.batch_size=8', 'TRAIN.max_steps_per_epoch=2', 'LOGGING.tensorboard=false']
    assert cli.main([*args, '--epochs', '1', '--output_dir', str(tmp_path / 'tuned'), *fine_tune]) == 0
    best = tmp_path / 'tuned' / 'best_model.pth'
    tuned, _, _ = load_model(best)
    exported, _, _ = load_model(best.with_suffix('.safetensors'))
    untuned, _, _ = load_model(pruned_only / 'pruned_model.pth')
    assert json.loads(best.with_suffix('.json').read_text())['pruning']['ratio'] == 0.25
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), tuned(x))
        assert not torch.allclose(tuned(x), untuned(x))  # the fine-tuning changed the pruned weights
    assert count_parameters(tuned) == count_parameters(untuned)


def test_backbones_the_dependency_graph_cannot_follow_are_refused(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / 'model.pth', 'mambaout_femto')
    assert cli.main(['prune', '--model_path', str(ckpt), '--ratio', '0.5']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'mambaout_femto' in err[0] and 'resnet' in err[0]
    resnet = make_checkpoint(tmp_path / 'resnet.pth')
    assert cli.main(['prune', '--model_path', str(resnet), '--ratio', '1.5']) == 2
    assert 'between 0 and 1' in capsys.readouterr().err
    assert not (tmp_path / 'model-pruned').exists() and not (tmp_path / 'resnet-pruned').exists()
