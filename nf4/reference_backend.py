"""The reference engine behind the backend protocol shared with ``nf4.kernels`` and
``nf4.cuda_backend``: ``quantize``, ``dequantize`` and ``matmul`` with the ops' signatures."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from nf4 import reference


def quantize(A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    packed, absmax = reference.quantize(A, blocksize, quant_type)
    if not double_quant:
        return packed, absmax, absmax.new_empty(0), absmax.new_zeros(())
    codes, nested_absmax, offset = reference.quantize_absmax(absmax)
    return packed, codes, nested_absmax, offset


def full_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize):
    if nested_absmax is None:
        return absmax
    return reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
               nested_blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    scale = full_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    numel = math.prod(shape)
    if out is None:
        return reference.dequantize(packed, scale, blocksize, quant_type, numel, dtype).view(shape)
    if out.is_contiguous():  # straight into the caller's buffer, no intermediate copy
        reference.dequantize(packed, scale, blocksize, quant_type, numel, dtype, out=out)
    else:
        out.copy_(reference.dequantize(packed, scale, blocksize, quant_type, numel, dtype).view(shape))
    return out


def route(dtype, tokens, out_features, in_features, blocksize, device):
    """(kernel, config) of ``nf4.backends.route``: the reference always decodes, then F.linear."""
    return "dequant", None


def matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
           quant_type, out_features, in_features, bias, config=None):
    W = dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                   quant_type, (out_features, in_features), A.dtype)
    return reference.matmul(A, W, bias)
