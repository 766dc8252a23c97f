"""Triton kernels, installed as ``nf4.kernels`` (the ``triton`` backend).

Implements the backend protocol of ``nf4.ops`` (see ``nf4/reference_backend.py``): ``quantize``,
``dequantize`` and the fused ``matmul``. Importing this package without Triton raises ImportError,
which ``nf4.backends`` takes as "backend unavailable".
"""
import triton  # noqa: F401  (ImportError here means: no Triton backend)

from .dequantize import dequantize
from .matmul import matmul, route
from .quantize import quantize

__all__ = ["quantize", "dequantize", "matmul", "route"]
