"""Gemma-2: ``(1 + weight)`` norms (four per layer), attention logit soft-capping and sliding
windows (passed to transformers' attention functions as its own forward does), GeGLU MLP
(``gelu_pytorch_tanh``), and the final logit soft-cap inside the fused loss.
"""
from __future__ import annotations

from torch import nn

from nf4.models import common

MODEL_TYPES = ("gemma2",)


def _extras(module: nn.Module) -> dict:
    return {"sliding_window": module.sliding_window, "softcap": module.attn_logit_softcapping}


def patch(model: nn.Module, model_type: str) -> dict[str, int]:
    counts = {"norms": common.patch_norms(model, gemma=True),
              "attention": common.patch_attention(model, "Attention", _extras)}
    if common.activation(model.config, "hidden_activation", "hidden_act") == "gelu_pytorch_tanh":
        counts["mlp"] = common.patch_mlp(model, "MLP", common.GEGLU_MLP)
    counts["loss"] = int(common.patch_loss(model))
    return counts
