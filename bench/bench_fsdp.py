"""QLoRA under FSDP2 on 1 and 2 GPUs: the same loss curve, and tokens/s on Llama-3-8B shapes.

Runs ``examples/qlora_fsdp.py`` four times, each in fresh processes (run ``bench/bench_fsdp.sh``,
which builds nf4 and sets the NCCL environment, rather than this module directly):

    tiny  1 GPU   the fixture tiny Llama, unsharded, global batch 4 = 2 micro-batches of 2
    tiny  2 GPUs  the same, sharded (FSDP2, one micro-batch per rank): the loss curves compare
    8B    1 GPU   Llama-3-8B shapes, random bf16 weights quantized to NF4, unsharded
    8B    2 GPUs  the same, sharded

The 8B setup is the end-to-end benchmark's (``bench/bench_qlora.py``): 2048-token sequences,
activation checkpointing, bf16 autocast, LoRA rank 16 / alpha 32 on all seven projections,
AdamW; here a step takes 2 sequences (4096 tokens), as 2 accumulated micro-batches on 1 GPU and
one per rank on 2. tokens/s counts the global batch over the timed steps (after warm-up).
Runs that fail or do not fit the time budget are reported as such, so the section is always
written (``write_section("fsdp", ...)``). Per-run logs and JSON land in ``$OUT/nf4_bench_fsdp``
(or the temporary folder).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from bench.common import require_cuda, stamp, table, write_section

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "qlora_fsdp.py"
TINY = ["--steps", "20", "--global-batch", "4", "--micro-batch", "2", "--seq-len", "64", "--warmup", "2"]
LLAMA8B = ["--model-8b-shaped", "--seq-len", "2048", "--global-batch", "2", "--micro-batch", "1",
           "--checkpointing", "--lr", "2e-4"]


def launcher(gpus: int) -> list[str]:
    if gpus == 1:
        return [sys.executable]  # unsharded: the single-GPU baseline has no FSDP at all
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus)]


def run(name: str, gpus: int, args: list[str], work: Path, timeout: float) -> dict:
    """One training run; its JSON result, or {"error": ...} when it fails or times out."""
    result_path = work / f"{name}.json"
    log_path = work / f"{name}.log"
    if timeout < 30:
        return {"error": "not run: time budget used up"}
    cmd = launcher(gpus) + [str(EXAMPLE)] + args + ["--loss-json", str(result_path)]
    log.info("%s: %s (timeout %.0f s)", name, " ".join(cmd), timeout)
    start = time.perf_counter()
    with open(log_path, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
            rc: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - start
    tail = log_path.read_text()[-2000:]
    if rc != 0 or not result_path.exists():
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}"
        log.error("%s %s; log tail:\n%s", name, why, tail)
        return {"error": why, "wall_s": wall}
    result = json.loads(result_path.read_text())
    result["wall_s"] = wall
    log.info("%s: %.0f tokens/s, losses %s (%.0f s wall)", name, result["tokens_per_s"],
             " ".join(f"{v:.4f}" for v in result["losses"]), wall)
    return result


def loss_section(one: dict, two: dict) -> str:
    if "error" in one or "error" in two:
        return (f"Loss curves: not compared (1 GPU: {one.get('error', 'ok')}; "
                f"2 GPUs: {two.get('error', 'ok')}).")
    rows = []
    for step, (a, b) in enumerate(zip(one["losses"], two["losses"])):
        rows.append([step, f"{a:.6f}", f"{b:.6f}", f"{abs(a - b):.2e}"])
    worst = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"]))
    same = one["losses"] == two["losses"]
    return "\n\n".join([
        "Loss curve, tiny Llama fixture (2 layers, hidden 256), 64-token sequences, global batch 4: "
        "1 GPU unsharded (2 accumulated micro-batches of 2) vs 2 GPUs FSDP2 (one micro-batch per "
        "rank); same seeds, data and adapter initialization.",
        table(["step", "1 GPU loss", "2 GPUs loss", "abs. diff"], rows),
        f"Identical bits: {'yes' if same else 'no'}; largest relative difference {worst:.2e}. "
        f"On the CPU the two runs are bit-identical (tests/test_fsdp.py); on a GPU, kernels whose "
        f"bits vary from run to run (split-K atomics) may add differences."])


def throughput_section(one: dict, two: dict) -> str:
    rows = []
    for gpus, r in ((1, one), (2, two)):
        if "error" in r:
            rows.append([gpus, "unsharded" if gpus == 1 else "FSDP2", r["error"], "", "", "", "", ""])
            continue
        tokens = r["global_batch"] * r["seq_len"]
        rows.append([gpus, "FSDP2" if r["sharded"] else "unsharded", tokens, f"{r['step_s']:.3f}",
                     f"{r['tokens_per_s']:,.0f}", "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}",
                     "n/a" if r.get("setup_peak_gb") is None else f"{r['setup_peak_gb']:.2f}",
                     " ".join(f"{v:.3f}" for v in r["losses"])])
    parts = ["tokens/s, Llama-3-8B shapes (32 layers, hidden 4096, vocab 128256; random bf16 weights "
             "quantized to NF4 with double quant), 2048-token sequences, 2 per step, activation "
             "checkpointing, bf16 autocast, LoRA r=16 on q,k,v,o,gate,up,down, AdamW; timed after "
             "2 warm-up steps. Training peak: rank 0's max_memory_allocated over the steps; setup "
             "peak: the same while the random model is built in bf16 and quantized (whole on every "
             "rank before sharding).",
             table(["GPUs", "model", "tokens/step", "s/step", "tokens/s", "training peak GB",
                    "setup peak GB", "losses"], rows)]
    if "error" not in one and "error" not in two:
        speedup = two["tokens_per_s"] / one["tokens_per_s"]
        parts.append(f"2 GPUs / 1 GPU: {speedup:.2f}x tokens/s ({speedup / 2:.0%} scaling efficiency).")
    return "\n\n".join(parts)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for all four runs")
    p.add_argument("--steps-8b", type=int, default=6, help="8B steps per run (2 of them warm-up)")
    args = p.parse_args()
    require_cuda("bench_fsdp")
    deadline = time.perf_counter() + args.budget_s
    work = Path(os.environ.get("OUT") or tempfile.gettempdir()) / "nf4_bench_fsdp"
    work.mkdir(parents=True, exist_ok=True)

    def left(share: float) -> float:
        # Each run may take at most `share` of what is left, so a hung run cannot starve the rest.
        return (deadline - time.perf_counter()) * share

    llama = LLAMA8B + ["--steps", str(args.steps_8b), "--warmup", "2"]
    tiny1 = run("tiny_1gpu", 1, TINY, work, left(0.2))
    tiny2 = run("tiny_2gpu", 2, TINY, work, left(0.25))
    big1 = run("llama8b_1gpu", 1, llama, work, left(0.5))
    big2 = run("llama8b_2gpu", 2, llama, work, left(0.95))
    body = "\n\n".join([
        "### QLoRA under FSDP2: 1 vs 2 GPUs (`bench/bench_fsdp.py`, `examples/qlora_fsdp.py`)",
        stamp() + f", NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE', 'unset')}, "
                  f"TORCH_SYMM_MEM_DISABLE_MULTICAST={os.environ.get('TORCH_SYMM_MEM_DISABLE_MULTICAST', 'unset')}",
        loss_section(tiny1, tiny2),
        throughput_section(big1, big2),
    ])
    write_section("fsdp", body)


if __name__ == "__main__":
    main()
