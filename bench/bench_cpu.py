"""The CPU path: nf4's reference backend beside bitsandbytes' CPU implementation, 4096x4096 layer.

    python -m bench.bench_cpu                                   # nf4 only, or bnb too if importable
    python -m bench.bench_cpu --bnb-python /tmp/bnbvenv/bin/python

bitsandbytes is never a dependency of nf4: with ``--bnb-python`` its figures come from a child
process of that interpreter (a scratch venv with torch and bitsandbytes) running the same cases on
the same seeded weight and inputs. Cases, bf16 activations, weight NF4 with double quantization,
block size 64 (the QLoRA setting):

    dequantize       the whole weight to bf16
    matmul, 1 token  ``matmul_4bit(x[1, 4096], W.t(), state)`` (a decode step)
    fwd+bwd, 512     ``matmul_4bit`` forward, then the gradient to x (a training micro-batch)

Time: median (min) ms over ``--repeats`` calls after 2 warm-up calls, ``time.perf_counter``, all
threads torch uses. Goal (issue 18): nf4 within 2x of bnb on every case. This is a CPU
benchmark, so unlike the GPU ones its section of bench/RESULTS.md is written from a CPU run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import stamp, table, write_section

OUT_FEATURES, IN_FEATURES = 4096, 4096
BLOCKSIZE = 64
CASES = ("dequantize", "matmul, 1 token", "fwd+bwd, 512 tokens")
ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) milliseconds of ``fn``."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded weight (bf16), the 1-token and 512-token inputs, and the upstream gradient."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) * 0.02).to(torch.bfloat16)
    x1 = torch.randn(1, IN_FEATURES, generator=g).to(torch.bfloat16)
    x512 = torch.randn(512, IN_FEATURES, generator=g).to(torch.bfloat16)
    dy = torch.randn(512, OUT_FEATURES, generator=g).to(torch.bfloat16)
    return W, x1, x512, dy


def cases(quantize, dequantize, matmul) -> dict[str, Callable[[], object]]:
    """The three timed calls, given a library's quantize(W) -> (packed, state),
    dequantize(packed, state) and matmul(x, packed_t, state)."""
    W, x1, x512, dy = inputs()
    packed, state = quantize(W)
    x512 = x512.requires_grad_()

    def fwd_bwd():
        x512.grad = None
        matmul(x512, packed.t(), state).backward(dy)

    return {"dequantize": lambda: dequantize(packed, state),
            "matmul, 1 token": lambda: matmul(x1, packed.t(), state),
            "fwd+bwd, 512 tokens": fwd_bwd}


def measure(library: str, repeats: int) -> dict[str, tuple[float, float]]:
    if library == "nf4":
        import nf4  # noqa: F401  (imported here: the bnb child runs without nf4 installed)

        nf4.set_backend("reference")
        calls = cases(lambda W: nf4.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True,
                                                  quant_type="nf4"),
                      nf4.dequantize_4bit, nf4.matmul_4bit)
    else:
        import bitsandbytes as bnb  # optional: the comparison, from a scratch venv

        calls = cases(lambda W: bnb.functional.quantize_4bit(W, blocksize=BLOCKSIZE, compress_statistics=True,
                                                             quant_type="nf4"),
                      bnb.functional.dequantize_4bit, lambda x, p, s: bnb.matmul_4bit(x, p, quant_state=s))
    results = {}
    for name in CASES:
        if name == "fwd+bwd, 512 tokens":
            results[name] = timed(calls[name], repeats)
        else:
            with torch.no_grad():
                results[name] = timed(calls[name], repeats)
    return results


def bnb_in_child(python: str, repeats: int) -> tuple[dict, str]:
    """bnb's figures and version from ``python -m bench.bench_cpu --child`` (a venv with bnb)."""
    proc = subprocess.run([python, "-m", "bench.bench_cpu", "--child", "--repeats", str(repeats)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"bench.bench_cpu: the bitsandbytes run under {python} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    data = json.loads(line[len("RESULT "):])
    return {k: tuple(v) for k, v in data["results"].items()}, data["version"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bnb-python", help="an interpreter with bitsandbytes (and torch) installed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import bitsandbytes  # optional: only the child of --bnb-python has it

        print("RESULT " + json.dumps({"results": measure("bnb", args.repeats), "version": bitsandbytes.__version__}))
        return
    ours = measure("nf4", args.repeats)
    theirs, version = None, None
    if args.bnb_python:
        theirs, version = bnb_in_child(args.bnb_python, args.repeats)
    else:
        try:
            import bitsandbytes  # optional: the comparison column
        except ImportError:
            pass
        else:
            theirs, version = measure("bnb", args.repeats), bitsandbytes.__version__
    rows = []
    for name in CASES:
        ms, best = ours[name]
        row = [name, f"{ms:.1f} ({best:.1f})"]
        if theirs is not None:
            b_ms, b_best = theirs[name]
            ratio = ms / b_ms
            row += [f"{b_ms:.1f} ({b_best:.1f})", f"{ratio:.2f}x", "met" if ratio <= 2.0 else "missed"]
        rows.append(row)
    headers = ["case", "nf4 reference ms"] + (["bnb CPU ms", "nf4 / bnb", "goal <= 2x"] if theirs else [])
    body = "\n".join([
        "## CPU path: nf4's reference backend vs bitsandbytes' CPU implementation (`bench/bench_cpu.py`)",
        "",
        f"{stamp(bnb=False)}, CPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
        + (f", bitsandbytes {version}" if version else ", bitsandbytes: not run"),
        "",
        f"{OUT_FEATURES}x{IN_FEATURES} weight, NF4 + double quant, block size {BLOCKSIZE}, bf16 activations. "
        "Median (min) ms of 'repeats' calls after 2 warm-ups. matmul: `matmul_4bit(x, W.t(), state)`; "
        "fwd+bwd: the same at 512 tokens, then the gradient to x.",
        "",
        table(headers, rows),
    ])
    write_section("cpu", body)


if __name__ == "__main__":
    main()
