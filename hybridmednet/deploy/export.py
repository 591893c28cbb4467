"""ONNX export of a checkpoint (`hybridmednet export`), refused unless ONNX Runtime reproduces PyTorch.

The export is a directory: model.onnx (fixed image size, dynamic batch; weights over 2 GB go to an
external data file beside it) and model.json (class names, preprocessing, what is stored with the
model, the config and the weights hash), so predict and evaluate can run it without the checkpoint.
Exporters drift from eager PyTorch in known ways (a batch size baked in, a wrong bias shape), so
every export is run by ONNX Runtime and PyTorch on the same images at two batch sizes before it is
kept; a failed check leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from hybridmednet.checkpoint import MODEL_ENTRIES, load_model, weights_hash, write_model_entries
from hybridmednet.deploy import DeployError, require

FORMAT = 'hybridmednet-onnx'
MODEL_FILE, META_FILE = 'model.onnx', 'model.json'
INPUT, OUTPUT = 'images', 'logits'
OPSET = 20  # >= 17 for LayerNormalization (ConvNeXt, Swin); 20 has Gelu as one op, not five
ATOL, RTOL = 1e-4, 1e-3
PARITY_BATCHES = (1, 3)  # 1: torch.export specialises size-1 dimensions; 3: neither 1 nor the traced 2

T = TypeVar('T')


def default_output_dir(model_path: str | Path, suffix: str = 'onnx') -> Path:
    """`checkpoints/best_model.pth` -> `checkpoints/best_model-onnx`."""
    path = Path(model_path)
    return path.with_name(f'{path.stem}-{suffix}')


def write_directory(out: str | Path, fill: Callable[[Path], T], marker: str = META_FILE) -> T:
    """Fill a fresh directory beside `out`, then put it in place of `out`: an exception leaves no files.
    An existing `out` is replaced only when empty or a model directory (holding `marker`)."""
    out = Path(out)
    if out.exists() and not (out / marker).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DeployError(f'{out} exists and is not an exported model; choose another --output_dir')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f'.{out.name}.{tag}{os.getpid()}') for tag in ('tmp', 'old'))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = fill(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads (default: torch's thread count).

    Idle threads sleep instead of spinning: with other work on the cores (data loading, a server's
    decoding threads, other jobs) spinning threads fight it for the CPU (efficientnetv2_s, 224 px,
    2 threads, batch 1 on a loaded 2-core machine: 111 ms spinning, 45 ms sleeping)."""
    ort = require('onnxruntime')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    try:
        return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise DeployError(f'{path}: ONNX Runtime cannot load it ({_first_line(exc)}); re-export it') from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f'{type(exc).__name__}: {text.splitlines()[0] if text else ""}'


def _export(model: nn.Module, example: torch.Tensor, path: Path, source: str) -> str:
    """Write model.onnx with the dynamo exporter, or the TorchScript one where dynamo fails; returns which."""
    require('onnxscript')  # the dynamo exporter's translator
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim('batch')},),
            opset_version=OPSET,
            verbose=False,
        )
        assert program is not None  # dynamo=True without a file name returns the program
        program.save(str(path))  # external data only past protobuf's 2 GB limit
        return 'dynamo'
    except Exception as exc:  # the exporter raises many types; any failure means: try the other exporter
        dynamo_error = _first_line(exc)
    for stale in path.parent.iterdir():  # the staging directory: whatever the failed export left
        stale.unlink()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)  # "legacy exporter": chosen on purpose here
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: 'batch'}, OUTPUT: {0: 'batch'}},
                opset_version=OPSET,
            )
    except Exception as exc:
        raise DeployError(
            f'{source}: neither ONNX exporter handles this model (dynamo: {dynamo_error}; TorchScript: '
            f'{_first_line(exc)})'
        ) from None
    warnings.warn(f'the dynamo ONNX exporter failed ({dynamo_error}); used the TorchScript exporter', stacklevel=2)
    return 'torchscript'


@torch.no_grad()
def parity(
    model: Callable[[torch.Tensor], torch.Tensor], onnx_path: Path, shape: Sequence[int], seed: int = 0
) -> float:
    """Max |ONNX Runtime - PyTorch| over random inputs of `shape` [C, *spatial] at each of PARITY_BATCHES;
    DeployError past ATOL + RTOL |x|."""
    ort_session = session(onnx_path)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in PARITY_BATCHES:
        x = torch.randn(batch, *shape, generator=generator)
        expected = model(x).float().numpy()
        got = ort_session.run(None, {ort_session.get_inputs()[0].name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise DeployError(
                f'{onnx_path}: ONNX Runtime gives logits of shape {list(got.shape)} for a batch of {batch}, '
                f'PyTorch {list(expected.shape)}; the export is refused'
            )
        diff = np.abs(got - expected)
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= ATOL + RTOL * np.abs(expected)):
            raise DeployError(
                f'{onnx_path}: ONNX Runtime and PyTorch differ by up to {diff.max():.2e} on a batch of {batch} '
                f'(allowed {ATOL:g} + {RTOL:g} x |logit|); the export is refused'
            )
    return worst


def export_onnx(model_path: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Export a checkpoint to `output_dir` (default `<checkpoint>-onnx`); returns the written model.json."""
    model, config, meta = load_model(model_path)
    shape = config.input_shape
    out = Path(output_dir) if output_dir else default_output_dir(model_path)
    source_meta = {key: meta.get(key) for key in ('class_names', 'preprocessing', 'epoch')}

    def fill(directory: Path) -> dict[str, Any]:
        onnx_path = directory / MODEL_FILE
        example = torch.randn(2, *shape)  # batch 2: torch.export would fix a batch of 1
        exporter = _export(model, example, onnx_path, str(model_path))
        record = {
            'format': FORMAT,
            'model_file': MODEL_FILE,
            'input': {'name': INPUT, 'shape': ['batch', *shape], 'dtype': 'float32'},
            'output': {'name': OUTPUT, 'shape': ['batch', len(meta['class_names'])]},
            'exporter': exporter,
            'opset': OPSET,
            'torch_version': torch.__version__,
            'source': str(model_path),
            'weights_hash': weights_hash(model.state_dict()),
            'parity': {
                'batches': list(PARITY_BATCHES),
                'max_abs_diff': parity(model, onnx_path, shape),
                'atol': ATOL,
                'rtol': RTOL,
            },
            **source_meta,
            'config': config.to_dict(),
        }
        write_meta(directory, record)
        # thresholds, calibration, OOD model: as in a safetensors sidecar (tensors in model.<entry>.safetensors);
        # not the heatmaps' healthy images (up to 16 MiB): an ONNX model has no gradients to draw heatmaps from
        kept = [key for key in MODEL_ENTRIES if key != 'heatmap_reference']
        write_model_entries(directory / META_FILE, {key: meta.get(key) for key in kept})
        return json.loads((directory / META_FILE).read_text())

    return {**write_directory(out, fill), 'output_dir': str(out)}
