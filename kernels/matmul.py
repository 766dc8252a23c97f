"""Fused 4-bit matmul in Triton: ``y = x @ dequantize(W).T + bias`` (the triton backend's matmul).

The weight is read in bitsandbytes' layout as stored: ``[out, in]`` row-major, two codes per
byte (element 2j in the high nibble), with its absmax (double-quantized or not) decoded in the
same kernel; nothing is converted at load time. Three paths, chosen by the token count ``M``
(rows of ``x`` after flattening its leading dimensions):

* ``gemv`` (M <= GEMV_MAX_M): a CUDA-core kernel; each program streams a strip of ``BLOCK_N``
  weight rows once for all M tokens, in fp32, double-buffering the next tile in registers.
  Weight bytes dominate, so the grid is made of many narrow strips (512 programs at N = 4096).
* ``dot`` (16 tokens everywhere, up to 64 where N >= 8192): tiles of the weight dequantized in
  registers to x's dtype and fed to ``tl.dot`` (tensor cores) with fp32 accumulation. The weight
  tile is the dot's first operand (``acc[n, m]``), so a small token count is the narrow side.
* ``dequant`` (otherwise): the weight is dequantized once (``torch.ops.nf4.dequantize``: the CUDA
  extension when it is there, else the Triton kernel) and cuBLAS does the product; on the H100 it
  beat this file's tl.dot kernel from 64-128 tokens up (see ``choose_config``).

Note: weight layouts the fast paths need.
    The fused paths need ``in_features`` to be a multiple of ``blocksize``, so that every row
    starts on a byte and on an absmax block (true of every transformer shape: 64 divides them).
    Other shapes are rare and take the ``dequant`` path, which handles any element count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dequantize import decode_absmax
from .tables import dense, device_tables

# The largest token count the CUDA-core GEMV serves (tl.dot needs 16 rows, so below that the MMA
# computes mostly padding; at 8 tokens the GEMV's FMAs still hide under the weight stream).
GEMV_MAX_M = 8


@dataclass(frozen=True)
class Config:
    """One launch configuration. ``kind`` is ``gemv``, ``dot`` or ``dequant``."""
    kind: str
    block_m: int = 16      # tokens per program (gemv: all of them, a power of two <= 8)
    block_n: int = 64      # weight rows per program
    block_k: int = 64      # gemv: packed bytes per row per iteration; dot: elements per iteration
    split_k: int = 1       # programs sharing one output tile along K (fp32 atomics when > 1)
    select: bool = False   # decode levels with a select tree instead of a table gather
    num_warps: int = 4
    num_stages: int = 1    # 1: the kernels double-buffer in registers themselves


def choose_config(M: int, N: int, K: int, blocksize: int, device: torch.device) -> Config:
    """The configuration for an [M, K] x [N, K]^T product.

    Chosen from ``python -m bench.bench_matmul --sweep`` on an H100 (2026-11-22; bf16 x, nf4 + double
    quant, blocksize 64; time / bf16 F.linear time on 4096x4096, 14336x4096, 4096x14336, 28672x8192):
      1 token   gemv 8 rows x 256 B, 4 warps:   0.84 0.88 0.90 0.91 (16 rows/8 warps: up to 1.05,
                256 B tiles beat 512/1024 B ones, select-tree decode 1.13-1.28, split-K 1.25+,
                a second tile prefetched in registers 0.88-0.99: not kept)
      4 tokens  the same gemv:                  1.67 2.11 2.19 2.33 (dequant + cuBLAS ~1.6-2.4)
      16 tokens dot 16x32x256, split-K 2:       1.39 1.68 1.52 1.77; dot 16x64x128, split-K 2:
                1.61 1.47 1.85 1.30, so 64-row tiles where N >= 8192 (enough programs)
      64 tokens dot 64x64x128:                  1.53 (14336x4096) 1.73 (28672x8192) but 3.7 where
                N = 4096 (64 programs); dequant + cuBLAS there: 1.72 / 1.92
      128+      dequant + cuBLAS: 1.68-2.18 at 128 (the tl.dot kernel: 1.83-4.33), 1.48-1.66 at
                512 (dot 3.6-5.4), 1.04-1.14 at 4096 (dot ~5)
    """
    if K % blocksize:
        return Config("dequant")  # See Note: weight layouts the fast paths need.
    if M <= GEMV_MAX_M:
        return Config("gemv", block_m=triton.next_power_of_2(M), block_n=8, block_k=256,
                      num_warps=4)
    if M <= 16:
        if N >= 8192:
            return Config("dot", block_m=16, block_n=64, block_k=128, split_k=2, num_warps=4)
        return Config("dot", block_m=16, block_n=32, block_k=256, split_k=2, num_warps=4)
    if M <= 64 and N >= 8192:
        return Config("dot", block_m=64, block_n=64, block_k=128, num_warps=4)
    return Config("dequant")


@triton.jit
def _store_tile(y_ptr, acc, rows, toks, M, N, stride_ym, bias_ptr,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write ``acc[n, m]`` to ``y[m, n]``: plain store (+ bias) or fp32 atomic add (split-K)."""
    ptrs = y_ptr + toks[None, :].to(tl.int64) * stride_ym + rows[:, None]
    ok = (rows[:, None] < N) & (toks[None, :] < M)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(ptrs, acc, mask=ok)


