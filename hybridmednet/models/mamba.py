"""Vision Mamba (Zhu et al., 2024): bidirectional state-space blocks over image patches.

Pure PyTorch, so it trains and runs on CPU. The selective scan is chunked: the linear
recurrence runs step by step only inside short chunks (all chunks at once), and the chunk
boundary states are carried in a second short loop. Tokens are handled one segment at a time,
and the backward pass is the adjoint recurrence run by the same scan on recomputed states, as
the CUDA kernel does, so memory grows as L * d. On a GPU with `mamba-ssm` installed the fused
kernel runs each direction instead.

Module and parameter names follow the official hustvl/Vim code, so its checkpoints load
key for key (`load_vim_checkpoint`).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from torch import Tensor, nn

from hybridmednet.models.backbones import PretrainedWeightsError, check_fits, deconv_upsamplers, read_state_dict

VIM_VARIANTS: dict[str, dict[str, Any]] = {
    'vim_tiny': dict(embed_dim=192),
    'vim_small': dict(embed_dim=384),
    'vim_base': dict(embed_dim=768),
}


# --------------------------------------------------------------------------- selective scan

def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
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


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   chunk: int = 4, segment: int = 32, tokens_first: bool = False) -> Tensor:
    """Chunked selective scan, same arguments and result as `selective_scan_ref`.

    The sequence is handled in equal segments of at most `segment` tokens, so the [tokens, n, d]
    states exist one segment at a time (memory O(l * d), cache-sized work). Inside a segment the
    scan steps through `chunk` positions, each step advancing all of the segment's chunks at once.
    As in mamba-ssm's kernel, the delta bias, softplus, D skip and z gate are fused into the one
    autograd function. With `tokens_first`, u, delta, z and the result are [b, l, d] and B, C
    [b, l, n]: the layout the scan works in and the Vim block produces, so nothing is transposed
    (the CPU path of `BiMamba`).
    """
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk,
                                max(segment // chunk, 1) * chunk, tokens_first)


class _SelectiveScan(torch.autograd.Function):
    """out = (y + D u) silu(z), y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + (dt u)_t B_t and
    dt = softplus(delta + bias) (or delta + bias), for u, delta, z [b, d, l]; A [d, n]; B, C [b, n, l]
    (u, delta, z [b, l, d] and B, C [b, l, n] when `tokens_first`).

    Inside, tokens come first ([b, l, d], zero-padded to a multiple of `chunk`; the scan is causal,
    so padding cannot reach the real tokens) and states are laid out [b, l, n, d], so every
    contraction over n or d runs along a vectorised axis. Only the state entering each segment is
    kept: the backward pass recomputes a segment's states, then runs the adjoint recurrence
    g_t = dL/dh_t + a_{t+1} g_{t+1} with the same chunked scan backwards in time, so it costs about
    two forward passes and builds no autograd graph. Segment-sized buffers are reused across segments.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, bias: Tensor | None, softplus: bool, chunk: int, segment: int,
                tokens_first: bool) -> Tensor:
        length = u.shape[1 if tokens_first else 2]
        padded = length + -length % chunk
        count = -(-padded // segment)  # equal segments, so none is left a few tokens long (196 = 7 x 28)
        segment = -(-padded // count // chunk) * chunk if count > 1 else padded
        delta, u, B, C = (_time_major(t, padded, tokens_first) for t in (delta, u, B, C))
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
            h = h_buf[:, :e - s]
            entering[:, i + 1] = _segment_states(dt[:, s:e], dtu[:, s:e], B[:, s:e], log2_decay, entering[:, i],
                                                 chunk, a_buf[:, :e - s], h, p_buf[:, :e - s])
            torch.matmul(C[:, s:e, None, :], h, out=y[:, s:e, None, :])
        if D is not None:
            y.addcmul_(u, D)
        z_gate = None
        if z is not None:
            z = _time_major(z, padded, tokens_first)
            z_gate = F.silu(z)
        ctx.save_for_backward(delta if softplus else None, u, dt, A, B, C, entering[:, :-1], D, z,
                              y if z is not None else None)
        ctx.chunk, ctx.segment, ctx.has_bias, ctx.tokens_first = chunk, segment, bias is not None, tokens_first
        return _channel_major(y * z_gate if z is not None else y, length, tokens_first)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        delta, u, dt, A, B, C, entering, D, z, y = ctx.saved_tensors
        chunk, segment = ctx.chunk, ctx.segment
        b, padded, d = dt.shape
        n = A.shape[1]
        length = grad_out.shape[1 if ctx.tokens_first else 2]
        grad_y = _time_major(grad_out, padded, ctx.tokens_first)
        grad_z = None
        if z is not None:
            sig = torch.sigmoid(z)
            grad_z = (z - z * sig).add_(1).mul_(sig).mul_(y).mul_(grad_y)  # d silu(z) = sig (1 + z (1 - sig))
            grad_y.mul_(sig.mul_(z))
        grad_D = (grad_y * u).sum((0, 1)) if D is not None else None
        dtu = dt * u
        A_t = A.t().contiguous()
        log2_decay = _log2_decay(A)
        grad_dt, grad_dtu = torch.empty_like(dt), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = dt.new_zeros(n, d)
        # a_buf[:, t] = a_t and a_buf[:, t + 1] = a_{t+1}; h_buf[:, t] = h_{t-1} and h_buf[:, t + 1] = h_t
        a_buf, h_buf = dt.new_empty(b, segment + 1, n, d), dt.new_empty(b, segment + 1, n, d)
        g_buf, p_buf, w_buf = (dt.new_empty(b, segment, n, d) for _ in range(3))
        after = dt.new_zeros(b, n * d)       # g at the first token after this segment
        decay_after = dt.new_zeros(b, n, d)  # and the decay that carries it back one token
        for i, s in reversed(list(enumerate(range(0, padded, segment)))):
            e = min(s + segment, padded)
            w = e - s
            a, states, p = a_buf[:, :w + 1], h_buf[:, :w + 1], p_buf[:, :w]
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
        grad_bias = grad_dt[:, :length].sum((0, 1)) if ctx.has_bias else None
        grads = [_channel_major(t, length, ctx.tokens_first) if t is not None else None
                 for t in (grad_u, grad_dt, grad_B, grad_C, grad_z)]
        return *grads[:2], grad_A.t(), *grads[2:4], grad_D, grads[4], grad_bias, None, None, None, None


def _time_major(x: Tensor, length: int, tokens_first: bool = False) -> Tensor:
    """[b, c, l] (or [b, l, c] when `tokens_first`) -> a new contiguous [b, length, c], zero-padded at the
    end. Transposes go as one 2-D copy per batch item: PyTorch transposes those in cache blocks, while a
    strided 3-D copy is ~5x slower at 1,024 tokens."""
    b, c, l = (x.shape[0], x.shape[2], x.shape[1]) if tokens_first else x.shape
    out = x.new_empty(b, length, c)
    out[:, l:] = 0
    if tokens_first:
        out[:, :l] = x
    else:
        for i in range(b):
            out[i, :l].copy_(x[i].t())
    return out


def _channel_major(x: Tensor, length: int, tokens_first: bool = False) -> Tensor:
    """[b, l, c] -> contiguous [b, c, length], the first `length` tokens (inverse of `_time_major`);
    with `tokens_first`, just the first `length` tokens."""
    if tokens_first:
        return x[:, :length]
    b, _, c = x.shape
    out = x.new_empty(b, c, length)
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


def _segment_states(dt: Tensor, dtu: Tensor, B: Tensor, log2_decay: Tensor, carry: Tensor, chunk: int,
                    a: Tensor, h: Tensor, p: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba mixer ("v2"): one input and output projection, and for each scan
    direction its own conv1d, x/dt projections, A and D. The backward direction scans the flipped
    sequence; both outputs are averaged before `out_proj`."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        for suffix in ('', '_b'):
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner)
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():  # softplus(bias) = dt
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            setattr(self, f'conv1d{suffix}', conv)
            setattr(self, f'x_proj{suffix}', x_proj)
            setattr(self, f'dt_proj{suffix}', dt_proj)
            setattr(self, 'A_log' if not suffix else 'A_b_log', nn.Parameter(torch.log(A)))
            setattr(self, f'D{suffix}', nn.Parameter(torch.ones(self.d_inner)))

    def forward(self, hidden: Tensor) -> Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # [b, l, d_inner] each
        forward = self.scan_direction(x, z, backward=False)
        backward = self.scan_direction(x.flip(1), z.flip(1), backward=True).flip(1)
        return self.out_proj((forward + backward) / 2)

    def scan_direction(self, x: Tensor, z: Tensor, backward: bool) -> Tensor:
        """One causal selective scan over the tokens of x [b, l, d_inner] gated by z, giving [b, l, d_inner];
        `backward` picks the _b parameters (the caller flips the sequence). The PyTorch scan takes the
        tokens-first layout as it is; mamba-ssm's kernel wants channels first."""
        s = '_b' if backward else ''
        conv, x_proj, dt_proj = getattr(self, f'conv1d{s}'), getattr(self, f'x_proj{s}'), getattr(self, f'dt_proj{s}')
        A = -torch.exp(getattr(self, 'A_b_log' if backward else 'A_log').float())
        u = F.silu(conv(x.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)  # causal depthwise conv
        dt, B, C = x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt @ dt_proj.weight.t()
        options = dict(D=getattr(self, f'D{s}').float(), delta_bias=dt_proj.bias.float(), delta_softplus=True)
        scan = scan_function(x.device)
        if scan is selective_scan:
            return selective_scan(u, delta, A, B, C, z=z, tokens_first=True, **options)
        channels_first = [t.transpose(1, 2).contiguous() for t in (u, delta, B, C, z)]
        return scan(*channels_first[:2], A, *channels_first[2:4], z=channels_first[4], **options).transpose(1, 2)


class VimBlock(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(RMSNorm(x)))."""

    def __init__(self, dim: int, d_state: int = 16, drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mixer = BiMamba(dim, d_state)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class VisionMamba(nn.Module):
    """The Vim classifier: patch embedding, a class token in the middle of the sequence, absolute
    position embedding, `depth` bidirectional Mamba blocks, a final RMSNorm and a linear head on the
    class token. Keys match the official checkpoints."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 192, depth: int = 24,
                 d_state: int = 16, num_classes: int = 0, drop_path_rate: float = 0.0, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(VimBlock(embed_dim, d_state, rate) for rate in rates)
        self.norm_f = RMSNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        # as in the Vim code: lecun-normal patch conv, truncated-normal tokens and head, zero Linear
        # biases except dt_proj (set above), out_proj scaled down by sqrt(depth)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(depth)

    def tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int], int]:
        """Embedded token sequence [b, h*w + 1, d] with the class token at index h*w // 2."""
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        mid = x.shape[1] // 2
        x = torch.cat([x[:, :mid], self.cls_token.expand(x.shape[0], -1, -1), x[:, mid:]], 1)
        return x + resize_pos_embed(self.pos_embed, self.grid, grid), grid, mid

    def forward_intermediates(self, x: Tensor, indices: list[int]) -> tuple[list[Tensor], tuple[int, int], int]:
        """Token sequences after the blocks at 1-based depths `indices`, each passed through norm_f."""
        x, grid, mid = self.tokens(x)
        taps = {}
        for depth, layer in enumerate(self.layers, 1):
            x = layer(x)
            if depth in indices:
                taps[depth] = self.norm_f(x)
        return [taps[i] for i in indices], grid, mid

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised class token [b, d]."""
        (x,), _, mid = self.forward_intermediates(x, [len(self.layers)])
        return x[:, mid]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resize of the patch position embeddings; the class token's entry (middle index) is kept."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    old_mid, new_mid = old_grid[0] * old_grid[1] // 2, new_grid[0] * new_grid[1] // 2
    cls = pos_embed[:, old_mid:old_mid + 1]
    patches = torch.cat([pos_embed[:, :old_mid], pos_embed[:, old_mid + 1:]], 1)
    patches = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode='bicubic', align_corners=False)
    patches = patches.to(pos_embed.dtype).flatten(2).transpose(1, 2)
    return torch.cat([patches[:, :new_mid], cls, patches[:, new_mid:]], 1)


class VimBackbone(nn.Module):
    """Vim as a 4-scale pyramid: tokens after 1/4, 2/4, 3/4 and all of the blocks, reshaped to
    stride-16 maps and resampled to strides 4, 8, 16, 32 (ViTDet's simple feature pyramid:
    two 2x deconvolutions, one, none, a 2x max-pool)."""

    def __init__(self, img_size: int = 224, embed_dim: int = 192, depth: int = 24, **options: Any):
        super().__init__()
        self.trunk = VisionMamba(img_size=img_size, embed_dim=embed_dim, depth=depth, **options)
        if self.trunk.patch_size != 16:
            raise ValueError("the Vim pyramid expects 16x16 patches (strides 4..32 are resampled from 16)")
        self.indices = [max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)]
        d = embed_dim
        self.channels = [d // 4, d // 2, d, d]
        self.reductions = [4, 8, 16, 32]
        self.resample = nn.ModuleList([*deconv_upsamplers(d), nn.Identity(), nn.MaxPool2d(2)])

    def forward(self, x: Tensor) -> list[Tensor]:
        taps, (h, w), mid = self.trunk.forward_intermediates(x, self.indices)
        maps = []
        for tokens, resample in zip(taps, self.resample):
            patches = torch.cat([tokens[:, :mid], tokens[:, mid + 1:]], 1)  # drop the class token
            maps.append(resample(patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)))
        return maps

    def load_pretrained(self, path: str | Path) -> None:
        load_vim_checkpoint(self.trunk, path)


def load_vim_checkpoint(model: VisionMamba, path: str | Path) -> None:
    """Load an official hustvl/Vim checkpoint (.pth with a 'model' entry, a plain state dict, or
    .safetensors). The layouts match key for key; the position embedding is resized to the model's
    grid, the classifier is dropped when the model has none, and anything else that does not fit
    is an error listing the keys."""
    state = read_state_dict(path)
    if not isinstance(model.head, nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith('head.')}
    if 'pos_embed' in state:
        old = state['pos_embed']
        side = math.isqrt(old.shape[1] - 1)
        if side * side != old.shape[1] - 1:
            raise ValueError(f"{path}: pos_embed has {old.shape[1]} entries, not a square grid plus a class token")
        state['pos_embed'] = resize_pos_embed(old, (side, side), model.grid)
    check_fits(model.state_dict(), state,
               f"Vim checkpoint {path} does not fit a Vim with embed_dim={model.embed_dim}, depth={len(model.layers)}")
    model.load_state_dict(state, strict=True)


def build_vim_backbone(spec: Any, pretrained: bool | str = False, img_size: int = 224,
                       **options: Any) -> VimBackbone:
    """Registry builder for vim_tiny / vim_small / vim_base; `pretrained` is False or a local checkpoint path."""
    if pretrained is True:
        raise PretrainedWeightsError(
            f"{spec.name}: there is no hub source for Vision Mamba weights. Download an official checkpoint "
            "from https://github.com/hustvl/Vim and set MODEL['pretrained'] = '/path/to/vim_checkpoint.pth', "
            "or MODEL['pretrained'] = False to train from scratch.")
    model = VimBackbone(img_size=img_size, **{**VIM_VARIANTS[spec.name], **options})
    if pretrained:
        model.load_pretrained(pretrained)
    return model
