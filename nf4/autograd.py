"""The maths of the QLoRA layer: a frozen 4-bit base plus a trainable low-rank adapter.

    y = x W^T + b + scaling * dropout(x) A^T B^T        (computed in ``compute_dtype``)

``QuantLoraLinear`` is the ``autograd.Function``; ``nf4.nn.QuantLinear4bit`` only holds state and
calls ``quant_lora_linear``. Gradients flow to ``x``, ``A`` and ``B``; the base (packed weight and
bias) is frozen and gets none.

Note: one pass over the output.
    An unfused adapter (``y = base(x) + (x @ A.T @ B.T) * s``) writes the [tokens, out] output
    three more times than the base matmul does (the delta, its scaled copy, the sum). Here the
    delta goes into the same buffer as the base product: the small rank-r GEMM writes
    ``b + s * (x A^T) B^T`` once and the large GEMM accumulates onto it with ``beta=1``
    (cuBLAS reads C in its epilogue, hidden under the compute of a K=4096 GEMM). Where the route
    is a fused dequantize-in-registers kernel (few tokens), the base product comes first and the
    delta is added in place with ``addmm_``.

Note: what backward keeps.
    Saved between forward and backward: the checked weight (``PackedWeight``, already resident)
    and the tensor holding its bytes, ``x * mask`` (the input itself when there is no dropout, so no copy), the dropout mask
    (bool), ``x A^T`` ([tokens, r]) and the compute-dtype copies of A and B. The dequantized
    weight is never saved: backward decodes it again into a transient buffer for
    ``dx = dy W`` and frees it at once, so no [out, in] float tensor lives between the passes.

Note: scaling in the GEMMs.
    The adapter's factor ``s = scaling / (1 - p)`` (LoRA scaling times the dropout rescale) is
    every rank-r GEMM's ``alpha``, applied to the fp32 accumulator, never a separate multiply:
    y gets ``addmm(.., xa, B^T, alpha=s)``; dA = ``s g^T (x*mask)``, dB = ``s dy^T xa`` and the
    adapter's share of dx, ``s (g A) * mask``, likewise. Where there is no input to add, addmm
    runs with ``beta=0``, which ignores that input's values (NaN included). On CUDA the
    half-precision dA/dB GEMMs write fp32 (the parameters' dtype) directly. A bf16 step with an
    fp32 adapter at 8192 tokens (no bias, no dropout) launches 12 kernels instead of 18: casts
    of A and B, x A^T, decode, adapter GEMM, base GEMM; dy B, dB, dA, decode, dx's two GEMMs
    (cuBLAS adds its own memsets and split-K reductions: 18 instead of 24 in the profiler).

Note: eager and traced calls.
    An eager call (plain tensors, not under torch.compile) takes the weight as one checked
    ``nf4.weight.PackedWeight`` (See Note: validate once there) and launches its kernels
    directly; which base product runs (a fused kernel, or decode + cuBLAS with the adapter's
    output as the GEMM's C) is the weight's route, the one ``nf4.backends.route`` gives every
    caller. A traced call (torch.compile, FakeTensor, DTensor under FSDP) is the same maths written
    with ``torch.ops.nf4.matmul`` and plain torch ops, whose autograd formulas give the same
    gradients (``quant_lora_linear``).

Note: host cost.
    At 8192 tokens a step's GPU work (0.9 ms at 4096x4096 on the H100) was shorter than the
    Python that issues it on that machine's slow CPU (1.1-1.6 ms), so each step avoids calls
    that would do nothing: a ``.to()`` to the same dtype or a reshape to the same shape still
    costs a dispatch. With the notes above, issuing a step took 0.69-0.74x the time it did
    (two runs on one H100 machine, old and new code back to back: 1.10 -> 0.81 ms and
    1.59 -> 1.10 ms).
"""
from __future__ import annotations

from typing import Optional

import torch

from nf4 import functional
from nf4.weight import PackedWeight, eager, packed_weight

