"""Host µs per 4-bit call and transformers generate tokens/s: nf4, bf16 and bitsandbytes, same run.

    python -m bench.bench_host               # both parts, into the RESULTS.md section "host"
    python -m bench.bench_host --layers 2    # the generate rows on a 2-layer model (a quick check)
    python -m bench.bench_host --no-generate # the per-call table only
    python -m bench.bench_host --profile     # cProfile of 2000 nf4.matmul_4bit calls, stdout only

Per call (issue 15's table): 1 token, 4096x4096, bf16 x, weight nf4 + double quant, blocksize 64.
Each call runs ``--calls`` times back to back (after a warm-up) with one synchronize at the end;
µs/call is that loop's wall time over the calls, the median of ``--repeats`` loops. Where "GPU
µs" (the kernels' own time per call, from torch.profiler, measured after all the loops) is below
it, the GPU waited on Python and µs/call is the host's cost. Rows: ``F.linear``; ``bnb.matmul_4bit`` and ``nf4.matmul_4bit`` (weight as
``Linear4bit`` passes it, ``weight.t()``); ``bnb.nn.Linear4bit`` and ``nf4.nn.Linear4bit`` (bf16
compute, built the same way, the second proving the drop-in); ``nf4.QuantLinear4bit``; LoRA r=16,
alpha 32, dropout 0 around a bf16 ``nn.Linear`` and around ``bnb.nn.Linear4bit`` (``LoRA`` below:
peft's forward, base(x) + B(A(x)) * scaling with bf16 ``nn.Linear`` adapters), and
``nf4.QuantLinear4bit`` r=16 with its default float32 adapters and with bf16 ones. Every row
runs under ``torch.no_grad()``; the LoRA rows also in training mode with grad enabled and an
input that requires grad (as every layer's input does past the first adapter of a LoRA model).

generate: transformers ``LlamaForCausalLM`` with Llama-3-8B's shapes and random bf16 weights
(built on the GPU from a config, one seed), batch 1, a 16-token prompt, 64 new tokens, greedy,
eager, the default dynamic cache. Setups: bf16; nf4 via ``nf4.quantize_model`` (every linear
but ``lm_head``); bitsandbytes, the same linears swapped by hand for ``bnb.nn.Linear4bit`` (nf4,
double quant, bf16 compute). A fresh model per setup, the previous one freed first. tokens/s:
new tokens over the wall time of one ``generate`` (prefill included), median of
``--generate-repeats`` after a short warm-up ``generate``.

Without a CUDA GPU it prints one line and exits with status 2 (``bench.common.NO_GPU_EXIT``).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import logging
import math
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

import torch
import torch.nn.functional as F
from torch import nn

import nf4
from bench.common import require_cuda, stamp, sync, table, write_section
from nf4.nn import QuantLinear4bit
from nf4.testing import LLAMA_SHAPES

try:
    import bitsandbytes as bnb
except ImportError:  # optional: its rows are left out without it
    bnb = None
try:
    import transformers
except ImportError:  # optional (the [hf] extra): the generate part is left out without it
    transformers = None

log = logging.getLogger("bench_host")

SHAPE = LLAMA_SHAPES["llama8b.attn_o"]  # 4096x4096, the table
RANK = 16
ALPHA = 32.0
GOAL = 1.2            # issue 15: nf4's host µs at most 1.2x its bf16 counterpart
GENERATE_GOALS = {"bf16": 1.0, "bnb": 1.2}  # nf4 tokens/s at least this times the setup's
SEED = 0
GB = 1e9

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)

F_LINEAR = "F.linear (bf16)"
BNB_MATMUL = "bnb.matmul_4bit"
NF4_MATMUL = "nf4.matmul_4bit"
BNB_LAYER = "bnb.nn.Linear4bit"
NF4_LAYER = "nf4.QuantLinear4bit (no adapters)"
NF4_COMPAT = "nf4.nn.Linear4bit"
BF16_LORA = "bf16 nn.Linear + LoRA r=16"
BNB_LORA = "bnb.nn.Linear4bit + LoRA r=16"
NF4_LORA = "nf4.QuantLinear4bit r=16 (fp32 adapters)"
NF4_LORA_BF16 = "nf4.QuantLinear4bit r=16 (bf16 adapters)"


class LoRA(nn.Module):
    """peft's LoRA ``Linear.forward`` reduced to what runs at dropout 0 with one adapter:
    ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, bf16 ``nn.Linear`` adapters, frozen base."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int):
        super().__init__()
        device = next(p.device for p in base.parameters())
        self.base = base.requires_grad_(False)
        self.lora_dropout = nn.Identity()  # peft's choice at lora_dropout=0
        self.lora_A = nn.Linear(in_features, RANK, bias=False, device=device, dtype=torch.bfloat16)
        self.lora_B = nn.Linear(RANK, out_features, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            self.lora_B.weight.normal_(0, 0.01)  # not peft's zeros: no path may skip a zero B
        self.scaling = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def linear4bit(lib, linear: nn.Linear) -> nn.Module:
    """``lib.Linear4bit`` (nf4, double quant, blocksize 64, bf16 compute) holding ``linear``'s
    weight, quantized on its device; ``lib`` is ``bitsandbytes.nn`` or ``nf4.nn`` (same code for
    both: nf4's is a drop-in)."""
    if linear.bias is not None:
        raise ValueError("linear4bit copies weights only; this layer has a bias")
    q = lib.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                       compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = lib.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                              compress_statistics=True, blocksize=64, module=q).to(linear.weight.device)
    return q


