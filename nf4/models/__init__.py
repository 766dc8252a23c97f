"""Per-architecture training path: transformers' norms, RoPE, MLP activation and causal-LM loss
replaced by nf4's Triton kernels, one file per architecture family.

    model = nf4.from_pretrained(..., patch=True)      # or: nf4.models.patch(model)
    # transformers: quantization_config=nf4.hf.Nf4Config(patch=True), or nf4.hf.install(patch=True)
    nf4.models.unpatch(model)                          # back to transformers' forwards

The family comes from ``model.config.model_type``; an unknown type runs unpatched (one log line).
Only module instances are patched (their ``forward`` attribute), never transformers' classes.
With labels, a patched ``*ForCausalLM`` returns the loss and ``logits=None`` (the full logits are
never built); called without labels it runs transformers' forward and returns the logits.
Where the layers are nf4's 4-bit LoRA layers, each gated MLP and each q/k/v triple runs as one
autograd function with its adapters (``nf4.models.lora_blocks``; ``patch(model, fused_lora=False)``
keeps one call per layer).
Gradient checkpointing with CPU offload of the saved layer inputs: ``nf4.models.checkpointing``.
"""
from __future__ import annotations

import logging

from torch import nn

from nf4.models import common, gemma2, llama, phi3
from nf4.models.common import unpatch

log = logging.getLogger(__name__)

FAMILIES = {t: family for family in (llama, gemma2, phi3) for t in family.MODEL_TYPES}

__all__ = ["patch", "unpatch", "FAMILIES"]


def patch(model: nn.Module, fused_lora: bool = True, recompute_mlp: bool = True) -> bool:
    """Patch ``model`` in place for its ``config.model_type``; returns whether it was patched.

    ``fused_lora``: run each gated MLP and each q/k/v projection triple as one autograd function
    with its adapters (``nf4.models.lora_blocks``) where the layers allow it; False keeps one call
    per layer (for comparison). ``recompute_mlp``: the MLP block recomputes gate and up in
    backward instead of keeping them (See Note: what the MLP block keeps).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("fused_lora", fused_lora), ("recompute_mlp", recompute_mlp)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        log.info("nf4.models: model_type %r has no fused training path (%s); running unpatched",
                 model_type, ", ".join(sorted(FAMILIES)))
        return False
    counts = family.patch(model, model_type)
    counts["lora blocks"] = common.set_lora_blocks(model, fused_lora, recompute_mlp)
    log.info("nf4.models: patched %s (%s)", model_type, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return True
