"""Model packages in the Hugging Face layout: written from a checkpoint, loaded from a folder or from the Hub
cache (offline: never a network call here), pushed with one call (the Hub client is replaced by a recorder)."""

import json
import shutil

import numpy as np
import pytest
import torch

import hybridmednet
from hybridmednet import create_model
from hybridmednet.checkpoint import load_model, save_checkpoint
from hybridmednet.commands import export as export_command
from hybridmednet.deploy import DeployError
from hybridmednet.deploy.hub import download, from_pretrained
from hybridmednet.deploy.runtime import load_any_model
from hybridmednet.evaluation.calibration import Calibration
from hybridmednet.evaluation.ood import fit_ood

NAMES = ['Atelectasis', 'Effusion', 'Mass']


@pytest.fixture(scope='module')
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp('hub')
    torch.manual_seed(0)
    model = create_model('resnet18', num_classes=3, image_size=32, class_names=NAMES, fpn_channels=16)
    rng = np.random.default_rng(0)
    dim = 2 * sum(model.backbone.channels)
    ood = fit_ood(rng.normal(size=(300, dim)), rng.normal(size=(50, dim)))
    calibration = Calibration(NAMES, np.array([0.5, 1.5, 2.0]), np.array([-1.0, 0.0, 0.3]))
    thresholds = {'values': dict(zip(NAMES, [0.2, 0.4, 0.6])), 'method': 'youden'}
    checkpoint = save_checkpoint(
        root / 'best_model.pth',
        {
            'model_state_dict': model.state_dict(),
            'config': model.config.to_dict(),
            'class_names': NAMES,
            'epoch': 3,
            'thresholds': thresholds,
            'calibration': calibration.to_meta(),
            'ood': ood.to_state(),
        },
    )
    assert export_command.main(['--model_path', str(checkpoint), '--format', 'hf']) == 0
    return {'root': root, 'checkpoint': checkpoint, 'folder': root / 'best_model-hf', 'model': model.eval()}


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_package_holds_the_hub_layout_and_every_model_entry(package):
    folder = package['folder']
    assert sorted(p.name for p in folder.iterdir()) == [
        'README.md',
        'config.json',
        'config.ood.safetensors',
        'model.safetensors',
    ]  # no pickle anywhere
    config = json.loads((folder / 'config.json').read_text())
    assert config['class_names'] == NAMES and config['epoch'] == 3
    card = (folder / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: hybridmednet\n')
    assert '# Model card: best_model-hf (from best_model.pth)' in card  # the package, not model.safetensors
    _, _, original = load_model(package['checkpoint'])
    _, _, packaged = load_model(folder)
    assert packaged['thresholds'] == original['thresholds'] and packaged['calibration'] == original['calibration']
    assert torch.equal(packaged['ood']['precision'], original['ood']['precision'])


def test_from_pretrained_on_a_folder_and_every_command_reads_it(package):
    model = hybridmednet.from_pretrained(package['folder'])
    assert model.class_names == NAMES and not model.training
    assert same_outputs(model, package['model'])
    any_model = load_any_model(package['folder'])[0]  # what predict / evaluate / serve call with --model_path
    assert isinstance(any_model, hybridmednet.HybridMedNet) and same_outputs(any_model, package['model'])


def test_from_pretrained_resolves_a_repo_id_through_the_hub_cache_offline(package, tmp_path):
    repo = tmp_path / 'cache' / 'models--hospital--cxr-demo'
    commit = 'a' * 40
    shutil.copytree(package['folder'], repo / 'snapshots' / commit)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    model = from_pretrained('hospital/cxr-demo', cache_dir=tmp_path / 'cache', local_files_only=True)
    assert same_outputs(model, package['model'])
    with pytest.raises(DeployError, match='hospital/other: no such local folder'):
        from_pretrained('hospital/other', cache_dir=tmp_path / 'cache', local_files_only=True)


def test_a_folder_that_is_not_a_package_is_refused(tmp_path):
    (tmp_path / 'model.safetensors').write_bytes(b'')  # no config.json beside it
    with pytest.raises(DeployError, match='not a model package'):
        download(tmp_path)
    with pytest.raises(DeployError, match='not a model package'):
        hybridmednet.push_to_hub(tmp_path, 'hospital/cxr-demo')


def test_push_to_hub_creates_a_private_repo_and_uploads_the_folder(package, monkeypatch):
    calls = []

    class Recorder:
        def __init__(self, token=None):
            calls.append(('token', token))

        def create_repo(self, repo_id, **options):
            calls.append(('create_repo', repo_id, options))

        def upload_folder(self, **options):
            calls.append(('upload_folder', options))
            return type('Commit', (), {'commit_url': 'https://huggingface.co/hospital/cxr-demo/commit/1'})()

    monkeypatch.setattr('huggingface_hub.HfApi', Recorder)
    url = hybridmednet.push_to_hub(package['folder'], 'hospital/cxr-demo', token='t')
    assert url.endswith('/commit/1')
    assert calls[0] == ('token', 't')
    assert calls[1] == ('create_repo', 'hospital/cxr-demo', {'repo_type': 'model', 'private': True, 'exist_ok': True})
    assert calls[2][1]['folder_path'] == str(package['folder']) and calls[2][1]['repo_id'] == 'hospital/cxr-demo'
