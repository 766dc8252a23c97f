"""kernels.rms_norm: forward and both gradients against transformers' Llama and Gemma norms."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers")
from nf4.kernels.rms_norm import rms_norm  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

# fp32: the kernel and torch sum in different orders over <= 300 values: a few fp32 ulps.
# bf16: transformers rounds x_hat to bf16 before the weight multiply (Llama) and every gradient op
# rounds in bf16; the kernel rounds once from fp32. Two bf16 roundings of values of size ~3 (randn
# inputs, weights near 1) differ by at most 2 ulps = 2 * 2^-7 * 4; gradients sum 300 such terms.
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}


def reference(kind: str, hidden: int, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    module = (LlamaRMSNorm if kind == "llama" else Gemma2RMSNorm)(hidden, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * 0.2
                            + (1.0 if kind == "llama" else 0.0))
    return module.to(DEVICE, dtype)


def check(kind, shape, dtype, seed=0):
    ref = reference(kind, shape[-1], dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    y_ref = ref(x)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, ref.weight), dy)
    weight = ref.weight.detach().clone().requires_grad_()
    y = rms_norm(x, weight, 1e-6, offset=0.0 if kind == "llama" else 1.0, out_dtype=y_ref.dtype)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    tol = TOLERANCES[dtype]
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    # dweight sums over every row: the bf16 bound grows with the row count (<= 15 rows here).
    torch.testing.assert_close(dw, dw_ref, atol=tol["atol"] * 8, rtol=tol["rtol"] * 4)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 33), (7, 300)])
def test_matches_transformers(kind, dtype, shape):
    check(kind, shape, dtype)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 9), hidden=st.integers(1, 130), kind=st.sampled_from(["llama", "gemma"]),
       seed=st.integers(0, 2**16))
def test_matches_transformers_any_shape(rows, hidden, kind, seed):
    check(kind, (rows, hidden), torch.float32, seed)


def test_non_contiguous_input():
    ref = reference("llama", 16, torch.float32, 0)
    x = torch.randn(16, 6).to(DEVICE).t()  # [6, 16] with row stride 1: copied to rows
    torch.testing.assert_close(rms_norm(x, ref.weight, 1e-6), ref(x), **TOLERANCES[torch.float32])


def test_rejects_bad_weight():
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
