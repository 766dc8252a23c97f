"""Llama-like decoders: llama, mistral, qwen2, qwen3 (Qwen3's q/k norms are RMSNorms too).

Norms: ``weight * x_hat`` (offset 0). Attention: separate q/k/v projections, RoPE in place;
Mistral reads its sliding window from the config, Qwen2/3 from the attention module. MLP:
``down(silu(gate(x)) * up(x))`` when the config's activation is ``silu``.
"""
from __future__ import annotations

from torch import nn

from nf4.models import common

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_EXTRAS = {"llama": common.attention_extras_none, "mistral": common.sliding_window_of_config,
           "qwen2": common.sliding_window_of_module, "qwen3": common.sliding_window_of_module}


def patch(model: nn.Module, model_type: str) -> dict[str, int]:
    counts = {"norms": common.patch_norms(model, gemma=False),
              "attention": common.patch_attention(model, "Attention", _EXTRAS[model_type])}
    if common.activation(model.config, "hidden_act") == "silu":
        counts["mlp"] = common.patch_mlp(model, "MLP", common.SWIGLU_MLP)
    counts["loss"] = int(common.patch_loss(model))
    return counts
