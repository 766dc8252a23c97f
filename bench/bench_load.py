"""Loading an 8B-shaped bf16 checkpoint into 4 bits: nf4 (auto, mmap, read) vs transformers + bnb vs raw mmap.

    python -m bench.bench_load [--dir DIR] [--shape llama3-8b|small|tiny] [--repeats 2] [--cold-repeats 1]
                               [--budget-s 540] [--only VARIANT,...] [--prepare] [--keep]

Writes a Llama-3-8B-shaped checkpoint with random bf16 weights (~16 GB, 4 shards) under ``--dir``
(or ``$NF4_BENCH_LOAD_DIR``; one of them is required), announcing its size and the free disk
first, then loads it in fresh processes (bench/load_child.py), one loader after the other in turn:

- ``nf4 (auto)`` / ``nf4 (mmap)`` / ``nf4 (read)``: ``nf4.from_pretrained`` (nf4, double quant,
  bf16 compute) with ``NF4_LOAD_IO`` set to each I/O strategy (nf4.loading.io; ``auto``, the
  default, maps the files and preads chunks that are not in the page cache);
- ``nf4 (auto), fresh process``: the same load as a new script runs it, ``import nf4`` then
  ``nf4.from_pretrained``, with transformers imported and CUDA initialized inside the call;
- ``transformers + bitsandbytes``: the same quantization through transformers (when bitsandbytes
  is installed and there is a GPU);
- ``raw mmap``: the ceiling the issue names: each shard mmap'd, ``torch.frombuffer`` over it, copied
  to the device in 256 MB chunks (no parsing, no quantization).

Page cache warm (every file read twice first), and cold: before each cold child every shard is
fsync'd and dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed); a timed read
of the dropped files shows whether the drop took. Each child reports the wall time of the load
call, the time from its spawn to the loaded model, where that time went (imports, CUDA init and
the loader's phases, See Note: phases of a fresh process), peak RSS (VmHWM: includes mapped
page-cache pages, which are file-backed and reclaimable), peak RssAnon (anonymous memory only,
sampled every 2 ms), and peak / final GPU memory. Except in the fresh-process one, every child
imports torch/transformers and creates the CUDA context before the clock of its call starts. The
section of bench/RESULTS.md is written only from a GPU run; a CPU run (``--shape tiny`` or
``small``, a 0.3 GB Llama for the CPU's phases) prints it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.common import stamp, table, write_section
from bench.load_child import PROBE
from nf4.loading import io

SHAPES = {
    # Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 8 KV heads, vocab 128256, untied head.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    # A 0.3 GB Llama: enough work for the CPU's phases to show (quantizing overlapping the build).
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                  tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                 tie_word_embeddings=False),
}
SHARDS = 4
DIR_ENV = "NF4_BENCH_LOAD_DIR"
DIAGNOSTICS = ("stream:mmap", "stream:read", "nf4-seq:auto", "fresh-seq:auto")
# Kinds of variant that load with nf4.from_pretrained (bench/load_child.py).
NF4_KINDS = ("nf4", "fresh", "nf4-seq", "fresh-seq")
LOADERS = {"nf4:auto": "nf4 (auto)", "fresh:auto": "nf4 (auto), fresh process", "nf4:mmap": "nf4 (mmap)",
           "nf4:read": "nf4 (read)", "bnb": "transformers + bitsandbytes",
           "raw": "raw mmap + frombuffer, 256 MB chunks"}
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


def run_child(variant: str, folder: Path, probe_out: Path) -> dict:
    """One load in a fresh process (bench/load_child.py), timed from here, the spawn."""
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "bench.load_child", variant, str(folder), str(probe_out),
                           repr(spawned)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} load failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    if variant.split(":")[0] in NF4_KINDS:
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
           statistics.median(r["process_s"] for r in rs), max(r["rss_peak"] for r in rs) / GB,
           max(r["rss_anon_peak"] for r in rs) / GB, max(r["rss_anon_peak"] - r["rss_anon_base"] for r in rs) / GB]
    if "gpu_peak" in rs[0]:
        row += [max(r["gpu_peak"] for r in rs) / GB, rs[-1]["gpu_final"] / GB]
    return row


def phase_table(results: dict[tuple[str, str], list[dict]], variants: list[str]) -> str:
    """Where each warm loader's time went: every phase as start-end, seconds since the spawn, from
    its run of median process time (See Note: phases of a fresh process, bench/load_child.py)."""
    runs = {}
    for v in variants:
        rs = sorted(results.get((v, "warm"), []), key=lambda r: r["process_s"])
        if rs:
            runs[v] = rs[(len(rs) - 1) // 2]
    names: list[str] = []
    for r in runs.values():
        names += [p[0] for p in r["phases"] if p[0] not in names]
    rows = []
    for name in names:
        cells = []
        for r in runs.values():
            span = next((p for p in r["phases"] if p[0] == name), None)
            cells.append(f"{span[1]:.2f}-{span[2]:.2f}" if span else "")
        rows.append([name] + cells)
    rows.append(["loaded (process s)"] + [f"{r['process_s']:.2f}" for r in runs.values()])
    return table(["phase (s since spawn)"] + [LOADERS.get(v, v) for v in runs], rows)


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
    parser.add_argument("--only", type=lambda v: v.split(","), default=None, metavar="VARIANT,...",
                        help=f"run only these loaders and diagnostics (of {', '.join(LOADERS)}, "
                             f"{', '.join(DIAGNOSTICS)}, nf4:auto:16)")
    args = parser.parse_args()
    if args.dir is None:
        parser.error(f"--dir (or {DIR_ENV}) is required: the {args.shape} checkpoint is written there")
    cuda = torch.cuda.is_available()
    loaders = [v for v in LOADERS if v != "bnb"]
    if importlib.util.find_spec("bitsandbytes") is None or not cuda:
        print("no bitsandbytes or no GPU: no transformers + bitsandbytes row", flush=True)
    else:
        loaders.insert(loaders.index("raw"), "bnb")
    # Diagnostics, warm, one run each: bytes to the device through nf4's pipeline only, both nf4
    # loads without quantizing while the model is built, and the default load with twice the
    # reader threads.
    diagnostics = list(DIAGNOSTICS) + (["nf4:auto:16"] if cuda else [])
    if args.only is not None:
        unknown = sorted(set(args.only) - set(loaders) - set(diagnostics))
        if unknown:
            parser.error(f"--only: {unknown} are not among {loaders + diagnostics} on this machine")
        loaders = [v for v in loaders if v in args.only]
        diagnostics = [v for v in diagnostics if v in args.only]

    began = time.perf_counter()
    names = _shapes(args.shape)
    ckpt = prepare(args, names)
    if args.prepare:
        return
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
    headers = ["loader", "page cache", "runs", "wall s (median)", "wall s (best)", "process s (median)",
               "peak RSS GB", "peak RssAnon GB", "RssAnon over start GB", "peak GPU GB",
               "final GPU GB"][:len(rows[0]) if rows else None]
    wall = {(v, c): statistics.median(r["wall_s"] for r in rs) for (v, c), rs in results.items()}
    process = {(v, c): statistics.median(r["process_s"] for r in rs) for (v, c), rs in results.items()}
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
            f"parsing or quantization (the ceiling). wall: the load call alone; for every loader but "
            f"the fresh-process one, torch, transformers and the model class are imported and the CUDA "
            f"context made before it (nf4 is imported too), as a process that already uses them would; "
            f"the fresh-process nf4 runs `import nf4; nf4.from_pretrained(...)` as a new script does. "
            f"process: from the spawn to the loaded model (device work finished).", "",
            table(headers, rows) if rows else "(no loader ran)", ""]
    for cache in ("warm", "cold"):
        for v in ("nf4:auto", "fresh:auto", "nf4:mmap", "nf4:read"):
            if (v, cache) not in wall:
                continue
            parts = []
            # The goals are about the load call with its imports done (wall); the fresh process's
            # call also imports transformers and creates the CUDA context, so it is compared whole.
            if v.startswith("fresh"):
                parts += [f"process {process[(v, cache)] / process[(o, cache)]:.2f}x {LOADERS[o]}'s"
                          for o in ("bnb", "raw") if (o, cache) in process]
            if ("bnb", cache) in wall and not v.startswith("fresh"):
                parts.append(f"{wall[(v, cache)] / wall[('bnb', cache)]:.2f}x transformers + bitsandbytes"
                             + (" (goal <= 0.6x)" if cache == "warm" else ""))
            if ("raw", cache) in wall and not v.startswith("fresh"):
                parts.append(f"{wall[(v, cache)] / wall[('raw', cache)]:.2f}x raw mmap"
                             + (" (goal <= 1.3x)" if cache == "warm" else ""))
            if parts:
                body.append(f"- {LOADERS[v]}, {cache}: " + ", ".join(parts) + ".")
    nf4_rows = [r for r in rows if r[0].startswith("nf4")]
    if nf4_rows and len(nf4_rows[0]) > 9:
        body.append(f"- nf4 peak GPU - final: at most {max(r[9] - r[10] for r in nf4_rows):.2f} GB (goal <= "
                    f"largest tensor {largest / GB:.2f} GB); nf4 peak RssAnon at most "
                    f"{max(r[7] for r in nf4_rows):.2f} GB (goal <= 1.5 GB).")
    body += ["", "Where the time goes (warm; the run of median process time; phases of the load call "
             "from model.nf4_load_phases: they overlap where the worker quantizes while the model is "
             "built):", "", phase_table(results, loaders + [v for v in diagnostics if v.split(":")[0] in NF4_KINDS])]
    probes = {v: args.dir / f"probe_{v.replace(':', '_')}.safetensors" for v in loaders + diagnostics}
    base = probes.get("nf4:auto")
    same = [f"- nf4 (auto) vs {LOADERS.get(other, other)}: {compare_probes(base, probes[other])}."
            for other in probes if other != "nf4:auto" and not other.startswith(("raw", "stream"))
            and base.exists() and probes[other].exists()] if base is not None else []
    if same:
        body += ["", f"Quantized bytes of `{PROBE}`:"] + same
    body += ["", "Diagnostics (warm, one run each; wall / process s): " + ", ".join(
        f"{v} {wall[(v, 'warm')]:.2f} / {process[(v, 'warm')]:.2f}" for v in diagnostics if (v, "warm") in wall)
        + f" (stream:S = bytes to the device through nf4's pipeline with I/O strategy S, no quantization; "
          f"nf4-seq / fresh-seq = nf4 (auto) / its fresh process with NF4_LOAD_OVERLAP=0, nothing "
          f"quantized while the model is built; nf4:auto:16 = the default load with 16 reader threads "
          f"instead of {io.READER_THREADS})."]
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
