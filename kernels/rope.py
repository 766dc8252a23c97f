"""Rotary position embedding of q and k in Triton, in place (``apply_rope_``) or into new tensors
(``apply_rope``), forward and backward.

transformers' convention (``rotate_half``): with ``x = [x1, x2]`` split at half the rotary
width and ``cos``/``sin`` of shape [batch or 1, seq, rotary_dim] built by the model's rotary
module from ``position_ids`` (so every RoPE scaling type is the model's own),

    out = [x1 * c - x2 * s, x2 * c + x1 * s]

where ``c``/``s`` are the first half of ``cos``/``sin`` (transformers' rotary modules build them
as ``cat(freqs, freqs)``, both halves equal). Channels past ``rotary_dim`` (partial rotary) pass
through. The rotation is orthogonal, so the backward is the same kernel with ``-s``.

q is [batch, q_heads, seq, head_dim] and k [batch, kv_heads, seq, head_dim], any strides with a
unit stride along head_dim (the usual ``view(...).transpose(1, 2)`` of a projection). One program
handles (batch, position) pairs for every head, loading cos/sin once a pair.

The patched models use ``apply_rope_`` (See Note: RoPE in place, in nf4/models/common.py) and
fall back to ``apply_rope`` for q and k that autograd does not let another Function modify in
place (views that a custom Function returned). Sums and products are float32; the result is
rounded once (transformers rounds cos/sin-products in the input dtype, two more roundings in bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


_INTERPRETER_POSITIONS = 16


@triton.jit
def _rope_kernel(src_ptr, dst_ptr, cos_ptr, sin_ptr, n_pos, seq_len, n_heads, half,
                 src_b, src_h, src_s, dst_b, dst_h, dst_s, cs_b, cs_s,
                 SIGN: tl.constexpr,    # 1.0 forward, -1.0 backward (the inverse rotation)
                 POS: tl.constexpr,     # (batch, position) pairs per program
                 HEADS: tl.constexpr,   # power of two >= n_heads
                 HALF: tl.constexpr):   # power of two >= rotary_dim / 2
    pos = tl.program_id(0).to(tl.int64) * POS + tl.arange(0, POS)
    b = (pos // seq_len)[:, None, None]
    s = (pos % seq_len)[:, None, None]
    d = tl.arange(0, HALF)[None, None, :]
    h = tl.arange(0, HEADS)[None, :, None].to(tl.int64)
    ok_pos = (pos < n_pos)[:, None, None]
    cs = b * cs_b + s * cs_s + d
    c = tl.load(cos_ptr + cs, mask=ok_pos & (d < half), other=0.0).to(tl.float32)
    sn = SIGN * tl.load(sin_ptr + cs, mask=ok_pos & (d < half), other=0.0).to(tl.float32)
    mask = ok_pos & (h < n_heads) & (d < half)
    src = src_ptr + b * src_b + s * src_s + h * src_h + d
    dst = dst_ptr + b * dst_b + s * dst_s + h * dst_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * c - x2 * sn).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * c + x1 * sn).to(dst_ptr.dtype.element_ty), mask=mask)


def _check(name: str, t: torch.Tensor) -> None:
    if t.ndim != 4 or t.stride(-1) != 1:
        raise ValueError(f"{name} must be [batch, heads, seq, head_dim] with unit stride along "
                         f"head_dim, got shape {list(t.shape)} strides {list(t.stride())}")


def rope_launch(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                sign: float) -> None:
    """Rotate src -> dst ([batch, heads, seq, head_dim]; dst may be src: in place)."""
    batch, n_heads, seq, _ = src.shape
    rot = cos.shape[-1]
    # cos/sin may broadcast over batch (stride 0); they share one layout (made together).
    cos_b = cos.stride(0) if cos.shape[0] == batch else 0
    heads = triton.next_power_of_2(n_heads)
    half = triton.next_power_of_2(max(rot // 2, 1))
    # positions a program: one when a position is already >= 2048 values (Llama's q: 32 heads x
    # 64), up to 2048 values on the GPU; under the interpreter, where each program costs
    # milliseconds of Python, 16.
    per_program = _INTERPRETER_POSITIONS if src.device.type == "cpu" else max(1, 2048 // (heads * half))
    n_pos = batch * seq
    if src.numel():
        _rope_kernel[(triton.cdiv(n_pos, per_program),)](
            src, dst, cos, sin, n_pos, seq, n_heads, rot // 2, src.stride(0), src.stride(1), src.stride(2),
            dst.stride(0), dst.stride(1), dst.stride(2), cos_b, cos.stride(1), SIGN=sign,
            POS=triton.next_power_of_2(per_program), HEADS=heads, HALF=half, num_warps=4)


class RoPEFunction(torch.autograd.Function):
    """Rotates x in place (``mark_dirty``); backward rotates the gradient back into a new tensor
    (the incoming gradient may be shared, so it is not overwritten). One tensor per call: autograd
    cannot return two tensors from a Function that modified views in place (q and k are views of
    their projections), so q and k are two calls, each loading cos/sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        rope_launch(x, x, cos, sin, 1.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotated(dy if dy.stride(-1) == 1 else dy.contiguous(), cos, sin, -1.0), None, None


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """A new tensor (x's strides): x rotated by ``sign``; channels past rotary_dim copied."""
    out = torch.empty_like(x)
    if cos.shape[-1] != x.shape[-1]:
        out.copy_(x)
    rope_launch(x, out, cos, sin, sign)
    return out


class RoPEOutOfPlaceFunction(torch.autograd.Function):
    """The same rotation into a new tensor: for q/k that are views of another custom Function's
    output (QuantLinear4bit's), which autograd forbids modifying in place."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotated(x, cos, sin, 1.0)

    backward = RoPEFunction.backward


def _check_all(q, k, cos, sin) -> None:
    _check("q", q)
    _check("k", k)
    batch, _, seq, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != head_dim:
        raise ValueError(f"k has shape {list(k.shape)}, expected [{batch}, kv_heads, {seq}, {head_dim}]")
    if cos.shape != sin.shape or cos.ndim != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq \
            or cos.shape[2] % 2 or cos.shape[2] > head_dim:
        raise ValueError(f"cos/sin must be [1 or {batch}, {seq}, even rotary_dim <= {head_dim}], got "
                         f"{list(cos.shape)} and {list(sin.shape)}")
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError(f"cos/sin need unit stride along the last dimension and one layout, got strides "
                         f"{list(cos.stride())} and {list(sin.stride())}")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(f"q, k, cos, sin are on {q.device}, {k.device}, {cos.device}, {sin.device}")


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate ``q`` and ``k`` in place and return them (see the module docstring for shapes)."""
    _check_all(q, k, cos, sin)
    return RoPEFunction.apply(q, cos, sin), RoPEFunction.apply(k, cos, sin)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated copies of ``q`` and ``k`` (same strides); q and k are left as they are."""
    _check_all(q, k, cos, sin)
    return RoPEOutOfPlaceFunction.apply(q, cos, sin), RoPEOutOfPlaceFunction.apply(k, cos, sin)
