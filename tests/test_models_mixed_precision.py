"""Vision Mamba under mixed precision: the selective scan keeps its state in float32 for fp16 and bf16
inputs (as mamba-ssm's kernel does), and the model trains under autocast."""

from __future__ import annotations

import pytest
import torch

from hybridmednet.models.mamba import VisionMamba
from hybridmednet.models.selective_scan import selective_scan, selective_scan_ref

HALF = [torch.float16, torch.bfloat16]


def half_inputs(dtype, length=1025, seed=0):
    """Scan inputs as BiMamba passes them under autocast: per-token tensors in `dtype`, A, D and the
    delta bias in float32. Order: u, delta, A, B, C, D, z, delta_bias."""
    g = torch.Generator().manual_seed(seed)
    b, d, n = 2, 16, 16
    r = lambda *s: torch.randn(*s, generator=g)
    return [
        r(b, d, length).to(dtype),
        (r(b, d, length) - 1).to(dtype),
        -torch.rand(d, n, generator=g) * 4 - 0.1,
        r(b, n, length).to(dtype),
        r(b, n, length).to(dtype),
        r(d),
        r(b, d, length).to(dtype),
        r(d),
    ]


def run_scan(scan, inputs):
    u, delta, A, B, C, D, z, bias = inputs
    return scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)


def assert_within_rounding(actual, exact):
    """`actual` is `exact` (float64) rounded to actual's dtype, give or take one unit in the last place
    (float32 gradients: 1e-5 relative)."""
    rtol = max(torch.finfo(actual.dtype).eps, 1e-5)
    atol = 1e-2 * rtol * exact.abs().max().item()  # entries near zero carry the float32 scan's absolute error
    torch.testing.assert_close(actual.double(), exact.to(actual.dtype).double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize('dtype', HALF)
def test_half_precision_scan_matches_float64_to_within_rounding(dtype):
    # over 1,025 tokens a state kept in fp16/bf16 drifts by tens to hundreds of units in the last place
    inputs = half_inputs(dtype)
    y = run_scan(selective_scan, inputs)
    exact = run_scan(selective_scan_ref, [t.double() for t in inputs])
    assert y.dtype == dtype
    assert_within_rounding(y, exact)


@pytest.mark.parametrize('dtype', HALF)
def test_half_precision_backward_keeps_float32_state_and_input_dtypes(dtype):
    leaves = [t.requires_grad_() for t in half_inputs(dtype)]
    y = run_scan(selective_scan, leaves)
    assert {t.dtype for t in y.grad_fn.saved_tensors if t is not None} == {torch.float32}
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, leaves, grad_out)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    exact = torch.autograd.grad(run_scan(selective_scan_ref, exact_leaves), exact_leaves, grad_out.double())
    names = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
    for name, leaf, grad, grad_exact in zip(names, leaves, grads, exact):
        assert grad.dtype == leaf.dtype, name
        assert_within_rounding(grad, grad_exact)


@pytest.mark.parametrize(
    'device,dtype',
    [
        ('cpu', torch.bfloat16),
        pytest.param(
            'cuda', torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
        ),
    ],
)
def test_vision_mamba_trains_under_autocast(device, dtype):
    torch.manual_seed(0)
    model = VisionMamba(img_size=64, embed_dim=192, depth=2, num_classes=3).to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    reference = model(x)
    reference.square().sum().backward()
    reference_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast(device, dtype=dtype):
        logits = model(x)
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.05 * reference.abs().max().item())
    logits.float().square().sum().backward()
    for name in (
        'layers.0.mixer.A_log',
        'layers.1.mixer.A_b_log',
        'layers.0.mixer.dt_proj.bias',
        'layers.1.mixer.D_b',
        'layers.0.mixer.in_proj.weight',
        'patch_embed.proj.weight',
    ):
        grad, expected = dict(model.named_parameters())[name].grad, reference_grads[name]
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert torch.cosine_similarity(grad.flatten(), expected.flatten(), dim=0) > 0.95, name
