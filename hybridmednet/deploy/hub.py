"""Model packages in the Hugging Face layout: `config.json`, `model.safetensors`, a README.md model card.

The package is the safetensors export under the names the Hub expects (checkpoint.PACKAGE_WEIGHTS and
PACKAGE_CONFIG): config.json holds what the export's sidecar holds (config, class names, preprocessing,
thresholds, calibration, OOD statistics), so every command reads the folder as `--model_path`. Weights
load from safetensors only, never from a pickle. `from_pretrained` takes a local folder or a Hub repo
id, resolved through huggingface_hub's cache (offline with HF_HUB_OFFLINE=1 or local_files_only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from hybridmednet.checkpoint import (
    MODEL_ENTRIES,
    PACKAGE_CONFIG,
    PACKAGE_WEIGHTS,
    export_weights,
    load_model,
    package_weights,
    write_model_entries,
)
from hybridmednet.deploy import DeployError
from hybridmednet.deploy.export import default_output_dir, write_directory
from hybridmednet.evaluation.card import write_card
from hybridmednet.evaluation.report import default_output_dir as results_dir
from hybridmednet.models.hybrid import HybridMedNet

FRONT_MATTER = """---
library_name: hybridmednet
pipeline_tag: image-classification
tags:
- medical-imaging
- chest-x-ray
- multi-label-classification
---

"""
PACKAGE_FILES = ['*.json', '*.safetensors', '*.md']  # what a download fetches: never a pickle


def save_pretrained(
    model_path: str | Path, output_dir: str | Path | None = None, results_path: str | Path | None = None
) -> Path:
    """Write the package folder of a checkpoint or safetensors export (default `<name>-hf` beside it);
    the model card reads `results_path` (default: the results.json `evaluate --save_results` wrote)."""
    model, config, meta = load_model(model_path)
    out = Path(output_dir) if output_dir else default_output_dir(model_path, 'hf')
    results = Path(results_path) if results_path else results_dir(model_path) / 'results.json'
    if results_path and not results.is_file():
        raise DeployError(f'{results}: no such evaluation results file (write one with `evaluate --save_results`)')
    kept = {k: meta[k] for k in ('epoch', 'best_auc', 'pruning') if meta.get(k) is not None}

    def fill(folder: Path) -> Path:
        weights = export_weights(folder / PACKAGE_WEIGHTS, model.state_dict(), config, kept, folder / PACKAGE_CONFIG)
        write_model_entries(weights, {k: meta[k] for k in MODEL_ENTRIES if meta.get(k) is not None})
        name = f'{out.resolve().name} (from {Path(model_path).name})'
        card = write_card(weights, results if results.is_file() else None, folder / 'README.md', name)
        card.write_text(FRONT_MATTER + card.read_text())
        return out

    return write_directory(out, fill, marker=PACKAGE_CONFIG)


def download(path_or_repo_id: str | Path, revision: str | None = None, **hub_options: Any) -> Path:
    """A local package folder: `path_or_repo_id` itself, or the Hub repo's snapshot in the local cache
    (downloaded unless offline). `hub_options` go to huggingface_hub.snapshot_download (cache_dir,
    local_files_only, token)."""
    path = Path(path_or_repo_id)
    if path.exists():
        if not package_weights(path):
            raise DeployError(f'{path}: not a model package (a folder with {PACKAGE_WEIGHTS} and {PACKAGE_CONFIG})')
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise DeployError(
            'loading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub'
        ) from None
    try:
        folder = Path(
            snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=PACKAGE_FILES, **hub_options)
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        raise DeployError(
            f'{path_or_repo_id}: no such local folder, and the Hugging Face Hub repo could not be read '
            f'({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else "no detail"})'
        ) from None
    if not package_weights(folder):
        raise DeployError(f'{path_or_repo_id}: the repo holds no {PACKAGE_WEIGHTS} with {PACKAGE_CONFIG}')
    return folder


def from_pretrained(
    path_or_repo_id: str | Path,
    revision: str | None = None,
    map_location: str | torch.device = 'cpu',
    **hub_options: Any,
) -> HybridMedNet:
    """The model of a package folder or Hub repo, in eval mode; its class names, thresholds and the rest
    are in `load_model(download(...))[2]`, which every command reads from the same folder."""
    model, _, _ = load_model(download(path_or_repo_id, revision, **hub_options), map_location=map_location)
    return cast(HybridMedNet, model)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = True,
    commit_message: str = 'Upload HybridMedNet model',
) -> str:
    """Upload a package folder (`save_pretrained`'s) to a Hub model repo, created private unless told
    otherwise; returns the commit URL."""
    if not package_weights(folder):
        raise DeployError(f'{folder}: not a model package; write one with `hybridmednet export --format hf`')
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise DeployError(
            'pushing to the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub'
        ) from None
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type='model', commit_message=commit_message
    )
    return str(getattr(commit, 'commit_url', commit))
