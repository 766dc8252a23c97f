"""Which implementation runs an operation: a choice behind the ops, not a second API.

Backends:
    ``reference``  pure PyTorch (``nf4.reference``); any device; the oracle.
    ``triton``     Triton kernels (``nf4.kernels``); CUDA tensors, or CPU tensors when
                   ``TRITON_INTERPRET=1`` (the interpreter, for CI).
    ``cuda``       the compiled extension ``nf4._C``; CUDA tensors.

Selection: ``nf4.set_backend(name)`` overrides ``NF4_BACKEND``; with neither, a CUDA tensor goes to
the fastest available backend for that operation (``_AUTO_ORDER_CUDA``) and a CPU tensor to
the reference. An explicit choice that cannot serve a tensor raises rather than silently falling back.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any, NamedTuple, Optional

import torch

log = logging.getLogger(__name__)

BACKENDS = ("reference", "triton", "cuda")
# Modules implementing the backend protocol: quantize, dequantize, matmul with the ops' signatures.
_MODULES = {"reference": "nf4.reference_backend", "triton": "nf4.kernels", "cuda": "nf4.cuda_backend"}
# Automatic choice on CUDA tensors, per operation: the extension's kernels first. Its matmul is
# the fused few-token kernel (csrc/matmul.cu) and hands larger batches to Triton's matmul when
# Triton is installed (see nf4.cuda_backend.matmul), else to dequantize + cuBLAS.
_AUTO_ORDER_CUDA = {
    "quantize": ("cuda", "triton", "reference"),
    "dequantize": ("cuda", "triton", "reference"),
    "matmul": ("cuda", "triton", "reference"),
}

_override: Optional[str] = None
_loaded: dict[str, ModuleType] = {}
_load_errors: dict[str, str] = {}
# The automatic choice for CUDA tensors, per operation, once made: it depends only on which
# backends import, and _load remembers both outcomes, so it never changes. resolve() runs once or
# twice per layer call, and the walk down _AUTO_ORDER_CUDA doubled its cost.
_auto_cuda: dict[str, ModuleType] = {}


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every operation (``None`` restores automatic selection)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _override = name


def get_backend() -> Optional[str]:
    """The forced backend (``set_backend`` or ``NF4_BACKEND``), or None for automatic selection."""
    if _override is not None:
        return _override
    env = os.environ.get("NF4_BACKEND", "").strip().lower()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"NF4_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
    return env


# os.environ's own mapping, read without its encode-and-lookup wrapper (~4 µs a call on the GPU
# machine's host, paid by every eager call); other platforms' os.environ read the usual way.
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("NF4_BACKEND") if _ENVIRON is not None else None


def forced() -> Optional[str]:
    """``get_backend()`` at the cost of two dictionary lookups: every eager call asks it (routes
    are cached per forced backend)."""
    if _override is not None:
        return _override
    if _ENVIRON is not None and _ENV_KEY not in _ENVIRON:
        return None
    return get_backend()


def _load(name: str) -> Optional[ModuleType]:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as e:  # triton not installed, or the extension not built
        _load_errors[name] = f"{type(e).__name__}: {e}"
        log.debug("nf4 backend %s unavailable: %s", name, e)
        return None
    _loaded[name] = module
    return module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        return (device.type == "cuda" or (device.type == "cpu" and _interpreting())) and _load(name) is not None
    if name == "cuda":
        return device.type == "cuda" and _load(name) is not None
    return False


def available(device: torch.device | str = "cuda") -> list[str]:
    """The backends that can run tensors on ``device`` on this machine: none for CUDA tensors
    without a usable GPU (``nf4 env`` says why each op runs where it does)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in BACKENDS if supports(b, device)]


def cuda_module() -> Optional[ModuleType]:
    """``nf4.cuda_backend`` when the extension loads, else None."""
    return _load("cuda")


class Route(NamedTuple):
    """How a matmul of ``tokens`` rows runs: the backend (name and module), the kernel and its
    configuration. Kernels: ``"dequant"`` (decode the weight, then cuBLAS / F.linear: every
    backend); the CUDA extension's fused ``"few"``, ``"tiled"``, ``"wgmma"``; Triton's fused
    ``"gemv"``, ``"dot"``. The module's ``matmul`` takes ``config=`` to run exactly this route."""
    backend: str
    module: ModuleType
    kernel: str
    config: Any = None


def route(device: torch.device, dtype: torch.dtype, tokens: int, out_features: int, in_features: int,
          blocksize: int) -> Route:
    """The one routing decision for a 4-bit matmul ``[tokens, in] x [out, in]^T`` in ``dtype`` on
    ``device``: the backend ``resolve`` picks, then that backend's own choice of kernel and config
    (``module.route``). ``matmul_4bit``, ``QuantLinear4bit`` and the benchmarks all ask it."""
    module = resolve(device, "matmul")
    name = next(n for n, m in _loaded.items() if m is module)
    kernel, config = module.route(dtype, tokens, out_features, in_features, blocksize, device)
    if kernel.startswith("triton:"):  # the CUDA backend hands a shape to Triton's fused kernels
        kernel = kernel.removeprefix("triton:")
        return Route("triton", _load("triton"), kernel, config)
    return Route(name, module, kernel, config)


def resolve(device: torch.device, op: str) -> ModuleType:
    """The backend module that runs operation ``op`` (quantize, dequantize, matmul) on ``device``."""
    forced = get_backend()
    if forced is not None:
        if not supports(forced, device):
            why = _load_errors.get(forced)
            if forced == "triton" and device.type == "cpu" and why is None:
                why = "Triton runs CPU tensors only under TRITON_INTERPRET=1"
            elif forced == "cuda" and device.type != "cuda":
                why = "the cuda backend needs CUDA tensors"
            raise RuntimeError(f"nf4 backend {forced!r} cannot run {device.type} tensors"
                               + (f": {why}" if why else ""))
        return _load(forced)
    if device.type == "cuda":
        module = _auto_cuda.get(op)
        if module is None:
            module = next(_load(name) for name in _AUTO_ORDER_CUDA[op] if supports(name, device))
            _auto_cuda[op] = module
        return module
    return _load("reference")
