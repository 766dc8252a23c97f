"""kernels.glu: SwiGLU and GeGLU forward and gradients against transformers' activations."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers")
from nf4.kernels.glu import geglu, swiglu  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

KERNELS = {"silu": swiglu, "gelu_pytorch_tanh": geglu}
# fp32: sigmoid/tanh through exp in a different order than torch's: a few ulps on values ~10.
# bf16: transformers rounds act(gate) and then the product (and each backward product) in bf16;
# the kernel rounds once: 2 ulps of 2^-8 relative on values up to ~16.
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}


def check(act, shape, dtype, seed=0, fused_halves=False):
    g = torch.Generator().manual_seed(seed)
    if fused_halves:  # Phi-3: one gate_up projection split with chunk(2, -1)
        gate_up = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(DEVICE, dtype).requires_grad_()
        gate, up = gate_up.chunk(2, dim=-1)
        leaves = (gate_up,)
    else:
        gate = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
        up = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
        leaves = (gate, up)
    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    want = ACT2FN[act](gate) * up
    grads_want = torch.autograd.grad(want, leaves, dout)
    got = KERNELS[act](gate, up)
    grads = torch.autograd.grad(got, leaves, dout)
    tol = TOLERANCES[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("act", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 37), (2, 1100)])
def test_matches_transformers(act, dtype, shape):
    check(act, shape, dtype)


@pytest.mark.parametrize("act", list(KERNELS))
def test_reads_chunked_halves(act):
    check(act, (2, 3, 19), torch.float32, fused_halves=True)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 200), act=st.sampled_from(list(KERNELS)),
       seed=st.integers(0, 2**16))
def test_matches_transformers_any_shape(rows, width, act, seed):
    check(act, (rows, width), torch.float32, seed)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
