"""The wheel works outside the checkout: built, installed (not editable) and run from another folder."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'wheel',
            '-q',
            '--no-deps',
            '--no-build-isolation',
            '-w',
            str(tmp_path / 'dist'),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / 'dist').glob('hybridmednet-*.whl'))
    target = tmp_path / 'site'
    subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(target), 'HF_HUB_OFFLINE': '1'}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    where = run('-c', 'import hybridmednet; print(hybridmednet.__file__)')
    assert where.stdout.strip().startswith(str(target)), where.stderr  # the wheel's copy, not the checkout
    models = run('-m', 'hybridmednet.cli', 'models', '--family', 'resnet')
    assert models.returncode == 0 and 'resnet50' in models.stdout, models.stderr
    demo = run('-m', 'hybridmednet.cli', 'demo', '--help')
    assert demo.returncode == 0 and 'quickstart' in demo.stdout
    shipped = run(
        '-c', 'from hybridmednet.config import load_config; print(load_config("quickstart").MODEL["backbone"])'
    )
    assert shipped.stdout.strip() == 'resnet18', shipped.stderr  # the quickstart config travels as package data
    assert (target / 'bin' / 'hybridmednet').is_file()  # the console script
