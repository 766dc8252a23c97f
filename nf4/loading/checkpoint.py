"""Safetensors checkpoints as untrusted input: header validation, shard indexes, streaming reads.

A checkpoint folder holds ``model.safetensors`` or shards named by ``model.safetensors.index.json``.
Every shard's header is parsed and checked before any byte of tensor data is used: dtype known,
shape made of non-negative ints, ``data_offsets`` inside the file and exactly ``numel * itemsize``
long, no two tensors overlapping. A truncated or corrupt shard, or an index naming a missing shard
or a tensor its shard lacks, raises ValueError/FileNotFoundError naming the file and the tensor.
Nothing is ever unpickled.

Note: why the header is parsed here rather than through ``safe_open``.
    The format is a little-endian u64 header length, a JSON header, then raw bytes. Knowing each
    tensor's byte range lets the loader ``pread`` a tensor (or a chunk of one) straight into its
    destination: a CPU tensor, or a pinned staging buffer whose bytes go to the GPU while the next
    chunk is read by another thread. ``safe_open(...).get_tensor`` copies each tensor into a fresh
    host tensor on one thread, which bounds the GPU path by one memcpy stream; the streaming
    reader (``nf4.loading.io``) keeps host memory at a few staging buffers, copies with several
    threads, and takes the bytes from a map of the file or from ``read()``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nf4 import safe_json
from nf4.quant_state import _MAX_JSON_BYTES as MAX_QUANT_STATE_JSON_BYTES
from nf4.quant_state import _unpack_json as unpack_quant_state_json

log = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors' own dtype names -> torch dtypes (the subset torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# safetensors refuses headers above 100 MB; a real 8B shard's header is ~30 KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# An index above this is not an index (Llama-3-405B's is ~150 KB).
MAX_INDEX_BYTES = 64 * 1024 * 1024
# A config.json above this is not a config: Llama's is ~1 KB, the largest seen (an image classifier's
# id2label for 21,843 ImageNet-21k classes) ~1 MB.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# torch computes a tensor's storage size in int64 from the non-zero dims too: [2**64, 0] cannot be
# made at all and [2**62, 4, 0] overflows, though both hold zero bytes.
MAX_STORAGE_SPAN = 2**63 - 1


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``shard`` file, absolute byte ``offset`` and ``nbytes``."""

    name: str
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns (entries by name, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {file_size} bytes, too short for a safetensors header (truncated?)")
        header_len = int.from_bytes(head, "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise ValueError(f"{path}: header claims {header_len} bytes but the file holds {file_size} "
                             f"(corrupt or truncated safetensors file)")
        raw = f.read(header_len)
    # Depth- and duplicate-checked: a repeated tensor name would silently keep the last entry.
    header = safe_json.loads(raw, f"{path}: header (corrupt safetensors file)", MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = file_size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_start, data_size)
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries.values() if e.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap (corrupt safetensors file)")
    return entries, metadata


def _entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: header entry must be an object, got {type(info).__name__}")
    dtype = DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ValueError(f"{where}: dtype {info.get('dtype')!r} is not one of {sorted(DTYPES)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if math.prod(d or 1 for d in shape) * dtype.itemsize > MAX_STORAGE_SPAN:
        raise ValueError(f"{where}: shape {shape} overflows torch's 64-bit storage size "
                         f"(even with a zero dimension)")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
        raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{where}: {offsets[1] - offsets[0]} bytes of data for {info['dtype']} "
                         f"{shape}, expected {nbytes}")
    if offsets[1] > data_size:
        raise ValueError(f"{where}: data ends at byte {offsets[1]} but the file holds {data_size} "
                         f"bytes of data (truncated safetensors file)")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + offsets[0], nbytes)


