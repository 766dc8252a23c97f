"""Loading and saving models: Hub/folder resolution, streaming quantization, bnb-format output.

    model = nf4.loading.from_pretrained("meta-llama/Llama-3.1-8B")   # 4-bit linear layers
    nf4.loading.save_pretrained(model, "llama-8b-nf4")               # loads in transformers + bnb
"""
from nf4.loading.adapter import save_adapter
from nf4.loading.model import from_pretrained, quantize_model
from nf4.loading.save import save_pretrained
from nf4.loading.summary import summarize

__all__ = ["from_pretrained", "quantize_model", "save_pretrained", "save_adapter", "summarize"]
