"""nf4: 4-bit NormalFloat quantization for PyTorch, a drop-in for bitsandbytes' 4-bit path.

    import nf4
    packed, state = nf4.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    layer = nf4.QuantLinear4bit.from_linear(linear, lora_rank=16)
    model = nf4.from_pretrained("meta-llama/Llama-3.1-8B", lora_rank=16)   # needs the [hf] extra
"""
import importlib.util
from pathlib import Path

# Note: source checkouts and nf4.kernels.
#     setup.py installs kernels/ as the subpackage nf4.kernels (package_dir). When nf4 is imported
#     from a checkout whose editable install went to another interpreter (on the GPU machine the
#     bare `pip` is the system Python's, not the torch venv's), that mapping is missing and the
#     Triton backend would silently vanish. Only then, let this package also search the checkout
#     root, where kernels/ lives.
if importlib.util.find_spec("nf4.kernels") is None:
    _root = Path(__file__).resolve().parent.parent
    if (_root / "kernels" / "__init__.py").is_file():
        __path__.append(str(_root))

from nf4 import functional, nn  # noqa: E402
from nf4.backends import available as available_backends, get_backend, set_backend  # noqa: E402
from nf4.functional import dequantize_4bit, matmul_4bit, quantize_4bit  # noqa: E402
from nf4.loading import from_pretrained, quantize_model, save_adapter, save_pretrained  # noqa: E402
from nf4.nn import QuantLinear4bit  # noqa: E402
from nf4.quant_state import QuantState  # noqa: E402

__version__ = "0.1.0"

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "matmul_4bit", "functional", "nn",
           "QuantLinear4bit", "from_pretrained", "quantize_model", "save_pretrained", "save_adapter",
           "set_backend", "get_backend", "available_backends"]
