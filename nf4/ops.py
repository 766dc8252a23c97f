"""The ``torch.library`` custom ops: one entry point per operation, whatever the backend.

    torch.ops.nf4.quantize(A, blocksize, quant_type, double_quant)
        -> (packed uint8 [ceil(n/2)], absmax, nested_absmax, offset)
    torch.ops.nf4.dequantize(packed, absmax, nested_absmax?, nested_code?, offset?, blocksize,
                             nested_blocksize, quant_type, shape, dtype) -> Tensor[shape]
    torch.ops.nf4.dequantize_out(..., out)            (writes into ``out``)
    torch.ops.nf4.matmul(A, packed, absmax, nested_absmax?, nested_code?, offset?, blocksize,
                         nested_blocksize, quant_type, out_features, in_features, bias?)
        -> A @ W.T + bias, in A's dtype

Tensor contracts (checked here, before any backend runs; metadata only, no device sync):
    A: float32/float16/bfloat16, at least one element, any shape.
    packed: uint8, exactly ceil(prod(shape) / 2) elements.
    absmax: float32 [ceil(n / blocksize)]; with double quantization uint8 codes of that length,
        plus nested_absmax float32 [ceil(blocks / nested_blocksize)], nested_code float32 [256] and
        offset float32 (one element).
    Every tensor on one device.
Each op has a fake (meta) implementation, so ``torch.compile`` traces through it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from nf4 import backends, codebook
from nf4.quant_state import check_blocksize, check_float_dtype, num_blocks, packed_nbytes


# ------------------------------------------------------------------------------------ checks
def _check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    # A loop rather than a set of devices: it runs on every layer call, and builds nothing
    # unless the devices differ.
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError("nf4: tensors on different devices: "
                             + ", ".join(f"{k} on {v.device}" for k, v in tensors.items()
                                         if v is not None))
    return device


def check_quantize_args(A: torch.Tensor, blocksize: int, quant_type: str) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a tensor, got {type(A).__name__}")
    check_float_dtype(A.dtype, "A.dtype")
    if A.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(A.shape)})")
    check_blocksize(blocksize)
    codebook.check_quant_type(quant_type)


def check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                          nested_blocksize, quant_type, shape, dtype) -> torch.device:
    check_blocksize(blocksize)
    codebook.check_quant_type(quant_type)
    check_float_dtype(dtype, "dtype")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative, got {list(shape)}")
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"shape {list(shape)} has no elements")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.numel() != packed_nbytes(numel):
        raise ValueError(f"packed has {packed.numel()} bytes, expected {packed_nbytes(numel)} for "
                         f"shape {list(shape)}")
    blocks = num_blocks(numel, blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax has {absmax.numel()} values, expected {blocks} for shape "
                         f"{list(shape)} with blocksize {blocksize}")
    nested = nested_absmax is not None
    if nested:
        if nested_code is None or offset is None:
            raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"double-quantized absmax must be uint8 codes, got {absmax.dtype}")
        check_blocksize(nested_blocksize, "nested_blocksize")
        want = num_blocks(blocks, nested_blocksize)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != want:
            raise ValueError(f"nested_absmax must be float32 [{want}], got {nested_absmax.dtype} "
                             f"{list(nested_absmax.shape)}")
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(f"nested_code must be float32 [256], got {nested_code.dtype} "
                             f"{list(nested_code.shape)}")
        if offset.dtype != torch.float32 or offset.numel() != 1:
            raise ValueError(f"offset must be one float32 value, got {offset.dtype} {list(offset.shape)}")
    elif absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 (or uint8 with nested_absmax), got {absmax.dtype}")
    return _check_same_device(packed=packed, absmax=absmax, nested_absmax=nested_absmax,
                              nested_code=nested_code, offset=offset)


def check_dequantize_out(out, dtype: torch.dtype, shape: Sequence[int], device: torch.device) -> None:
    """``out`` of a dequantization: a contiguous tensor of exactly ``dtype``, ``shape``, ``device``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if out.dtype != dtype or list(out.shape) != list(shape) or out.device != device:
        raise ValueError(f"out must be {dtype} {list(shape)} on {device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def check_matmul_inputs(A, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                        nested_blocksize, quant_type, out_features, in_features, bias) -> torch.device:
    """Every check ``torch.ops.nf4.matmul`` runs (these also cover ``dequantize`` of the weight to
    ``A.dtype``); returns the device."""
    device = check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                   nested_blocksize, quant_type, (out_features, in_features), A.dtype)
    check_matmul_args(A, bias, out_features, in_features)
    _check_same_device(A=A, packed=packed, bias=bias)
    return device


