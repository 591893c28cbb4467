"""The selective scan of Mamba (Gu & Dao, 2023) in plain PyTorch, and the dispatch to mamba-ssm's kernel.

The scan is chunked: the linear recurrence runs step by step only inside short chunks (all chunks at
once), and the chunk boundary states are carried in a second short loop. Tokens are handled one
segment at a time, and the backward pass is the adjoint recurrence run by the same scan on recomputed
states, as the CUDA kernel does, so memory grows as L * d. On a GPU with `mamba-ssm` installed its
fused kernel runs instead (`scan_function`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Sequential reference: one Python step per token (the algorithm of mamba-ssm's `selective_scan_ref`).

    Shapes as in mamba-ssm: u, delta, z [b, d, l]; A [d, n]; B, C [b, n, l]; D, delta_bias [d].
    """
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))
    drive = torch.einsum('bdl,bnl->bdln', delta * u, B)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(2)):
        h = a_t * h + x_t
        ys.append(torch.einsum('bdn,bn->bd', h, c_t))
    y = torch.stack(ys, 2)
    if D is not None:
        y = y + u * D[:, None]
    return y * F.silu(z) if z is not None else y


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = 4,
    segment: int = 32,
    tokens_first: bool = False,
) -> Tensor:
    """Chunked selective scan, same arguments and result as `selective_scan_ref`.

    The sequence is handled in equal segments of at most `segment` tokens, so the [tokens, n, d]
    states exist one segment at a time (memory O(l * d), cache-sized work). Inside a segment the
    scan steps through `chunk` positions, each step advancing all of the segment's chunks at once.
    As in mamba-ssm's kernel, the delta bias, softplus, D skip and z gate are fused into the one
    autograd function. With `tokens_first`, u, delta, z and the result are [b, l, d] and B, C
    [b, l, n]: the layout the scan works in and the Vim block produces, so nothing is transposed
    (the CPU path of `BiMamba`).
    """
    return _SelectiveScan.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, max(segment // chunk, 1) * chunk, tokens_first
    )


