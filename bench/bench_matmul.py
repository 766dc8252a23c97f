"""Fused 4-bit matmul vs bf16 ``F.linear`` and bitsandbytes' ``matmul_4bit``, same run, same inputs.

    python -m bench.bench_matmul            # the RESULTS.md section "matmul"
    python -m bench.bench_matmul --sweep    # time candidate kernel configs (to tune choose_config)

For each shape of ``nf4.testing.BENCH_SHAPES`` and token count of ``BENCH_TOKENS``: bf16 x,
weight quantized to nf4 with double quantization and blocksize 64, under ``torch.no_grad()``
(bitsandbytes' 1-token kernel needs an input without grad). Two times per library:
    graph   median of ``triton.testing.do_bench`` (L2 flushed before every call) over CUDA-graph
            replays of one call: each library's Python overhead taken out, the GPU work compared;
    eager   the plain call as a model makes it: back-to-back calls, each on the next of several
            copies of the weight (``ROTATE_BYTES`` of them, so L2 never holds the weight, as in a
            model whose layers each have their own), one synchronize at the end; wall µs per call,
            median of ``EAGER_REPEATS`` loops. Where Python is slower than the kernel, this is
            the host's cost; "host µs" is the loop's time before that synchronize (what Python
            spends issuing one call, when the GPU keeps up).
Without a CUDA GPU it prints one line and exits with status 2 (``bench.common.NO_GPU_EXIT``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import nf4
from nf4 import backends
from bench.common import bench_ms, require_cuda, stamp, sync, table, write_section
from nf4.testing import BENCH_SHAPES, BENCH_TOKENS

log = logging.getLogger("bench_matmul")

# The issue's goals on the H100, nf4 time / bf16 time at the worst shape.
GOALS = {1: 0.40, 16: 0.50, 128: 1.0, 4096: 1.05}
# Issue 15: matmul_4bit called eagerly never slower than bnb.matmul_4bit, nf4 eager / bnb eager.
EAGER_GOAL = 1.0
# Weight bytes the eager loop cycles through: 256 MiB, do_bench's L2 flush buffer, 5x the H100's
# and H200's 50 MB L2.
ROTATE_BYTES = 256 * 2**20
EAGER_REPEATS = 3
EAGER_LOOP_S = 0.05  # aim of one eager loop's length (20 to 1000 calls)


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


def timed(fn: Callable[[], object], device: torch.device = torch.device("cuda")) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (eager, with a warning, if capture fails).
    On a CPU (the tests' dry run of this script) a plain median of 5 timed calls."""
    if device.type != "cuda":
        fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    try:
        replay = graphed(fn)
    except RuntimeError as e:
        log.warning("CUDA graph capture failed (%s); timing eagerly", e)
        replay = fn
    return bench_ms(replay)[0]


def quantized(out_f: int, in_f: int, device: torch.device = torch.device("cuda")):
    W = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02
    packed, state = nf4.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    return W, packed, state


def bnb_weight(W: torch.Tensor):
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        return None
    q, qs = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnb, q, qs


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def shape_calls(out_f: int, in_f: int, device: torch.device, rotate_bytes: int
                ) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    """{library: [one call per weight copy]} for bf16, nf4 and (when installed) bnb; each library
    gets enough copies of a random weight to span ``rotate_bytes`` of its own format."""
    def copies(nbytes: int) -> int:
        return max(1, math.ceil(rotate_bytes / nbytes))

    W, packed, state = quantized(out_f, in_f, device)
    Ws = [W] + [torch.randn_like(W) * 0.02 for _ in range(copies(_nbytes(W)) - 1)]
    # Default arguments bind each copy to its own call.
    calls = {"bf16": [lambda x, w=w: F.linear(x, w) for w in Ws]}
    nf4_bytes = _nbytes(packed, state.absmax, *((state.state2.absmax,) if state.nested else ()))
    nf4_weights = [(packed, state)] + [
        nf4.quantize_4bit(Ws[i % len(Ws)], blocksize=64, compress_statistics=True, quant_type="nf4")
        for i in range(1, copies(nf4_bytes))]
    calls["nf4"] = [lambda x, p=p, st=st: nf4.matmul_4bit(x, p.t(), st) for p, st in nf4_weights]
    first = bnb_weight(W)
    if first is not None:
        bnb, q, qs = first
        # bitsandbytes' packed codes, absmax codes and nested absmax are nf4's, byte for byte.
        bnb_weights = [(q, qs)] + [bnb_weight(Ws[i % len(Ws)])[1:] for i in range(1, copies(nf4_bytes))]
        calls["bnb"] = [lambda x, q=q, qs=qs: bnb.matmul_4bit(x, q.t(), quant_state=qs) for q, qs in bnb_weights]
    return calls


