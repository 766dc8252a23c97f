"""Loading an 8B-shaped bf16 checkpoint into 4 bits: nf4.from_pretrained vs transformers + bnb.

    python -m bench.bench_load [--shape llama3-8b|tiny] [--dir DIR] [--keep]

Writes a Llama-3-8B-shaped checkpoint with random bf16 weights (~16 GB, 4 shards) to local disk,
reads it once so both loaders start from a warm page cache, then loads it in fresh processes,
alternating nf4 and transformers + bitsandbytes (nf4, bnb4, double quant, bf16 compute). Each
child reports wall time of the load call, peak anonymous host memory (RssAnon from
/proc/self/status sampled by a thread every 2 ms: mmap'd checkpoint pages are page cache, not
anon), peak and final GPU memory (torch.cuda.max_memory_allocated / memory_allocated). Both
children import torch/transformers and create the CUDA context before the clock starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nf4.loading
from bench.common import stamp, table, write_section
from nf4.loading import checkpoint

SHAPES = {
    # Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 8 KV heads, vocab 128256, untied head.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                 tie_word_embeddings=False),
}
SHARDS = 4
# The layer whose quantized bytes the two loaders must agree on (a 14336x4096 MLP projection).
PROBE = "model.layers.0.mlp.down_proj.weight"


def write_checkpoint(folder: Path, shape: str) -> int:
    """Random bf16 weights (N(0, 0.02), norms 1) written shard by shard; returns bytes written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    total = sum(2 * torch.Size(s).numel() for s in names.values())
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    per_shard = -(-total // SHARDS)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        index += 1
        file = f"model-{index:05d}-of-{SHARDS:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard, size = {}, 0

    for name, s in names.items():
        if name.endswith("norm.weight"):
            t = torch.ones(s, dtype=torch.bfloat16)
        else:
            t = (torch.randn(s, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()
        shard[name] = t
        size += t.numel() * 2
        if size >= per_shard and index < SHARDS - 1:
            flush()
    flush()
    # Rename if fewer shards than planned were needed (tiny shapes).
    if index != SHARDS:
        for i in range(1, index + 1):
            old = folder / f"model-{i:05d}-of-{SHARDS:05d}.safetensors"
            new = f"model-{i:05d}-of-{index:05d}.safetensors"
            old.rename(folder / new)
            weight_map = {k: (new if v == old.name else v) for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    return total


def warm(folder: Path) -> float:
    """Read every file once (page cache); returns GB/s."""
    start, n = time.perf_counter(), 0
    for p in sorted(folder.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                n += len(chunk)
    return n / (time.perf_counter() - start) / 1e9


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakAnon(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_anon()
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, _rss_anon())


def child(variant: str, folder: str, probe_out: str) -> None:
    """One timed load in this process; prints a JSON line. ``nf4:T`` uses T reader threads;
    ``read:T`` only streams the bytes to the device (the I/O ceiling of the pipeline)."""
    import transformers


    variant, _, threads = variant.partition(":")
    if threads:
        checkpoint.READER_THREADS = int(threads)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("nf4.loading").setLevel(logging.DEBUG)
    transformers.LlamaForCausalLM  # the lazy module import, outside the clock for both loaders
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.zeros(1, device=device)  # CUDA context before the clock
    base = _rss_anon()
    sampler = _PeakAnon()
    sampler.start()
    start = time.perf_counter()
    if variant == "nf4":
        model = nf4.loading.from_pretrained(folder, device=device, progress=False)
    elif variant == "read":
        entries = sorted(checkpoint.Checkpoint(folder).entries.values(), key=lambda e: (str(e.shard), e.offset))
        for _ in checkpoint.stream_tensors(entries, device):
            pass
        model = None
    else:
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    result = dict(variant=variant, wall_s=wall, rss_anon_peak=max(sampler.peak, _rss_anon()),
                  rss_anon_base=base)
    if device == "cuda":
        result.update(gpu_peak=torch.cuda.max_memory_allocated(), gpu_final=torch.cuda.memory_allocated())
    if model is not None:
        module = model.get_submodule(PROBE.rsplit(".", 1)[0])
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, probe_out)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(variant: str, folder: Path, probe_out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_load", "--child", variant, str(folder),
                           str(probe_out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} load failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    if variant.startswith("nf4"):
        print("\n".join(proc.stderr.splitlines()[-12:]), flush=True)
    return json.loads(line[len("RESULT "):])


def compare_probes(a: Path, b: Path) -> str:
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        lines = []
        for key in ("weight", "weight.absmax"):
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            lines.append(f"{key}: {int((x != y).sum())} of {x.numel()} bytes differ")
        return "; ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nf4_bench_load"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "DIR", "PROBE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    ckpt = args.dir / "ckpt"
    t0 = time.perf_counter()
    if not (ckpt / "model.safetensors.index.json").exists():
        nbytes = write_checkpoint(ckpt, args.shape)
        print(f"wrote {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    for attempt in (1, 2):  # the second pass shows whether the page cache holds the whole checkpoint
        print(f"page cache warm-up read {attempt} at {warm(ckpt):.1f} GB/s", flush=True)
    variants = ["nf4", "bnb"]
    try:
        import bitsandbytes  # noqa: F401  (optional: only its presence is checked)
    except ImportError:
        variants = ["nf4"]
        print("bitsandbytes not installed: timing nf4 only", flush=True)
    results = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            results[v].append(run_child(v, ckpt, args.dir / f"probe_{v}.safetensors"))
            print(v, results[v][-1], flush=True)
    extra = {}
    if torch.cuda.is_available():
        # Diagnostics only (not in the table's goals): the pipeline's I/O ceiling and thread counts.
        for v in ("read:8", "read:16", "nf4:4", "nf4:16"):
            extra[v] = run_child(v, ckpt, args.dir / "probe_extra.safetensors")
            print(v, extra[v], flush=True)
    probe = compare_probes(args.dir / "probe_nf4.safetensors", args.dir / "probe_bnb.safetensors") \
        if len(variants) == 2 else "n/a"
    gb = 1e9
    rows = []
    for v in variants:
        rs = results[v]
        row = [v if v == "nf4" else "transformers + bitsandbytes",
               statistics.median(r["wall_s"] for r in rs), min(r["wall_s"] for r in rs),
               max(r["rss_anon_peak"] for r in rs) / gb,
               max(r["rss_anon_peak"] - r["rss_anon_base"] for r in rs) / gb]
        if "gpu_peak" in rs[0]:
            row += [max(r["gpu_peak"] for r in rs) / gb, rs[-1]["gpu_final"] / gb]
        rows.append(row)
    headers = ["loader", "wall s (median)", "wall s (best)", "peak RssAnon GB", "RssAnon over start GB",
               "peak GPU GB", "final GPU GB"][:len(rows[0])]
    largest = max(2 * torch.Size(s).numel() for s in _shapes(args.shape).values())
    body = [f"### Loading a {args.shape} bf16 checkpoint into NF4 (double quant, bf16 compute)", "",
            stamp(), "",
            f"Checkpoint: random bf16 weights, {SHARDS} shards, page cache warm; each load in a fresh "
            f"process, {args.repeats} runs each, alternating. Largest tensor {largest / gb:.2f} GB "
            f"(embedding). GB = 1e9 bytes.", "", table(headers, rows), "",
            f"Quantized bytes of `{PROBE}`, nf4 vs bnb: {probe}."]
    if extra:
        body += ["", "Diagnostics (one run each): " + ", ".join(
            f"{v} {r['wall_s']:.2f} s" for v, r in extra.items())
            + " (read:T = bytes to the GPU only with T reader threads; nf4:T = full load with T threads; "
              "default 8)."]
    if len(rows) == 2:
        ratio = rows[0][1] / rows[1][1]
        body += ["", f"nf4 / bnb wall time: {ratio:.2f}x (goal <= 0.6x)."]
        if len(rows[0]) > 5:
            body += [f"nf4 peak GPU - final: {rows[0][5] - rows[0][6]:.2f} GB (goal <= largest tensor "
                     f"{largest / gb:.2f} GB); nf4 peak RssAnon {rows[0][3]:.2f} GB (goal <= 1.5 GB)."]
    write_section("load", "\n".join(body))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def _shapes(shape: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
