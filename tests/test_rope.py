"""kernels.rope: in-place rotation of q and k against transformers' apply_rotary_pos_emb."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers")
from nf4.kernels.rope import apply_rope, apply_rope_  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

# fp32: x1*c - x2*s, one FMA order against another: 1e-6 on values of size ~3.
# bf16: transformers rounds cos/sin (given in bf16 here for both) and each product and sum in bf16
# (three roundings of 2^-8 relative on values up to ~4); the kernel rounds once.
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def cos_sin(batch, seq, rot, dtype, seed, broadcast=False):
    """cos/sin as transformers' rotary modules make them: cat(freqs, freqs) at position_ids."""
    g = torch.Generator().manual_seed(seed)
    position_ids = torch.randint(0, 4096, (1 if broadcast else batch, seq), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def projections(batch, q_heads, k_heads, seq, head_dim, dtype, seed):
    """q, k as attention modules make them: view(batch, seq, heads, head_dim).transpose(1, 2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, q_heads * head_dim, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(batch, seq, k_heads * head_dim, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k


def heads(x, n, head_dim):
    return x.view(x.shape[0], x.shape[1], n, head_dim).transpose(1, 2)


def check(batch, q_heads, k_heads, seq, head_dim, dtype, seed=0, rot=None, broadcast=False, fn=apply_rope_):
    rot = rot or head_dim
    cos, sin = cos_sin(batch, seq, rot, dtype, seed, broadcast)
    q, k = projections(batch, q_heads, k_heads, seq, head_dim, dtype, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    dq_out = torch.randn(batch, q_heads, seq, head_dim, generator=g).to(DEVICE, dtype)
    dk_out = torch.randn(batch, k_heads, seq, head_dim, generator=g).to(DEVICE, dtype)

    qh, kh = heads(q * 1, q_heads, head_dim), heads(k * 1, k_heads, head_dim)
    q_rot, k_pass = qh[..., :rot], qh[..., rot:]
    kr, kp = kh[..., :rot], kh[..., rot:]
    q_ref, k_ref = apply_rotary_pos_emb(q_rot, kr, cos, sin)
    q_ref, k_ref = torch.cat([q_ref, k_pass], -1), torch.cat([k_ref, kp], -1)
    grads_ref = torch.autograd.grad((q_ref, k_ref), (q, k), (dq_out, dk_out))

    q_out, k_out = fn(heads(q * 1, q_heads, head_dim), heads(k * 1, k_heads, head_dim), cos, sin)
    grads = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(k_out, k_ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 2), (2, 4, 2, 5, 8), (3, 3, 1, 7, 18)])
def test_matches_transformers(dtype, shape):
    check(*shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_place_matches_transformers(dtype):
    check(2, 3, 1, 5, 10, dtype, fn=apply_rope)
    check(2, 2, 2, 3, 12, dtype, rot=8, fn=apply_rope)


def test_cos_sin_broadcast_over_batch():
    check(3, 2, 2, 5, 8, torch.float32, broadcast=True)


def test_partial_rotary_leaves_the_rest():
    check(2, 2, 1, 3, 12, torch.float32, rot=8)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), q_heads=st.integers(1, 5), k_heads=st.integers(1, 3),
       seq=st.integers(1, 9), half=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_matches_transformers_any_shape(batch, q_heads, k_heads, seq, half, seed):
    check(batch, q_heads, k_heads, seq, 2 * half, torch.float32, seed)


def test_rotates_in_place():
    q = torch.randn(1, 2, 3, 4).to(DEVICE)
    k = torch.randn(1, 1, 3, 4).to(DEVICE)
    cos, sin = cos_sin(1, 3, 4, torch.float32, 0)
    q_out, k_out = apply_rope_(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()


def test_rejects_bad_shapes():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="unit stride"):
        apply_rope_(q.transpose(2, 3), q, *cos_sin(1, 3, 4, torch.float32, 0))
    with pytest.raises(ValueError, match="cos/sin must be"):
        apply_rope_(q, q.clone(), *cos_sin(1, 3, 6, torch.float32, 0))