# ------------------------------------------------------------------------------- per call
@dataclass
class Call:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    lora: bool                     # has an adapter: also timed with grad, compared to bf16 + LoRA
    reference: Optional[str] = None  # the row whose time the goal bounds this one's by (GOAL x)


def build_calls(device: torch.device, out_features: int, in_features: int) -> list[Call]:
    """The issue's rows on one random bf16 weight (bitsandbytes' rows when it is installed)."""
    torch.manual_seed(SEED)
    linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    linear.requires_grad_(False)
    W = linear.weight
    packed, state = nf4.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")

    def quant_lora(adapter_dtype: torch.dtype) -> QuantLinear4bit:
        layer = QuantLinear4bit.from_linear(linear, lora_rank=RANK, lora_alpha=ALPHA, compute_dtype=torch.bfloat16)
        layer.lora_A = nn.Parameter(layer.lora_A.detach().to(adapter_dtype))
        layer.lora_B = nn.Parameter(torch.randn_like(layer.lora_B, dtype=adapter_dtype) * 0.01)
        return layer

    calls = [Call(F_LINEAR, lambda x: F.linear(x, W), lora=False)]
    if bnb is not None:
        q, qs = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        calls.append(Call(BNB_MATMUL, lambda x: bnb.matmul_4bit(x, q.t(), quant_state=qs), lora=False))
    calls.append(Call(NF4_MATMUL, lambda x: nf4.matmul_4bit(x, packed.t(), state), lora=False,
                      reference=F_LINEAR))
    bnb_layer = linear4bit(bnb.nn, linear) if bnb is not None else None
    if bnb_layer is not None:
        calls.append(Call(BNB_LAYER, bnb_layer, lora=False))
    calls += [Call(NF4_LAYER, QuantLinear4bit.from_linear(linear, compute_dtype=torch.bfloat16), lora=False,
                   reference=F_LINEAR),
              Call(NF4_COMPAT, linear4bit(nf4.nn, linear), lora=False, reference=F_LINEAR),
              Call(BF16_LORA, LoRA(linear, in_features, out_features), lora=True)]
    if bnb_layer is not None:
        calls.append(Call(BNB_LORA, LoRA(bnb_layer, in_features, out_features), lora=True))
    calls += [Call(NF4_LORA, quant_lora(torch.float32), lora=True, reference=BF16_LORA),
              Call(NF4_LORA_BF16, quant_lora(torch.bfloat16), lora=True, reference=BF16_LORA)]
    return calls


def host_us(fn: Callable[[], object], device: torch.device, calls: int, repeats: int, warmup: int) -> float:
    """Median over ``repeats`` of the wall µs per call of ``calls`` back-to-back calls, one
    synchronize at the end of each loop."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def kernel_us(fn: Callable[[], object], device: torch.device, calls: int) -> tuple[float, float]:
    """(device µs, kernels) per call: the self device time and count of every CUDA event that
    torch.profiler records over ``calls`` calls. NaN where none is recorded (CPU tensors)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not events:
        return math.nan, math.nan
    return (sum(e.self_device_time_total for e in events) / calls, sum(e.count for e in events) / calls)


