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
    (cuBLAS reads C in its epilogue, hidden under the compute of a K=4096 GEMM). For few tokens,
    where the fused dequantize-in-registers kernel of ``torch.ops.nf4.matmul`` wins, the base
    product comes first and the delta is added in place with ``addmm_``.

Note: what backward keeps.
    Saved between forward and backward: the packed weight and its state (already resident),
    ``dropout(x)`` (the input itself when there is no dropout, so no copy), the dropout mask
    (bool), ``x A^T`` ([tokens, r]) and the compute-dtype copies of A and B. The dequantized
    weight is never saved: backward decodes it again into a transient buffer for
    ``dx = dy W`` and frees it at once, so no [out, in] float tensor lives between the passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from nf4 import backends, codebook, ops

# Up to this many tokens the base product uses the fused dequantize-matmul op (memory-bound
# regime: it reads 0.5 byte per weight instead of writing and re-reading 2); above it, the weight
# is decoded once into a transient buffer and cuBLAS runs at full tensor-core rate.
FUSED_MAX_TOKENS = 64


def resolve_dtypes(x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype) of a layer call: the autocast dtype for both under autocast,
    else the layer's ``compute_dtype`` (None: the input's) and the input's dtype."""
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


def _dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                quant_type, out_features, in_features, dtype):
    args = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
            quant_type, [out_features, in_features], dtype)
    if torch.compiler.is_compiling() or type(packed) is not torch.Tensor:
        return torch.ops.nf4.dequantize(*args)  # traced (fake/functional tensors): the opaque op
    # Eager: the same checks the op runs, then the backend directly. The custom-op dispatch costs
    # ~40 us of CPU per call here, twice a step, which the GPU waits for at small shapes.
    device = ops.check_dequantize_args(*args)
    return backends.resolve(device, "dequantize").dequantize(*args)


class QuantLoraLinear(torch.autograd.Function):
    """Forward/backward of the QLoRA layer; see the module docstring for the memory contract.

    Tensor contracts (the module checks them; this function trusts its caller):
        x: [..., in_features], any float dtype; output has ``out_dtype`` and shape [..., out].
        packed: uint8 [ceil(out*in/2)]; absmax, nested_absmax, nested_code, offset: the
            QuantState tensors as ``torch.ops.nf4.dequantize`` takes them (None when not nested).
        bias: [out] or None; lora_A [r, in] and lora_B [out, r], or both None (rank 0).
        mask: bool [..., in] keep-mask or None (no dropout); ``dropout_scale`` = 1 / (1 - p).
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_A, lora_B,
                mask, blocksize: int, nested_blocksize: int, quant_type: str, out_features: int,
                in_features: int, scaling: float, dropout_scale: float,
                compute_dtype: torch.dtype, out_dtype: torch.dtype):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features).to(compute_dtype)
        tokens = x2.shape[0]
        b = None if bias is None else bias.to(compute_dtype)
        has_lora = lora_A is not None
        wargs = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                 quant_type, out_features, in_features)
        xd = xa = A = B = None
        if has_lora:
            A = lora_A.to(compute_dtype)
            B = lora_B.to(compute_dtype)
            xd = x2 if mask is None else x2 * mask.reshape(-1, in_features) * dropout_scale
            xa = xd @ A.t()                                              # [T, r]
        if tokens <= FUSED_MAX_TOKENS:
            y = torch.ops.nf4.matmul(x2, *wargs, b)
            if has_lora:
                y.addmm_(xa, B.t(), alpha=scaling)
        else:
            W = _dequantize(*wargs, compute_dtype)
            if has_lora:
                # See Note: one pass over the output.
                y = (torch.addmm(b, xa, B.t(), alpha=scaling) if b is not None
                     else torch.mm(xa * scaling, B.t()))
                y.addmm_(x2, W.t())
            elif b is not None:
                y = torch.addmm(b, x2, W.t())
            else:
                y = x2 @ W.t()
            del W
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset, xd, xa, A, B, mask)
        ctx.meta = (blocksize, nested_blocksize, quant_type, out_features, in_features, scaling,
                    dropout_scale, compute_dtype, x.dtype, x.shape,
                    None if lora_A is None else lora_A.dtype)
        return y.to(out_dtype).reshape(*lead, out_features)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, nested_absmax, nested_code, offset, xd, xa, A, B, mask = ctx.saved_tensors
        (blocksize, nested_blocksize, quant_type, out_features, in_features, scaling,
         dropout_scale, compute_dtype, x_dtype, x_shape, lora_dtype) = ctx.meta
        dy2 = dy.reshape(-1, out_features).to(compute_dtype)
        dx = dA = dB = None
        has_lora = A is not None
        g = None
        if has_lora:
            g = dy2 @ B                                                   # [T, r]
            if ctx.needs_input_grad[8]:
                dB = torch.mm(dy2.t(), xa).mul_(scaling).to(lora_dtype)
            if ctx.needs_input_grad[7]:
                dA = torch.mm(g.t(), xd).mul_(scaling).to(lora_dtype)
        if ctx.needs_input_grad[0]:
            W = _dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                            nested_blocksize, quant_type, out_features, in_features, compute_dtype)
            if has_lora:
                # The adapter's share first (rank-r GEMM writes dx once), then the base GEMM
                # accumulates onto it: one pass over dx instead of three.
                dx = torch.mm(g * scaling, A)                             # g is [T, r]: cheap
                if mask is not None:
                    dx.mul_(mask.reshape(-1, in_features)).mul_(dropout_scale)
                dx.addmm_(dy2, W)
            else:
                dx = dy2 @ W
            del W
            dx = dx.to(x_dtype).reshape(x_shape)
        return (dx, None, None, None, None, None, None, dA, dB, None, None, None, None, None, None,
                None, None, None, None)


def quant_lora_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                      lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], scaling: float,
                      mask: Optional[torch.Tensor], dropout_p: float, compute_dtype: torch.dtype,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """``x W^T + b + scaling * dropout(x) A^T B^T`` with ``W`` the 4-bit ``packed`` weight.

    ``packed`` is the flat uint8 view of the weight's bytes; ``quant_state.shape`` is (out, in).
    ``mask`` (from ``dropout_mask``) applies dropout to the adapter's input only, as in LoRA.
    """
    out_features, in_features = quant_state.shape
    if quant_state.nested:
        nested = (quant_state.state2.absmax, quant_state.state2.code, quant_state.offset)
        nested_blocksize = quant_state.state2.blocksize
    else:
        nested = (None, None, None)
        nested_blocksize = codebook.NESTED_BLOCKSIZE
    dropout_scale = 1.0 / (1.0 - dropout_p) if mask is not None else 1.0
    return QuantLoraLinear.apply(x, packed, quant_state.absmax, *nested, bias, lora_A, lora_B, mask,
                                 quant_state.blocksize, nested_blocksize, quant_state.quant_type,
                                 out_features, in_features, float(scaling), dropout_scale,
                                 compute_dtype, out_dtype)
