"""Blockwise 4-bit quantization in Triton (the ``triton`` backend's ``quantize``).

Same results as ``nf4.reference`` (see its Note: reciprocal scaling): the reciprocal of absmax is
taken with IEEE rounding (``div_rn``), so the GPU and the interpreter both match the reference
byte for byte; the tables come from ``nf4.codebook`` as kernel arguments.

    quantize(A, blocksize, quant_type, double_quant)
        -> (packed uint8 [ceil(n/2)], absmax, nested_absmax, offset)   (backend protocol)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tables import dense, device_tables
from nf4 import codebook
from nf4.quant_state import num_blocks, packed_nbytes

# Elements one program quantizes (several blocks when they are small): 4096 keeps a program's
# tile at 16 values per thread with 8 warps, and cuts the interpreter's per-program overhead.
_ELEMS_PER_PROGRAM = 4096


@triton.jit
def _quantize_kernel(a_ptr, packed_ptr, absmax_ptr, thr_ptr, fp4_codes_ptr, n, nbytes, nblocks,
                     BLOCKSIZE: tl.constexpr,   # elements per absmax block
                     ROWS: tl.constexpr,        # blocks per program
                     IS_NF4: tl.constexpr,      # nf4 (15 thresholds) or fp4 (7 on |x| + sign)
                     ZERO_CODE: tl.constexpr):  # code of 0.0, pads the low nibble of an odd n
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]   # [ROWS, 1]
    pair = tl.arange(0, HALF)[None, :]                                           # [1, HALF]
    even = block * BLOCKSIZE + 2 * pair
    even_ok = even < n
    odd_ok = (even + 1) < n
    x0 = tl.load(a_ptr + even, mask=even_ok, other=0.0).to(tl.float32)
    x1 = tl.load(a_ptr + even + 1, mask=odd_ok, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))   # [ROWS]
    tl.store(absmax_ptr + tl.reshape(block, [ROWS]), amax, mask=tl.reshape(block, [ROWS]) < nblocks)
    # 1/0 = inf and 0 * inf = NaN: a zero block scales to NaN, which no threshold accepts (code 0).
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), amax)[:, None]
    s0 = x0 * inv
    s1 = x1 * inv
    c0 = tl.zeros([ROWS, HALF], tl.int32)
    c1 = tl.zeros([ROWS, HALF], tl.int32)
    if IS_NF4:
        for i in tl.static_range(15):
            t = tl.load(thr_ptr + i)
            c0 += (s0 > t).to(tl.int32)
            c1 += (s1 > t).to(tl.int32)
    else:
        for i in tl.static_range(7):
            t = tl.load(thr_ptr + i)
            c0 += (tl.abs(s0) > t).to(tl.int32)
            c1 += (tl.abs(s1) > t).to(tl.int32)
        c0 = tl.load(fp4_codes_ptr + c0).to(tl.int32) | tl.where(s0 < 0, 8, 0)
        c1 = tl.load(fp4_codes_ptr + c1).to(tl.int32) | tl.where(s1 < 0, 8, 0)
    c1 = tl.where(odd_ok, c1, ZERO_CODE)
    byte = block * HALF + pair
    tl.store(packed_ptr + byte, ((c0 << 4) | c1).to(tl.uint8), mask=byte < nbytes)


@triton.jit
def _quantize_absmax_kernel(absmax_ptr, offset_ptr, codes_ptr, nested_ptr, thr_ptr, nblocks,
                            NESTED_BLOCKSIZE: tl.constexpr,  # absmax values per nested block (256)
                            FLAT_CODE: tl.constexpr):        # codebook.NESTED_FLAT_CODE
    nb = tl.program_id(0).to(tl.int64)
    idx = nb * NESTED_BLOCKSIZE + tl.arange(0, NESTED_BLOCKSIZE)
    ok = idx < nblocks
    centred = tl.load(absmax_ptr + idx, mask=ok, other=0.0) - tl.load(offset_ptr)
    centred = tl.where(ok, centred, 0.0)
    amax = tl.max(tl.abs(centred), axis=0)
    tl.store(nested_ptr + nb, amax)
    scaled = centred * tl.math.div_rn(1.0, amax)
    # Binary search over the 255 ascending midpoints: code = number of thresholds t with x > t.
    code = tl.zeros([NESTED_BLOCKSIZE], tl.int32)
    for step in tl.static_range(7, -1, -1):
        cand = code + (1 << step)
        code = tl.where(scaled > tl.load(thr_ptr + cand - 1), cand, code)
    # NaN (a block of identical absmax values): bnb's code, it decodes to offset whatever it is.
    code = tl.where(scaled != scaled, FLAT_CODE, code)
    tl.store(codes_ptr + idx, code.to(tl.uint8), mask=ok)


def quantize(A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    """Backend protocol: ``A`` is fp32/fp16/bf16 with at least one element (ops.py checks); a 1-D
    expanded ``A`` stays stride 0 through ``reshape``, so it is made dense here too."""
    flat = dense(A).reshape(-1)
    n = flat.numel()
    blocks = num_blocks(n, blocksize)
    packed = torch.empty(packed_nbytes(n), dtype=torch.uint8, device=A.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=A.device)
    t = device_tables(A.device)
    rows = max(1, _ELEMS_PER_PROGRAM // blocksize)
    is_nf4 = quant_type == "nf4"
    _quantize_kernel[(triton.cdiv(blocks, rows),)](
        flat, packed, absmax, t.nf4_thresholds if is_nf4 else t.fp4_thresholds, t.fp4_sorted_codes,
        n, packed.numel(), blocks, BLOCKSIZE=blocksize, ROWS=rows, IS_NF4=is_nf4,
        ZERO_CODE=codebook.zero_code(quant_type), num_warps=8 if rows * blocksize >= 4096 else 4)
    if not double_quant:
        return packed, absmax, absmax.new_empty(0), absmax.new_zeros(())
    # The mean is torch's, as in the reference, so that offset agrees to the bit (a Triton
    # reduction would sum in another order and move codes that sit on a threshold).
    offset = absmax.mean()
    nbs = codebook.NESTED_BLOCKSIZE
    codes = torch.empty(blocks, dtype=torch.uint8, device=A.device)
    nested = torch.empty(num_blocks(blocks, nbs), dtype=torch.float32, device=A.device)
    _quantize_absmax_kernel[(nested.numel(),)](
        absmax, offset, codes, nested, t.dynamic_thresholds, blocks, NESTED_BLOCKSIZE=nbs,
        FLAT_CODE=codebook.NESTED_FLAT_CODE)
    return packed, codes, nested, offset
