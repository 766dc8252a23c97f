"""JSON from untrusted files (checkpoint headers, indexes, config.json, quantization states).

Python's parser recurses once per nesting level, so ``[[[[...]]]]`` a few thousand deep raises
RecursionError (or, in C extensions with a larger limit, exhausts the stack) while staying far
under any size cap. Every untrusted JSON is therefore measured first: its size against the
caller's cap (for a file, from ``stat`` before any byte is read, so a 32 GiB sparse file costs
nothing), then its nesting depth by a linear scan without recursion, and only then parsed. An
object that repeats a key is refused (Python keeps the last copy silently; safetensors refuses).
Every failure is a ValueError naming ``what``.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

# The deepest nesting accepted. Real files nest at most ~6 levels (a multimodal config's
# text_config.rope_scaling.<list>; a safetensors header is 3); 32 leaves room for new formats
# while staying far below the interpreter's recursion limit (1000).
MAX_JSON_DEPTH = 32

# A JSON string literal: the scan drops them so that brackets inside names do not count.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting of ``text`` outside string literals (exact for valid JSON)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _unique_keys(what: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"{what}: key {k!r} appears twice in one JSON object")
            out[k] = v
        return out
    return hook


def loads(raw: bytes | str, what: str, max_bytes: int) -> Any:
    """Parse ``raw`` (UTF-8 bytes or text) after checking its size and nesting depth."""
    if len(raw) > max_bytes:
        raise ValueError(f"{what}: {len(raw)} bytes of JSON, more than the {max_bytes} accepted")
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: not valid UTF-8 JSON ({e})") from e
    depth = nesting_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what}: JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} "
                         f"accepted")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not valid JSON ({e})") from e


def read_file(path: Path, max_bytes: int, what: str = "") -> Any:
    """Parse the JSON file ``path``, refusing it by its size before reading it. At most
    ``max_bytes + 1`` bytes are read, so a file that grows meanwhile, or a FIFO or device whose
    ``stat`` size is 0, cannot make it read more."""
    what = what or str(path)
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(f"{what}: {size} bytes, more than the {max_bytes} accepted")
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    return loads(raw, what, max_bytes)
