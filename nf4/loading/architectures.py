"""Per-architecture choices: which linear layers stay in high precision, and the LoRA targets.

Only ``nn.Linear`` layers are ever quantized, so embeddings and norms stay as they are by
construction; the table lists the *linear* layers that must not be: the output head (its error
lands directly on the logits, and it is often tied to the embedding) and MoE routers (a few
thousand parameters whose small errors flip expert choices). Unknown ``model_type``s fall back to
every linear layer but ``lm_head``, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    keep: tuple[str, ...]          # linear modules left unquantized (matched by name suffix)
    lora_targets: tuple[str, ...]  # default LoRA targets (matched by name suffix)


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_DECODER = Architecture(keep=("lm_head",), lora_targets=_ATTN + _MLP)
# Routers: Mixtral's block_sparse_moe.gate, Qwen-MoE's mlp.gate and mlp.shared_expert_gate.
_MOE = Architecture(keep=("lm_head", "gate", "shared_expert_gate", "router"), lora_targets=_ATTN + _MLP)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "phi3": Architecture(keep=("lm_head",), lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    # BERT (the MiniLM demo): every linear layer, pooler and heads included, is quantized.
    "bert": Architecture(keep=(), lora_targets=("query", "key", "value", "dense")),
}
FALLBACK = Architecture(keep=("lm_head",), lora_targets=())


def architecture(model_type: object) -> Architecture:
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        log.warning("model_type %r is not in nf4's table (%s): quantizing every nn.Linear but lm_head, "
                    "and LoRA needs explicit target_modules", model_type, ", ".join(sorted(ARCHITECTURES)))
        return FALLBACK
    return arch


def matches(module_name: str, patterns) -> bool:
    """Whether ``module_name`` is one of ``patterns`` or ends with ``"." + pattern``."""
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)