# Whether autocast is on for any device: one call, where asking about x's device needs x.device
# first (the layer's hot path asks on every call).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def resolve_dtypes(x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype) of a layer call: the autocast dtype for both under autocast,
    else the layer's ``compute_dtype`` (None: the input's) and the input's dtype."""
    if not _any_autocast():
        compute = compute_dtype or x.dtype
        if compute not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"compute dtype must be float16, bfloat16 or float32, got {compute}")
        return compute, x.dtype
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype, dtype
    compute = compute_dtype or x.dtype
    if compute not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"compute dtype must be float16, bfloat16 or float32, got {compute}")
    return compute, x.dtype


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool keep-mask of x's shape (keep probability ``1 - p``), drawn from the current RNG.

    The module draws it outside the autograd function, so gradient checkpointing (which restores
    the RNG state) replays the same mask, and tests can redraw it from the same seed.
    """
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def scaled_mm(a, b, alpha, like, out_dtype):
    """``alpha * (a @ b)`` as ``out_dtype``: one GEMM, alpha applied to the fp32 accumulator.

    ``like`` is any tensor of a's dtype with the result's shape: with ``beta=0`` addmm ignores its
    input's values (NaN included) and takes only its shape. A half-precision GEMM on CUDA writes
    an fp32 result directly (the ``out_dtype`` overload, CUDA-only in torch 2.11-2.13), instead of
    rounding to half, scaling and casting in three launches. Only eager calls come here: torch
    2.11's fake-tensor decomposition of that overload fails under torch.compile."""
    if out_dtype == a.dtype:
        return torch.addmm(like, a, b, beta=0, alpha=alpha)
    if a.is_cuda and out_dtype == torch.float32:
        return torch.addmm(like, a, b, out_dtype, beta=0, alpha=alpha)
    return torch.addmm(like, a, b, beta=0, alpha=alpha).to(out_dtype)


def _lora_forward(x, bias, lora_A, lora_B, mask, weight: PackedWeight, lora_scale: float,
                  compute_dtype: torch.dtype, out_dtype: torch.dtype):
    """The layer's forward on a checked weight: (y, then what backward needs: x * mask, x A^T,
    and A, B in the compute dtype; None without an adapter)."""
    # See Note: host cost.
    in_features, out_features = weight.in_features, weight.out_features
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    if x2.dtype != compute_dtype:
        x2 = x2.to(compute_dtype)
    b = bias if bias is None or bias.dtype == compute_dtype else bias.to(compute_dtype)
    xd = xa = A = B = None
    if lora_A is not None:
        A = lora_A if lora_A.dtype == compute_dtype else lora_A.to(compute_dtype)
        B = lora_B if lora_B.dtype == compute_dtype else lora_B.to(compute_dtype)
        xd = x2 if mask is None else x2 * mask.reshape(-1, in_features)
        xa = torch.nn.functional.linear(xd, A)                           # [T, r]
    y = adapted_matmul(x2, b, xa, B, weight, lora_scale, compute_dtype)
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)), xd, xa, A, B


def adapted_matmul(x2: torch.Tensor, b: Optional[torch.Tensor], xa: Optional[torch.Tensor],
                   B: Optional[torch.Tensor], weight: PackedWeight, lora_scale: float,
                   compute_dtype: torch.dtype) -> torch.Tensor:
    """``x2 W^T + b + lora_scale * xa B^T`` as [tokens, out] in ``compute_dtype``, without autograd:
    the base product by the weight's route, the adapter's rank-r GEMM in the same output buffer.

    x2: [tokens, in], b: [out] or None, xa: [tokens, r] (``x A^T``, any strides) and B: [out, r]
    or both None, all already in ``compute_dtype``. The layer's forward and the fused LoRA blocks
    (``nf4.models.lora_blocks``, which recompute projections in backward) share it.
    """
    tokens, out_features = x2.shape[0], weight.out_features
    # See Note: scaling in the GEMMs.
    r = weight.route(tokens, compute_dtype) if tokens else None
    if r is not None and r.kernel != "dequant":
        y = weight.matmul(x2, b, r)
        if xa is not None:
            y.addmm_(xa, B.t(), alpha=lora_scale)
        return y
    W = weight.dequantize(compute_dtype)
    if xa is not None:
        # See Note: one pass over the output.
        if b is not None:
            y = torch.addmm(b, xa, B.t(), alpha=lora_scale)
        else:
            y = torch.addmm(x2.new_empty((tokens, out_features)), xa, B.t(), beta=0, alpha=lora_scale)
        y.addmm_(x2, W.t())
    else:
        y = torch.nn.functional.linear(x2, W, b)
    return y


