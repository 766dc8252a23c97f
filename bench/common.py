"""Helpers every benchmark shares: the GPU check, timing, environment stamp, RESULTS.md sections.

Each benchmark owns one section of ``bench/RESULTS.md`` between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` and rewrites only that section, so benchmarks run separately never clobber
each other. When ``$OUT`` is set (the GPU machine), the section is also written to
``$OUT/results_NAME.md``; ``python -m bench.common apply FILE...`` merges such files here.

Note: where benchmarks run, and what they write.
    The published sections are GPU measurements. A benchmark that needs a GPU calls
    ``require_cuda`` (or ``require_extension``) first: without one it prints one line to stderr and
    exits with status ``NO_GPU_EXIT`` (nothing measured, nothing written), never a traceback. A
    run that is not the published measurement (``bench_qlora --tiny``, a CPU ``bench_load --shape
    tiny``) prints its table and leaves RESULTS.md alone. The exception is ``bench_cpu``, whose
    section is a CPU measurement by design.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Exit status of a GPU benchmark started where no CUDA GPU is visible: 2, as argparse uses for a
# command that cannot run as asked; nothing was measured, so nothing is written.
NO_GPU_EXIT = 2
_HEADER = "# Benchmark results\n\nWritten by the scripts in `bench/`; each section says where and when it was measured.\n"


def require_cuda(prog: str) -> None:
    """Leave with one line on stderr and status ``NO_GPU_EXIT`` when no CUDA GPU is visible (a
    traceback from the first ``device="cuda"`` would bury the reason)."""
    if not torch.cuda.is_available():
        sys.stderr.write(f"{prog}: needs a CUDA GPU and torch sees none; nothing measured\n")
        raise SystemExit(NO_GPU_EXIT)


def require_extension(prog: str) -> None:
    """``require_cuda``, then the same for the compiled nf4._C (the kernels some benchmarks time)."""
    require_cuda(prog)
    if not cuda_extension_loaded():
        sys.stderr.write(f"{prog}: needs nf4._C, which is not built here (see `nf4 env`); nothing measured\n")
        raise SystemExit(NO_GPU_EXIT)


def cuda_extension_loaded() -> bool:
    try:
        import nf4.cuda_backend  # noqa: F401  (optional: the compiled extension)
    except ImportError:
        return False
    return True


def bench_ms(fn: Callable[[], object], quantiles=(0.5, 0.2, 0.8), warmup: int = 25, rep: int = 100):
    """(median, p20, p80) milliseconds of ``fn`` via triton.testing.do_bench (L2 flushed)."""
    from triton.testing import do_bench  # optional: benchmarks run on the GPU machine only

    return tuple(do_bench(fn, warmup=warmup, rep=rep, quantiles=list(quantiles)))


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CPU work is synchronous already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def commit() -> str:
    """NF4_COMMIT when set (the GPU machine's copy of the tree may carry stale git metadata),
    else git's HEAD, with "+dirty" for uncommitted changes to tracked files."""
    if os.environ.get("NF4_COMMIT"):
        return os.environ["NF4_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("NF4_COMMIT", "unknown")
    return sha + ("+dirty" if dirty else "")


def stamp(bnb: bool = True) -> str:
    """One line: GPU, date, commit, software versions (bitsandbytes' as this interpreter sees it
    unless ``bnb`` is False: bench_cpu reports the version of its separate venv itself)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    parts = [f"GPU: {gpu}", f"date: {datetime.date.today().isoformat()}", f"commit: {commit()}",
             f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if not bnb:
        return ", ".join(parts)
    try:
        import bitsandbytes
        parts.append(f"bitsandbytes {bitsandbytes.__version__}")
    except ImportError:
        parts.append("bitsandbytes: not installed")
    return ", ".join(parts)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _replace_section(text: str, name: str, body: str) -> str:
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(name: str, body: str) -> None:
    """Replace this benchmark's section of RESULTS.md (and copy it to $OUT when set)."""
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    RESULTS.write_text(_replace_section(text, name, body))
    out = os.environ.get("OUT")
    if out:
        Path(out, f"results_{name}.md").write_text(f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->\n")
    print(body)


def apply(paths: Sequence[str]) -> None:
    """Merge section files (``results_NAME.md`` from $OUT) into RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    for p in paths:
        content = Path(p).read_text()
        m = re.search(r"<!-- (\S+):start -->\n(.*)\n<!-- \1:end -->", content, re.S)
        if not m:
            raise ValueError(f"{p}: no <!-- NAME:start --> ... <!-- NAME:end --> section")
        text = _replace_section(text, m.group(1), m.group(2))
    RESULTS.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "apply":
        sys.exit("usage: python -m bench.common apply results_NAME.md [...]")
    apply(sys.argv[2:])
