"""One fused-matmul call per kernel, for a profiler (not a benchmark: no timing).

    ncu --kernel-name regex:wgmma_kernel --launch-skip 1 --launch-count 1 \\
        python -m bench.profile_matmul --kernel wgmma --config 2,1 --shape 28672x8192 --tokens 128

Runs the chosen kernel twice (a warm-up launch, then the one to profile) on a random weight
quantized to nf4 with double quantization, blocksize 64, and bf16 x.
"""
from __future__ import annotations

import argparse

import torch

import nf4
from bench.common import require_extension

try:
    from nf4 import cuda_backend as cb
except ImportError:  # nf4._C not built: main() says so in one line
    cb = None



def main() -> None:
    require_extension("profile_matmul")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=sorted(cb.FUSED_MATMULS), required=True)
    parser.add_argument("--config", type=lambda v: tuple(int(c) for c in v.split(",")), default=None)
    parser.add_argument("--shape", default="28672x8192", help="out_features x in_features")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    out_f, in_f = (int(v) for v in args.shape.split("x"))
    W = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = nf4.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    s2 = state.state2
    x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
    call = cb.FUSED_MATMULS[args.kernel]
    for _ in range(2):
        call(x, packed.reshape(-1), state.absmax, s2.absmax, s2.code, state.offset, 64, 256, "nf4",
             out_f, in_f, None, config=args.config)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
