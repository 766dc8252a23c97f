"""One load in a fresh process for bench/bench_load.py, timed from the moment it was spawned.

    python -m bench.load_child VARIANT DIR PROBE SPAWNED      (bench_load runs it; prints one JSON line)

VARIANT is ``KIND[:STRATEGY[:THREADS]]``:

- ``nf4:S[:T]``: ``nf4.from_pretrained`` with I/O strategy S (and T reader threads), after
  transformers, the model class and the CUDA context were made ready outside the timed call, as
  for ``bnb`` (the figure bench/RESULTS.md has always shown);
- ``fresh:S``: the same load as a user's script runs it, ``import nf4`` then
  ``nf4.from_pretrained``: transformers is imported and CUDA initialized inside the call;
- ``nf4-seq:S`` / ``fresh-seq:S``: the same two with ``NF4_LOAD_OVERLAP=0`` (no quantizing while
  the model is built: nf4.loading.model; the others set it to 1, the default on CUDA devices);
- ``bnb``: transformers + bitsandbytes (nf4, double quant, bf16 compute);
- ``raw``: every shard mmap'd, ``torch.frombuffer``, copied to the device in 256 MB chunks;
- ``stream:S``: the tensors to the device through nf4's I/O pipeline only.

Note: phases of a fresh process.
    SPAWNED is the parent's ``time.time()`` just before it started this process; every phase is
    reported as (start, end) in seconds since then, so ``python`` is process creation, the
    interpreter's start and this module's standard-library imports. The heavy modules are imported
    in ``main``, each timed, in the order the variant's user imports them: that order and its cost
    are what this child measures, which is why they are not at the top of the file. The loader's
    own phases (``model.nf4_load_phases``) are placed on the same clock. ``wall_s`` is the timed
    call alone, ``process_s`` everything from the spawn to the loaded model (device work finished).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import mmap
import os
import sys
import threading
import time
from pathlib import Path

# The layer whose quantized bytes the loaders must agree on (a 14336x4096 MLP projection).
PROBE = "model.layers.0.mlp.down_proj.weight"
# The raw ceiling's chunk, as the issue measured it (1.81 s for 16 GB on the H200 machine).
RAW_CHUNK_BYTES = 256 * 2**20
KINDS = ("nf4", "fresh", "nf4-seq", "fresh-seq", "bnb", "raw", "stream")


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


class _Clock:
    """Phases as (name, start, end), seconds since the parent spawned this process."""

    def __init__(self, spawned: float):
        self.spawned = spawned
        self.phases: list[tuple[str, float, float]] = [("python", 0.0, time.time() - spawned)]

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self.phases.append((name, start - self.spawned, time.time() - self.spawned))

    def now(self) -> float:
        return time.time() - self.spawned


def raw_to_device(torch, folder: Path, device: str) -> None:
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


def main(variant: str, folder: str, probe_out: str, spawned: float) -> None:
    clock = _Clock(spawned)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("nf4.loading").setLevel(logging.INFO)  # the loader's summary line, for the log
    kind, _, rest = variant.partition(":")
    strategy, _, threads = rest.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown variant {variant!r}: the kind must be one of {KINDS}")
    # On for nf4 and fresh on any device (the default, auto, turns it on for CUDA devices only), so
    # that a CPU run shows it too; off for the -seq kinds.
    os.environ["NF4_LOAD_OVERLAP"] = "0" if kind.endswith("-seq") else "1"
    if strategy:
        os.environ["NF4_LOAD_IO"] = strategy
    with clock("import torch"):
        torch = importlib.import_module("torch")
    nf4 = transformers = None
    if kind not in ("bnb", "raw"):
        with clock("import nf4"):
            nf4 = importlib.import_module("nf4")
    if kind in ("nf4", "nf4-seq", "bnb"):
        with clock("import transformers + model class"):
            transformers = importlib.import_module("transformers")
            transformers.LlamaForCausalLM  # the lazy module import, outside the clock for every loader
    if threads:
        importlib.import_module("nf4.loading.io").READER_THREADS = int(threads)
    with clock("torch.cuda.is_available"):  # the driver, not yet a context
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not kind.startswith("fresh"):
        with clock("CUDA init"):
            torch.zeros(1, device=device)  # the context before the timed call
    base = _status("RssAnon")
    sampler = _PeakAnon()
    sampler.start()
    model = None
    called = clock.now()
    start = time.perf_counter()
    if kind in ("nf4", "fresh", "nf4-seq", "fresh-seq"):
        model = nf4.from_pretrained(folder, device=device, progress=False)
    elif kind == "stream":
        loading = importlib.import_module("nf4.loading")
        entries = sorted(loading.checkpoint.Checkpoint(folder).entries.values(),
                         key=lambda e: (str(e.shard), e.offset))
        for _ in loading.io.stream_tensors(entries, device):
            pass
    elif kind == "raw":
        raw_to_device(torch, Path(folder), device)
    else:
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    process = clock.now()
    sampler.done.set()
    sampler.join()
    for name, (a, b) in (getattr(model, "nf4_load_phases", None) or {}).items():
        clock.phases.append((name, called + a, called + b))
    clock.phases.append(("load call", called, called + wall))
    result = dict(variant=variant, wall_s=wall, process_s=process, phases=clock.phases,
                  rss_peak=_status("VmHWM"), rss_anon_peak=max(sampler.peak, _status("RssAnon")),
                  rss_anon_base=base)
    if device == "cuda":
        result.update(gpu_peak=torch.cuda.max_memory_allocated(), gpu_final=torch.cuda.memory_allocated())
    if model is not None:
        save_file = importlib.import_module("safetensors.torch").save_file
        module = model.get_submodule(PROBE.rsplit(".", 1)[0])
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, probe_out)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__.splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
