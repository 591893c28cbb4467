"""The served model: loaded once, with what every answer needs (operating point, OOD model, weights
hash), and a `score` that takes a batch of preprocessed images.

A training checkpoint or safetensors export is served through PyTorch: probabilities, the OOD score
and heatmaps (evaluation/gradcam.py). An exported ONNX folder is served through ONNX Runtime
(`hybridmednet.deploy.runtime`, the `deploy` extra): the exported graph gives logits only, so
heatmaps and the OOD score are not available and the answers say so.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridmednet.checkpoint import load_model, weights_hash
from hybridmednet.config import Config
from hybridmednet.data.transforms import build_transforms
from hybridmednet.evaluation.gradcam import grad_cam
from hybridmednet.evaluation.inference import batch_outputs
from hybridmednet.evaluation.operating_point import OperatingPoint
from hybridmednet.models.hybrid import HybridMedNet
from hybridmednet.serve import ServeError

NO_OOD_STATISTICS = (
    'the model carries no out-of-distribution statistics, so nothing tells whether this image resembles '
    'the training images'
)
ONNX_NO_HEATMAPS = 'heatmaps need the PyTorch checkpoint: this model is served through ONNX Runtime'
ONNX_NO_OOD = 'the out-of-distribution score needs the PyTorch checkpoint: this model is served through ONNX Runtime'


@dataclass
class Request:
    image: torch.Tensor  # [3, S, S], preprocessed
    heatmaps: bool


@dataclass
class Scored:
    probabilities: np.ndarray  # [K], calibrated as the thresholds expect
    positive: np.ndarray  # [K] bool
    ood_score: float | None
    cams: dict[int, np.ndarray]  # finding index -> heatmap [S, S], for the positive findings when asked


class ServedModel:
    """One model and everything stored with it; `score` runs on the inference thread only."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], Any],
        config: Config,
        meta: dict[str, Any],
        *,
        name: str,
        runtime: str,
        fingerprint: str | None,
        device: str = 'cpu',
        load_seconds: float = 0.0,
    ):
        self.model = model
        self.config = config
        self.meta = meta
        self.name = name
        self.runtime = runtime  # 'pytorch' | 'onnxruntime'
        self.weights_hash = fingerprint
        self.device = device
        self.load_seconds = load_seconds
        self.class_names: list[str] = list(meta['class_names'])
        with warnings.catch_warnings(record=True) as caught:  # "no fitted thresholds": a note in every answer
            warnings.simplefilter('always')
            self.op = OperatingPoint.of_model(meta)
        self.notes = [str(w.message) for w in caught]
        self.transform = build_transforms(config, train=False)
        fitted_with = (self.op.fitted_on or {}).get('tta')  # thresholds fit the outputs they were fitted on
        self.tta = bool(config.EVAL['tta'] if fitted_with is None else fitted_with)
        self.torch_model = model if isinstance(model, HybridMedNet) else None
        self.ood, self.ood_note = self._ood_model()
        self.heatmaps_note = None if self.torch_model is not None else ONNX_NO_HEATMAPS
        self.heatmap_timing: str | None = None  # what _heatmap_pool measured, for the startup line
        self.heatmap_pool = self._heatmap_pool()

    @classmethod
    def load(cls, path: str | Path, device: str = 'cpu') -> ServedModel:
        """A checkpoint (.pth / .safetensors) through PyTorch, or an exported ONNX folder through ONNX Runtime."""
        start = time.perf_counter()
        path = Path(path)
        model: Callable[[torch.Tensor], Any]
        if path.is_dir():
            try:
                from hybridmednet.deploy.runtime import load_exported

                model, config, meta = load_exported(path)
            except ImportError as exc:
                raise ServeError(
                    f'{path} is a folder, so it is served as an exported ONNX model, which needs hybridmednet.deploy '
                    f"and ONNX Runtime: pip install 'hybridmednet[deploy]' ({exc})"
                ) from None
            runtime, fingerprint = 'onnxruntime', meta.get('weights_hash')
        else:
            network, config, meta = load_model(path, map_location=device)
            model, runtime, fingerprint = network, 'pytorch', weights_hash(network.state_dict())
        served = cls(model, config, meta, name=path.name, runtime=runtime, fingerprint=fingerprint, device=device)
        served.load_seconds = time.perf_counter() - start
        return served

    def _ood_model(self) -> tuple[Any, str | None]:
        """(OodModel or None, why there is none)."""
        state = self.meta.get('ood')
        if state is None:
            return None, NO_OOD_STATISTICS
        if self.torch_model is None:
            return None, ONNX_NO_OOD
        from hybridmednet.evaluation.ood import OodModel  # only models that carry OOD statistics need it

        return OodModel.from_state(state), None

    def _heatmap_pool(self) -> ThreadPoolExecutor | None:
        """Threads of one torch thread each that run a request's heatmap passes side by side, kept where they
        measure faster than one pass after the other on this machine and model: a backward pass can leave cores
        idle, by how much depends on the model (docs/benchmarks.md, "Serving")."""
        threads = torch.get_num_threads()
        model = self.torch_model
        if model is None or torch.device(self.device).type != 'cpu' or threads < 2 or len(self.class_names) < 2:
            return None
        started = threading.Barrier(threads + 1)

        def one_thread() -> None:
            torch.set_num_threads(1)
            started.wait()

        pool = ThreadPoolExecutor(threads, thread_name_prefix='hybridmednet-heatmap')
        for _ in range(threads):  # each task blocks until all have started: one per thread
            pool.submit(one_thread)
        started.wait()
        torch.set_num_threads(threads)  # torch gives threads started later the last count set: this one's again
        x = self.preprocess(np.zeros((self.image_size, self.image_size), np.float32)).to(self.device)

        def seconds(side_by_side: ThreadPoolExecutor | None) -> float:
            start = time.perf_counter()
            grad_cam(model, x, [0, 1], pool=side_by_side)
            return time.perf_counter() - start

        seconds(None), seconds(pool)  # warm-up
        alone, together = min(seconds(None) for _ in range(2)), min(seconds(pool) for _ in range(2))
        self.heatmap_timing = f'two heatmaps {1e3 * alone:.0f} ms one after the other, {1e3 * together:.0f} together'
        if together < alone:
            return pool
        pool.shutdown()
        return None

    @property
    def image_size(self) -> int:
        return int(self.config.DATA['image_size'])

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(image)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, K], the OOD model's features [B, D] when there is one): the backbone runs once for both."""
        if self.torch_model is None:
            return torch.as_tensor(np.asarray(self.model(x), dtype=np.float32)), None
        return batch_outputs(self.torch_model, x, self.tta, self.ood is not None)

    def score(self, requests: Sequence[Request]) -> list[Scored]:
        """Probabilities, decisions and OOD scores for a batch; a heatmap per positive finding where asked."""
        x = torch.stack([r.image for r in requests]).to(self.device)
        logits, features = self._forward(x)
        probs = self.op.probabilities(logits.cpu().numpy().astype(np.float64))
        ood: list[float | None] = [None] * len(requests)
        if features is not None and self.ood is not None:
            ood = [float(d) for d in self.ood.score(features)]
        out = []
        for i, (request, p) in enumerate(zip(requests, probs)):
            positive = self.op.positives(p)
            classes = np.flatnonzero(positive).tolist()
            cams: dict[int, np.ndarray] = {}
            if request.heatmaps and classes and self.torch_model is not None:
                cams = dict(zip(classes, grad_cam(self.torch_model, x[i], classes, pool=self.heatmap_pool)))
            out.append(Scored(p, positive, ood[i], cams))
        return out