@dataclass
class Timing:
    us: float          # wall µs per call in the eager loop
    device_us: float   # kernel µs per call
    kernels: float     # kernels launched per call


@dataclass
class Measured:
    name: str
    reference: Optional[str]
    no_grad: Timing
    grad: Optional[Timing]  # LoRA rows only


def measure_calls(device: torch.device, out_features: int, in_features: int, calls: int, repeats: int,
                  warmup: int, profiled: int) -> list[Measured]:
    """Every row of ``build_calls`` at one token: no_grad, and for LoRA rows grad too. All host
    timings come first, the profiled runs after them: once started, the profiler's CUDA tracing
    may stay attached to the process and tax later launches."""
    x = torch.randn(1, in_features, device=device, dtype=torch.bfloat16)
    x_grad = x.clone().requires_grad_(True)
    runs = []  # (call, mode, grad context, one call)
    for call in build_calls(device, out_features, in_features):
        runs.append((call, "no_grad", torch.no_grad, functools.partial(call.fn, x)))
        if call.lora:
            runs.append((call, "grad", torch.enable_grad, functools.partial(call.fn, x_grad)))

    def each(measure):
        out = []
        for call, mode, context, one in runs:
            if isinstance(call.fn, nn.Module):
                call.fn.train(mode == "grad")
            with context():
                out.append(measure(one))
        return out

    walls = each(lambda one: host_us(one, device, calls, repeats, warmup))
    kernels = each(lambda one: kernel_us(one, device, profiled))
    timings: dict[str, dict[str, Timing]] = {}
    for (call, mode, _, _), us, (device_us, count) in zip(runs, walls, kernels):
        timings.setdefault(call.name, {})[mode] = Timing(us, device_us, count)
        log.info("%s, %s: %.1f µs/call; kernels %.1f µs in %.1f launches", call.name, mode, us, device_us, count)
    refs = {call.name: call.reference for call, *_ in runs}
    return [Measured(name, refs[name], t["no_grad"], t.get("grad")) for name, t in timings.items()]


def calls_report(results: list[Measured]) -> tuple[str, list[list]]:
    """(table, goal rows) of the per-call part."""
    by = {m.name: m for m in results}

    def ratio(name: str, ref: str, mode: str) -> float:
        a, b = (getattr(by[n], mode) if n in by else None for n in (name, ref))
        return math.nan if a is None or b is None else a.us / b.us

    rows, goals = [], []
    for m in results:
        g = m.grad
        rows.append([m.name, m.no_grad.us, m.no_grad.device_us, m.no_grad.kernels,
                     ratio(m.name, F_LINEAR, "no_grad"),
                     "" if g is None else ratio(m.name, BF16_LORA, "no_grad"),
                     "" if g is None else g.us, "" if g is None else g.device_us,
                     "" if g is None else ratio(m.name, BF16_LORA, "grad")])
        for mode in ("no_grad", "grad"):
            if m.reference is not None and getattr(m, mode) is not None:
                r = ratio(m.name, m.reference, mode)
                goals.append([f"{m.name} / {m.reference}, {mode.replace('_', ' ')}", r, f"<= {GOAL}",
                              "met" if r <= GOAL else "NOT met"])
    text = table(["call", "µs/call", "GPU µs/call", "kernels/call", "x F.linear", "x bf16+LoRA",
                  "µs/call, grad", "GPU µs, grad", "x bf16+LoRA, grad"], rows)
    return text, goals