@triton.jit
def _levels(code, levels_ptr, SELECT: tl.constexpr):
    """fp32 level of each 4-bit ``code`` (int32). SELECT: a 4-level select tree over the 16 table
    values held in registers (no memory access); else a gather from the 64-byte table (L1 hits)."""
    if SELECT:
        b0 = (code & 1) != 0
        b1 = (code & 2) != 0
        b2 = (code & 4) != 0
        s0 = tl.where(b0, tl.load(levels_ptr + 1), tl.load(levels_ptr + 0))
        s1 = tl.where(b0, tl.load(levels_ptr + 3), tl.load(levels_ptr + 2))
        s2 = tl.where(b0, tl.load(levels_ptr + 5), tl.load(levels_ptr + 4))
        s3 = tl.where(b0, tl.load(levels_ptr + 7), tl.load(levels_ptr + 6))
        s4 = tl.where(b0, tl.load(levels_ptr + 9), tl.load(levels_ptr + 8))
        s5 = tl.where(b0, tl.load(levels_ptr + 11), tl.load(levels_ptr + 10))
        s6 = tl.where(b0, tl.load(levels_ptr + 13), tl.load(levels_ptr + 12))
        s7 = tl.where(b0, tl.load(levels_ptr + 15), tl.load(levels_ptr + 14))
        t0 = tl.where(b2, tl.where(b1, s3, s2), tl.where(b1, s1, s0))
        t1 = tl.where(b2, tl.where(b1, s7, s6), tl.where(b1, s5, s4))
        return tl.where((code & 8) != 0, t1, t0)
    else:
        return tl.load(levels_ptr + code)


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                 levels_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym, K_PER_SPLIT,
                 BLOCKSIZE: tl.constexpr,         # elements per absmax block (divides K)
                 NESTED: tl.constexpr,            # absmax double-quantized
                 NESTED_BLOCKSIZE: tl.constexpr,  # absmax codes per nested_absmax value
                 HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr,           # tokens, a power of two >= M
                 BLOCK_N: tl.constexpr,           # weight rows per program
                 BLOCK_KB: tl.constexpr,          # packed bytes per row per iteration
                 SPLIT_K: tl.constexpr,           # programs along K
                 SELECT: tl.constexpr):           # level decode (see _levels)
    HALF: tl.constexpr = BLOCKSIZE // 2                                    # bytes per absmax block
    HB: tl.constexpr = HALF if HALF < BLOCK_KB else BLOCK_KB               # bytes per sub-block
    NB: tl.constexpr = BLOCK_KB // HB                                      # sub-blocks per iteration
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    KB = tl.multiple_of(K // 2, 16)   # row stride in bytes: K is a multiple of BLOCKSIZE >= 32
    KBLK = K // BLOCKSIZE
    kb_start = tl.multiple_of(tl.program_id(1) * (K_PER_SPLIT // 2), BLOCK_KB)
    # K is a multiple of BLOCKSIZE (>= 32) and K_PER_SPLIT of 2 * BLOCK_KB, so the byte bounds are
    # multiples of 16: saying so lets the masked byte loads be 16-byte vectors (else 1 byte each).
    kb_end = tl.multiple_of(tl.minimum(KB, kb_start + K_PER_SPLIT // 2), 16)
    sub = tl.arange(0, NB)
    in_tile = sub[:, None] * HB + tl.arange(0, HB)[None, :]               # [NB, HB]
    w_ptrs = packed_ptr + rows64[:, None, None] * KB + in_tile[None, :, :]
    a_ptrs = absmax_ptr + rows64[:, None] * KBLK + sub[None, :]
    tok = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    # One token: products accumulate elementwise and are reduced once after the loop, so the loop
    # has no cross-thread reduction (with several tokens that would cost BLOCK_M times the registers).
    ONE: tl.constexpr = BLOCK_M == 1
    acc1 = tl.zeros([BLOCK_N if ONE else 1, NB if ONE else 1, HB if ONE else 1], tl.float32)
    # Register double buffering: the next tile's bytes and absmax are requested before this tile
    # is decoded, so each program keeps a DRAM read in flight (Triton's pipeliner only stages
    # loads that feed tl.dot; without this the loop waits a full memory latency per iteration).
    p_next = tl.load(w_ptrs + kb_start,
                     mask=row_ok[:, None, None] & (kb_start + in_tile < kb_end)[None], other=0)
    a_next = tl.load(a_ptrs + kb_start // HALF,
                     mask=row_ok[:, None] & (kb_start // HALF + sub < KBLK)[None, :], other=0)
    for kb0 in range(kb_start, kb_end, BLOCK_KB):
        p = p_next.to(tl.int32)
        a_raw = a_next
        kn = kb0 + BLOCK_KB
        p_next = tl.load(w_ptrs + kn, mask=row_ok[:, None, None] & (kn + in_tile < kb_end)[None],
                         other=0)
        a_next = tl.load(a_ptrs + kn // HALF,
                         mask=row_ok[:, None] & ((kn // HALF + sub < KBLK)
                                                 & (tl.full([NB], kn, tl.int32) < kb_end))[None, :],
                         other=0)
        j = kb0 + in_tile
        j_ok = j < kb_end
        blk = kb0 // HALF + sub
        scale = decode_absmax(a_raw, rows64[:, None] * KBLK + blk[None, :],
                              row_ok[:, None] & (blk < KBLK)[None, :], nested_absmax_ptr,
                              nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)  # [BN, NB]
        lvl_hi = _levels(p >> 4, levels_ptr, SELECT)                           # [BN, NB, HB]
        lvl_lo = _levels(p & 15, levels_ptr, SELECT)
        if BLOCK_M == 1:
            xe = tl.load(x_ptr + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
            acc1 += (lvl_hi * xe[None, :, :] + lvl_lo * xo[None, :, :]) * scale[:, :, None]
        else:
            for m in tl.static_range(BLOCK_M):
                x_ok = j_ok & (tl.full([NB, HB], m, tl.int32) < M)
                xe = tl.load(x_ptr + m * stride_xm + 2 * j, mask=x_ok, other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + m * stride_xm + 2 * j + 1, mask=x_ok, other=0.0).to(tl.float32)
                part = tl.sum(lvl_hi * xe[None, :, :] + lvl_lo * xo[None, :, :], axis=2)  # [BN, NB]
                dot = tl.sum(part * scale, axis=1)                                         # [BN]
                acc += tl.where(tok[None, :] == m, dot[:, None], 0.0)
    if BLOCK_M == 1:
        acc += tl.sum(tl.sum(acc1, axis=2), axis=1)[:, None]
    _store_tile(y_ptr, acc, rows, tok, M, N, stride_ym, bias_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _dot_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                levels_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym, K_PER_SPLIT,
                BLOCKSIZE: tl.constexpr,         # elements per absmax block (divides K)
                NESTED: tl.constexpr,            # absmax double-quantized
                NESTED_BLOCKSIZE: tl.constexpr,  # absmax codes per nested_absmax value
                HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr,           # tokens per program (>= 16)
                BLOCK_N: tl.constexpr,           # weight rows per program (>= 16)
                BLOCK_K: tl.constexpr,           # elements of K per iteration (>= 32)
                SPLIT_K: tl.constexpr,           # programs along K
                SELECT: tl.constexpr,            # level decode (see _levels)
                PRECISION: tl.constexpr,         # tl.dot input precision (ieee for fp32 x)
                UPCAST_DOT: tl.constexpr):       # feed tl.dot fp32 (interpreter: see _upcast_dot)
    SB: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_K else BLOCK_K       # elements per scale
    NB: tl.constexpr = BLOCK_K // SB                                       # scales per row per tile
    HK: tl.constexpr = BLOCK_K // 2                                        # bytes per row per tile
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    tok_ok = toks < M
    rows64 = rows.to(tl.int64)
    KB = tl.multiple_of(K // 2, 16)   # row stride in bytes: K is a multiple of BLOCKSIZE >= 32
    KBLK = K // BLOCKSIZE
    k_start = tl.multiple_of(tl.program_id(2) * K_PER_SPLIT, BLOCK_K)
    # Multiples of 16 (see _gemv_kernel): keeps the masked loads vectorized.
    k_end = tl.multiple_of(tl.minimum(K, k_start + K_PER_SPLIT), 16)
    kb_end = tl.multiple_of(k_end // 2, 8)
    jb = tl.arange(0, HK)
    kk = tl.arange(0, BLOCK_K)
    sub = tl.arange(0, NB)
    w_ptrs = packed_ptr + rows64[:, None] * KB + jb[None, :]                        # [BN, HK]
    x_ptrs = x_ptr + toks[None, :].to(tl.int64) * stride_xm + kk[:, None]          # [BK, BM]
    a_ptrs = absmax_ptr + rows64[:, None] * KBLK + sub[None, :]                     # [BN, NB]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    # Register double buffering of the weight bytes, absmax and x (see _gemv_kernel).
    p_next = tl.load(w_ptrs + k_start // 2,
                     mask=row_ok[:, None] & (k_start // 2 + jb < kb_end)[None, :], other=0)
    x_next = tl.load(x_ptrs + k_start, mask=tok_ok[None, :] & (k_start + kk < k_end)[:, None],
                     other=0.0)
    a_next = tl.load(a_ptrs + k_start // BLOCKSIZE,
                     mask=row_ok[:, None] & (k_start // BLOCKSIZE + sub < KBLK)[None, :], other=0)
    for k0 in range(k_start, k_end, BLOCK_K):
        p = p_next.to(tl.int32)
        xt = x_next
        a_raw = a_next
        kn = k0 + BLOCK_K
        p_next = tl.load(w_ptrs + kn // 2, mask=row_ok[:, None] & (kn // 2 + jb < kb_end)[None, :],
                         other=0)
        x_next = tl.load(x_ptrs + kn, mask=tok_ok[None, :] & (kn + kk < k_end)[:, None], other=0.0)
        a_next = tl.load(a_ptrs + kn // BLOCKSIZE,
                         mask=row_ok[:, None] & ((kn // BLOCKSIZE + sub < KBLK)
                                                 & (tl.full([NB], kn, tl.int32) < k_end))[None, :],
                         other=0)
        w = tl.reshape(tl.join(_levels(p >> 4, levels_ptr, SELECT),
                               _levels(p & 15, levels_ptr, SELECT)), [BLOCK_N, BLOCK_K])
        blk = k0 // BLOCKSIZE + sub
        scale = decode_absmax(a_raw, rows64[:, None] * KBLK + blk[None, :],
                              row_ok[:, None] & (blk < KBLK)[None, :], nested_absmax_ptr,
                              nested_code_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)  # [BN, NB]
        if NB == 1:
            w = w * scale
        else:
            w = tl.reshape(tl.reshape(w, [BLOCK_N, NB, SB]) * scale[:, :, None], [BLOCK_N, BLOCK_K])
        w = w.to(xt.dtype)
        if UPCAST_DOT:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    _store_tile(y_ptr, acc, rows, toks, M, N, stride_ym, bias_ptr, HAS_BIAS, SPLIT_K)


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits (3.9), so under
    it the bf16-rounded operands are widened to fp32 first: same products, exact in fp32."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _k_per_split(K: int, split_k: int, step: int) -> int:
    """K elements per split, a multiple of ``step`` (the iteration width) so splits never overlap."""
    per = triton.cdiv(K, split_k)
    return triton.cdiv(per, step) * step


def launch(A2: torch.Tensor, packed, absmax, nested_absmax, nested_code, offset, blocksize,
           nested_blocksize, quant_type, N: int, bias: Optional[torch.Tensor], cfg: Config):
    """Run one configuration on a 2-D ``A2`` [M, K] (last dimension contiguous)."""
    M, K = A2.shape
    if cfg.kind == "dequant":
        W = torch.ops.nf4.dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                     nested_blocksize, quant_type, [N, K], A2.dtype)
        return F.linear(A2, W, bias)
    nested = nested_absmax is not None
    levels = device_tables(A2.device).levels(quant_type)
    if cfg.split_k > 1:
        y = torch.zeros((M, N), dtype=torch.float32, device=A2.device)
    else:
        y = torch.empty((M, N), dtype=A2.dtype, device=A2.device)
    step = 2 * cfg.block_k if cfg.kind == "gemv" else cfg.block_k
    k_per_split = _k_per_split(K, cfg.split_k, step)
    args = (A2, packed, absmax, nested_absmax if nested else absmax,
            nested_code if nested else levels, offset if nested else levels, levels,
            bias if bias is not None else levels, y, M, N, K, A2.stride(0), y.stride(0),
            k_per_split)
    meta = dict(BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
                HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                SPLIT_K=cfg.split_k, SELECT=cfg.select, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    if cfg.kind == "gemv":
        if M > cfg.block_m:
            raise ValueError(f"gemv config serves at most {cfg.block_m} tokens, got M={M}")
        grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
        _gemv_kernel[grid](*args, BLOCK_KB=cfg.block_k, **meta)
    else:
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), cfg.split_k)
        precision = "ieee" if A2.dtype == torch.float32 else "tf32"
        _dot_kernel[grid](*args, BLOCK_K=cfg.block_k, PRECISION=precision,
                          UPCAST_DOT=_upcast_dot(A2.dtype), **meta)
    if cfg.split_k > 1:
        if bias is not None:
            y += bias
        y = y.to(A2.dtype)
    return y


def route(dtype: torch.dtype, tokens: int, out_features: int, in_features: int, blocksize: int,
          device: torch.device) -> tuple[str, Config]:
    """(kernel, config) of ``nf4.backends.route`` for this backend: ``choose_config``'s kind
    ("gemv", "dot" or "dequant") and the config itself."""
    cfg = choose_config(tokens, out_features, in_features, blocksize, device)
    return cfg.kind, cfg


def matmul(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
           nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
           offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int, quant_type: str,
           out_features: int, in_features: int, bias: Optional[torch.Tensor],
           config: Optional[Config] = None) -> torch.Tensor:
    """Backend protocol: ``A [..., in] @ W.T + bias`` in A's dtype; ops.py has checked the metadata.

    ``config`` overrides :func:`choose_config` (benchmarks and tests use it to pin a path)."""
    lead = A.shape[:-1]
    A2 = A.reshape(-1, in_features)
    if A2.stride(-1) != 1:
        A2 = A2.contiguous()
    M = A2.shape[0]
    if M == 0:
        return A.new_empty((*lead, out_features))
    cfg = config or choose_config(M, out_features, in_features, blocksize, A.device)
    # ops.py checked sizes, not layouts: strided or expanded state and bias are made dense here.
    y = launch(A2, dense(packed).reshape(-1), dense(absmax), dense(nested_absmax),
               dense(nested_code), dense(offset), blocksize, nested_blocksize, quant_type,
               out_features, dense(bias), cfg)
    # A 2-D input gets y itself: reshape to the same shape would return a view, which autograd
    # forbids modifying in place when it leaves a custom Function (RoPE rotates q, k in place).
    return y if A.dim() == 2 else y.reshape(*lead, out_features)
