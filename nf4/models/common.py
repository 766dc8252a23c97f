"""The patched forwards every family shares: RMSNorm, attention with in-place RoPE, gated MLP,
and the causal-LM loss through the fused lm_head + cross-entropy.

Each ``patch_*`` function replaces one module instance's ``forward`` (never the class, so an
unpatched model of the same type in the same process stays as transformers wrote it) and keeps
the original as ``_nf4_unpatched_forward``. The replacement forwards mirror transformers' own
(5.17 to 5.23) line for line except where a kernel takes over; the unpatched model is their
correctness reference (tests/test_models.py). Each one runs the original forward instead where
the Triton kernels cannot run the input (``kernels_run_on``: CPU tensors outside the
interpreter), so a patched model moved to the CPU still works, as transformers wrote it.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Callable, Optional

import torch
from torch import nn

from nf4.kernels.glu import geglu, swiglu
from nf4.kernels.linear_cross_entropy import linear_cross_entropy
from nf4.kernels.rms_norm import rms_norm
from nf4.kernels.rope import apply_rope, apply_rope_  # apply_rope_: See Note: RoPE in place
from nf4.models import lora_blocks

# Attention-interface keyword arguments a family adds to Llama's (sliding window, soft-cap).
AttentionExtras = Callable[[nn.Module], dict]


def kernels_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels run tensors on ``device``: CUDA, or the CPU under the
    interpreter (``TRITON_INTERPRET=1``, which CI uses)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def _forward_slot(module: nn.Module) -> str:
    # accelerate's hooks (device_map dispatch, offload) replace the instance's forward with a
    # wrapper that moves inputs and weights, then calls module._old_forward: patched there, the
    # wrapper still runs around the patched forward.
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def _replace_forward(module: nn.Module, forward: Callable) -> None:
    slot = _forward_slot(module)
    if not hasattr(module, "_nf4_unpatched_forward"):
        module._nf4_unpatched_forward = getattr(module, slot)
    setattr(module, slot, types.MethodType(forward, module))


def unpatch_module(module: nn.Module) -> None:
    if hasattr(module, "_nf4_unpatched_forward"):
        setattr(module, _forward_slot(module), module._nf4_unpatched_forward)
        del module._nf4_unpatched_forward


# ------------------------------------------------------------------------------- norms
def _llama_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not kernels_run_on(x.device):
        return self._nf4_unpatched_forward(x)
    # transformers returns weight * x_hat.to(x.dtype): the promoted dtype of the two
    return rms_norm(x, self.weight, self.variance_epsilon, 0.0, torch.promote_types(x.dtype, self.weight.dtype))


def _gemma_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not kernels_run_on(x.device):
        return self._nf4_unpatched_forward(x)
    return rms_norm(x, self.weight, self.eps, 1.0, x.dtype)


def patch_norms(model: nn.Module, gemma: bool) -> int:
    """Every ``*RMSNorm`` module (layer norms, final norm, q/k norms). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            _replace_forward(module, _gemma_norm_forward if gemma else _llama_norm_forward)
            count += 1
    return count