# ------------------------------------------------------------------------------- generate
def llama(shape: dict, layers: int, device: torch.device) -> nn.Module:
    """``LlamaForCausalLM`` with ``shape`` and ``layers`` decoder layers, random bf16 weights
    built on ``device`` (16 GB at Llama-3-8B's 32 layers), same seed every time."""
    config = transformers.LlamaConfig(**{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def to_bnb(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` but ``lm_head`` for ``bnb.nn.Linear4bit`` on its device, one at a
    time (each bf16 weight is freed as its layer goes). Returns the count."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear4bit(bnb.nn, model.get_submodule(name)))
    return len(names)


def convert(setup: str, model: nn.Module, device: torch.device) -> int:
    """Quantize ``model`` in place for ``setup``; returns how many linear layers are 4-bit."""
    if setup == "bf16":
        return 0
    if setup == "nf4":
        nf4.quantize_model(model, device=device, compute_dtype=torch.bfloat16)
        return sum(isinstance(m, QuantLinear4bit) for m in model.modules())
    if setup == "bnb":
        return to_bnb(model)
    raise ValueError(f"unknown setup {setup!r}, expected bf16, nf4 or bnb")


def tokens_per_s(model: nn.Module, device: torch.device, prompt: int, new_tokens: int, repeats: int,
                 warmup_tokens: int) -> float:
    """Median new tokens per second of greedy ``generate`` (prefill included)."""
    g = torch.Generator(device="cpu").manual_seed(SEED + 1)
    ids = torch.randint(model.config.vocab_size, (1, prompt), generator=g).to(device)
    # min_new_tokens: a random model may well emit the config's EOS id and stop early.
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=warmup_tokens, min_new_tokens=warmup_tokens, **kwargs)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(device)
        elapsed = time.perf_counter() - start
        made = out.shape[1] - prompt
        if made != new_tokens:
            log.warning("generate made %d tokens, asked for %d", made, new_tokens)
        rates.append(made / elapsed)
    return statistics.median(rates)


@dataclass
class GenerateResult:
    setup: str
    quantized: int       # 4-bit linear layers
    weights_gb: float    # memory allocated once converted (CUDA), NaN on CPU
    tokens_per_s: float


def measure_generate(device: torch.device, shape: dict, layers: int, setups: list[str], prompt: int,
                     new_tokens: int, repeats: int, warmup_tokens: int = 4) -> list[GenerateResult]:
    results = []
    for setup in setups:
        model = llama(shape, layers, device)
        quantized = convert(setup, model, device)
        sync(device)
        weights = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else math.nan
        rate = tokens_per_s(model, device, prompt, new_tokens, repeats, warmup_tokens)
        results.append(GenerateResult(setup, quantized, weights, rate))
        log.info("generate %s: %d 4-bit linears, weights %.2f GB, %.2f tokens/s", setup, quantized, weights, rate)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            log.info("after %s: %.2f GB still allocated", setup, torch.cuda.memory_allocated(device) / GB)
    return results


def generate_report(results: list[GenerateResult]) -> tuple[str, list[list]]:
    by = {r.setup: r for r in results}
    rows = [[r.setup, r.quantized, r.weights_gb, r.tokens_per_s, 1e3 / r.tokens_per_s,
             by["nf4"].tokens_per_s / r.tokens_per_s if "nf4" in by else math.nan] for r in results]
    goals = []
    if "nf4" in by:
        for other, want in GENERATE_GOALS.items():
            if other in by:
                r = by["nf4"].tokens_per_s / by[other].tokens_per_s
                goals.append([f"generate: nf4 tokens/s / {other}", r, f">= {want}", "met" if r >= want else "NOT met"])
    text = table(["setup", "4-bit linears", "weights GB", "tokens/s", "ms/token", "nf4 speed-up"], rows)
    return text, goals


# ------------------------------------------------------------------------------- profile
def profile_matmul(device: torch.device, out_features: int, in_features: int, calls: int, top: int,
                   stream: TextIO) -> None:
    """cProfile of ``calls`` eager ``nf4.matmul_4bit`` calls at 1 token under no_grad (after a
    warm-up), the ``top`` functions by cumulative time, written to ``stream``."""
    torch.manual_seed(SEED)
    W = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
    packed, state = nf4.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    x = torch.randn(1, in_features, device=device, dtype=torch.bfloat16)
    B = packed.t()
    with torch.no_grad():
        for _ in range(50):
            nf4.matmul_4bit(x, B, state)
        sync(device)
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        for _ in range(calls):
            nf4.matmul_4bit(x, B, state)
        sync(device)
        prof.disable()
        wall = time.perf_counter() - start
    stream.write(f"cProfile of {calls} nf4.matmul_4bit calls, 1 token, {out_features}x{in_features}, "
                 f"{device}: {wall / calls * 1e6:.1f} µs/call under the profiler\n")
    pstats.Stats(prof, stream=stream).sort_stats("cumulative").print_stats(top)


# ------------------------------------------------------------------------------- main
def report(calls_text: str, goals: list[list], gen_text: Optional[str], layers: int, args,
           shape: tuple[int, int] = SHAPE) -> str:
    out_f, in_f = shape
    lines = [
        "## host: per-call host cost and transformers generate (`bench/bench_host.py`)",
        "",
        stamp(),
        "",
        f"Per call: 1 token, {out_f}x{in_f}, bf16 x, nf4 + double quant, blocksize 64. µs/call: wall "
        f"time of {args.calls} back-to-back eager calls (one synchronize at the end) over {args.calls}, "
        f"median of {args.repeats} loops; the GPU waits on Python whenever GPU µs/call (the kernels' "
        "own time, torch.profiler) is below it, so µs/call is then the host's cost. kernels/call: "
        "launches per call. LoRA: r=16, alpha 32, dropout 0; 'bf16 nn.Linear + LoRA' and 'bnb + LoRA' "
        "are peft's forward (base(x) + B(A(x)) * s, bf16 nn.Linear adapters). grad: training mode, "
        "grad enabled, input requiring grad. Ratios: µs/call over the named row's, same mode.",
        "",
        calls_text,
        "",
    ]
    if bnb is None:
        lines += ["bitsandbytes is not installed here: its rows are left out.", ""]
    if gen_text is not None:
        scope = "Llama-3-8B shapes" if layers == LLAMA3_8B["num_hidden_layers"] else \
            f"Llama-3-8B shapes but {layers} of its 32 layers (a quick check, not the 8B figure)"
        lines += [f"transformers {transformers.__version__} `generate`, {scope}, random bf16 weights, batch 1, "
                  f"{args.prompt}-token prompt, {args.new_tokens} new tokens, greedy, eager, dynamic cache; "
                  f"median of {args.generate_repeats} runs after a warm-up. tokens/s: new tokens over the "
                  "wall time of one generate (prefill included). Weights GB: allocated after conversion "
                  "(1e9 B). nf4 speed-up: nf4 tokens/s over the row's.", "", gen_text, ""]
    else:
        lines += ["generate: not run (--no-generate, or transformers not installed).", ""]
    lines += ["Goals (issue 15):", "", table(["goal", "measured", "target", ""], goals)]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per row (median)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls before a row's loops")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"],
                        help="decoder layers of the generate model (32: Llama-3-8B)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--generate-repeats", type=int, default=3)
    parser.add_argument("--no-generate", action="store_true", help="the per-call table only")
    parser.add_argument("--profile", action="store_true",
                        help="only a cProfile of --calls nf4.matmul_4bit calls (top 25), to stdout")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, device: torch.device, shape: tuple[int, int] = SHAPE,
        model_shape: dict = LLAMA3_8B) -> str:
    """Both parts as ``args`` ask, on ``device``; returns the RESULTS.md section."""
    results = measure_calls(device, *shape, calls=args.calls, repeats=args.repeats, warmup=args.warmup,
                            profiled=min(200, args.calls))
    calls_text, goals = calls_report(results)
    gen_text = None
    if transformers is None:
        log.warning("transformers is not installed: generate not measured")
    elif not args.no_generate:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the per-call rows' weights, freed when measure_calls returned
        setups = ["bf16", "nf4"] + (["bnb"] if bnb is not None else [])
        gen = measure_generate(device, model_shape, args.layers, setups, args.prompt, args.new_tokens,
                               args.generate_repeats)
        gen_text, gen_goals = generate_report(gen)
        goals += gen_goals
    return report(calls_text, goals, gen_text, args.layers, args, shape)


def main() -> None:
    args = parse_args()
    require_cuda("bench_host")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device("cuda")
    if args.profile:
        profile_matmul(device, *SHAPE, args.calls, 25, sys.stdout)
        return
    write_section("host", run(args, device))


if __name__ == "__main__":
    main()