def check_matmul_args(A, bias, out_features, in_features) -> None:
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"A must be float16, bfloat16 or float32, got {A.dtype}")
    if A.dim() == 0 or A.shape[-1] != in_features:
        raise ValueError(f"A has shape {list(A.shape)}, expected last dimension {in_features} "
                         f"(in_features)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"bias must have shape [{out_features}], got {list(bias.shape)}")


# ------------------------------------------------------------------------------------ quantize
@torch.library.custom_op("nf4::quantize", mutates_args=())
def quantize(A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_quantize_args(A, blocksize, quant_type)
    return backends.resolve(A.device, "quantize").quantize(A.contiguous(), blocksize, quant_type, double_quant)


def _check_fake_devices(**tensors: Optional[torch.Tensor]) -> None:
    """Fake implementations also run when real tensors are mixed with meta ones (a layer still on
    the meta device): the dispatcher then picks the meta kernel, and without this check the op
    would return uninitialized memory instead of failing. Under FakeTensorMode (torch.compile)
    every tensor reports its fake device, so consistent inputs pass."""
    _check_same_device(**tensors)


@quantize.register_fake
def _(A, blocksize, quant_type, double_quant):
    n = A.numel()
    blocks = num_blocks(n, blocksize)
    packed = A.new_empty(packed_nbytes(n), dtype=torch.uint8)
    if double_quant:
        return (packed, A.new_empty(blocks, dtype=torch.uint8),
                A.new_empty(num_blocks(blocks, codebook.NESTED_BLOCKSIZE), dtype=torch.float32),
                A.new_empty((), dtype=torch.float32))
    return (packed, A.new_empty(blocks, dtype=torch.float32), A.new_empty(0, dtype=torch.float32),
            A.new_empty((), dtype=torch.float32))


# ------------------------------------------------------------------------------------ dequantize
@torch.library.custom_op("nf4::dequantize", mutates_args=())
def dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
               nested_blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
               ) -> torch.Tensor:
    device = check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                   nested_blocksize, quant_type, shape, dtype)
    return backends.resolve(device, "dequantize").dequantize(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
        quant_type, list(shape), dtype)


@dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
      shape, dtype):
    _check_fake_devices(packed=packed, absmax=absmax, nested_absmax=nested_absmax,
                        nested_code=nested_code, offset=offset)
    return packed.new_empty(list(shape), dtype=dtype)


@torch.library.custom_op("nf4::dequantize_out", mutates_args=("out",))
def dequantize_out(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                   nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                   nested_blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype,
                   out: torch.Tensor) -> None:
    device = check_dequantize_args(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                   nested_blocksize, quant_type, shape, dtype)
    check_dequantize_out(out, dtype, shape, device)
    backends.resolve(device, "dequantize").dequantize(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
        quant_type, list(shape), dtype, out=out)


@dequantize_out.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
      shape, dtype, out):
    _check_fake_devices(packed=packed, absmax=absmax, nested_absmax=nested_absmax,
                        nested_code=nested_code, offset=offset, out=out)
    return None


# ------------------------------------------------------------------------------------ matmul
@torch.library.custom_op("nf4::matmul", mutates_args=())
def matmul(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
           nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
           offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int, quant_type: str,
           out_features: int, in_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    device = check_matmul_inputs(A, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                 nested_blocksize, quant_type, out_features, in_features, bias)
    return backends.resolve(device, "matmul").matmul(
        A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
        quant_type, out_features, in_features, bias)


@matmul.register_fake
def _(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
      out_features, in_features, bias):
    _check_fake_devices(A=A, packed=packed, absmax=absmax, nested_absmax=nested_absmax,
                        nested_code=nested_code, offset=offset, bias=bias)
    return A.new_empty((*A.shape[:-1], out_features))
