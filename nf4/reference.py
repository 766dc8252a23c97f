"""Pure-PyTorch reference engine: the oracle every kernel is tested against.

Plain tensor operations, no custom kernels, so it runs on any device (the ops layer sends it CPU
tensors by default). Each function takes and returns flat tensors; shapes, QuantState and input
validation live in ``nf4.ops`` / ``nf4.functional``.

Note: reciprocal scaling.
    Values are scaled by ``x * (1 / absmax)`` in float32, not ``x / absmax``: the product of a
    reciprocal is what bitsandbytes computes, and the two differ in the last bit often enough to
    move values that sit on a decision threshold. bitsandbytes' CUDA build goes further and uses an
    approximate reciprocal with denormals flushed; the CPU reference keeps the IEEE one, so a few
    threshold ties differ from bnb's GPU bytes by one code (see tests/fixtures/README.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nf4 import codebook


def _pad_to_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    return F.pad(flat, (0, pad)) if pad else flat


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 max |x| of each block of ``blocksize`` consecutive elements (last block partial)."""
    return _pad_to_blocks(flat.float(), blocksize).view(-1, blocksize).abs().amax(dim=1)


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x * (1/absmax) per block; a block whose absmax is 0 scales to NaN, which no threshold
    accepts, so it encodes as code 0 everywhere, as bitsandbytes stores such blocks."""
    inv = torch.reciprocal(absmax)  # 1/0 = inf, and 0 * inf = NaN
    blocks = _pad_to_blocks(flat.float(), blocksize).view(-1, blocksize)
    return (blocks * inv[:, None]).reshape(-1)[: flat.numel()]


def encode(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (uint8, one per element) of values already scaled into [-1, 1]."""
    nan = torch.isnan(scaled)
    if quant_type == "nf4":
        # bucketize(right=False) counts thresholds strictly below x: x > t takes the upper code.
        codes = torch.bucketize(scaled, codebook.nf4_thresholds().to(scaled.device))
    else:
        codebook.check_quant_type(quant_type)
        idx = torch.bucketize(scaled.abs(), codebook.fp4_thresholds().to(scaled.device))
        codes = codebook.fp4_sorted_codes().to(scaled.device).long()[idx]
        codes = codes | torch.where(scaled < 0, codebook.FP4_SIGN_BIT, 0)
    return torch.where(nan, 0, codes).to(torch.uint8)


def pack(codes: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Two codes per byte: element 2j in the high nibble, 2j+1 in the low one; an odd count pads
    the last low nibble with the code of 0.0."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), codebook.zero_code(quant_type))])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``numel`` codes as int64 indices."""
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


def quantize(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` (any shape, fp32/fp16/bf16) to (packed uint8 [ceil(n/2)], absmax float32 [blocks])."""
    flat = A.reshape(-1)
    absmax = blockwise_absmax(flat, blocksize)
    codes = encode(_scale_blocks(flat, absmax, blocksize), quant_type)
    return pack(codes, quant_type), absmax


def quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = codebook.NESTED_BLOCKSIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (uint8 codes, float32 nested absmax, float32 offset (0-dim)).

    The mean of all absmax values is subtracted, then the centred values are quantized blockwise
    with the signed dynamic map to the nearest value (x above a float32 midpoint: upper code)."""
    offset = absmax.mean()
    centred = absmax - offset
    nested_absmax = blockwise_absmax(centred, nested_blocksize)
    scaled = _scale_blocks(centred, nested_absmax, nested_blocksize)
    thresholds = codebook.dynamic_map_thresholds().to(absmax.device)
    # A block of identical absmax values centres to zeros: scaled is NaN there (See
    # codebook.NESTED_FLAT_CODE); it decodes back to the offset whatever the code.
    codes = torch.where(torch.isnan(scaled), codebook.NESTED_FLAT_CODE,
                        torch.bucketize(scaled, thresholds))
    return codes.to(torch.uint8), nested_absmax, offset


def dequantize_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                      offset: torch.Tensor, nested_blocksize: int) -> torch.Tensor:
    """float32 absmax from double-quantized codes: ``code[q] * nested_absmax[block]``, then
    ``+ offset`` as a separate rounding (bitsandbytes adds the offset in a second pass)."""
    scale = nested_absmax.repeat_interleave(nested_blocksize)[: codes.numel()]
    return nested_code.float()[codes.long()] * scale + offset.float().reshape(())


# Note: byte-pair decoding.
#     Each packed byte b holds two codes (b >> 4 for element 2j, b & 15 for 2j+1), so a 256-entry
#     table of their two float32 levels, stored as one int64 per byte (the pair's bits, moved
#     without float arithmetic), decodes a byte with one gather: no shifts, no int64 code tensor,
#     no per-element scale tensor. The decoded levels are scaled per block in place in float32
#     and then rounded once to the output dtype, as the per-element formula
#     ``(level[code] * absmax[block]).to(dtype)`` does, so the result is bit-identical to it
#     (tests/test_reference.py). torch.mul into a bf16 ``out`` is no cheaper: it multiplies into
#     a float32 temporary and casts (the in-place scale measured 1.35x faster). 4096x4096 to bf16
#     on 2 idle cores: 205 -> 68 ms (bench/RESULTS.md, cpu section).
_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def pair_levels(quant_type: str, device: torch.device) -> torch.Tensor:
    """int64 [256]: entry b is the float32 pair (level[b >> 4], level[b & 15]) in memory order."""
    key = (quant_type, torch.device(device))
    table = _PAIR_TABLES.get(key)
    if table is None:
        levels = codebook.levels(quant_type)
        byte = torch.arange(256)
        pairs = torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1).contiguous()
        table = pairs.view(torch.int64).reshape(256).to(device)
        _PAIR_TABLES[key] = table
    return table


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
               numel: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat tensor of ``numel`` values in ``dtype``: ``level[code] * absmax[block]`` in float32,
    rounded once to ``dtype`` (see Note: byte-pair decoding); into ``out`` (``numel`` contiguous
    elements of ``dtype``) when given."""
    # int32 indices: half the bytes of int64 ones, and index_select takes either.
    pairs = pair_levels(quant_type, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    values = pairs.view(torch.float32)  # a fresh buffer: scaled in place (no second float32 copy)
    scale = absmax.float()
    full = numel - numel % blocksize
    values[:full].view(-1, blocksize).mul_(scale[: full // blocksize, None])
    if full < numel:  # the last, partial block
        values[full:numel].mul_(scale[full // blocksize])
    values = values[:numel]
    if out is None:
        return values if dtype == torch.float32 else values.to(dtype)
    return out.view(-1).copy_(values)


def matmul(A: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``A @ W.T + bias`` with the dequantized weight ``W`` [out, in] already in A's dtype."""
    return F.linear(A, W, bias)