class _SelectiveScan(torch.autograd.Function):
    """out = (y + D u) silu(z), y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + (dt u)_t B_t and
    dt = softplus(delta + bias) (or delta + bias), for u, delta, z [b, d, l]; A [d, n]; B, C [b, n, l]
    (u, delta, z [b, l, d] and B, C [b, l, n] when `tokens_first`).

    As in mamba-ssm's kernel, the scan runs in float32 (float64 stays float64) whatever the input
    dtypes: a state accumulated over ~1,000 tokens in fp16 or bf16 loses precision, and autocast
    hands the scan half-precision activations beside float32 A, D and bias. The output comes back
    in u's dtype and each gradient in its input's dtype.

    Inside, tokens come first ([b, l, d], zero-padded to a multiple of `chunk`; the scan is causal,
    so padding cannot reach the real tokens) and states are laid out [b, l, n, d], so every
    contraction over n or d runs along a vectorised axis. Only the state entering each segment is
    kept: the backward pass recomputes a segment's states, then runs the adjoint recurrence
    g_t = dL/dh_t + a_{t+1} g_{t+1} with the same chunked scan backwards in time, so it costs about
    two forward passes and builds no autograd graph. Segment-sized buffers are reused across segments.
    """

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        bias: Tensor | None,
        softplus: bool,
        chunk: int,
        segment: int,
        tokens_first: bool,
    ) -> Tensor:
        length = u.shape[1 if tokens_first else 2]
        padded = length + -length % chunk
        count = -(-padded // segment)  # equal segments, so none is left a few tokens long (196 = 7 x 28)
        segment = -(-padded // count // chunk) * chunk if count > 1 else padded
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, bias))
        out_dtype, work = u.dtype, torch.promote_types(u.dtype, torch.float32)
        delta, u, B, C = (_time_major(t, padded, tokens_first, work) for t in (delta, u, B, C))
        A = A.to(work)
        D, bias = (None if t is None else t.to(work) for t in (D, bias))
        if bias is not None:
            delta += bias
        dt = _softplus(delta) if softplus else delta
        dtu = dt * u
        b, _, d = dt.shape
        n = A.shape[1]
        starts = range(0, padded, segment)
        log2_decay = _log2_decay(A)
        y = dt.new_empty(b, padded, d)
        a_buf, h_buf, p_buf = (dt.new_empty(b, segment, n, d) for _ in range(3))
        entering = dt.new_zeros(b, len(starts) + 1, n * d)  # state entering each segment
        for i, s in enumerate(starts):
            e = min(s + segment, padded)
            h = h_buf[:, : e - s]
            entering[:, i + 1] = _segment_states(
                dt[:, s:e],
                dtu[:, s:e],
                B[:, s:e],
                log2_decay,
                entering[:, i],
                chunk,
                a_buf[:, : e - s],
                h,
                p_buf[:, : e - s],
            )
            torch.matmul(C[:, s:e, None, :], h, out=y[:, s:e, None, :])
        if D is not None:
            y.addcmul_(u, D)
        z_gate = None
        if z is not None:
            z = _time_major(z, padded, tokens_first, work)
            z_gate = F.silu(z)
        ctx.save_for_backward(
            delta if softplus else None, u, dt, A, B, C, entering[:, :-1], D, z, y if z is not None else None
        )
        ctx.chunk, ctx.segment, ctx.has_bias, ctx.tokens_first = chunk, segment, bias is not None, tokens_first
        return _channel_major(y * z_gate if z_gate is not None else y, length, tokens_first, out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        delta, u, dt, A, B, C, entering, D, z, y = ctx.saved_tensors
        u_type, delta_type, A_type, B_type, C_type, D_type, z_type, bias_type = ctx.dtypes
        chunk, segment = ctx.chunk, ctx.segment
        b, padded, d = dt.shape
        n = A.shape[1]
        length = grad_out.shape[1 if ctx.tokens_first else 2]
        grad_y = _time_major(grad_out, padded, ctx.tokens_first, dt.dtype)
        grad_z = None
        if z is not None:
            sig = torch.sigmoid(z)
            grad_z = (z - z * sig).add_(1).mul_(sig).mul_(y).mul_(grad_y)  # d silu(z) = sig (1 + z (1 - sig))
            grad_y.mul_(sig.mul_(z))
        grad_D = (grad_y * u).sum((0, 1)).to(D_type) if D is not None else None
        dtu = dt * u
        A_t = A.t().contiguous()
        log2_decay = _log2_decay(A)
        grad_dt, grad_dtu = torch.empty_like(dt), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = dt.new_zeros(n, d)
        # a_buf[:, t] = a_t and a_buf[:, t + 1] = a_{t+1}; h_buf[:, t] = h_{t-1} and h_buf[:, t + 1] = h_t
        a_buf, h_buf = dt.new_empty(b, segment + 1, n, d), dt.new_empty(b, segment + 1, n, d)
        g_buf, p_buf, w_buf = (dt.new_empty(b, segment, n, d) for _ in range(3))
        after = dt.new_zeros(b, n * d)  # g at the first token after this segment
        decay_after = dt.new_zeros(b, n, d)  # and the decay that carries it back one token
        for i, s in reversed(list(enumerate(range(0, padded, segment)))):
            e = min(s + segment, padded)
            w = e - s
            a, states, p = a_buf[:, : w + 1], h_buf[:, : w + 1], p_buf[:, :w]
            a[:, -1] = decay_after
            states[:, 0] = entering[:, i].view(b, n, d)
            h = states[:, 1:]
            _segment_states(dt[:, s:e], dtu[:, s:e], B[:, s:e], log2_decay, entering[:, i], chunk, a[:, :-1], h, p)
            g = torch.mul(grad_y[:, s:e, None, :], C[:, s:e, :, None], out=g_buf[:, :w])
            after = _scan(a[:, 1:], g, after, chunk, True, p)
            decay_after = a[:, 0].clone()
            torch.matmul(B[:, s:e, None, :], g, out=grad_dtu[:, s:e, None, :])
            torch.matmul(dtu[:, s:e, None, :], g.transpose(2, 3), out=grad_B[:, s:e, None, :])
            torch.sum(torch.mul(h, grad_y[:, s:e, None, :], out=p), 3, out=grad_C[:, s:e])
            # dL/d(dt A) at token t: g_t a_t h_{t-1}
            g_log = torch.mul(g, a[:, :-1], out=w_buf[:, :w]).mul_(states[:, :-1])
            torch.sum(torch.mul(g_log, A_t, out=p), 2, out=grad_dt[:, s:e])
            grad_A += torch.mul(g_log, dt[:, s:e, None, :], out=p).sum((0, 1))
        grad_u = grad_dtu * dt
        if D is not None:
            grad_u.addcmul_(grad_y, D)
        grad_dt.addcmul_(grad_dtu, u)
        if delta is not None:
            grad_dt *= torch.sigmoid(delta)
        grad_bias = grad_dt[:, :length].sum((0, 1)).to(bias_type) if ctx.has_bias else None
        per_token = zip((grad_u, grad_dt, grad_B, grad_C, grad_z), (u_type, delta_type, B_type, C_type, z_type))
        grads = [
            _channel_major(t, length, ctx.tokens_first, dtype) if t is not None else None for t, dtype in per_token
        ]
        return *grads[:2], grad_A.t().to(A_type), *grads[2:4], grad_D, grads[4], grad_bias, None, None, None, None


def _time_major(x: Tensor, length: int, tokens_first: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """[b, c, l] (or [b, l, c] when `tokens_first`) -> a new contiguous [b, length, c] of `dtype` (x's by
    default), zero-padded at the end. Transposes go as one 2-D copy per batch item: PyTorch transposes
    those in cache blocks, while a strided 3-D copy is ~5x slower at 1,024 tokens."""
    b, c, n = (x.shape[0], x.shape[2], x.shape[1]) if tokens_first else x.shape
    out = x.new_empty(b, length, c, dtype=dtype)
    out[:, n:] = 0
    if tokens_first:
        out[:, :n] = x
    else:
        for i in range(b):
            out[i, :n].copy_(x[i].t())
    return out


def _channel_major(x: Tensor, length: int, tokens_first: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """[b, l, c] -> contiguous [b, c, length] of `dtype` (x's by default), the first `length` tokens (inverse
    of `_time_major`); with `tokens_first`, just the first `length` tokens."""
    if tokens_first:
        return x[:, :length] if dtype is None else x[:, :length].to(dtype)
    b, _, c = x.shape
    out = x.new_empty(b, c, length, dtype=dtype)
    for i in range(b):
        out[i].copy_(x[i, :length].t())
    return out


def _softplus(x: Tensor) -> Tensor:
    """max(x, 0) + log1p(exp(-|x|)), with log1p(v) = log(1 + v) v / ((1 + v) - 1) (Goldberg): as accurate
    as F.softplus and about twice as fast, since torch's log1p is slow on CPU."""
    v = x.abs().neg_().exp_()
    w = v + 1
    return torch.log(w).mul_(v).div_(w - 1).where(w != 1, v).add_(x.clamp(min=0))


def _log2_decay(A: Tensor) -> Tensor:
    """A log2(e) as [n, d]: the decay is computed as 2^(dt A log2 e), since exp2 is ~10x faster than exp on CPU."""
    return (A * math.log2(math.e)).t().contiguous()


def _decay(dt: Tensor, log2_decay: Tensor, out: Tensor) -> Tensor:
    """exp(dt A) [b, l, n, d] from dt [b, l, d], written to `out`."""
    return torch.mul(dt[:, :, None, :], log2_decay, out=out).exp2_()


def _segment_states(
    dt: Tensor, dtu: Tensor, B: Tensor, log2_decay: Tensor, carry: Tensor, chunk: int, a: Tensor, h: Tensor, p: Tensor
) -> Tensor:
    """The states h_t [b, l, n, d] of one segment, written to `h` (its decays to `a`), from the state
    `carry` entering it; returns the state leaving it. The forward pass and the backward pass's
    recomputation both run it."""
    _decay(dt, log2_decay, out=a)
    torch.mul(dtu[:, :, None, :], B[:, :, :, None], out=h)
    return _scan(a, h, carry, chunk, False, p)


def _scan(a: Tensor, x: Tensor, carry: Tensor, chunk: int, reverse: bool, p: Tensor) -> Tensor:
    """x_t <- a_t x_{t-1} + x_t in place along dim 1 (x_t <- a_t x_{t+1} + x_t when reversed),
    starting from `carry` [b, n * d]; returns the last state. Steps run one at a time inside chunks,
    all chunks at once, then the chunks' entering states are carried in a short loop and added
    with the decay accumulated since the chunk began (kept in the buffer `p`). Slices are taken
    once with `unbind`: per-step Python indexing costs as much as the small carry steps themselves."""
    b, length = x.shape[:2]
    k = length // chunk
    a, x, p = a.view(b, k, chunk, -1), x.view(b, k, chunk, -1), p.view(b, k, chunk, -1)
    a_steps, x_steps, p_steps = a.unbind(2), x.unbind(2), p.unbind(2)
    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
    prev = steps[0]
    p_steps[prev].copy_(a_steps[prev])
    for t in steps[1:]:
        x_steps[t].addcmul_(a_steps[t], x_steps[prev])
        torch.mul(a_steps[t], p_steps[prev], out=p_steps[t])
        prev = t
    carries = x.new_empty(k + 1, b, x.shape[-1])  # state entering each chunk, in scan order
    carries[0] = carry
    into, ends, decays = carries.unbind(0), x_steps[prev].unbind(1), p_steps[prev].unbind(1)
    for c, j in enumerate(range(k - 1, -1, -1) if reverse else range(k)):
        torch.addcmul(ends[j], decays[j], into[c], out=into[c + 1])
    entering = carries[:-1].flip(0) if reverse else carries[:-1]
    x.addcmul_(p, entering.transpose(0, 1).unsqueeze(2))
    return into[-1]


@functools.cache
def _mamba_ssm_scan() -> Callable[..., Tensor] | None:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def scan_function(device: torch.device) -> Callable[..., Tensor]:
    """The fused mamba-ssm kernel for CUDA tensors when it is installed, else the PyTorch scan."""
    kernel = _mamba_ssm_scan() if device.type == 'cuda' else None
    return kernel or selective_scan
