"""Loading an 8B-shaped bf16 checkpoint into 4 bits: nf4 (auto, mmap, read) vs transformers + bnb vs raw mmap.

    python -m bench.bench_load [--dir DIR] [--shape llama3-8b|tiny] [--repeats 2] [--cold-repeats 1]
                               [--budget-s 540] [--prepare] [--keep]

Writes a Llama-3-8B-shaped checkpoint with random bf16 weights (~16 GB, 4 shards) under ``--dir``
(or ``$NF4_BENCH_LOAD_DIR``; one of them is required), announcing its size and the free disk
first, then loads it in fresh processes, one loader after the other in turn:

- ``nf4 (auto)`` / ``nf4 (mmap)`` / ``nf4 (read)``: ``nf4.from_pretrained`` (nf4, double quant,
  bf16 compute) with ``NF4_LOAD_IO`` set to each I/O strategy (nf4.loading.io; ``auto``, the
  default, maps the files and preads chunks that are not in the page cache);
- ``transformers + bitsandbytes``: the same quantization through transformers (when bitsandbytes
  is installed and there is a GPU);
- ``raw mmap``: the ceiling the issue names: each shard mmap'd, ``torch.frombuffer`` over it, copied
  to the device in 256 MB chunks (no parsing, no quantization).

Page cache warm (every file read twice first), and cold: before each cold child every shard is
fsync'd and dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed); a timed read
of the dropped files shows whether the drop took. Each child reports the wall time of the load
call, peak RSS (VmHWM: includes mapped page-cache pages, which are file-backed and reclaimable),
peak RssAnon (anonymous memory only, sampled every 2 ms), and peak / final GPU memory. Every child
imports torch/transformers and creates the CUDA context before its clock starts. The section of
bench/RESULTS.md is written only from a GPU run; a CPU run (``--shape tiny``) prints it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import mmap
import os
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
from nf4.loading import checkpoint, io

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
DIR_ENV = "NF4_BENCH_LOAD_DIR"
# The layer whose quantized bytes the loaders must agree on (a 14336x4096 MLP projection).
PROBE = "model.layers.0.mlp.down_proj.weight"
# The raw ceiling's chunk, as the issue measured it (1.81 s for 16 GB on the H200 machine).
RAW_CHUNK_BYTES = 256 * 2**20
LOADERS = {"nf4:auto": "nf4 (auto)", "nf4:mmap": "nf4 (mmap)", "nf4:read": "nf4 (read)",
           "bnb": "transformers + bitsandbytes", "raw": "raw mmap + frombuffer, 256 MB chunks"}
GB = 1e9


def _shapes(shape: str) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_checkpoint(folder: Path, shape: str, names: dict[str, tuple[int, ...]]) -> None:
    """Random bf16 weights (N(0, 0.02), norms 1) written shard by shard."""
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
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


def read_all(folder: Path) -> float:
    """Read every file once with read() on one thread; returns GB/s."""
    start, n = time.perf_counter(), 0
    for p in sorted(folder.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                n += len(chunk)
    return n / (time.perf_counter() - start) / GB


def drop_cache(folder: Path) -> None:
    """Drop the folder's files from the page cache: fsync (dirty pages do not drop), then
    POSIX_FADV_DONTNEED, which any process that can open the file may ask for."""
    for p in sorted(folder.iterdir()):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakAnon(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _status("RssAnon")
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, _status("RssAnon"))


def raw_to_device(folder: Path, device: str) -> None:
    """Every shard's bytes to ``device`` through mmap + torch.frombuffer, 256 MB at a time (a
    pageable copy: the driver stages it), into one reused device buffer."""
    buffer = torch.empty(RAW_CHUNK_BYTES, dtype=torch.uint8, device=device)
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        size = len(mapped)
        for start in range(0, size, RAW_CHUNK_BYTES):
            n = min(RAW_CHUNK_BYTES, size - start)
            buffer[:n].copy_(torch.frombuffer(mapped, dtype=torch.uint8, count=n, offset=start))
        del mapped  # frombuffer's tensors are gone; the map is unmapped with its last reference


def child(variant: str, folder: str, probe_out: str) -> None:
    """One timed load in this process; prints a JSON line. ``nf4:S[:T]`` loads with I/O strategy
    S (and T reader threads), ``stream:S`` only streams the tensors to the device through nf4's
    pipeline (its I/O ceiling), ``raw`` and ``bnb`` as in the module docstring."""
    import transformers

    kind, _, rest = variant.partition(":")
    strategy, _, threads = rest.partition(":")
    if threads:
        io.READER_THREADS = int(threads)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("nf4.loading").setLevel(logging.INFO)
    transformers.LlamaForCausalLM  # the lazy module import, outside the clock for every loader
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.zeros(1, device=device)  # CUDA context before the clock
    base = _status("RssAnon")
    sampler = _PeakAnon()
    sampler.start()
    model = None
    start = time.perf_counter()
    if kind == "nf4":
        model = nf4.loading.from_pretrained(folder, device=device, progress=False)
    elif kind == "stream":
        entries = sorted(checkpoint.Checkpoint(folder).entries.values(), key=lambda e: (str(e.shard), e.offset))
        for _ in io.stream_tensors(entries, device, strategy=strategy):
            pass
    elif kind == "raw":
        raw_to_device(Path(folder), device)
    elif kind == "bnb":
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    result = dict(variant=variant, wall_s=wall, rss_peak=_status("VmHWM"),
                  rss_anon_peak=max(sampler.peak, _status("RssAnon")), rss_anon_base=base)
    if device == "cuda":
        result.update(gpu_peak=torch.cuda.max_memory_allocated(), gpu_final=torch.cuda.memory_allocated())
    if model is not None:
        module = model.get_submodule(PROBE.rsplit(".", 1)[0])
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, probe_out)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(variant: str, folder: Path, probe_out: Path) -> dict:
    env = dict(os.environ)
    if variant.startswith("nf4:"):
        env[io.STRATEGY_ENV] = variant.split(":")[1]
    proc = subprocess.run([sys.executable, "-m", "bench.bench_load", "--child", variant, str(folder),
                           str(probe_out)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} load failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    if variant.startswith("nf4"):
        print("\n".join(proc.stderr.splitlines()[-4:]), flush=True)
    return json.loads(line[len("RESULT "):])


def compare_probes(a: Path, b: Path) -> str:
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        lines = []
        for key in ("weight", "weight.absmax"):
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            lines.append(f"{key}: {int((x != y).sum())} of {x.numel()} bytes differ")
        return "; ".join(lines)


def _row(label: str, cache: str, rs: list[dict]) -> list:
    row = [label, cache, len(rs), statistics.median(r["wall_s"] for r in rs), min(r["wall_s"] for r in rs),
           max(r["rss_peak"] for r in rs) / GB, max(r["rss_anon_peak"] for r in rs) / GB,
           max(r["rss_anon_peak"] - r["rss_anon_base"] for r in rs) / GB]
    if "gpu_peak" in rs[0]:
        row += [max(r["gpu_peak"] for r in rs) / GB, rs[-1]["gpu_final"] / GB]
    return row


def prepare(args, names: dict) -> Path:
    ckpt = args.dir / "ckpt"
    total = sum(2 * torch.Size(s).numel() for s in names.values())
    if (ckpt / "model.safetensors.index.json").exists():
        print(f"using the {args.shape} checkpoint already in {ckpt}", flush=True)
        return ckpt
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    print(f"writing a {args.shape} bf16 checkpoint: {total / GB:.2f} GB in {SHARDS} shards to {ckpt} "
          f"({free / GB:.1f} GB free there)", flush=True)
    # The checkpoint plus 1 GB for probes and the filesystem's own needs.
    if free < total + GB:
        raise SystemExit(f"{args.dir}: {free / GB:.1f} GB free, the checkpoint needs {total / GB:.2f} GB "
                         f"(+1 GB); pass --dir or {DIR_ENV} on a larger disk")
    t0 = time.perf_counter()
    write_checkpoint(ckpt, args.shape, names)
    print(f"wrote {total / GB:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dir", type=Path, default=Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else None,
                        help=f"where the checkpoint is written (required, or ${DIR_ENV}): nothing large "
                             f"is written anywhere the user did not name")
    parser.add_argument("--repeats", type=int, default=2, help="warm-cache runs per loader")
    parser.add_argument("--cold-repeats", type=int, default=1, help="cold-cache runs per loader (0: none)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="skip children that would end past this many seconds from the start, so "
                             "the section is written within a 600 s command limit")
    parser.add_argument("--prepare", action="store_true", help="only write the checkpoint (implies --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "DIR", "PROBE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.dir is None:
        parser.error(f"--dir (or {DIR_ENV}) is required: the {args.shape} checkpoint is written there")
    began = time.perf_counter()
    names = _shapes(args.shape)
    ckpt = prepare(args, names)
    if args.prepare:
        return
    cuda = torch.cuda.is_available()
    loaders = ["nf4:auto", "nf4:mmap", "nf4:read", "raw"]
    if importlib.util.find_spec("bitsandbytes") is None or not cuda:
        print("no bitsandbytes or no GPU: no transformers + bitsandbytes row", flush=True)
    else:
        loaders.insert(3, "bnb")

    results: dict[tuple[str, str], list[dict]] = {}
    skipped: list[str] = []
    longest = {"warm": 0.0, "cold": 0.0}  # seconds of the longest child so far, process start included

    def run(variant: str, cache: str) -> None:
        # A cold child reads the disk: until one has run, guess twice the longest warm one.
        guess = longest[cache] or 2 * longest["warm"]
        if time.perf_counter() - began + 1.2 * guess > args.budget_s:
            skipped.append(f"{variant} ({cache})")
            print(f"skipped {variant} ({cache}): would pass --budget-s {args.budget_s:.0f}", flush=True)
            return
        t0 = time.perf_counter()
        if cache == "cold":
            drop_cache(ckpt)
        r = run_child(variant, ckpt, args.dir / f"probe_{variant.replace(':', '_')}.safetensors")
        longest[cache] = max(longest[cache], time.perf_counter() - t0)
        results.setdefault((variant, cache), []).append(r)
        print(f"{variant} ({cache}): {r['wall_s']:.2f} s", {k: v for k, v in r.items() if k != "variant"}, flush=True)

    for attempt in (1, 2):  # the second pass shows whether the page cache holds the whole checkpoint
        print(f"page cache warm-up read {attempt}: {read_all(ckpt):.1f} GB/s", flush=True)
    for _ in range(args.repeats):
        for v in loaders:
            run(v, "warm")
    # Diagnostics, warm, one run each: bytes to the device through nf4's pipeline only, and the
    # default load with twice the reader threads.
    diagnostics = ["stream:mmap", "stream:read"] + (["nf4:auto:16"] if cuda else [])
    for v in diagnostics:
        run(v, "warm")
    cold_read = None
    if args.cold_repeats and time.perf_counter() - began + 4 * longest["warm"] >= args.budget_s:
        skipped.append("every cold run")
    elif args.cold_repeats:
        drop_cache(ckpt)
        cold_read = read_all(ckpt)
        print(f"read() of the dropped files: {cold_read:.2f} GB/s", flush=True)
        for _ in range(args.cold_repeats):
            for v in loaders:
                run(v, "cold")

    largest = max(2 * torch.Size(s).numel() for s in names.values())
    rows = [_row(LOADERS[v], cache, results[(v, cache)]) for cache in ("warm", "cold") for v in loaders
            if (v, cache) in results]
    headers = ["loader", "page cache", "runs", "wall s (median)", "wall s (best)", "peak RSS GB",
               "peak RssAnon GB", "RssAnon over start GB", "peak GPU GB", "final GPU GB"][:len(rows[0])]
    wall = {(v, c): statistics.median(r["wall_s"] for r in rs) for (v, c), rs in results.items()}
    body = [f"### Loading a {args.shape} bf16 checkpoint into NF4 (double quant, bf16 compute)", "",
            stamp() + f", {os.cpu_count()} CPU cores", "",
            f"Checkpoint: random bf16 weights, {sum(2 * torch.Size(s).numel() for s in names.values()) / GB:.2f} "
            f"GB in {SHARDS} shards; each load in a fresh process, loaders in turn. Warm: every file read "
            f"twice first." + (f" Cold: fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every file before "
                               f"the child (read() of the dropped files: {cold_read:.2f} GB/s, against "
                               f"the warm figures printed while it ran)." if cold_read else "")
            + f" Largest tensor {largest / GB:.2f} GB (embedding). GB = 1e9 bytes. Peak RSS (VmHWM) "
            f"counts mapped page-cache pages, which are file-backed and reclaimable; RssAnon does not. "
            f"raw: every shard mmap'd, torch.frombuffer, 256 MB pageable copies to the device, no "
            f"parsing or quantization (the ceiling).", "", table(headers, rows), ""]
    for cache in ("warm", "cold"):
        for v in ("nf4:auto", "nf4:mmap", "nf4:read"):
            if (v, cache) not in wall:
                continue
            parts = []
            if ("bnb", cache) in wall:
                parts.append(f"{wall[(v, cache)] / wall[('bnb', cache)]:.2f}x transformers + bitsandbytes"
                             + (" (goal <= 0.6x)" if cache == "warm" else ""))
            if ("raw", cache) in wall:
                parts.append(f"{wall[(v, cache)] / wall[('raw', cache)]:.2f}x raw mmap"
                             + (" (goal <= 1.3x)" if cache == "warm" else ""))
            if parts:
                body.append(f"- {LOADERS[v]}, {cache}: " + ", ".join(parts) + ".")
    nf4_rows = [r for r in rows if r[0].startswith("nf4")]
    if nf4_rows and len(nf4_rows[0]) > 8:
        body.append(f"- nf4 peak GPU - final: at most {max(r[8] - r[9] for r in nf4_rows):.2f} GB (goal <= "
                    f"largest tensor {largest / GB:.2f} GB); nf4 peak RssAnon at most "
                    f"{max(r[6] for r in nf4_rows):.2f} GB (goal <= 1.5 GB).")
    probes = {v: args.dir / f"probe_{v.replace(':', '_')}.safetensors" for v in LOADERS}
    same = [f"- nf4 (auto) vs {LOADERS[other]}: {compare_probes(probes['nf4:auto'], probes[other])}."
            for other in ("nf4:mmap", "nf4:read", "bnb") if probes["nf4:auto"].exists() and probes[other].exists()]
    if same:
        body += ["", f"Quantized bytes of `{PROBE}`:"] + same
    body += ["", "Diagnostics (warm, one run each): " + ", ".join(
        f"{v} {wall[(v, 'warm')]:.2f} s" for v in diagnostics if (v, "warm") in wall)
        + f" (stream:S = bytes to the device through nf4's pipeline with I/O strategy S, no quantization; "
          f"nf4:auto:16 = the default load with 16 reader threads instead of {io.READER_THREADS})."]
    if skipped:
        body += ["", f"Skipped to stay within {args.budget_s:.0f} s: {', '.join(skipped)}."]
    print(f"benchmark took {time.perf_counter() - began:.0f} s", flush=True)
    if cuda:
        write_section("load", "\n".join(body))
    else:
        print("\n".join(body))
        print("(no GPU: bench/RESULTS.md left as it is)")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