# ------------------------------------------------------------------------------- attention
def _transformers_attention(config, eager: Callable) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # optional dependency ([hf])
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)
    # releases without get_interface: "eager" is the module's own function, others are registered
    impl = config._attn_implementation
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    if not kernels_run_on(hidden_states.device):
        return self._nf4_unpatched_forward(hidden_states, position_embeddings=position_embeddings,
                                           attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    # Rows: a QuantLinear4bit called on 2-D input returns its own output, where 3-D input gets a
    # view it made, which autograd would not let RoPE rotate in place (See Note: RoPE in place).
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    if hasattr(self, "qkv_proj"):  # Phi-3: one projection, split as transformers does
        qkv = self.qkv_proj(hidden_states)
        q_size = self.config.num_attention_heads * self.head_dim
        kv_size = self.config.num_key_value_heads * self.head_dim
        q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    else:
        # One fused q/k/v block when the projections allow it (nf4.models.lora_blocks).
        qkv = lora_blocks.qkv(self, hidden_states) if getattr(self, "_nf4_fused_lora", False) else None
        q, k, v = qkv or (self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states))
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head norms before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = (apply_rope_ if rotatable_in_place(q) and rotatable_in_place(k) else apply_rope)(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attention = _transformers_attention(self.config, self._nf4_eager_attention)
    out, weights = attention(self, q, k, v, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **self._nf4_attention_extras(self), **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


# Note: RoPE in place.
#     q and k are rotated where they lie (``apply_rope_``): no rotated copies ([tokens, heads x
#     head_dim] each, 16 + 4 MB a layer at 2048 tokens of Llama-3-8B, 0.5 + 0.125 GB at 64k),
#     and nothing is lost, because nothing keeps the unrotated values: the projections save their
#     input, not their output, and the Qwen3 q/k norms save theirs. Autograd records the rotation
#     on the projection's output (CopySlices) and checks the version counters, so a producer that
#     did save its output would make backward raise, never compute a wrong gradient. It forbids
#     the rotation of a view that a custom Function returned (QuantLinear4bit's output for 3-D
#     input, hence the 2-D input above) or one of several views an op returned (a fused q/k/v
#     split): those are rotated into new tensors (``apply_rope``), as all of them were before.
_DEFAULT_VIEW = torch._C._autograd.CreationMeta.DEFAULT


def rotatable_in_place(t: torch.Tensor) -> bool:
    """Whether autograd lets ``t`` be modified in place: outside autograd (no grad mode, or a
    tensor that needs none), a tensor that is not a view, or a view made by an ordinary op."""
    if not (t.requires_grad and torch.is_grad_enabled() and t._is_view()):
        return True
    return torch._C._autograd._get_creation_meta(t) == _DEFAULT_VIEW


def patch_attention(model: nn.Module, class_suffix: str, extras: AttentionExtras) -> int:
    """Every module whose class name ends with ``class_suffix`` (``"Attention"``): the model
    family's eager attention and ``extras`` are looked up once here."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith(class_suffix):
            family = sys.modules[type(module).__module__]
            module._nf4_eager_attention = family.eager_attention_forward
            module._nf4_attention_extras = extras
            _replace_forward(module, _attention_forward)
            count += 1
    return count


# ------------------------------------------------------------------------------- MLP
def _gated_mlp(self, x, act: int, glu: Callable):
    """``down(glu(gate(x), up(x)))``: one fused block with the adapters when the projections allow
    it (``lora_blocks.mlp``), else the layers and the GLU kernel."""
    if not kernels_run_on(x.device):
        return self._nf4_unpatched_forward(x)
    if getattr(self, "_nf4_fused_lora", False):
        y = lora_blocks.mlp(self, x, act, self._nf4_lora_recompute)
        if y is not None:
            return y
    return self.down_proj(glu(self.gate_proj(x), self.up_proj(x)))


def _swiglu_mlp_forward(self, x):
    return _gated_mlp(self, x, lora_blocks.SWIGLU, swiglu)


def _geglu_mlp_forward(self, x):
    return _gated_mlp(self, x, lora_blocks.GEGLU, geglu)


def _fused_swiglu_mlp_forward(self, x):  # Phi-3: gate_up_proj, gate first
    if not kernels_run_on(x.device):
        return self._nf4_unpatched_forward(x)
    if getattr(self, "_nf4_fused_lora", False):
        y = lora_blocks.gate_up_mlp(self, x, lora_blocks.SWIGLU, self._nf4_lora_recompute)
        if y is not None:
            return y
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(swiglu(gate, up))


def patch_mlp(model: nn.Module, class_suffix: str, forward: Callable) -> int:
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith(class_suffix):
            _replace_forward(module, forward)
            count += 1
    return count


SWIGLU_MLP = _swiglu_mlp_forward
GEGLU_MLP = _geglu_mlp_forward
FUSED_SWIGLU_MLP = _fused_swiglu_mlp_forward


# ------------------------------------------------------------------------------- LoRA blocks
# The patched forwards that can run a fused LoRA block, and the projections the block needs.
_BLOCK_PROJECTIONS = {_swiglu_mlp_forward: ("gate_proj", "up_proj", "down_proj"),
                      _geglu_mlp_forward: ("gate_proj", "up_proj", "down_proj"),
                      _fused_swiglu_mlp_forward: ("gate_up_proj", "down_proj"),
                      _attention_forward: ("q_proj", "k_proj", "v_proj")}


def set_lora_blocks(model: nn.Module, fused: bool, recompute: bool) -> int:
    """Turn the fused LoRA blocks (``nf4.models.lora_blocks``) on or off in every patched gated
    MLP (separate gate and up, or Phi-3's one gate_up) and attention with separate q, k, v
    projections; ``recompute``: the MLP block rebuilds gate and up
    in backward instead of keeping them. Returns how many modules have them on (each still falls
    back per call when its layers do not allow it)."""
    count = 0
    for module in model.modules():
        names = _BLOCK_PROJECTIONS.get(getattr(module.__dict__.get(_forward_slot(module)), "__func__", None))
        if names is not None and all(hasattr(module, n) for n in names):
            module._nf4_fused_lora, module._nf4_lora_recompute = fused, recompute
            count += fused
    return count


# ------------------------------------------------------------------------------- loss
def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    shift_labels = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)
    lm_head = self.lm_head
    if ((labels is None and shift_labels is None) or type(lm_head) is not nn.Linear
            or not kernels_run_on(lm_head.weight.device)):
        if shift_labels is not None:
            kwargs["shift_labels"] = shift_labels
        if return_dict is not None:
            kwargs["return_dict"] = return_dict
        return self._nf4_unpatched_forward(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=past_key_values,
                                           inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                           logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast  # optional dependency ([hf])

    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    loss = linear_cross_entropy(outputs.last_hidden_state, lm_head.weight,
                                labels if shift_labels is None else shift_labels, bias=lm_head.bias,
                                shift=shift_labels is None, num_items_in_batch=kwargs.get("num_items_in_batch"),
                                softcap=getattr(self.config, "final_logit_softcapping", None))
    # The logits are never materialized: a caller that needs them calls without labels.
    result = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return result.to_tuple() if return_dict is False else result


def patch_loss(model: nn.Module) -> bool:
    """The ``*ForCausalLM`` forward: with labels, the loss comes from the fused kernel and
    ``logits`` is None; without labels, the original forward runs."""
    if not (hasattr(model, "lm_head") and hasattr(model, "model")):
        return False
    _replace_forward(model, _causal_lm_forward)
    return True


def unpatch(model: nn.Module) -> None:
    """Restore every forward this package replaced."""
    for module in model.modules():
        unpatch_module(module)
        for attr in ("_nf4_eager_attention", "_nf4_attention_extras", "_nf4_fused_lora", "_nf4_lora_recompute"):
            if hasattr(module, attr):
                delattr(module, attr)


def attention_extras_none(module: nn.Module) -> dict:
    return {}


def sliding_window_of_config(module: nn.Module) -> dict:
    return {"sliding_window": getattr(module.config, "sliding_window", None)}


def sliding_window_of_module(module: nn.Module) -> dict:
    return {"sliding_window": module.sliding_window}


def activation(config, *names: str) -> Optional[str]:
    """The config's activation name under the first of ``names`` it has."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None
