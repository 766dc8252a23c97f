"""nf4: 4-bit NormalFloat quantization for PyTorch, a drop-in for bitsandbytes' 4-bit path.

    import nf4
    packed, state = nf4.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    layer = nf4.QuantLinear4bit.from_linear(linear, lora_rank=16)
    model = nf4.from_pretrained("meta-llama/Llama-3.1-8B", lora_rank=16)   # needs the [hf] extra
"""
from nf4 import functional, nn
from nf4.backends import available as available_backends, get_backend, set_backend
from nf4.functional import dequantize_4bit, matmul_4bit, quantize_4bit
from nf4.loading import from_pretrained, quantize_model, save_pretrained
from nf4.nn import QuantLinear4bit
from nf4.quant_state import QuantState

__version__ = "0.1.0"

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "matmul_4bit", "functional", "nn",
           "QuantLinear4bit", "from_pretrained", "quantize_model", "save_pretrained",
           "set_backend", "get_backend", "available_backends"]
