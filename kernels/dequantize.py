"""Blockwise 4-bit dequantization in Triton (the ``triton`` backend's ``dequantize``).

One pass: each program reads packed bytes and their absmax (decoding double-quantized absmax in
the same kernel) and writes ``level[code] * absmax`` in float32, cast to the output dtype; element
2j comes from the high nibble of byte j. Bit for bit the reference: the nested absmax is
``code * nested_absmax`` and then ``+ offset`` as a second rounding, so the kernels are compiled
without FMA contraction (``enable_fp_fusion=False``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .tables import dense, device_tables

# Packed bytes one program decodes (4096 outputs): 16 outputs per thread with 8 warps.
_BYTES_PER_PROGRAM = 2048


@triton.jit
def decode_absmax(raw, block, mask, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                  NESTED: tl.constexpr,             # raw holds uint8 codes of the dynamic map
                  NESTED_BLOCKSIZE: tl.constexpr):  # absmax codes per nested_absmax value
    """float32 absmax from what ``absmax_ptr`` holds at ``block`` (``raw``, already loaded)."""
    if NESTED:
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + raw.to(tl.int32)) * scale + tl.load(offset_ptr)
    else:
        return raw


@triton.jit
def block_absmax(absmax_ptr, block, mask, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """float32 absmax of the blocks ``block`` (any shape), decoding double quantization."""
    raw = tl.load(absmax_ptr + block, mask=mask, other=0)
    return decode_absmax(raw, block, mask, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                         NESTED, NESTED_BLOCKSIZE)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even. bf16 is rounded with integer ops because Triton's
    interpreter truncates fp32 -> bf16 (it would differ from the reference in ~half the values);
    on the GPU this is the same result as cvt.rn.bf16.f32."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                       levels_ptr, out_ptr, numel, nblocks,
                       BLOCKSIZE: tl.constexpr,         # elements per absmax block
                       ROWS: tl.constexpr,              # absmax blocks per program
                       NESTED: tl.constexpr,            # double-quantized absmax
                       NESTED_BLOCKSIZE: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)                 # [ROWS]
    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]                         # [ROWS, HALF]
    # numel may be odd: the last byte's low nibble is padding, and no byte lies past (numel+1)//2.
    p = tl.load(packed_ptr + byte, mask=2 * byte < numel, other=0).to(tl.int32)
    scale = block_absmax(absmax_ptr, block, block < nblocks, nested_absmax_ptr, nested_code_ptr,
                         offset_ptr, NESTED, NESTED_BLOCKSIZE)[:, None]
    hi = tl.load(levels_ptr + (p >> 4)) * scale
    lo = tl.load(levels_ptr + (p & 15)) * scale
    vals = tl.reshape(tl.join(hi, lo), [ROWS, BLOCKSIZE])
    elem = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, round_to(vals, out_ptr.dtype.element_ty), mask=elem < numel)


def launch_dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                      nested_blocksize, quant_type, numel, out):
    """Decode ``numel`` values into the contiguous tensor ``out`` (any float dtype)."""
    nblocks = absmax.numel()
    rows = max(1, _BYTES_PER_PROGRAM // (blocksize // 2))
    nested = nested_absmax is not None
    levels = device_tables(packed.device).levels(quant_type)
    _dequantize_kernel[(triton.cdiv(nblocks, rows),)](
        packed, absmax, nested_absmax if nested else absmax, nested_code if nested else levels,
        offset if nested else levels, levels, out, numel, nblocks, BLOCKSIZE=blocksize, ROWS=rows,
        NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize, num_warps=8, enable_fp_fusion=False)
    return out


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
               nested_blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Backend protocol; ops.py has checked every size, dtype and device, not the layout: every
    input is made dense here (``out`` is contiguous: ops.py checks it)."""
    if out is None:
        out = torch.empty(list(shape), dtype=dtype, device=packed.device)
    launch_dequantize(dense(packed).reshape(-1), dense(absmax), dense(nested_absmax),
                      dense(nested_code), dense(offset), blocksize, nested_blocksize, quant_type,
                      math.prod(shape), out)
    return out
