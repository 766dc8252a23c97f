"""Per-architecture training path: transformers' norms, RoPE, MLP activation and causal-LM loss
replaced by nf4's Triton kernels, one file per architecture family.

    model = nf4.from_pretrained(..., patch=True)      # or: nf4.models.patch(model)
    nf4.models.unpatch(model)                          # back to transformers' forwards

The family comes from ``model.config.model_type``; an unknown type runs unpatched (one log line).
Only module instances are patched (their ``forward`` attribute), never transformers' classes.
With labels, a patched ``*ForCausalLM`` returns the loss and ``logits=None`` (the full logits are
never built); called without labels it runs transformers' forward and returns the logits.
Gradient checkpointing with CPU offload of the saved layer inputs: ``nf4.models.checkpointing``.
"""
from __future__ import annotations

import logging

from torch import nn

from nf4.models import gemma2, llama, phi3
from nf4.models.common import unpatch

log = logging.getLogger(__name__)

FAMILIES = {t: family for family in (llama, gemma2, phi3) for t in family.MODEL_TYPES}

__all__ = ["patch", "unpatch", "FAMILIES"]


def patch(model: nn.Module) -> bool:
    """Patch ``model`` in place for its ``config.model_type``; returns whether it was patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        log.info("nf4.models: model_type %r has no fused training path (%s); running unpatched",
                 model_type, ", ".join(sorted(FAMILIES)))
        return False
    counts = family.patch(model, model_type)
    log.info("nf4.models: patched %s (%s)", model_type, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return True
