"""RMSNorm forward and backward in Triton, for the patched training path (``nf4.models``).

    y = x * rsqrt(mean(x^2) + eps) * (weight + offset)

``offset`` is 0 for Llama-style norms and 1 for Gemma's ``1 + weight``. Every sum is taken in
float32 whatever the input dtype, and ``y`` is rounded once (transformers' Llama norm rounds the
normalized ``x`` to the input dtype before the weight multiply: a second rounding this kernel
does not make, so bf16 outputs may differ from it by one bf16 ulp).

Forward saves only ``x`` and the per-row ``rstd`` (4 bytes a row); backward recomputes ``x_hat``:

    dx = rstd * (g - x_hat * mean(g * x_hat)),  g = dy * (weight + offset)
    dweight = sum over rows of dy * x_hat

Each backward program walks a contiguous range of rows and writes one float32 partial row of
``dweight``; the partials are summed by torch (a [programs, hidden] tensor, a few MB at most).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# Rows per backward program: enough programs to fill the GPU (4 per SM) while the dweight
# partials stay small; under the interpreter a handful of programs is fastest.
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 2
_INTERPRETER_ROWS = 16


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, x_stride, y_stride, eps,
                             OFFSET: tl.constexpr,  # 0.0 (Llama) or 1.0 (Gemma's 1 + weight)
                             ROWS: tl.constexpr,    # rows per program
                             BLOCK: tl.constexpr):  # power of two >= n_cols
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + OFFSET
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols,
                              rows_per_program, dy_stride, x_stride, dx_stride,
                              OFFSET: tl.constexpr,
                              ROWS: tl.constexpr,    # rows per loop step (rows_per_program is a multiple)
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] + OFFSET
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    # int64 row offsets: 2^31 elements is 2^19 rows of 4096.
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for first in range(start, end, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        tl.store(dx_ptr + rows[:, None] * dx_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with unit stride along hidden (a copy only when it is not already)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _block(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    # 8 warps from 2048 columns (Llama's 4096 = 16 fp32 values a thread), 4 below.
    return block, 8 if block >= 2048 else 4


def _programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, _PROGRAMS_PER_SM * sms))
    return max(1, min(n_rows, _INTERPRETER_PROGRAMS))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y shaped like x in ``out_dtype``, float32 rstd [rows]) for x [..., hidden]."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    # allocated in x's shape and viewed as rows for the kernel: the Function must not return a
    # view it made (autograd forbids modifying such a view in place, as RoPE does next)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y2 = y.view(n_rows, n_cols)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, warps = _block(n_cols)
    # one row a program on the GPU (a 4096-wide row is 16 values a thread); under the
    # interpreter, where each program costs milliseconds of Python, 16.
    rows = _INTERPRETER_ROWS if x.device.type == "cpu" else 1
    if n_rows:
        _rms_norm_forward_kernel[(triton.cdiv(n_rows, rows),)](x2, weight, y2, rstd, n_rows, n_cols, x2.stride(0),
                                                               y2.stride(0), eps, OFFSET=offset, ROWS=rows,
                                                               BLOCK=block, num_warps=warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx shaped and typed like x, dweight in weight's dtype or None)."""
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(n_rows, n_cols)
    rows = _INTERPRETER_ROWS if x.device.type == "cpu" else 1
    programs = _programs(x.device, n_rows)
    per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    block, warps = _block(n_cols)
    if n_rows:
        _rms_norm_backward_kernel[(programs,)](dy2, x2, weight, rstd, dx2, partial, n_rows, n_cols,
                                               per_program, dy2.stride(0), x2.stride(0), dx2.stride(0),
                                               OFFSET=offset, ROWS=rows, BLOCK=block, num_warps=warps)
    dw = partial.sum(0).to(weight.dtype) if weight_grad else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and rstd; the maths is in the launchers above."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, out_dtype):
        y, rstd = rms_norm_forward(x, weight, eps, offset, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.needs_input_grad[1])
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any float dtype, [..., hidden]); ``weight`` is
    [hidden]. ``out_dtype`` defaults to x's dtype."""
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}] (x's last dimension), got {list(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}: expected one device")
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), out_dtype or x.dtype)
