"""bitsandbytes-compatible functional API (mirrors ``bitsandbytes.functional``'s 4-bit part).

    packed, state = nf4.functional.quantize_4bit(W, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    W_hat = nf4.functional.dequantize_4bit(packed, state)
    y = nf4.functional.matmul_4bit(x, packed.t(), state, bias=b)

Signatures and defaults are bitsandbytes' (``quant_type="fp4"`` included, because code written for
bnb relies on it); for new code we recommend ``quant_type="nf4", compress_statistics=True``.
Every call goes through the ``torch.ops.nf4`` custom ops, so the backend (reference, triton, cuda)
is chosen per device behind one API (see ``nf4.backends``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from nf4 import codebook, ops
from nf4.quant_state import QuantState, num_blocks
from nf4.weight import as_uint8 as _as_uint8, check_storage_dtype, eager, packed_weight

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "matmul_4bit", "get_4bit_type",
           "quantize_nf4", "quantize_fp4", "dequantize_nf4", "dequantize_fp4", "gemv_4bit"]


# Tables on the CPU, built once at import; per-device copies are cached so that eager calls make
# no host-to-device copy. Under torch.compile the copy is traced instead (a cache lookup keyed by
# device is not traceable, and the compiled graph keeps the table as a constant anyway).
_CPU_TABLES = {"nf4": codebook.levels("nf4"), "fp4": codebook.levels("fp4"),
               "dynamic": codebook.dynamic_map()}
_DEVICE_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _CPU_TABLES[kind].to(device)
    key = (kind, device)
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = _CPU_TABLES[kind].to(device)
    return _DEVICE_TABLES[key]


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16 levels of ``typename`` (``"nf4"`` or ``"fp4"``) as float32 (bnb's ``get_4bit_type``)."""
    return codebook.levels(typename).to(device or "cpu")


