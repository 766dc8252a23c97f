"""What nf4 finds on this machine, and which backend each operation will use: ``nf4 env``.

Everything here is computed, never printed: ``report()`` returns (key, value) rows that the command
line prints and the tests check. The backend rows ask ``nf4.backends`` (the same routing the ops
use) and add why.
"""
from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

import nf4
from nf4 import backends

OPS = ("quantize", "dequantize", "matmul")
# Backend name of each backend module (nf4.backends resolves to modules).
_NAMES = {module: name for name, module in backends._MODULES.items()}


@dataclass(frozen=True)
class Extension:
    """The compiled module ``nf4._C``: loaded (with its targets) or not (with the reason)."""

    loaded: bool
    archs: tuple[str, ...] = ()   # SASS targets, e.g. ("80", "86", "89", "90a")
    ptx: str = ""                 # the embedded PTX's virtual arch ("80"), "" for none
    path: str = ""
    error: str = ""

    def describe(self) -> str:
        if not self.loaded:
            return f"not loaded: {self.error}"
        targets = ", ".join(f"sm_{a}" for a in self.archs)
        ptx = f" + compute_{self.ptx} PTX" if self.ptx else " (no PTX)"
        return f"loaded from {self.path}, built for {targets}{ptx}"


def _extension_module() -> tuple[Optional[ModuleType], str]:
    """nf4.cuda_backend (which imports nf4._C and builds its tables), or the reason it failed."""
    try:
        return importlib.import_module("nf4.cuda_backend"), ""
    except ImportError as e:
        if "cannot import name '_C'" in str(e):
            return None, ("not built (nvcc was not found when nf4 was installed, or NF4_BUILD_CUDA=0; "
                          "see README 'Building for other GPUs')")
        return None, f"{type(e).__name__}: {e}"


def extension() -> Extension:
    module, error = _extension_module()
    if module is None:
        return Extension(loaded=False, error=error)
    C = module._C
    archs = tuple(a for a in getattr(C, "cuda_archs", "").split(",") if a)
    return Extension(loaded=True, archs=archs, ptx=getattr(C, "ptx_arch", ""), path=str(Path(C.__file__)))


def cuda_code_for(capability: tuple[int, int], archs: tuple[str, ...], ptx: str) -> Optional[str]:
    """How a GPU of compute capability ``capability`` runs a module built for ``archs`` (+ ``ptx``):
    "sm_XX SASS", "sm_XX SASS (binary compatible)", "JIT from compute_XX PTX", or None (no code).

    SASS runs on its own major version from its minor up (sm_80 on 8.6 and 8.9); an "a" target only
    on exactly its version; PTX is compiled by the driver for any GPU at least as new."""
    major, minor = capability
    version = 10 * major + minor
    if f"{version}a" in archs:
        return f"sm_{version}a SASS"
    if str(version) in archs:
        return f"sm_{version} SASS"
    compatible = [int(a) for a in archs if a.isdigit() and int(a) // 10 == major and int(a) <= version]
    if compatible:
        return f"sm_{max(compatible)} SASS (binary compatible)"
    if ptx and int(ptx) <= version:
        return f"JIT from compute_{ptx} PTX (compiled by the driver at first use)"
    return None


def _gpus() -> list[tuple[str, tuple[int, int]]]:
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


def _no_gpu_reason() -> str:
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    return "torch.cuda.is_available() is False (no GPU or no driver)"


def backend_choices(ext: Optional[Extension] = None) -> dict[tuple[str, str], tuple[Optional[str], str]]:
    """{(device type, op): (backend name or None, why)} for "cuda" and "cpu" tensors on this machine,
    as ``nf4.backends`` resolves them now (NF4_BACKEND / ``set_backend`` included)."""
    ext = extension() if ext is None else ext
    forced = backends.get_backend()
    gpus = _gpus()
    choices = {}
    for op in OPS:
        for device in (torch.device("cpu"), torch.device("cuda")):
            if device.type == "cuda" and not gpus:
                choices[("cuda", op)] = (None, f"no usable CUDA GPU: {_no_gpu_reason()}")
            elif forced is not None:
                ok = backends.supports(forced, device)
                choices[(device.type, op)] = (
                    (forced, "forced by NF4_BACKEND / nf4.set_backend") if ok else
                    (None, f"the forced backend {forced!r} cannot run {device.type} tensors: calls raise"))
            elif device.type == "cpu":
                choices[("cpu", op)] = ("reference", "the default for CPU tensors (pure PyTorch)")
            else:
                name = _NAMES[backends.resolve(device, op).__name__]
                choices[("cuda", op)] = (name, _cuda_why(name, op, ext, gpus[torch.cuda.current_device()][1]))
    return choices


def _cuda_why(name: str, op: str, ext: Extension, capability: tuple[int, int]) -> str:
    sm = f"sm_{capability[0]}{capability[1]}"
    if name == "cuda":
        code = cuda_code_for(capability, ext.archs, ext.ptx)
        if code is None:
            return (f"nf4._C has no code for this {sm} GPU (built for {', '.join(ext.archs)}): launches fail; "
                    f"rebuild with NF4_CUDA_ARCHS={capability[0]}{capability[1]} or set NF4_BACKEND=triton")
        why = f"nf4._C runs {code} on this {sm} GPU"
        if op == "matmul":
            cb = importlib.import_module("nf4.cuda_backend")
            wgmma = cb.wgmma_available(torch.device("cuda"))
            why += (f"; fused kernels up to {cb.WGMMA_MAX_TOKENS} tokens (wgmma)" if wgmma else
                    f"; fused kernels up to {cb.TILED_MAX_TOKENS} tokens (no wgmma: needs sm_90a code on an H100/H200)")
            why += ", larger batches: its dequantize + cuBLAS (nf4.backends.route)"
        return why
    if name == "triton":
        return f"nf4._C not loaded: {ext.error}"
    return "neither nf4._C nor Triton loaded"


def _version(module_name: str) -> str:
    try:
        return importlib.import_module(module_name).__version__
    except ImportError as e:
        return f"not installed ({e})"


def report() -> list[tuple[str, str]]:
    """The rows of ``nf4 env``: versions, GPUs, the extension, and the backend per op and device."""
    ext = extension()
    rows = [
        ("nf4", f"{nf4.__version__} ({Path(nf4.__file__).resolve().parent})"),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"),
        ("triton", _version("triton")),
    ]
    gpus = _gpus()
    if gpus:
        rows += [(f"gpu {i}", f"{name}, compute capability {cc[0]}.{cc[1]} (sm_{cc[0]}{cc[1]})")
                 for i, (name, cc) in enumerate(gpus)]
    else:
        rows.append(("gpu", f"none: {_no_gpu_reason()}"))
    rows.append(("nf4._C", ext.describe()))
    forced = backends.get_backend()
    rows.append(("backend choice", f"forced: {forced}" if forced else "automatic (NF4_BACKEND unset)"))
    choices = backend_choices(ext)
    for op in OPS:
        for device in ("cuda", "cpu"):
            name, why = choices[(device, op)]
            rows.append((f"{op}, {device} tensors", f"{name or 'none'}: {why}"))
    return rows
