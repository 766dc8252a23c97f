"""nf4: 4-bit NormalFloat quantization for PyTorch, a drop-in for bitsandbytes' 4-bit path."""
from nf4 import functional
from nf4.backends import available as available_backends, get_backend, set_backend
from nf4.functional import dequantize_4bit, matmul_4bit, quantize_4bit
from nf4.quant_state import QuantState

__version__ = "0.1.0"

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "matmul_4bit", "functional",
           "set_backend", "get_backend", "available_backends"]
