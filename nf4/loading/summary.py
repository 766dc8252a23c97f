"""Describe a checkpoint folder without loading it: architecture, quantization format, sizes.

Reads config.json, every shard's header and each quantized weight's small JSON state; no tensor
data beyond those, and no transformers.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nf4 import codebook
from nf4.loading.checkpoint import Checkpoint, read_quant_state_json
from nf4.quant_state import check_blocksize

QUANT_STATE_MARK = ".weight.quant_state.bitsandbytes__"


@dataclass
class Summary:
    folder: Path
    architecture: str
    model_type: str
    quant_method: str
    files: int
    tensors: int
    total_bytes: int
    quantized_weights: int = 0
    quantized_params: int = 0
    quantized_bytes: int = 0          # packed weights plus their quantization state
    other_params: int = 0
    formats: Counter = field(default_factory=Counter)  # (quant_type, blocksize, double quant) -> count

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else float("nan")

    @property
    def bits_per_param(self) -> float:
        params = self.quantized_params + self.other_params
        return 8 * self.total_bytes / params if params else float("nan")

    def rows(self) -> list[tuple[str, str]]:
        rows = [("folder", str(self.folder)), ("architecture", self.architecture),
                ("model_type", self.model_type), ("quantization", self.quant_method),
                ("files", str(self.files)), ("tensors", str(self.tensors)),
                ("size", _human(self.total_bytes))]
        for (quant_type, blocksize, double), n in sorted(self.formats.items()):
            rows.append(("format", f"{quant_type}, block size {blocksize}, double quant "
                                   f"{'yes' if double else 'no'} ({n} weights)"))
        if self.quantized_weights:
            rows += [("quantized weights", f"{self.quantized_weights} ({self.quantized_params:,} params, "
                                           f"{_human(self.quantized_bytes)})"),
                     ("bits/param (quantized)", f"{self.bits_per_quantized_param:.3f}")]
        rows.append(("bits/param (all)", f"{self.bits_per_param:.3f}"))
        return rows


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def summarize(folder: str | Path) -> Summary:
    """Summarize the checkpoint in ``folder`` (validated like any checkpoint nf4 reads)."""
    ckpt = Checkpoint(folder)
    config = ckpt.config
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    archs = config.get("architectures") or ["?"]
    s = Summary(folder=ckpt.folder, architecture=str(archs[0]), model_type=str(config.get("model_type", "?")),
                quant_method=str(qc.get("quant_method", "none")), files=len(ckpt.shards),
                tensors=len(ckpt.entries), total_bytes=ckpt.total_bytes)
    state_parts = set()
    for name, entry in ckpt.entries.items():
        module, mark, _ = name.rpartition(QUANT_STATE_MARK)
        if not mark:
            continue
        try:
            meta = read_quant_state_json(entry)
            shape = meta["shape"]
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"shape must be a list of non-negative ints, got {shape!r}")
            numel = math.prod(shape)
            codebook.check_quant_type(meta["quant_type"])
            fmt = (meta["quant_type"], check_blocksize(meta["blocksize"]), "nested_offset" in meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{entry.shard}: tensor {name!r} is not a valid quantization state: {e}") from e
        weight = f"{module}.weight"
        parts = [weight] + [k for k in ckpt.entries if k.startswith(weight + ".")]
        state_parts.update(parts)
        s.quantized_weights += 1
        s.quantized_params += numel
        s.quantized_bytes += sum(ckpt.entries[k].nbytes for k in parts if k in ckpt.entries)
        s.formats[fmt] += 1
    s.other_params = sum(e.numel for n, e in ckpt.entries.items() if n not in state_parts)
    return s
