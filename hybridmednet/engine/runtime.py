"""Where a run executes: its processes (torchrun / DDP), device, precision, random streams and signals.

Kept apart from the loop so that the loop reads as what it does, not how it is set up.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hybridmednet.config import Config


@dataclass
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()


def setup_device(config: Config) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    want = config.TRAIN['device']
    if want == 'auto':
        want = 'cuda' if torch.cuda.is_available() else 'cpu'
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return Dist(), torch.device(want)
    device = torch.device(f'cuda:{os.environ.get("LOCAL_RANK", "0")}' if want.startswith('cuda') else 'cpu')
    owns = not dist.is_initialized()
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if owns:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Dist(dist.get_rank(), dist.get_world_size(), owns), device


def precision(enabled: bool, device: torch.device, log: Callable[[str], None]):
    """(autocast context factory, GradScaler): fp16 + scaling on CUDA, bf16 on a CPU that has it."""
    if enabled and device.type == 'cuda':
        return partial(torch.autocast, 'cuda', dtype=torch.float16), torch.amp.GradScaler('cuda')
    off = torch.amp.GradScaler(device.type, enabled=False)
    if (
        enabled
        and device.type == 'cpu'
        and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    ):
        return partial(torch.autocast, 'cpu', dtype=torch.bfloat16), off
    if enabled:
        log(f'note: mixed precision off: no fp16/bf16 support on {device.type}')
    return nullcontext, off


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_worker(_: int) -> None:
    """DataLoader workers: numpy and random follow the worker's torch seed (set from the loop's RNG).

    Workers ignore Ctrl-C: the terminal sends it to them too, and a worker started by spawn or
    forkserver (no inherited handler) would die of it, failing the main process before it writes
    its resumable checkpoint.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# -- random streams as tensors and plain values (weights_only-loadable, saved in checkpoints) -------
def rng_state() -> dict[str, Any]:
    """Every random stream the loop draws from: torch (CPU, CUDA), numpy, Python."""
    # legacy=True is numpy's default, spelled out: its stubs type the bare call as the dict form
    state = np.random.get_state(legacy=True)
    if not isinstance(state, tuple):  # a dict only for a non-MT19937 generator; numpy's global one is MT19937
        raise RuntimeError(f'numpy global random state is not MT19937 ({state.get("bit_generator")}); cannot save it')
    _, keys, pos, has_gauss, cached = state
    version, internal, gauss_next = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': {
            'keys': torch.from_numpy(keys.astype(np.int64)),
            'pos': int(pos),
            'has_gauss': int(has_gauss),
            'cached_gaussian': float(cached),
        },
        'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64), 'gauss_next': gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'].cpu())
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
    n = state['numpy']
    np.random.set_state(
        ('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian'])
    )
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss_next']))


@contextmanager
def stop_on_sigint(on_stop: Callable[[int], None]) -> Iterator[None]:
    """Ctrl-C (or SIGTERM from a scheduler): finish the step, write a resumable checkpoint, exit.

    Repeated signals do not abort harder: torchrun forwards the terminal's SIGINT to workers that
    already got it, and a half-written step must not be the result.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = {
        sig: signal.signal(sig, lambda signum, frame: on_stop(signum)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
