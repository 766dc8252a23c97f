"""Gated MLP activations in Triton: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu_tanh(gate) * up``.

One kernel for both: they differ only in the activation (a constexpr), and share the layout:
``gate`` and ``up`` are [rows, width] with any row stride and a unit column stride, so Phi-3's
``gate_up_proj(x).chunk(2, -1)`` halves are read where they lie. Forward saves gate and up (the
inputs it already has) and no activation: backward recomputes it, one sigmoid/tanh per element,
cheaper than storing and re-reading a [rows, width] tensor.

    silu(g) = g * sigmoid(g)                 silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    gelu_tanh(g) = g/2 * (1 + t),  t = tanh(sqrt(2/pi) * (g + 0.044715 g^3))   (Gemma's gelu)
    gelu_tanh'(g) = (1 + t)/2 + g/2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 g^2)

All in float32, rounded once per output (transformers rounds act(gate) before the product: one
more rounding in bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


SWIGLU = 0
GEGLU = 1
# Elements per program along a row: 1024 fp32 values (8 a thread with 4 warps).
_BLOCK = 1024
_INTERPRETER_ROWS = 16


@triton.jit
def _tanh(x):
    # tanh via sigmoid (exact identity; the interpreter and every GPU have exp).
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


# sqrt(2/pi) = 0.7978845608028654 and the cubic coefficient 0.044715 are written as literals in
# the jitted functions below (Triton reads module globals only when they are constexpr).
@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    else:
        return 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    else:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)


@triton.jit
def _glu_forward_kernel(gate_ptr, up_ptr, out_ptr, n_rows, width, gate_stride, up_stride, out_stride,
                        ACT: tl.constexpr,     # SWIGLU or GEGLU
                        ROWS: tl.constexpr,    # rows per program
                        BLOCK: tl.constexpr):  # columns per program
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (row < n_rows) & (cols < width)
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (_act(g, ACT) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_rows, width, dout_stride,
                         gate_stride, up_stride, dgate_stride, dup_stride,
                         ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                         STORE_OUT: tl.constexpr):  # also write act(gate) * up over dout
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (row < n_rows) & (cols < width)
    do = tl.load(dout_ptr + row * dout_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a = _act(g, ACT)
    # Each element is loaded before it is stored, by the same program: the outputs may alias the
    # inputs element for element (see glu_backward_with_output).
    tl.store(dgate_ptr + row * dgate_stride + cols, (do * u * _act_grad(g, ACT)).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * dup_stride + cols, (do * a).to(dup_ptr.dtype.element_ty), mask=mask)
    if STORE_OUT:
        tl.store(dout_ptr + row * dout_stride + cols, (a * u).to(dout_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, width] with unit column stride, without copying when the layout allows."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dimensions not collapsible into one row stride
        return t.contiguous().view(-1, t.shape[-1])


def _tiles(x: torch.Tensor, rows: int, width: int) -> tuple[tuple[int, int], int, int]:
    """(grid, rows a program, columns a program): 1 x 1024 on the GPU; under the interpreter,
    where each program costs milliseconds of Python, 16 rows of up to 1024 columns."""
    if x.device.type == "cpu":
        per_row, block = _INTERPRETER_ROWS, min(_BLOCK, triton.next_power_of_2(width))
    else:
        per_row, block = 1, _BLOCK
    return (triton.cdiv(rows, per_row), triton.cdiv(width, block)), per_row, block


def glu_forward(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    g2, u2 = _rows(gate), _rows(up)
    # allocated in gate's shape (a Function must not return a view it made)
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel():
        grid, rows, block = _tiles(gate, *g2.shape)
        _glu_forward_kernel[grid](g2, u2, out.view(g2.shape), g2.shape[0], g2.shape[1], g2.stride(0),
                                  u2.stride(0), g2.shape[1], ACT=act, ROWS=rows, BLOCK=block, num_warps=4)
    return out


def glu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int):
    d2, g2, u2 = _rows(dout), _rows(gate), _rows(up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dgate.numel():
        width = g2.shape[1]
        grid, rows, block = _tiles(gate, *g2.shape)
        _glu_backward_kernel[grid](d2, g2, u2, dgate.view(g2.shape), dup.view(u2.shape), g2.shape[0], width,
                                   d2.stride(0), g2.stride(0), u2.stride(0), width, width,
                                   ACT=act, ROWS=rows, BLOCK=block, STORE_OUT=False, num_warps=4)
    return dgate, dup


def glu_backward_with_output(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int,
                             dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """The backward of ``act(gate) * up`` for a caller that also needs that output again (the
    fused LoRA MLP: its down adapter's dA reads it, and it was not kept), in one pass: dgate and
    dup into the given buffers, and the output ``act(gate) * up`` over ``dout``.

    All five: [rows, width], one dtype, one device, each contiguous or a 2-D view whose rows are
    contiguous (gate and up may be the two halves of one [rows, 2 x width] tensor, as Phi-3's
    fused projection gives them). ``dgate`` may be ``gate`` and ``dup`` may be ``up`` (in place:
    each element is read before it is written, by the same program): three [rows, width] buffers
    where ``glu_backward`` plus ``glu_forward`` take five and two passes.
    """
    for name, t in (("dout", dout), ("gate", gate), ("up", up), ("dgate", dgate), ("dup", dup)):
        rows_ok = t.is_contiguous() or (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1])
        if t.shape != gate.shape or t.dtype != gate.dtype or t.device != gate.device or not rows_ok:
            raise ValueError(f"{name} must be {gate.dtype} {list(gate.shape)} on {gate.device} with contiguous "
                             f"rows, got {'' if rows_ok else 'strides ' + str(t.stride()) + ' '}{t.dtype} "
                             f"{list(t.shape)} on {t.device}")
    if gate.numel():
        d2, g2, u2, dg2, du2 = (_rows(t) for t in (dout, gate, up, dgate, dup))
        width = g2.shape[1]
        grid, rows, block = _tiles(gate, *g2.shape)
        _glu_backward_kernel[grid](d2, g2, u2, dg2, du2, g2.shape[0], width, d2.stride(0), g2.stride(0),
                                   u2.stride(0), dg2.stride(0), du2.stride(0),
                                   ACT=act, ROWS=rows, BLOCK=block, STORE_OUT=True, num_warps=4)


class GLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up; backward recomputes the activation."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return glu_forward(gate, up, act)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward(dout, gate, up, ctx.act)
        return dgate, dup, None


def _glu(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {list(gate.shape)} and {list(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device}, up on {up.device}: expected one device")
    return GLUFunction.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama, Mistral, Qwen, Phi-3 MLPs)."""
    return _glu(gate, up, SWIGLU)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up`` (Gemma's ``gelu_pytorch_tanh``)."""
    return _glu(gate, up, GEGLU)
