"""Quantize throughput: nf4's CUDA kernels, the Triton backend and bitsandbytes, next to a
device-to-device copy of the same bf16 weight, on nf4.testing.BENCH_SHAPES (bf16, blocksize 64,
double quantization, NF4).

GB/s counts the bytes that must move: the weight read once, the packed codes, the 8-bit absmax
codes and the nested absmax written once. Writes the ``quantize`` section of bench/RESULTS.md.

    python -m bench.bench_quantize
"""
from __future__ import annotations

import importlib

import torch

import nf4
from bench.common import bench_ms, require_extension, stamp, table, write_section
from nf4 import backends, codebook
from nf4.quant_state import num_blocks
from nf4.testing import BENCH_SHAPES

BLOCKSIZE = 64

try:
    from nf4 import cuda_backend
except ImportError:  # nf4._C not built: main() says so in one line (bench.common.require_extension)
    cuda_backend = None

try:
    import bitsandbytes.functional as bnb_f
except ImportError:  # optional: the column then reads n/a
    bnb_f = None


def kernel_available(backend: str, op: str) -> bool:
    """Whether ``backend`` implements ``op`` here (the Triton kernels land separately)."""
    if not backends.supports(backend, torch.device("cuda")):
        return False
    return hasattr(importlib.import_module(backends._MODULES[backend]), op)


def quantize_bytes(n: int, itemsize: int) -> int:
    blocks = num_blocks(n, BLOCKSIZE)
    return n * itemsize + (n + 1) // 2 + blocks + 4 * num_blocks(blocks, codebook.NESTED_BLOCKSIZE) + 4


def nibble_diffs(a: torch.Tensor, b: torch.Tensor) -> int:
    x = a.view(-1) ^ b.view(-1)
    return int(((x >> 4) != 0).sum() + ((x & 0xF) != 0).sum())


def nf4_quantize(W: torch.Tensor, backend: str):
    nf4.set_backend(backend)
    try:
        return nf4.functional.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    finally:
        nf4.set_backend(None)


def timed(fn, backend: str | None = None) -> float:
    if backend is not None:
        nf4.set_backend(backend)
    try:
        return bench_ms(fn)[0]
    finally:
        nf4.set_backend(None)


def main() -> None:
    require_extension("bench_quantize")
    rows = []
    has_triton = kernel_available("triton", "quantize")
    for shape in BENCH_SHAPES:
        W = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        n = W.numel()
        nbytes = quantize_bytes(n, W.element_size())
        copy_dst = torch.empty_like(W)
        t_copy = timed(lambda: copy_dst.copy_(W))
        quant = lambda: nf4.functional.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True,
                                                     quant_type="nf4")
        t_cuda = timed(lambda: cuda_backend.quantize(W, BLOCKSIZE, "nf4", True))
        t_cuda_api = timed(quant, "cuda")
        t_cuda_single = timed(lambda: cuda_backend.quantize(W, BLOCKSIZE, "nf4", False))
        t_triton = timed(quant, "triton") if has_triton else None
        t_bnb, diffs = None, "n/a"
        if bnb_f is not None:
            t_bnb = timed(lambda: bnb_f.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True,
                                                      quant_type="nf4"))
            ours, _ = nf4_quantize(W, "cuda")
            theirs, _ = bnb_f.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
            diffs = nibble_diffs(ours, theirs)
        gbs = lambda t: nbytes / t / 1e6 if t else "n/a"
        rows.append([f"{shape[0]}x{shape[1]}", t_copy, 2 * n * W.element_size() / t_copy / 1e6,
                     t_cuda, gbs(t_cuda), t_cuda_api, t_cuda_single,
                     t_bnb if t_bnb else "n/a", gbs(t_bnb), f"{t_bnb / t_cuda:.1f}x" if t_bnb else "n/a",
                     t_triton if t_triton else "n/a", gbs(t_triton), diffs])
    headers = ["shape", "copy ms", "copy GB/s", "cuda ms", "cuda GB/s", "cuda ms (API)", "cuda ms (no dq)", "bnb ms",
               "bnb GB/s", "cuda vs bnb", "triton ms", "triton GB/s", "codes != bnb"]
    body = (f"## quantize (bf16, blocksize {BLOCKSIZE}, double quant, nf4)\n\n{stamp()}\n\n"
            "Median of triton.testing.do_bench (L2 flushed). GB/s = (weight read + packed, absmax codes and "
            "nested absmax written) / time; copy GB/s = 2 x weight bytes / time. \"cuda\": nf4.cuda_backend.quantize "
            "(the kernels, torch's mean between them); \"API\": the same through nf4.functional.quantize_4bit "
            "(custom op, checks, QuantState); \"no dq\": one launch, float32 absmax. \"codes != bnb\": 4-bit codes "
            "that differ from bitsandbytes' on this weight.\n\n"
            + table(headers, rows))
    write_section("quantize", body)


if __name__ == "__main__":
    main()
