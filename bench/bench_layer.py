"""QLoRA layer: forward + backward (gradients to the input and the adapter) at 8192 tokens, rank 16.

Three layers from the same run, for each Llama-8B projection shape:
    bf16      frozen bf16 ``nn.Linear`` + unfused LoRA: ``y = x W^T + (x A^T B^T) * s``
    bnb       bitsandbytes ``Linear4bit`` (nf4, double quant, bf16 compute) + the same LoRA
    nf4       ``nf4.QuantLinear4bit`` (LoRA fused into the output pass)
Time is the median (p20-p80) of ``bench_ms``; memory is ``max_memory_allocated`` during one step
above what was allocated before it (layer, input and upstream gradient excluded).
Goal (issue 5): nf4 at most 1.0x the bf16 time on every shape, with no more peak memory.

    python -m bench.bench_layer            # the table, into bench/RESULTS.md
    python -m bench.bench_layer --profile  # plus a per-kernel CUDA time breakdown of each layer
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

from bench.common import bench_ms, require_cuda, stamp, table, write_section
from nf4.nn import QuantLinear4bit
from nf4.testing import LLAMA_SHAPES

try:
    import bitsandbytes as bnb
except ImportError:  # optional: the comparison column is left empty without it
    bnb = None

log = logging.getLogger(__name__)

TOKENS = 8192
RANK = 16
ALPHA = 32.0
SHAPES = [LLAMA_SHAPES[k] for k in ("llama8b.attn_o", "llama8b.mlp_up", "llama8b.mlp_down")]
MIB = 2**20


class UnfusedLoRA(nn.Module):
    """A frozen base layer plus the textbook LoRA branch, as peft computes it."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(RANK, in_features, device="cuda", dtype=torch.bfloat16))
        self.lora_B = nn.Parameter(torch.randn(out_features, RANK, device="cuda", dtype=torch.bfloat16) * 0.01)
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.scaling = ALPHA / RANK

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def make_layers(out_features: int, in_features: int) -> dict[str, nn.Module]:
    linear = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.requires_grad_(False)
    layers = {"bf16": UnfusedLoRA(linear, in_features, out_features)}
    if bnb is not None:
        q = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
        q.load_state_dict(linear.state_dict())
        layers["bnb"] = UnfusedLoRA(q.cuda(), in_features, out_features)
    ours = QuantLinear4bit.from_linear(linear, lora_rank=RANK, lora_alpha=ALPHA,
                                       compute_dtype=torch.bfloat16)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.01)
    layers["nf4"] = ours
    return layers


def step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [layer.lora_A, layer.lora_B]

    def step():
        y = layer(x)
        return torch.autograd.grad(y, [x, *params], dy)

    return step


def enqueue_ms(fn, steps: int = 20) -> float:
    """CPU milliseconds to issue one step (no synchronization inside the loop). When this
    exceeds the GPU time, the GPU waits for the CPU and the measured time is the CPU's."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / steps * 1e3


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def profile(name: str, fn) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    log.info("%s, 5 steps:\n%s", name, prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="log a per-kernel breakdown")
    args = parser.parse_args()
    require_cuda("bench_layer")
    rows = []
    for out_features, in_features in SHAPES:
        torch.manual_seed(0)
        layers = make_layers(out_features, in_features)
        x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(TOKENS, out_features, device="cuda", dtype=torch.bfloat16)
        res = {}
        for name, layer in layers.items():
            fn = step_fn(layer, x, dy)
            fn()
            mem = peak_mib(fn)
            ms = bench_ms(fn)
            res[name] = (ms, mem)
            log.info("%dx%d %s: CPU %.3f ms to issue one step", out_features, in_features, name,
                     enqueue_ms(fn))
            if args.profile:
                profile(f"{out_features}x{in_features} {name}", fn)
            log.info("%dx%d %s: %.3f ms, peak +%.0f MiB", out_features, in_features, name, ms[0], mem)
        with torch.no_grad():
            y_ref = layers["bf16"](x)
            err = (layers["nf4"](x) - y_ref).float().abs().max().item() / y_ref.float().abs().max().item()
        del layers
        b16 = res["bf16"]
        nf = res["nf4"]
        bn = res.get("bnb")

        def fmt(r):
            return "n/a" if r is None else f"{r[0][0]:.3f} ({r[0][1]:.3f}-{r[0][2]:.3f})"

        rows.append([f"{out_features}x{in_features}", fmt(b16), fmt(bn), fmt(nf),
                     f"{nf[0][0] / b16[0][0]:.3f}", f"{b16[1]:.0f}", "n/a" if bn is None else f"{bn[1]:.0f}",
                     f"{nf[1]:.0f}", f"{err:.3f}",
                     "yes" if nf[0][0] <= b16[0][0] and nf[1] <= b16[1] else "no"])
    body = "\n".join([
        "## QLoRA layer: forward + backward, 8192 tokens, LoRA rank 16 (`bench/bench_layer.py`)",
        "",
        stamp(),
        "",
        "Time: median (p20-p80) ms of one step (forward, then gradients to x, A and B). Peak: MiB "
        "allocated at peak during one step above the allocation before it. Goal: nf4 <= 1.0x bf16 "
        "time and <= bf16 peak. rel. diff: max|nf4 - bf16| / max|bf16| of the forward output "
        "(4-bit weight error).",
        "",
        table(["out x in", "bf16+LoRA ms", "bnb+LoRA ms", "nf4 ms", "nf4 / bf16", "bf16 peak MiB",
               "bnb peak MiB", "nf4 peak MiB", "rel. diff", "goal met"], rows),
    ])
    write_section("layer", body)


if __name__ == "__main__":
    main()