def quantize_4bit(A: torch.Tensor, absmax: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None, blocksize: int = 64,
                  compress_statistics: bool = False, quant_type: str = "fp4",
                  quant_storage: torch.dtype = torch.uint8, *, check_finite: bool = True
                  ) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` blockwise to 4 bits.

    Args:
        A: float32/float16/bfloat16 tensor of any shape with at least one element.
        absmax, out: optional preallocated outputs (bnb's convention): ``out`` receives the packed
            bytes ``[ceil(n/2), 1]`` in ``quant_storage``; ``absmax`` the float32 block maxima
            (only without ``compress_statistics``).
        blocksize: elements per block, a power of two from 32 to 4096.
        compress_statistics: double quantization (absmax as 8-bit codes, ~0.37 fewer bits/param).
        quant_type: ``"nf4"`` or ``"fp4"``.
        quant_storage: dtype the packed bytes are viewed as (uint8, or e.g. bfloat16 for FSDP).
        check_finite: refuse NaN and Inf with a ValueError (one reduction and a device sync). An
            Inf makes its block's absmax Inf and the whole block decode to NaN; a NaN does the
            same on the CPU and is dropped by the GPU kernels' max. nf4 refuses such weights
            everywhere (this function, ``QuantLinear4bit``, ``quantize_model``, ``from_pretrained``).
            Pass False only where the caller has checked already (the loader batches its checks).

    Returns:
        ``(packed, quant_state)`` with packed of shape ``[ceil(n/2) / itemsize, 1]``.
    """
    # Checked here too, not only inside the op: the op's schema would turn a wrong Python type
    # (blocksize=64.0) into an opaque RuntimeError before its own check runs.
    ops.check_quantize_args(A, blocksize, quant_type)
    check_storage_dtype(quant_storage)
    if check_finite and not torch.compiler.is_compiling() and nonfinite(A).item():
        bad = (~torch.isfinite(A.detach())).sum().item()
        raise ValueError(f"cannot quantize a tensor holding NaN or Inf ({bad} of {A.numel()} values, "
                         f"shape {list(A.shape)}): each would poison its whole block of {blocksize}")
    packed, am, nested, offset = torch.ops.nf4.quantize(A, blocksize, quant_type,
                                                        bool(compress_statistics))
    device = A.device
    if compress_statistics:
        # Each state owns its tables (clone: 1 KB + 64 B per weight): states that shared the cached
        # table made every saved checkpoint alias one quant_map, which safetensors refuses.
        state2 = QuantState(absmax=nested, code=_table("dynamic", device).clone(),
                            blocksize=codebook.NESTED_BLOCKSIZE, dtype=torch.float32)
        state = QuantState(absmax=am, shape=A.shape, code=_table(quant_type, device).clone(),
                           blocksize=blocksize, quant_type=quant_type, dtype=A.dtype,
                           offset=offset, state2=state2)
    else:
        if absmax is not None:
            if absmax.shape != am.shape or absmax.dtype != torch.float32 or absmax.device != device:
                raise ValueError(f"absmax must be float32 {list(am.shape)} on {device}, got "
                                 f"{absmax.dtype} {list(absmax.shape)} on {absmax.device}")
            am = absmax.copy_(am)
        state = QuantState(absmax=am, shape=A.shape, code=_table(quant_type, device).clone(),
                           blocksize=blocksize, quant_type=quant_type, dtype=A.dtype)
    packed = _view_storage(packed, quant_storage)
    if out is not None:
        if out.shape != packed.shape or out.dtype != packed.dtype or out.device != device:
            raise ValueError(f"out must be {packed.dtype} {list(packed.shape)} on {device}, got "
                             f"{out.dtype} {list(out.shape)} on {out.device}")
        packed = out.copy_(packed)
    return packed, state


def nonfinite(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on t's device: whether the float tensor t holds NaN or Inf (no host
    sync; aminmax reduces without a temporary the size of t, and min/max propagate NaN)."""
    lo, hi = torch.aminmax(t.detach())
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def _view_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    if quant_storage == torch.uint8:
        return packed.view(-1, 1)
    check_storage_dtype(quant_storage)
    size = torch.empty((), dtype=quant_storage).element_size()
    if packed.numel() % size:
        raise ValueError(f"{packed.numel()} packed bytes cannot be viewed as {quant_storage} "
                         f"({size} bytes each)")
    return packed.view(quant_storage).view(-1, 1)


def _state_tensors(state: QuantState):
    if state.nested:
        return state.absmax, state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize
    return state.absmax, None, None, None, codebook.NESTED_BLOCKSIZE


def dequantize_4bit(A: torch.Tensor, quant_state: Optional[QuantState] = None,
                    absmax: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                    blocksize: Optional[int] = None, quant_type: str = "fp4") -> torch.Tensor:
    """Decode packed bytes ``A`` back to ``quant_state.shape`` in ``quant_state.dtype``.

    As in bitsandbytes, ``quant_state`` may be omitted if ``absmax`` and ``out`` are given (then
    ``out`` supplies shape and dtype, and ``blocksize``/``quant_type`` the format). With ``out``,
    the result is written there (contiguous, matching shape and dtype) and returned.
    """
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, code=None,
                                 blocksize=64 if blocksize is None else blocksize,
                                 quant_type=quant_type, dtype=out.dtype)
    elif not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    if eager(A):
        w = packed_weight(A, quant_state)
        if out is not None:
            ops.check_dequantize_out(out, w.dtype, w.shape, w.device)
        return w.dequantize(out=out)
    packed = _as_uint8(A)
    quant_state.validate(packed)
    am, nested, ncode, offset, nbs = _state_tensors(quant_state)
    args = (packed, am, nested, ncode, offset, quant_state.blocksize, nbs, quant_state.quant_type,
            list(quant_state.shape), quant_state.dtype)
    if out is None:
        return torch.ops.nf4.dequantize(*args)
    torch.ops.nf4.dequantize_out(*args, out)
    return out


def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState,
                out: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A @ dequantize(B).T + bias`` with bitsandbytes' calling convention.

    ``B`` is the packed weight as ``Linear4bit`` passes it (``weight.t()``, any view of the same
    bytes); ``quant_state.shape`` is ``(out_features, in_features)``. The result has A's dtype and
    shape ``[..., out_features]``. Gradients flow to ``A`` and ``bias`` (the base is frozen).
    """
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    if eager(A) and eager(B):
        w = packed_weight(B, quant_state)
        w.check_input(A, bias)
        if len(w.shape) != 2:
            raise ValueError(f"matmul_4bit needs a 2-D weight, quant_state.shape is {list(w.shape)}")
        if torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad)):
            y = _Matmul4bit.apply(A, bias, w, B)
        else:
            y = w.matmul(A, bias)
    else:
        packed = _as_uint8(B)
        quant_state.validate(packed)
        if len(quant_state.shape) != 2:
            raise ValueError(f"matmul_4bit needs a 2-D weight, quant_state.shape is {tuple(quant_state.shape)}")
        out_features, in_features = quant_state.shape
        am, nested, ncode, offset, nbs = _state_tensors(quant_state)
        if bias is not None and bias.dtype != A.dtype:
            bias = bias.to(A.dtype)
        y = torch.ops.nf4.matmul(A, packed, am, nested, ncode, offset, quant_state.blocksize, nbs,
                                 quant_state.quant_type, out_features, in_features, bias)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != y.shape or out.dtype != y.dtype \
                or out.device != y.device:
            raise ValueError(f"out must be {y.dtype} {list(y.shape)} on {y.device}, got "
                             + (f"{out.dtype} {list(out.shape)} on {out.device}"
                                if isinstance(out, torch.Tensor) else type(out).__name__))
        out.copy_(y)
        return out
    return y


class _Matmul4bit(torch.autograd.Function):
    """``matmul_4bit``'s eager autograd (the op's formula, ``_matmul_backward``, serves traced
    calls): gradients for A and bias; the weight is decoded again in backward, never saved."""

    @staticmethod
    def forward(ctx, A, bias, w, B):
        ctx.w, ctx.B = w, B  # B keeps the packed bytes alive until backward checks them
        ctx.bias_dtype = None if bias is None else bias.dtype
        return w.matmul(A, bias)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.w
        if not w.current(ctx.B):  # its memory changed since forward: checked again
            w = packed_weight(ctx.B, w.state)
        grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_A = grad @ w.dequantize(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_A, grad_bias, None, None


def _matmul_setup_context(ctx, inputs, output):
    (A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
     out_features, in_features, bias) = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
    ctx.meta = (blocksize, nested_blocksize, quant_type, out_features, in_features, A.dtype)
    ctx.bias_dims = None if bias is None else tuple(range(output.dim() - 1))


def _matmul_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    blocksize, nested_blocksize, quant_type, out_features, in_features, dtype = ctx.meta
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = torch.ops.nf4.dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                     nested_blocksize, quant_type, [out_features, in_features], dtype)
        grad_A = grad @ W
    if ctx.bias_dims is not None and ctx.needs_input_grad[11]:
        grad_bias = grad.sum(dim=ctx.bias_dims) if ctx.bias_dims else grad
    return grad_A, None, None, None, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("nf4::matmul", _matmul_backward, setup_context=_matmul_setup_context)


def quantize_nf4(A, absmax=None, out=None, blocksize=64, compress_statistics=False,
                 quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=64, compress_statistics=False,
                 quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=64):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=64):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def bits_per_parameter(quant_state: QuantState) -> float:
    """Storage cost of one quantized parameter: 4 bits plus its share of the block statistics."""
    numel = math.prod(quant_state.shape)
    blocks = num_blocks(numel, quant_state.blocksize)
    stats = blocks * quant_state.absmax.element_size() * 8
    if quant_state.nested:
        stats += quant_state.state2.absmax.numel() * 32 + 32
    return 4.0 + stats / numel


def gemv_4bit(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
              transposed_A: bool = False, transposed_B: bool = False,
              state: Optional[QuantState] = None) -> torch.Tensor:
    """bitsandbytes' ``gemv_4bit``: ``A @ dequantize(B, state).T`` for the packed weight ``B``
    (as ``matmul_4bit`` hands it on: the ``[ceil(n/2), 1]`` bytes, not transposed).

    ``transposed_A``/``transposed_B`` are accepted and ignored, as bitsandbytes does. bnb calls
    this for one token (``A.numel() == A.shape[-1]``); here any number of rows is served by the
    same op as ``matmul_4bit``. Returns ``[..., state.shape[0]]`` in A's dtype (into ``out`` if given).
    """
    if state is None:
        raise ValueError("gemv_4bit needs state= (the QuantState from quantize_4bit)")
    return matmul_4bit(A, B.t(), state, out=out)
