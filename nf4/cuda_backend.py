"""The ``cuda`` backend: the compiled extension ``nf4._C`` behind the backend protocol
(``quantize``, ``dequantize``, ``matmul`` with the signatures of ``nf4.reference_backend``).

Importing this module raises ImportError when ``nf4._C`` was not built, so that
``nf4.backends`` falls back to another backend.

The extension takes raw device pointers, element counts, the device index and the current
stream's handle, and returns a status code; this module owns allocation and turns a non-OK
status into an exception naming the sizes. Metadata has been validated by ``nf4.ops`` already;
the extension checks pointers, sizes and 32-bit grid limits again before any launch.

Note: double-quantization offset.
    The offset is ``absmax.mean()`` computed by torch on the GPU, between the two quantize
    launches, because that is the reduction bitsandbytes uses: its result (and hence every nested
    code) then matches bnb bit for bit. The CPU reference's mean may differ in the last bit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nf4 import _C, codebook
from nf4.quant_state import num_blocks, packed_nbytes

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_QUANT_TYPE_CODES = {"nf4": 0, "fp4": 1}

# Encoder cells (see EncodeTable in csrc/common.cuh): cell k = floor(key * 16 + offset) mod 64 with
# key = x in [-1, 1] (NF4, offset 16) or |x| in [0, 1] (FP4, offset 0). 1/16 is narrower than the
# closest pair of thresholds (FP4's 0.208 and 0.292, 0.083 apart), so a cell holds at most one.
ENCODE_CELLS = 64
CELL_SCALE = 16.0
CELL_OFFSET = {"nf4": 16.0, "fp4": 0.0}


def encode_cells(thresholds: Sequence[float], offset: float) -> tuple[list[float], list[int]]:
    """(inside, below) per cell: the threshold inside it (+inf if none) and the number below it.

    Cell k covers keys in [(j - offset) / 16, (j + 1 - offset) / 16) with j = k, or j = k - 64 for
    k >= 48 (a negative floor wraps around; NaN's bits 0x7fffffff land in k = 63, j = -1)."""
    inside, below = [], []
    for k in range(ENCODE_CELLS):
        j = k if k < ENCODE_CELLS * 3 // 4 else k - ENCODE_CELLS
        lo, hi = (j - offset) / CELL_SCALE, (j + 1 - offset) / CELL_SCALE
        within = [t for t in thresholds if lo <= t < hi]
        if len(within) > 1:
            raise ValueError(f"encoder cell [{lo}, {hi}) holds {len(within)} thresholds {within}; "
                             f"cells must be narrower than the closest pair of thresholds")
        inside.append(within[0] if within else math.inf)
        below.append(sum(t < lo for t in thresholds))
    return inside, below


def _encode_table(quant_type: str) -> "_C.EncodeTable":
    if quant_type == "nf4":
        thresholds = codebook.nf4_thresholds().tolist()
    else:
        thresholds = codebook.fp4_thresholds().tolist()
    inside, below = encode_cells(thresholds, CELL_OFFSET[quant_type])
    fp4_codes = sum(int(c) << (4 * i) for i, c in enumerate(codebook.fp4_sorted_codes().tolist()))
    return _C.EncodeTable(inside, below, CELL_SCALE, CELL_OFFSET[quant_type], fp4_codes,
                          codebook.zero_code(quant_type))


# Tables for the kernels, built once from nf4.codebook (the kernels hold no copy of their own).
_ENCODE = {qt: _encode_table(qt) for qt in codebook.QUANT_TYPES}
_DECODE = {qt: _C.DecodeTable(codebook.levels(qt).tolist()) for qt in codebook.QUANT_TYPES}
_NESTED = _C.NestedTable(codebook.dynamic_map_thresholds().tolist() + [math.inf],
                         codebook.dynamic_zero_code())


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check(status, op: str, **sizes) -> None:
    if status == _C.Status.OK:
        return
    detail = ", ".join(f"{k}={v}" for k, v in sizes.items())
    why = status.name
    if status in (_C.Status.LAUNCH_FAILED, _C.Status.BAD_DEVICE):
        why += f" ({_C.last_cuda_error()})"
    raise RuntimeError(f"nf4 CUDA {op} failed: {why} for {detail}")


def _require_cuda(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got {name} on {t.device}")


def quantize(A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    _require_cuda(A, "A")
    A = A.contiguous()
    n = A.numel()
    blocks = num_blocks(n, blocksize)
    device = A.device
    packed = torch.empty(packed_nbytes(n), dtype=torch.uint8, device=device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    stream = _stream(device)
    status = _C.quantize(A.data_ptr(), _DTYPE_CODES[A.dtype], n, blocksize, _QUANT_TYPE_CODES[quant_type],
                         packed.data_ptr(), absmax.data_ptr(), _ENCODE[quant_type], device.index, stream)
    _check(status, "quantize", n=n, dtype=A.dtype, blocksize=blocksize, quant_type=quant_type)
    if not double_quant:
        return packed, absmax, absmax.new_empty(0), absmax.new_zeros(())
    # See Note: double-quantization offset.
    offset = absmax.mean()
    nested_bs = codebook.NESTED_BLOCKSIZE
    codes = torch.empty(blocks, dtype=torch.uint8, device=device)
    nested_absmax = torch.empty(num_blocks(blocks, nested_bs), dtype=torch.float32, device=device)
    status = _C.quantize_absmax(absmax.data_ptr(), blocks, offset.data_ptr(), nested_bs, codes.data_ptr(),
                                nested_absmax.data_ptr(), _NESTED, device.index, stream)
    _check(status, "quantize (nested absmax)", blocks=blocks, nested_blocksize=nested_bs)
    return packed, codes, nested_absmax, offset


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
               nested_blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    _require_cuda(packed, "packed")
    n = math.prod(shape)
    device = packed.device
    if out is None:
        out = torch.empty(list(shape), dtype=dtype, device=device)
    packed = packed.contiguous()
    absmax = absmax.contiguous()
    nested = nested_absmax is not None
    if nested:
        nested_absmax = nested_absmax.contiguous()
        nested_code = nested_code.contiguous()
        offset = offset.contiguous()
    status = _C.dequantize(packed.data_ptr(), n, blocksize, absmax.data_ptr(), nested,
                           nested_absmax.data_ptr() if nested else 0,
                           nested_code.data_ptr() if nested else 0,
                           offset.data_ptr() if nested else 0, nested_blocksize if nested else 0,
                           out.data_ptr(), _DTYPE_CODES[dtype], _DECODE[quant_type], device.index,
                           _stream(device))
    _check(status, "dequantize", n=n, shape=list(shape), dtype=dtype, blocksize=blocksize,
           quant_type=quant_type, nested=nested)
    return out


def matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
           quant_type, out_features, in_features, bias):
    """``A @ W.T + bias``: this backend's dequantize, then cuBLAS through F.linear (the
    large-batch path; the fused small-batch kernel is Triton's)."""
    W = dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                   quant_type, (out_features, in_features), A.dtype)
    return F.linear(A, W, bias)
