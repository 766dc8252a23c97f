"""Fused 4-bit matmul vs bf16 ``F.linear`` and bitsandbytes' ``matmul_4bit``, same run, same inputs.

    python -m bench.bench_matmul            # the RESULTS.md section "matmul"
    python -m bench.bench_matmul --sweep    # time candidate kernel configs (to tune choose_config)

For each shape of ``nf4.testing.BENCH_SHAPES`` and token count of ``BENCH_TOKENS``: bf16 x,
weight quantized to nf4 with double quantization and blocksize 64. Times are medians of
``triton.testing.do_bench`` (L2 flushed before every call) over CUDA-graph replays of one call,
under ``torch.no_grad()`` (bitsandbytes' 1-token kernel needs an input without grad): graphs take
each library's Python overhead out, so the table compares GPU work; the "nf4 eager" column is
the same call without a graph, Python dispatch included.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from typing import Callable

import torch
import torch.nn.functional as F

import nf4
from bench.common import bench_ms, stamp, table, write_section
from nf4.testing import BENCH_SHAPES, BENCH_TOKENS

log = logging.getLogger("bench_matmul")

# The goals on the H100, nf4 time / bf16 time at the worst shape.
GOALS = {1: 0.40, 16: 0.50, 128: 1.0, 4096: 1.05}


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """One call of ``fn`` captured in a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def timed(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (eager, with a warning, if capture fails)."""
    try:
        replay = graphed(fn)
    except RuntimeError as e:
        log.warning("CUDA graph capture failed (%s); timing eagerly", e)
        replay = fn
    return bench_ms(replay)[0]


def quantized(out_f: int, in_f: int):
    W = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = nf4.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    return W, packed, state


def bnb_weight(W: torch.Tensor):
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        return None
    q, qs = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnb, q, qs


def auto_route() -> str:
    """What the auto backend runs, by token count (for the table's description)."""
    try:
        cb = importlib.import_module("nf4.cuda_backend")
    except ImportError:
        return "Triton's matmul (the CUDA extension is not built)"
    hopper = cb.wgmma_available(torch.device("cuda"))
    middle = (f"the CUDA wgmma kernel up to {cb.WGMMA_MAX_TOKENS}" if hopper
              else f"the CUDA tiled kernel up to {cb.TILED_MAX_TOKENS}")
    top = cb.WGMMA_MAX_TOKENS if hopper else cb.TILED_MAX_TOKENS
    return (f"the CUDA few-token kernel up to {cb.FUSED_MAX_TOKENS} tokens ({cb.FEW_MAX_TOKENS_NARROW} below "
            f"{cb.TILED_MIN_ROWS} rows), {middle}, Triton's matmul above {top}")


def harness_floor_ms() -> float:
    """The same timing applied to one tiny kernel (a 1-element fill): what every figure in the
    table includes besides the work itself (graph launch, events, L2 flush boundary)."""
    a = torch.empty(1, device="cuda")
    return timed(lambda: a.zero_())


def run_table() -> None:
    rows = []
    worst: dict[int, float] = {}
    floor = harness_floor_ms()
    for out_f, in_f in BENCH_SHAPES:
        W, packed, state = quantized(out_f, in_f)
        bnb_state = bnb_weight(W)
        for tokens in BENCH_TOKENS:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            flops = 2.0 * tokens * out_f * in_f
            fns = {"bf16": lambda: F.linear(x, W),
                   "nf4": lambda: nf4.matmul_4bit(x, packed.t(), state)}
            if bnb_state is not None:
                bnb, q, qs = bnb_state
                fns["bnb"] = lambda: bnb.matmul_4bit(x, q.t(), quant_state=qs)
            ms = {k: timed(f) for k, f in fns.items()}
            eager = bench_ms(fns["nf4"])[0]
            ratio = ms["nf4"] / ms["bf16"]
            worst[tokens] = max(worst.get(tokens, 0.0), ratio)
            bnb_ratio = ms["bnb"] / ms["bf16"] if "bnb" in ms else float("nan")
            rows.append([f"{out_f}x{in_f}", tokens, ms["bf16"] * 1e3, ms["nf4"] * 1e3,
                         ms.get("bnb", float("nan")) * 1e3, eager * 1e3, ratio, bnb_ratio,
                         flops / ms["nf4"] / 1e9])
            log.info("%s", rows[-1])
        del W, packed, state, bnb_state
        torch.cuda.empty_cache()
    goal_rows = [[t, worst[t], GOALS.get(t, "-"),
                  "met" if t in GOALS and worst[t] <= GOALS[t] else ("-" if t not in GOALS else "missed")]
                 for t in BENCH_TOKENS]
    body = "\n\n".join([
        "## matmul: fused 4-bit matmul vs bf16 F.linear and bitsandbytes",
        stamp(),
        "bf16 x; weight nf4 + double quant, blocksize 64; `nf4.matmul_4bit` (auto backend: "
        f"{auto_route()}) vs `F.linear` bf16 vs `bnb.matmul_4bit`. Median µs of CUDA-graph replays, L2 "
        "flushed, under no_grad; 'nf4 eager' is the plain call (Python dispatch included). "
        "Ratios are time / bf16 time (lower is better); TFLOP/s is nf4's. Harness floor: a 1-element "
        f"fill kernel timed the same way measures {floor * 1e3:.1f} µs (included in every figure).",
        table(["shape (out x in)", "tokens", "bf16 µs", "nf4 µs", "bnb µs", "nf4 eager µs",
               "nf4/bf16", "bnb/bf16", "nf4 TFLOP/s"], rows),
        "Worst shape per token count vs the issue's goals (H100):",
        table(["tokens", "worst nf4/bf16", "goal", ""], goal_rows),
    ])
    write_section("matmul", body)


def sweep_configs(tokens: int):
    km = importlib.import_module("nf4.kernels.matmul")
    C = km.Config
    bm = km.triton.next_power_of_2(tokens)
    both = (False, True)  # table gather, select tree
    if tokens <= km.GEMV_MAX_M:
        return [C("gemv", block_m=bm, block_n=bn, block_k=bk, num_warps=w, select=sel)
                for bn, bk, w in [(8, 256, 4), (4, 256, 4), (8, 512, 8), (16, 256, 8), (8, 128, 4),
                                  (16, 128, 4), (4, 1024, 8)] for sel in both]
    if tokens <= 16:
        return [C("dot", block_m=16, block_n=bn, block_k=bk, num_warps=w, split_k=sk, select=sel,
                  num_stages=st)
                for bn, bk, w, sk, st in [(16, 128, 4, 1, 1), (32, 128, 4, 1, 1), (32, 256, 4, 1, 1),
                                          (64, 128, 4, 1, 1), (16, 256, 4, 1, 1), (64, 128, 4, 2, 1),
                                          (32, 128, 4, 1, 3), (16, 512, 4, 4, 1), (32, 256, 4, 2, 1),
                                          (16, 256, 4, 2, 1)] for sel in both
                ] + [C("gemv", block_m=16, block_n=8, block_k=256, num_warps=4)]
    if tokens <= 128:
        m = min(bm, 128)
        return [C("dot", block_m=m, block_n=bn, block_k=bk, num_warps=w, select=sel, num_stages=st)
                for bn, bk, w, st in [(32, 128, 4, 1), (64, 128, 4, 1), (64, 64, 4, 1), (128, 64, 8, 1),
                                      (64, 128, 4, 3)] for sel in both] + [C("dequant")]
    if tokens <= 512:
        return [C("dot", block_m=bm_, block_n=bn, block_k=64, num_warps=w, select=sel, num_stages=st)
                for bm_, bn, w, st in [(128, 128, 8, 1), (128, 256, 8, 1), (128, 128, 8, 3)]
                for sel in both] + [C("dequant")]
    return [C("dot", block_m=128, block_n=256, block_k=64, num_warps=8, select=True), C("dequant")]


def sweep_cuda_configs(tokens: int):
    """(kernel name, config) pairs: the few-token kernel's tiles up to 64 tokens, the tiled
    kernel's from 32 tokens up."""
    cb = importlib.import_module("nf4.cuda_backend")
    out = []
    if tokens <= 64:
        tile = next((t for t in cb.TOKEN_TILES if tokens <= t), cb.TOKEN_TILES[-1])
        out += [("few", (tile, rows, warps)) for rows in cb.ROW_TILES for warps in cb.FEW_WARPS
                if not (tile == 32 and rows == 64) and warps * tile // 8 <= 64]
    if tokens >= 32:
        out += [("tiled", cfg) for cfg in cb.tiled_configs()]
        if cb.wgmma_available(torch.device("cuda")):
            out += [("wgmma", cfg) for cfg in cb.WGMMA_CONFIGS]
    if tokens >= 128:
        out.append(("dequant", None))
    return out


def run_sweep_cuda(only_tokens) -> None:
    """Time every tile configuration of the CUDA fused kernels (csrc/matmul.cu, matmul_tiled.cu,
    matmul_wgmma.cu), and dequantization + cuBLAS from 128 tokens."""
    cb = importlib.import_module("nf4.cuda_backend")
    kernels = {**cb.FUSED_MATMULS, "dequant": lambda *args, config=None: cb.dequantized_matmul(*args)}
    lines = []
    for out_f, in_f in BENCH_SHAPES:
        W, packed, state = quantized(out_f, in_f)
        s2 = state.state2
        args = (packed.reshape(-1), state.absmax, s2.absmax, s2.code, state.offset, 64, 256, "nf4",
                out_f, in_f, None)
        for tokens in only_tokens or [t for t in BENCH_TOKENS if t <= 512]:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            base = timed(lambda: F.linear(x, W))
            sms = cb._sm_count(x.device)
            kernel = cb.fused_kernel(tokens, out_f, x.device)
            chosen = f"{kernel} {cb.FUSED_CONFIGS[kernel](tokens, out_f, in_f, sms)}" if kernel else "dequant None"
            results = []
            for name, cfg in sweep_cuda_configs(tokens):
                ms = bench_ms(graphed(lambda: kernels[name](x, *args, config=cfg)))[0]
                results.append((ms, name, cfg))
            results.sort(key=lambda r: r[0])
            lines.append(f"{out_f}x{in_f} tokens={tokens} bf16={base * 1e3:.1f}us chosen={chosen}")
            lines += [f"    {ms * 1e3:8.1f}us  {ms / base:5.2f}x  {name} {cfg}" for ms, name, cfg in results]
            log.info("\n%s", "\n".join(lines[-len(results) - 1:]))
        del W, packed, state
        torch.cuda.empty_cache()
    write_section("matmul_sweep_cuda", "\n".join(["## CUDA fused matmul config sweep (tuning, not a result)",
                                                    stamp(), "few: (token_tile, rows_per_cta, warps); "
                                                    "tiled: (row_tiles, token_tiles, k_warps); wgmma: (token_chunks, k_split); dequant: dequantize + cuBLAS", "```",
                                                    *lines, "```"]))


def run_sweep(only_tokens) -> None:
    km = importlib.import_module("nf4.kernels.matmul")
    lines = []
    for out_f, in_f in BENCH_SHAPES:
        W, packed, state = quantized(out_f, in_f)
        s2 = state.state2
        args = (packed.reshape(-1), state.absmax, s2.absmax, s2.code, state.offset, 64, 256, "nf4")
        for tokens in only_tokens or BENCH_TOKENS:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            base = timed(lambda: F.linear(x, W))
            chosen = km.choose_config(tokens, out_f, in_f, 64, x.device)
            results = []
            for cfg in sweep_configs(tokens):
                try:
                    ms = bench_ms(graphed(lambda: km.launch(x, *args, out_f, None, cfg)))[0]
                except Exception as e:  # noqa: BLE001  a config that does not compile is a result too
                    log.warning("%s failed: %s", cfg, e)
                    continue
                results.append((ms, cfg))
            results.sort(key=lambda r: r[0])
            lines.append(f"{out_f}x{in_f} tokens={tokens} bf16={base * 1e3:.1f}us chosen={chosen}")
            lines += [f"    {ms * 1e3:8.1f}us  {ms / base:5.2f}x  {cfg}" for ms, cfg in results]
            log.info("\n%s", "\n".join(lines[-len(results) - 1:]))
        del W, packed, state
        torch.cuda.empty_cache()
    write_section("matmul_sweep", "\n".join(["## matmul config sweep (tuning, not a result)", stamp(),
                                               "```", *lines, "```"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time candidate configs instead")
    parser.add_argument("--cuda", action="store_true", help="with --sweep: the CUDA fused kernel's configs")
    parser.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default=None,
                        help="sweep only these token counts (comma-separated)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with torch.no_grad():
        if args.sweep and args.cuda:
            run_sweep_cuda(args.tokens)
        elif args.sweep:
            run_sweep(args.tokens)
        else:
            run_table()


if __name__ == "__main__":
    main()
