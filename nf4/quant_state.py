"""QuantState: everything needed to decode a packed 4-bit tensor, in bitsandbytes' layout.

Field names, ``as_dict`` keys and the JSON blob match ``bitsandbytes.functional.QuantState`` so
that checkpoints move between the two libraries unchanged. Unlike bitsandbytes, every state that
enters from outside (``from_dict``) is validated before any tensor reaches a kernel: a checkpoint
is untrusted input, and a wrong absmax length would make a kernel read out of bounds.
"""
from __future__ import annotations

import json
import math
import weakref
from typing import Any, Mapping, Optional

import torch

from nf4 import codebook, safe_json

SUPPORTED_BLOCKSIZES = tuple(2**i for i in range(5, 13))  # 32 .. 4096
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE_KEY_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
              "nested_offset")
# A JSON blob larger than this is not a quant state (bnb's are ~170 bytes); refuse to parse it.
_MAX_JSON_BYTES = 64 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, what: str = "dtype") -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPE_BY_NAME:
        raise ValueError(f"{what} must be one of {sorted(_DTYPE_BY_NAME)}, got {name!r}")
    return _DTYPE_BY_NAME[name]


def check_blocksize(blocksize: Any, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    return blocksize


def check_float_dtype(dtype: Any, what: str) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} must be one of float32, float16, bfloat16, got {dtype}")
    return dtype


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def packed_nbytes(numel: int) -> int:
    """Bytes of packed data for ``numel`` 4-bit values: two per byte, the last one padded."""
    return -(-numel // 2)


class QuantState:
    """How to decode one packed 4-bit tensor.

    Attributes (bitsandbytes' names):
        absmax: float32 ``[ceil(numel / blocksize)]``, or with double quantization (``nested``)
            uint8 codes into ``state2.code`` of the same length.
        shape: the original tensor's shape (``torch.Size``).
        code: the 16 float32 levels of ``quant_type`` (bnb calls it ``quant_map`` when saved).
        blocksize: elements per absmax block.
        quant_type: ``"nf4"`` or ``"fp4"``.
        dtype: the dtype that dequantization returns (the original tensor's).
        offset: with double quantization, the float32 mean subtracted from absmax (0-dim tensor).
        state2: with double quantization, a QuantState for the absmax codes: its ``absmax`` is the
            float32 scale of each block of ``blocksize`` (256) codes, ``code`` the dynamic map.
    """

    valid_quant_types = codebook.QUANT_TYPES
    valid_qs_type_keys = tuple(f"bitsandbytes__{q}" for q in codebook.QUANT_TYPES)
    # The weight checked against this state (nf4.weight.PackedWeight), dropped by any change to
    # the state: See Note: validate once in nf4/weight.py.
    _packed_weight = None
    _owner = None  # the state whose state2 this is (a weak reference), told of changes too

    def __init__(self, absmax: torch.Tensor, shape=None, code: Optional[torch.Tensor] = None,
                 blocksize: Optional[int] = None, quant_type: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, offset: Optional[torch.Tensor] = None,
                 state2: Optional["QuantState"] = None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        d[name] = value
        if name == "state2" and isinstance(value, QuantState):
            value.__dict__["_owner"] = weakref.ref(self)
        d["_packed_weight"] = None
        owner = d.get("_owner")
        parent = owner() if owner is not None else None
        if parent is not None:
            parent.__dict__["_packed_weight"] = None

    def __getstate__(self) -> dict:
        # Copies and pickles carry the fields, never the cached weight (its pointers are this
        # object's) or the weak reference to an owner.
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed_weight", "_owner")}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    # ---------------------------------------------------------------- validation
    def validate(self, packed: Optional[torch.Tensor] = None) -> "QuantState":
        """Check that this state is self-consistent (and fits ``packed`` if given).

        Raises ValueError/TypeError naming the field, the actual and the expected value. Costs no
        device synchronization: only metadata is read.
        """
        codebook.check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        check_float_dtype(self.dtype, "QuantState.dtype")
        if self.shape is None or any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise ValueError(f"QuantState.shape must be a sequence of non-negative ints, got {self.shape}")
        numel = math.prod(self.shape)
        if numel == 0:
            raise ValueError(f"QuantState.shape {tuple(self.shape)} has no elements")
        if not isinstance(self.absmax, torch.Tensor):
            raise TypeError(f"QuantState.absmax must be a tensor, got {type(self.absmax).__name__}")
        expected_blocks = num_blocks(numel, self.blocksize)
        if self.absmax.dim() != 1 or self.absmax.numel() != expected_blocks:
            raise ValueError(
                f"QuantState.absmax has shape {tuple(self.absmax.shape)}, expected [{expected_blocks}] "
                f"for shape {tuple(self.shape)} with blocksize {self.blocksize}")
        if self.code is not None and (not isinstance(self.code, torch.Tensor) or self.code.numel() != 16):
            raise ValueError(f"QuantState.code (quant_map) must hold 16 values, got "
                             f"{getattr(self.code, 'shape', self.code)}")
        if self.nested:
            s2 = self.state2
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"with double quantization QuantState.absmax must be uint8 codes, "
                                f"got {self.absmax.dtype}")
            check_blocksize(s2.blocksize, "nested_blocksize")
            if not isinstance(s2.absmax, torch.Tensor) or s2.absmax.dtype != torch.float32:
                raise TypeError(f"nested_absmax must be a float32 tensor, got "
                                f"{getattr(s2.absmax, 'dtype', type(s2.absmax).__name__)}")
            expected_nested = num_blocks(expected_blocks, s2.blocksize)
            if s2.absmax.dim() != 1 or s2.absmax.numel() != expected_nested:
                raise ValueError(f"nested_absmax has shape {tuple(s2.absmax.shape)}, expected "
                                 f"[{expected_nested}] for {expected_blocks} absmax codes with "
                                 f"nested_blocksize {s2.blocksize}")
            if not isinstance(s2.code, torch.Tensor) or s2.code.dtype != torch.float32 or s2.code.numel() != 256:
                raise ValueError(f"nested_quant_map must be 256 float32 values, got "
                                 f"{getattr(s2.code, 'dtype', None)} {tuple(getattr(s2.code, 'shape', ()))}")
            if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1:
                raise ValueError(f"nested_offset must be a single value, got {self.offset!r}")
            devices = {self.absmax.device, s2.absmax.device, s2.code.device, self.offset.device}
        else:
            if self.absmax.dtype != torch.float32:
                raise TypeError(f"QuantState.absmax must be float32, got {self.absmax.dtype}")
            devices = {self.absmax.device}
        if packed is not None:
            if not isinstance(packed, torch.Tensor):
                raise TypeError(f"packed weight must be a tensor, got {type(packed).__name__}")
            nbytes = packed.numel() * packed.element_size()
            if nbytes != packed_nbytes(numel):
                raise ValueError(f"packed weight holds {nbytes} bytes, expected {packed_nbytes(numel)} "
                                 f"for shape {tuple(self.shape)} (two 4-bit values per byte)")
            devices.add(packed.device)
        if len(devices) > 1:
            raise ValueError(f"packed weight and QuantState tensors are on different devices: "
                             f"{sorted(str(d) for d in devices)}")
        return self

    # ---------------------------------------------------------------- (de)serialization
    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' dictionary form; with ``packed=True`` every non-tensor item goes into a
        uint8 tensor of UTF-8 JSON under ``quant_state.bitsandbytes__<quant_type>``."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": dtype_name(self.state2.dtype or torch.float32),
                "nested_offset": float(self.offset.item()),
            })
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                if not isinstance(v, torch.Tensor)}
        blob = json.dumps(meta).encode("utf-8")
        tensors[_STATE_KEY_PREFIX + self.quant_type] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str | None = None) -> "QuantState":
        """Rebuild a state from ``as_dict`` output (packed or not), as loaded from a checkpoint.

        Keys may carry a module prefix (``"model.layers.0.q_proj.weight.absmax"``). Everything is
        validated; nothing is unpickled.
        """
        if not isinstance(qs_dict, Mapping):
            raise TypeError(f"quant state must be a mapping, got {type(qs_dict).__name__}")
        items: dict[str, Any] = {}
        blobs = [k for k in qs_dict if _STATE_KEY_PREFIX.split(".")[0] in k
                 and isinstance(qs_dict[k], torch.Tensor)]
        if len(blobs) > 1:
            raise ValueError(f"expected one quant_state.bitsandbytes__* entry, found {sorted(blobs)}")
        if blobs:
            key = blobs[0]
            suffix = key.rsplit(".", 1)[-1]
            if suffix not in cls.valid_qs_type_keys:
                raise ValueError(f"{key!r}: expected a key ending in one of {cls.valid_qs_type_keys}")
            items.update(_unpack_json(qs_dict[key], key))
            if items.get("quant_type") != suffix.removeprefix("bitsandbytes__"):
                raise ValueError(f"{key!r} names quant type {suffix!r} but its JSON says "
                                 f"{items.get('quant_type')!r}")
        for k, v in qs_dict.items():
            if k in blobs:
                continue
            short = k.rsplit(".", 1)[-1]
            if short in items:
                raise ValueError(f"quant state key {short!r} given twice (as {k!r})")
            items[short] = v
        if "quant_type" not in items:
            raise ValueError("quant state has no quant_type (no quant_state.bitsandbytes__* entry)")
        unknown = set(items) - set(_TENSOR_KEYS) - set(_JSON_KEYS)
        if unknown:
            raise ValueError(f"unknown quant state keys {sorted(unknown)}")
        for k in ("absmax", "blocksize", "dtype", "shape"):
            if k not in items:
                raise ValueError(f"quant state is missing {k!r}")
        for k in _TENSOR_KEYS:
            if k in items and not isinstance(items[k], torch.Tensor):
                raise TypeError(f"quant state {k!r} must be a tensor, got {type(items[k]).__name__}")

        def to_dev(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return t if t is None or device is None else t.to(device)

        shape = items["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                            for d in shape):
            raise ValueError(f"quant state shape must be a list of ints, got {shape!r}")
        quant_type = items["quant_type"]
        codebook.check_quant_type(quant_type)
        code = items.get("quant_map")
        if code is None:
            code = codebook.levels(quant_type)
        state2 = None
        offset = None
        nested_keys = {"nested_absmax", "nested_blocksize", "nested_quant_map", "nested_offset"}
        present = nested_keys & set(items)
        if present and present != nested_keys:
            raise ValueError(f"incomplete double-quantization state: has {sorted(present)}, "
                             f"missing {sorted(nested_keys - present)}")
        if present:
            offset_value = items["nested_offset"]
            if isinstance(offset_value, bool) or not isinstance(offset_value, (int, float)) \
                    or not math.isfinite(offset_value):
                raise ValueError(f"nested_offset must be a finite number, got {offset_value!r}")
            nested_dtype = dtype_from_name(items.get("nested_dtype", "float32"), "nested_dtype")
            state2 = cls(absmax=to_dev(items["nested_absmax"]), code=to_dev(items["nested_quant_map"]),
                         blocksize=items["nested_blocksize"], dtype=nested_dtype)
            offset = torch.tensor(float(offset_value), dtype=torch.float32,
                                  device=device if device is not None else items["nested_absmax"].device)
        codebook.check_levels(code, quant_type)
        qs = cls(absmax=to_dev(items["absmax"]), shape=shape, code=to_dev(code),
                 blocksize=items["blocksize"], quant_type=quant_type,
                 dtype=dtype_from_name(items["dtype"]), offset=offset, state2=state2)
        return qs.validate()

    # ---------------------------------------------------------------- utilities
    def to(self, device) -> "QuantState":
        """Move every tensor to ``device`` in place (bitsandbytes' semantics) and return self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented

        def same(a, b) -> bool:
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())

        return (same(self.absmax, other.absmax) and self.shape == other.shape
                and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                and self.dtype == other.dtype and self.nested == other.nested
                and same(self.code, other.code)
                and (not self.nested or (same(self.offset, other.offset)
                                         and same(self.state2.absmax, other.state2.absmax)
                                         and same(self.state2.code, other.state2.code)
                                         and self.state2.blocksize == other.state2.blocksize)))

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        nested = f", nested(blocksize={self.state2.blocksize})" if self.nested else ""
        return (f"QuantState({self.quant_type}, shape={tuple(self.shape)}, blocksize={self.blocksize}, "
                f"dtype={dtype_name(self.dtype)}{nested}, device={self.absmax.device})")

    def __getitem__(self, idx):
        """bitsandbytes' legacy list form: ``[absmax, shape, dtype, blocksize, [offset, state2],
        quant_type]`` (``None`` in place of ``[offset, state2]`` without double quantization)."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]


def _unpack_json(t: torch.Tensor, key: str) -> dict[str, Any]:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{key!r} must be a 1-D uint8 tensor of UTF-8 JSON, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if t.numel() > _MAX_JSON_BYTES:
        raise ValueError(f"{key!r} holds {t.numel()} bytes, more than a quant state ({_MAX_JSON_BYTES})")
    meta = safe_json.loads(bytes(t.cpu().tolist()), repr(key), _MAX_JSON_BYTES)
    if not isinstance(meta, dict):
        raise ValueError(f"{key!r} must hold a JSON object, got {type(meta).__name__}")
    unknown = set(meta) - set(_JSON_KEYS)
    if unknown:
        raise ValueError(f"{key!r} has unknown fields {sorted(unknown)}")
    return meta