class QuantLoraLinear(torch.autograd.Function):
    """Forward/backward of the QLoRA layer on an eager call; see the module docstring for the
    memory contract.

    Inputs: ``x``, ``lora_A``, ``lora_B``, then a tuple ``rest`` of (bias, mask, weight, source,
    lora_scale, compute_dtype, out_dtype):
        x: [..., in_features], any float dtype; output has ``out_dtype`` and shape [..., out].
        bias: [out] or None; lora_A [r, in] and lora_B [out, r], or both None (rank 0).
        mask: bool [..., in] keep-mask or None (no dropout); ``lora_scale``: scaling / (1 - p).
        weight: the checked ``PackedWeight``; source: the tensor its bytes were checked against
            (kept until backward, which checks it again if its memory changed).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, rest):
        # Only the tensors that take gradients are apply()'s own arguments: autograd.Function
        # walks every argument on each call (~1 µs apiece on the GPU machine's host), and the
        # frozen bias, the mask and the weight get no gradient.
        bias, mask, weight, source, lora_scale, compute_dtype, out_dtype = rest
        y, xd, xa, A, B = _lora_forward(x, bias, lora_A, lora_B, mask, weight, lora_scale, compute_dtype,
                                        out_dtype)
        ctx.save_for_backward(xd, xa, A, B, mask)
        ctx.weight, ctx.source = weight, source
        ctx.meta = (lora_scale, compute_dtype, x.dtype, x.shape, None if lora_A is None else lora_A.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xd, xa, A, B, mask = ctx.saved_tensors
        lora_scale, compute_dtype, x_dtype, x_shape, lora_dtype = ctx.meta
        weight = ctx.weight
        in_features, out_features = weight.in_features, weight.out_features
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, out_features)
        if dy2.dtype != compute_dtype:
            dy2 = dy2.to(compute_dtype)
        dx = dA = dB = None
        needs = ctx.needs_input_grad
        g = None
        if A is not None:
            g = dy2 @ B                                                   # [T, r]
            if needs[2]:
                dB = scaled_mm(dy2.t(), xa, lora_scale, B, lora_dtype)
            if needs[1]:
                dA = scaled_mm(g.t(), xd, lora_scale, A, lora_dtype)
        if needs[0]:
            if not weight.current(ctx.source):
                # Its memory changed since forward (FSDP gathers the weight again for backward):
                # checked again, as any call would be.
                weight = packed_weight(ctx.source, weight.state)
            W = weight.dequantize(compute_dtype)
            if A is not None:
                # The adapter's share first (rank-r GEMM writes dx once), then the base GEMM
                # accumulates onto it: one pass over dx instead of three.
                dx = torch.addmm(xd, g, A, beta=0, alpha=lora_scale)      # xd lends its shape
                if mask is not None:
                    dx.mul_(mask.reshape(-1, in_features))
                dx.addmm_(dy2, W)
            else:
                dx = dy2 @ W
            del W
            if dx.dtype != x_dtype:
                dx = dx.to(x_dtype)
            if len(x_shape) != 2:
                dx = dx.reshape(x_shape)
        return dx, dA, dB, None


def lora_linear(x: torch.Tensor, weight: PackedWeight, source: torch.Tensor, bias: Optional[torch.Tensor],
                lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], scaling: float,
                mask: Optional[torch.Tensor], dropout_scale: float, compute_dtype: torch.dtype,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The eager layer call on a checked weight: without gradients to compute, the base product
    (and adapter) run directly; otherwise through ``QuantLoraLinear``."""
    if torch.is_grad_enabled() and (x.requires_grad or (lora_A is not None and
                                                        (lora_A.requires_grad or lora_B.requires_grad))):
        return QuantLoraLinear.apply(x, lora_A, lora_B, (bias, mask, weight, source, scaling * dropout_scale,
                                                         compute_dtype, out_dtype))
    return _lora_forward(x, bias, lora_A, lora_B, mask, weight, scaling * dropout_scale, compute_dtype,
                         out_dtype)[0]


def quant_lora_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                      lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], scaling: float,
                      mask: Optional[torch.Tensor], dropout_p: float, compute_dtype: torch.dtype,
                      out_dtype: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T`` with ``W`` the 4-bit ``packed`` weight.

    ``packed`` holds the weight's bytes (any view of them); ``quant_state.shape`` is (out, in).
    ``mask`` (from ``dropout_mask``) applies dropout to the adapter's input only, as in LoRA.
    See Note: eager and traced calls.
    """
    dropout_scale = 1.0 / (1.0 - dropout_p) if mask is not None else 1.0
    if eager(x) and eager(packed):
        weight = packed_weight(packed, quant_state)
        return lora_linear(x, weight, packed, bias, lora_A, lora_B, float(scaling), mask, dropout_scale,
                           compute_dtype, out_dtype)
    return _traced_lora_linear(x, packed, quant_state, bias, lora_A, lora_B, float(scaling) * dropout_scale,
                               mask, compute_dtype, out_dtype)


def _traced_lora_linear(x, packed, quant_state, bias, lora_A, lora_B, lora_scale, mask, compute_dtype,
                        out_dtype):
    """The layer's maths through ``torch.ops.nf4.matmul`` (whose autograd formula decodes the
    weight again for dx) and plain torch ops, for traced calls. See Note: eager and traced calls."""
    out_features, in_features = quant_state.shape
    x2 = x.reshape(-1, in_features).to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    y = functional.matmul_4bit(x2, packed, quant_state, bias=b)  # traced: torch.ops.nf4.matmul
    if lora_A is not None:
        xd = x2 if mask is None else x2 * mask.reshape(-1, in_features)
        xa = torch.nn.functional.linear(xd, lora_A.to(compute_dtype))
        y = torch.addmm(y, xa, lora_B.to(compute_dtype).t(), alpha=lora_scale)
    return y.to(out_dtype).reshape(*x.shape[:-1], out_features)