class Checkpoint:
    """All tensors of a checkpoint folder (single file or sharded with an index), validated.

    ``entries`` maps every tensor name to its TensorEntry; ``config`` is config.json's content.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: checkpoint folder not found")
        self.config = read_config(self.folder)
        self.shards = self._shard_files()
        self.entries: dict[str, TensorEntry] = {}
        self._index_map = self._read_index() if (self.folder / SAFE_INDEX_NAME).is_file() else None
        for shard in self.shards:
            entries, _ = read_header(shard)
            for name, entry in entries.items():
                if name in self.entries:
                    raise ValueError(f"{shard}: tensor {name!r} is also in {self.entries[name].shard.name}")
                self.entries[name] = entry
        if self._index_map is not None:
            for name, shard_name in self._index_map.items():
                entry = self.entries.get(name)
                if entry is None or entry.shard.name != shard_name:
                    raise ValueError(f"{self.folder / SAFE_INDEX_NAME}: tensor {name!r} should be in "
                                     f"{shard_name}, which does not hold it")

    def _shard_files(self) -> list[Path]:
        index = self.folder / SAFE_INDEX_NAME
        if index.is_file():
            names = sorted(set(self._read_index().values()))
            shards = []
            for name in names:
                shard = self.folder / name
                if not shard.is_file():
                    raise FileNotFoundError(f"{index}: names shard {name!r}, which is missing from {self.folder}")
                shards.append(shard)
            return shards
        single = self.folder / SAFE_WEIGHTS_NAME
        if single.is_file():
            return [single]
        others = sorted(p for p in self.folder.glob("*.safetensors"))
        if len(others) == 1:
            return others
        refuse_pickle_only(self.folder)
        raise FileNotFoundError(f"{self.folder}: no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME}"
                                + (f" (found {len(others)} .safetensors files and no index)" if others else ""))

    def _read_index(self) -> dict[str, str]:
        index = self.folder / SAFE_INDEX_NAME
        data = safe_json.read_file(index, MAX_INDEX_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: needs a non-empty 'weight_map' object")
        for name, shard in weight_map.items():
            # A shard name is a file in this folder: no directories, so no path escapes the folder.
            if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard:
                raise ValueError(f"{index}: tensor {name!r} maps to {shard!r}, expected a .safetensors "
                                 f"file name in the same folder")
        return weight_map

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> TensorEntry:
        return self.entries[name]

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        refuse_pickle_only(Path(folder))
        raise FileNotFoundError(f"{folder}: no config.json (not a transformers model folder)")
    config = safe_json.read_file(path, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{path}: architectures must be a list of class names, got {archs!r}")
    if not isinstance(config.get("model_type", ""), str):
        raise ValueError(f"{path}: model_type must be a string, got {config['model_type']!r}")
    return config


def read_quant_state_json(entry: TensorEntry) -> dict:
    """A bnb ``quant_state.bitsandbytes__*`` blob, parsed: its size is checked from the header
    before a byte is read (a blob claiming 32 GiB is refused, not read and then refused)."""
    if entry.nbytes > MAX_QUANT_STATE_JSON_BYTES:
        raise ValueError(f"{_where(entry)}: {entry.nbytes} bytes, more than a quantization state "
                         f"({MAX_QUANT_STATE_JSON_BYTES})")
    return unpack_quant_state_json(read_tensor(entry), entry.name)


def _where(entry: TensorEntry) -> str:
    return f"{entry.shard}: tensor {entry.name!r}"


def refuse_pickle_only(folder: Path) -> None:
    """Raise if ``folder`` has pickle weights and no safetensors (unpickling runs arbitrary code)."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}); "
            f"nf4 loads safetensors only, because unpickling a checkpoint runs arbitrary code. Convert "
            f"it once in a trusted environment (e.g. transformers' save_pretrained(..., "
            f"safe_serialization=True)) or pick a repository revision with .safetensors files.")


# ------------------------------------------------------------------------------- reading bytes
def _pread_into(fd: int, view: memoryview, offset: int, entry: TensorEntry) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ValueError(f"{entry.shard}: tensor {entry.name!r} ends past the end of the file "
                             f"(file truncated while loading)")
        done += n


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()).cast("B")


def read_tensor(entry: TensorEntry, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One tensor into host memory (a new tensor, or ``out``: contiguous CPU, same bytes)."""
    if out is None:
        out = torch.empty(entry.shape, dtype=entry.dtype)
    _check_out(entry, out)
    if entry.nbytes:
        fd = os.open(entry.shard, os.O_RDONLY)
        try:
            _pread_into(fd, _byte_view(out), entry.offset, entry)
        finally:
            os.close(fd)
    return out


def _check_out(entry: TensorEntry, out: torch.Tensor) -> None:
    if not out.is_contiguous() or out.numel() * out.element_size() != entry.nbytes:
        raise ValueError(f"destination for {entry.name!r} must be contiguous with {entry.nbytes} bytes, "
                         f"got {out.dtype} {tuple(out.shape)}")


def concrete_device(device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: tensors report an index, and comparing ``cuda`` with
    ``cuda:0`` says they differ (which once made every destination tensor be allocated twice)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
