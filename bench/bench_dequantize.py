"""Dequantize throughput: nf4's one-launch CUDA kernel, the Triton backend and bitsandbytes, next
to a device-to-device copy of the same bf16 weight, on nf4.testing.BENCH_SHAPES (bf16 output,
blocksize 64, double quantization, NF4).

GB/s counts the bytes that must move: packed codes, 8-bit absmax codes and nested absmax read
once, the bf16 weight written once. Writes the ``dequantize`` section of bench/RESULTS.md.

    python -m bench.bench_dequantize
"""
from __future__ import annotations

import torch

import nf4
from bench.bench_quantize import BLOCKSIZE, bnb_f, cuda_backend, kernel_available, quantize_bytes, timed
from bench.common import require_extension, stamp, table, write_section
from nf4 import codebook
from nf4.testing import BENCH_SHAPES


def main() -> None:
    require_extension("bench_dequantize")
    rows = []
    has_triton = kernel_available("triton", "dequantize")
    for shape in BENCH_SHAPES:
        W = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        n = W.numel()
        nbytes = quantize_bytes(n, W.element_size())  # the same bytes, the other way round
        copy_dst = torch.empty_like(W)
        t_copy = timed(lambda: copy_dst.copy_(W))
        copy_gbs = 2 * n * W.element_size() / t_copy / 1e6
        nf4.set_backend("cuda")
        packed, state = nf4.functional.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True,
                                                     quant_type="nf4")
        nf4.set_backend(None)
        out = torch.empty_like(W)
        dequant = lambda: nf4.functional.dequantize_4bit(packed, state)
        flat = packed.view(-1)
        nested = (state.state2.absmax, state.state2.code, state.offset)
        t_cuda = timed(lambda: cuda_backend.dequantize(flat, state.absmax, *nested, BLOCKSIZE, codebook.NESTED_BLOCKSIZE,
                                                       "nf4", shape, W.dtype))
        t_cuda_out = timed(lambda: cuda_backend.dequantize(flat, state.absmax, *nested, BLOCKSIZE,
                                                           codebook.NESTED_BLOCKSIZE, "nf4", shape, W.dtype, out=out))
        t_cuda_api = timed(dequant, "cuda")
        t_triton = timed(dequant, "triton") if has_triton else None
        t_bnb = None
        if bnb_f is not None:
            bnb_packed, bnb_state = bnb_f.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True,
                                                        quant_type="nf4")
            t_bnb = timed(lambda: bnb_f.dequantize_4bit(bnb_packed, bnb_state))
        gbs = lambda t: nbytes / t / 1e6 if t else "n/a"
        rows.append([f"{shape[0]}x{shape[1]}", t_copy, copy_gbs, t_cuda, gbs(t_cuda),
                     f"{100 * gbs(t_cuda) / copy_gbs:.0f}%", t_cuda_out, t_cuda_api,
                     t_bnb if t_bnb else "n/a", gbs(t_bnb), f"{t_bnb / t_cuda:.2f}x" if t_bnb else "n/a",
                     t_triton if t_triton else "n/a", gbs(t_triton)])
    headers = ["shape", "copy ms", "copy GB/s", "cuda ms", "cuda GB/s", "cuda / copy BW", "cuda ms (out=)", "cuda ms (API)",
               "bnb ms", "bnb GB/s", "cuda vs bnb", "triton ms", "triton GB/s"]
    body = (f"## dequantize (bf16 out, blocksize {BLOCKSIZE}, double quant, nf4)\n\n{stamp()}\n\n"
            "Median of triton.testing.do_bench (L2 flushed). GB/s = (packed, absmax codes and nested absmax "
            "read + bf16 weight written) / time; copy GB/s = 2 x weight bytes / time. \"cuda\": "
            "nf4.cuda_backend.dequantize (one launch); \"out=\": into a preallocated buffer; \"API\": through "
            "nf4.functional.dequantize_4bit (custom op, checks).\n\n"
            + table(headers, rows))
    write_section("dequantize", body)


if __name__ == "__main__":
    main()
