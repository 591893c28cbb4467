"""Static int8 quantisation of an exported model with ONNX Runtime (`hybridmednet quantize`).

Static, not dynamic: activation ranges are measured once on calibration images, so convolutions run
as int8 kernels with no range computed per call (ONNX Runtime's advice for CNNs). QDQ format, int8
weights per output channel, uint8 activations (x86 with VNNI). Convolutions, weight MatMuls and the
element-wise ops between them (SiLU's sigmoid and product, residual sums) are quantised, so the
activations stay int8 from one layer to the next; LayerNorm, GELU and Softmax stay float, where
int8 costs accuracy (ConvNeXt's LayerNorm is the known case), and so do the attention's
activation-by-activation MatMuls.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from hybridmednet.deploy import DeployError, require
from hybridmednet.deploy.export import MODEL_FILE, write_meta
from hybridmednet.deploy.runtime import read_meta

QUANTIZED_OPS = ('Conv', 'Gemm', 'MatMul', 'Relu', 'Clip', 'MaxPool', 'AveragePool', 'Resize', 'Sigmoid', 'Mul', 'Add')


def calibration_batches(dataset: Dataset, count: int, batch_size: int = 16) -> Iterator[np.ndarray]:
    """The first `count` images of `dataset` as float32 batches (the order is the dataset's, so runs repeat)."""
    n = min(count, len(dataset))  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    for batch in loader:
        yield batch[0].numpy().astype(np.float32)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a stream of batches; counts the images it served."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name, self.batches, self.images = input_name, iter(batches), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {self.input_name: batch}


def float_nodes(graph: Any) -> list[str]:
    """Nodes of the quantised op types that stay float: MatMuls of two activations (attention scores and
    their weighted sums) and the nodes that feed or read a Softmax, so that no int8 Softmax is fused in."""
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == 'Constant' for o in n.output
    }
    softmax_in = {n.input[0] for n in graph.node if n.op_type == 'Softmax'}
    softmax_out = {n.output[0] for n in graph.node if n.op_type == 'Softmax'}
    return [
        n.name
        for n in graph.node
        if (n.op_type == 'MatMul' and not constants & set(n.input))
        or softmax_in & set(n.output)
        or softmax_out & set(n.input)
    ]


def quantize_int8(source: str | Path, output: str | Path, batches: Iterable[np.ndarray]) -> dict[str, Any]:
    """Write an int8 copy of the exported model in `source` into the directory `output`; returns its model.json.

    `batches` are the calibration images ([B, 3, S, S] float32, preprocessed as for the model)."""
    quantization = require('onnxruntime.quantization')
    source, output = Path(source), Path(output)
    meta = read_meta(source)
    if meta.get('quantization'):
        raise DeployError(f'{source} is already quantised; give the float export it was made from')
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise DeployError(f'no calibration images for {source}: give a dataset whose train split has images')
    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    prepared = output / 'prepared.onnx'
    # shape inference and graph fusions (Conv + BatchNorm, ...) first, so calibration sees the final ops
    quantization.quant_pre_process(str(source / meta['model_file']), str(prepared), skip_symbolic_shape=True)
    graph = require('onnx').load(str(prepared), load_external_data=False).graph
    reader = _Reader(meta['input']['name'], itertools.chain([first], stream))
    quantization.quantize_static(
        str(prepared),
        str(output / MODEL_FILE),
        reader,
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=float_nodes(graph),
    )
    for path in output.iterdir():
        if path.name.startswith(prepared.name):
            path.unlink()
    for entry in meta.values():  # tensors of stored entries (the OOD model) travel with model.json
        if isinstance(entry, dict) and 'tensor_file' in entry:
            shutil.copy2(source / entry['tensor_file'], output / entry['tensor_file'])
    record = {
        **meta,
        'model_file': MODEL_FILE,
        'quantization': {
            'mode': 'static int8 (QDQ, per-channel int8 weights, uint8 activations)',
            'source': str(source),
            'calibration_images': reader.images,
            'quantized_ops': list(QUANTIZED_OPS),
            'onnxruntime_version': require('onnxruntime').__version__,
            'torch_version': torch.__version__,
            'seconds': round(time.perf_counter() - start, 1),
        },
    }
    write_meta(output, record)
    return record
