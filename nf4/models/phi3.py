"""Phi-3: one ``qkv_proj`` split into q, k, v and one ``gate_up_proj`` split into gate and up
(the kernels read the halves where they lie); partial rotary is handled by the RoPE kernel
(channels past cos' width pass through). Sliding window from the config, as transformers does.
"""
from __future__ import annotations

from torch import nn

from nf4.models import common

MODEL_TYPES = ("phi3",)


def patch(model: nn.Module, model_type: str) -> dict[str, int]:
    counts = {"norms": common.patch_norms(model, gemma=False),
              "attention": common.patch_attention(model, "Attention", common.sliding_window_of_config)}
    if common.activation(model.config, "hidden_act") == "silu":
        counts["mlp"] = common.patch_mlp(model, "MLP", common.FUSED_SWIGLU_MLP)
    counts["loss"] = int(common.patch_loss(model))
    return counts