def eager_us(fns: list[Callable[[], object]], device: torch.device, graph_ms: float,
             repeats: int = EAGER_REPEATS) -> tuple[float, float]:
    """(wall µs, issue µs) per call of back-to-back calls cycling through ``fns``, medians of
    ``repeats`` loops of about ``EAGER_LOOP_S`` (from the graph time) after one warm-up pass."""
    n = min(1000, max(20, int(EAGER_LOOP_S / max(graph_ms * 1e-3, 1e-6))))
    for fn in fns:
        fn()
    sync(device)
    walls, issues = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fns[i % len(fns)]()
        issued = time.perf_counter()
        sync(device)
        end = time.perf_counter()
        walls.append((end - start) / n * 1e6)
        issues.append((issued - start) / n * 1e6)
    return statistics.median(walls), statistics.median(issues)


@dataclass
class Row:
    shape: tuple[int, int]
    tokens: int
    graph_us: dict[str, float]
    eager_us: dict[str, float]
    host_us: dict[str, float]

    def ratio(self, lib: str, ref: str, kind: str) -> float:
        times = self.graph_us if kind == "graph" else self.eager_us
        return times[lib] / times[ref] if lib in times and ref in times else math.nan


@torch.no_grad()
def measure_rows(shapes, token_counts, device: torch.device, rotate_bytes: int = ROTATE_BYTES) -> list[Row]:
    """Graph and eager times of every library at every shape and token count."""
    rows = []
    for out_f, in_f in shapes:
        calls = shape_calls(out_f, in_f, device, rotate_bytes)
        for tokens in token_counts:
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
            row = Row((out_f, in_f), tokens, {}, {}, {})
            for lib, fns in calls.items():
                bound = [lambda f=f: f(x) for f in fns]
                row.graph_us[lib] = timed(bound[0], device) * 1e3
                row.eager_us[lib], row.host_us[lib] = eager_us(bound, device, row.graph_us[lib] * 1e-3)
            rows.append(row)
            log.info("%s", row)
        del calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def report_rows(rows: list[Row]) -> tuple[str, list[list], list]:
    """(table, goal rows per token count, worst eager nf4/bnb row as [ratio, shape, tokens])."""
    nan = math.nan
    lines = []
    for r in rows:
        out_f, in_f = r.shape
        lines.append([f"{out_f}x{in_f}", r.tokens,
                      *(r.graph_us.get(k, nan) for k in ("bf16", "nf4", "bnb")),
                      *(r.eager_us.get(k, nan) for k in ("bf16", "nf4", "bnb")),
                      r.host_us.get("nf4", nan), r.host_us.get("bnb", nan),
                      r.ratio("nf4", "bf16", "graph"), r.ratio("bnb", "bf16", "graph"),
                      r.ratio("nf4", "bf16", "eager"), r.ratio("bnb", "bf16", "eager"),
                      r.ratio("nf4", "bnb", "eager"),
                      2.0 * r.tokens * out_f * in_f / (r.graph_us["nf4"] * 1e-6) / 1e12])
    goal_rows = []
    for t in dict.fromkeys(r.tokens for r in rows):
        at = [r for r in rows if r.tokens == t]
        worst = max(r.ratio("nf4", "bf16", "graph") for r in at)
        goal = GOALS.get(t)
        goal_rows.append([t, worst, "-" if goal is None else goal,
                          "-" if goal is None else ("met" if worst <= goal else "missed"),
                          max(r.ratio("nf4", "bf16", "eager") for r in at),
                          max(r.ratio("nf4", "bnb", "eager") for r in at)])
    eager = [(r.ratio("nf4", "bnb", "eager"), f"{r.shape[0]}x{r.shape[1]}", r.tokens) for r in rows]
    eager = [e for e in eager if not math.isnan(e[0])]
    worst_eager = list(max(eager)) if eager else []
    text = table(["shape (out x in)", "tokens", "bf16 µs", "nf4 µs", "bnb µs", "bf16 eager µs",
                  "nf4 eager µs", "bnb eager µs", "nf4 host µs", "bnb host µs", "nf4/bf16", "bnb/bf16",
                  "nf4/bf16 eager", "bnb/bf16 eager", "nf4/bnb eager", "nf4 TFLOP/s"], lines)
    return text, goal_rows, worst_eager


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
    device = torch.device("cuda")
    floor = harness_floor_ms()
    write_section("matmul", section(measure_rows(BENCH_SHAPES, BENCH_TOKENS, device), floor, auto_route()))


