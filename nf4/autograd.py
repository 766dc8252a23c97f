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
    ``x * mask`` (the input itself when there is no dropout, so no copy), the dropout mask
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

Note: eager calls skip the op dispatch.
    An eager call runs the checks of ``torch.ops.nf4.matmul`` once per forward
    (``ops.check_matmul_inputs``, which cover decoding the weight to the compute dtype), resolves
    the backends, and calls them directly: the custom-op dispatch costs ~40 us of CPU per call,
    which the GPU waits for at small shapes. Backward decodes with the backend the forward
    resolved, without checking again: its tensors are the ones the forward checked (saved, so an
    in-place change between the passes is refused by autograd). Traced calls (torch.compile,
    tensor subclasses such as FSDP's DTensor) use the opaque ops.

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


def _eager_backends(x2, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                    nested_blocksize, quant_type, out_features, in_features, bias):
    """(matmul backend, dequantize backend) for an eager call, after every check the ops run;
    None when traced. See Note: eager calls skip the op dispatch."""
    if torch.compiler.is_compiling() or type(packed) is not torch.Tensor:
        return None  # traced (fake/functional tensors) or a tensor subclass: the opaque ops
    device = ops.check_matmul_inputs(x2, packed, absmax, nested_absmax, nested_code, offset,
                                     blocksize, nested_blocksize, quant_type, out_features,
                                     in_features, bias)
    return backends.resolve(device, "matmul"), backends.resolve(device, "dequantize")


def _dequantize(backend, wargs, dtype):
    out_features, in_features = wargs[-2:]
    args = (*wargs[:-2], [out_features, in_features], dtype)
    if backend is None:
        return torch.ops.nf4.dequantize(*args)
    return backend.dequantize(*args)


def _scaled_mm(a, b, alpha, like, out_dtype, eager: bool):
    """``alpha * (a @ b)`` as ``out_dtype``: one GEMM, alpha applied to the fp32 accumulator.

    ``like`` is any tensor of a's dtype with the result's shape: with ``beta=0`` addmm ignores its
    input's values (NaN included) and takes only its shape. A half-precision GEMM on CUDA writes
    an fp32 result directly (the ``out_dtype`` overload, CUDA-only in torch 2.11-2.13), instead of
    rounding to half, scaling and casting in three launches; only in eager calls, since torch
    2.11's fake-tensor decomposition of that overload fails under torch.compile."""
    if out_dtype == a.dtype:
        return torch.addmm(like, a, b, beta=0, alpha=alpha)
    if eager and a.is_cuda and out_dtype == torch.float32:
        return torch.addmm(like, a, b, out_dtype, beta=0, alpha=alpha)
    return torch.addmm(like, a, b, beta=0, alpha=alpha).to(out_dtype)


class QuantLoraLinear(torch.autograd.Function):
    """Forward/backward of the QLoRA layer; see the module docstring for the memory contract.

    Tensor contracts (the module checks x and the adapter; the weight's tensors are checked as
    ``torch.ops.nf4.matmul`` checks them):
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
        # See Note: host cost.
        x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
        if x2.dtype != compute_dtype:
            x2 = x2.to(compute_dtype)
        tokens = x2.shape[0]
        b = bias if bias is None or bias.dtype == compute_dtype else bias.to(compute_dtype)
        wargs = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                 quant_type, out_features, in_features)
        matmul_backend, dequantize_backend = _eager_backends(x2, *wargs, b) or (None, None)
        # See Note: scaling in the GEMMs.
        lora_scale = scaling * dropout_scale
        xd = xa = A = B = None
        if lora_A is not None:
            A = lora_A if lora_A.dtype == compute_dtype else lora_A.to(compute_dtype)
            B = lora_B if lora_B.dtype == compute_dtype else lora_B.to(compute_dtype)
            xd = x2 if mask is None else x2 * mask.reshape(-1, in_features)
            xa = torch.nn.functional.linear(xd, A)                       # [T, r]
        if tokens <= FUSED_MAX_TOKENS:
            if matmul_backend is None:
                y = torch.ops.nf4.matmul(x2, *wargs, b)
            else:
                y = matmul_backend.matmul(x2, *wargs, b)
            if A is not None:
                y.addmm_(xa, B.t(), alpha=lora_scale)
        else:
            W = _dequantize(dequantize_backend, wargs, compute_dtype)
            if A is not None:
                # See Note: one pass over the output.
                if b is not None:
                    y = torch.addmm(b, xa, B.t(), alpha=lora_scale)
                else:
                    y = torch.addmm(x2.new_empty((tokens, out_features)), xa, B.t(), beta=0,
                                    alpha=lora_scale)
                y.addmm_(x2, W.t())
            else:
                y = torch.nn.functional.linear(x2, W, b)
            del W
        ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset, xd, xa, A, B, mask)
        ctx.meta = (blocksize, nested_blocksize, quant_type, out_features, in_features, lora_scale,
                    compute_dtype, x.dtype, x.shape, None if lora_A is None else lora_A.dtype,
                    dequantize_backend)
        if y.dtype != out_dtype:
            y = y.to(out_dtype)
        if x.dim() == 2 and dequantize_backend is not None:
            return y
        # Traced, y is returned as a view even when the shape is unchanged: torch 2.11's dynamo
        # gives zero gradients through an autograd.Function whose output the forward mutated in
        # place (addmm_ above) and returned as is (seen on the H100 machine; 2.13 is fine).
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, nested_absmax, nested_code, offset, xd, xa, A, B, mask = ctx.saved_tensors
        (blocksize, nested_blocksize, quant_type, out_features, in_features, lora_scale,
         compute_dtype, x_dtype, x_shape, lora_dtype, dequantize_backend) = ctx.meta
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, out_features)
        if dy2.dtype != compute_dtype:
            dy2 = dy2.to(compute_dtype)
        dx = dA = dB = None
        needs = ctx.needs_input_grad
        eager = dequantize_backend is not None
        g = None
        if A is not None:
            g = dy2 @ B                                                   # [T, r]
            if needs[8]:
                dB = _scaled_mm(dy2.t(), xa, lora_scale, B, lora_dtype, eager)
            if needs[7]:
                dA = _scaled_mm(g.t(), xd, lora_scale, A, lora_dtype, eager)
        if needs[0]:
            wargs = (packed, absmax, nested_absmax, nested_code, offset, blocksize,
                     nested_blocksize, quant_type, out_features, in_features)
            W = _dequantize(dequantize_backend, wargs, compute_dtype)
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