def section(rows: list[Row], floor_ms: float, route: str) -> str:
    """The RESULTS.md section: the table, the goals, how it was measured (``route``: what the
    auto backend runs, ``floor_ms``: the harness floor)."""
    text, goal_rows, worst_eager = report_rows(rows)
    if worst_eager:
        ratio, shape, tokens = worst_eager
        eager_goal = (f"Eager, nf4 vs bitsandbytes (issue 15: never slower, nf4/bnb eager <= {EAGER_GOAL} at every "
                      f"shape and token count): worst {ratio:.3g} at {shape}, {tokens} tokens: "
                      f"{'met' if ratio <= EAGER_GOAL else 'missed'}.")
    else:
        eager_goal = "Eager, nf4 vs bitsandbytes: bitsandbytes is not installed here, not compared."
    return "\n\n".join([
        "## matmul: fused 4-bit matmul vs bf16 F.linear and bitsandbytes",
        stamp(),
        "bf16 x; weight nf4 + double quant, blocksize 64; `nf4.matmul_4bit` (auto backend: "
        f"{route}) vs `F.linear` bf16 vs `bnb.matmul_4bit`, under no_grad. µs: median of "
        "CUDA-graph replays of one call, L2 flushed (GPU work, no Python). eager µs: the plain call "
        f"as a model makes it, back to back, cycling through copies of the weight spanning "
        f"{ROTATE_BYTES // 2**20} MiB per library (so L2 never holds it), one synchronize per loop, "
        f"median of {EAGER_REPEATS} loops (Python and launch included). host µs: that loop's time "
        "before its synchronize per call (what Python spends issuing one; meaningful where below the "
        "eager time). Ratios are time / bf16 time, same kind (lower is better); nf4/bnb eager: "
        "eager time over bitsandbytes' eager time. TFLOP/s is nf4's (graph). Harness floor: a "
        f"1-element fill kernel timed the same way measures {floor_ms * 1e3:.1f} µs (included in every "
        "graph figure).",
        text,
        "Worst shape per token count vs the issue's goals (H100; graph times), with the worst eager ratios:",
        table(["tokens", "worst nf4/bf16", "goal", "", "worst nf4/bf16 eager", "worst nf4/bnb eager"], goal_rows),
        eager_goal,
    ])


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
            r = backends.route(x.device, x.dtype, tokens, out_f, in_f, 64)  # what matmul_4bit runs
            chosen = f"{r.backend}:{r.kernel} {r.config}"
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
    require_cuda("bench_matmul")
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
