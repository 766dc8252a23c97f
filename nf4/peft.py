"""peft interoperability: LoRA adapters from ``peft`` on nf4's 4-bit layers.

    from peft import LoraConfig, PeftModel, get_peft_model
    import nf4

    model = nf4.from_pretrained("meta-llama/Llama-3.1-8B")        # no built-in adapters
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ...                                          # train; model.save_pretrained(path) as usual
    model = PeftModel.from_pretrained(nf4.from_pretrained("meta-llama/Llama-3.1-8B"), path)

peft is an optional dependency (not installed with nf4; tested with peft 0.21). Two ways in:

- ``enable()`` (done for you by ``nf4.from_pretrained`` and ``quantize_model``, at once if peft is
  imported, else by ``import peft``: nf4.loading.peft_dispatch; and by ``nf4.hf``'s quantizer and
  ``nf4.hf.install()``): peft's LoRA dispatch (``LoraModel._create_new_module``) first asks whether
  the target is a ``QuantLinear4bit`` and wraps it in ``LoraQuantLinear4bit``; every other layer
  goes to peft's own dispatch unchanged. Then ``get_peft_model``, ``PeftModel.from_pretrained``
  and ``merge_and_unload`` need nothing else. ``disable()`` restores peft's function.
- ``register(config)``: attaches ``{QuantLinear4bit: LoraQuantLinear4bit}`` to one config through
  ``LoraConfig._register_custom_module``, peft's (experimental) per-config hook.

Merging (``merge``, ``merge_and_unload``) dequantizes, adds ``scaling * B A`` and quantizes again:
the merged weight carries a new 4-bit rounding error. It says so with a ``UserWarning`` each time.

Note: the fused path under peft.
    With one active vanilla adapter (no DoRA/aLoRA, no ``lora_bias``), the forward pass calls the
    same autograd function as nf4's built-in adapter (``nf4.autograd.quant_lora_linear``) with
    peft's ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r], so peft costs nothing over
    ``QuantLinear4bit(lora_rank=r)``: no output ``clone()``, no separate ``result + delta`` pass.
    As there, the adapter runs in the compute dtype (bf16 by default, the autocast dtype under
    autocast) while its parameters stay in their own dtype (float32, peft's default). Several
    active adapters, mixed-adapter batches (``adapter_names=``) and ``lora_bias`` take peft's
    textbook path (base output plus each delta, the delta computed in the adapter's dtype).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from nf4.autograd import dropout_mask, quant_lora_linear, resolve_dtypes
from nf4.nn import QuantLinear4bit

try:
    from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError:  # optional dependency: every entry point below raises a clear error instead
    LoraConfig = LoraLayer = LoraModel = BaseTunerLayer = check_adapters_to_merge = None

__all__ = ["enable", "disable", "enabled", "register", "LoraQuantLinear4bit"]

_MISSING = "nf4.peft needs peft (pip install peft); nf4's built-in adapters (lora_rank=...) do not"


def _require_peft() -> None:
    if LoraLayer is None:
        raise ImportError(_MISSING)


def register(config):
    """Make ``config`` (a peft ``LoraConfig``) wrap ``QuantLinear4bit`` layers; returns it."""
    _require_peft()
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear4bit: LoraQuantLinear4bit})
    return config


# peft's dispatch before enable() replaced it (None while not enabled).
_peft_create_new_module = None


def _create_new_module(lora_config, adapter_name, target, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantLinear4bit):
        return LoraQuantLinear4bit(target, adapter_name, config=lora_config, **kwargs)
    return _peft_create_new_module(lora_config, adapter_name, target, **kwargs)


def enable() -> None:
    """Make peft wrap every ``QuantLinear4bit`` in ``LoraQuantLinear4bit``, whatever the config
    (idempotent; see the module docstring). Raises ImportError without peft."""
    global _peft_create_new_module
    _require_peft()
    if _peft_create_new_module is None:
        _peft_create_new_module = LoraModel._create_new_module
        LoraModel._create_new_module = staticmethod(_create_new_module)


def disable() -> None:
    """Undo ``enable()``: peft's own ``LoraModel._create_new_module`` again."""
    global _peft_create_new_module
    if _peft_create_new_module is not None:
        LoraModel._create_new_module = staticmethod(_peft_create_new_module)
        _peft_create_new_module = None


def enabled() -> bool:
    return _peft_create_new_module is not None


def enable_if_available() -> bool:
    """``enable()`` when peft is installed (called wherever nf4 makes 4-bit models); whether it is."""
    if LoraModel is None:
        return False
    enable()
    return True


_Base = (nn.Module, LoraLayer) if LoraLayer is not None else (nn.Module,)


class LoraQuantLinear4bit(*_Base):
    """peft's LoRA layer around a frozen ``QuantLinear4bit`` (``base_layer``); adapters in
    ``lora_A[name]`` (nn.Linear in -> r) and ``lora_B[name]`` (r -> out), peft's layout and
    state_dict keys. See Note: the fused path under peft."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        _require_peft()
        base = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        if not isinstance(base, QuantLinear4bit):
            raise TypeError(f"LoraQuantLinear4bit wraps a QuantLinear4bit, got {type(base).__name__}")
        if base.lora_rank:
            raise ValueError(f"this QuantLinear4bit already has a built-in adapter (lora_rank="
                             f"{base.lora_rank}); load the model with lora_rank=0 to use peft's")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module):
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        return base.in_features, base.out_features

    def resolve_lora_variant(self, *, config=None, **kwargs):
        for field in ("use_dora", "alora_invocation_tokens", "arrow_config", "velora_config"):
            if getattr(config, field, None):
                raise ValueError(f"{type(self).__name__} supports plain LoRA only; LoraConfig.{field} "
                                 f"is set ({getattr(config, field)!r})")
        return None

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B A`` as float32 [out, in]."""
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def _requantize(self, delta: torch.Tensor) -> None:
        base = self.get_base_layer()
        w = base.dequantize()
        base.quantize_weight_((w.float() + delta).to(w.dtype))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the 4-bit weight: dequantize, add ``scaling * B A``, requantize
        (lossy: the sum is rounded to 4 bits again, as peft's bitsandbytes layer does)."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            warnings.warn("merging a LoRA adapter into a 4-bit weight requantizes it (rounding error)")
            delta = self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"adapter {name!r} has non-finite weights; not merged")
            self._requantize(delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self._requantize(-self.get_delta_weight(name))

    # ------------------------------------------------------------------ compute
    def _fused_adapter(self) -> Optional[str]:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in self.lora_variant or self.lora_bias.get(name, False):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return base(x)
        name = self._fused_adapter()
        if name is not None and base.quantized and isinstance(x, torch.Tensor) \
                and x.dim() > 0 and x.shape[-1] == base.in_features:
            return self._fused_forward(x, base, name)
        result = base(x)
        for active in self.active_adapters:
            if active not in self.lora_A:
                continue
            A, B = self.lora_A[active], self.lora_B[active]
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(A.weight.dtype)
            delta = B(A(self.lora_dropout[active](xa))) * self.scaling[active]
            result = result + delta.to(result.dtype)
        return result

    def _fused_forward(self, x: torch.Tensor, base: QuantLinear4bit, name: str) -> torch.Tensor:
        compute_dtype, out_dtype = resolve_dtypes(x, base.compute_dtype)  # QuantLinear4bit's rules
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        mask = dropout_mask(x, p) if p > 0 else None
        return quant_lora_linear(x, base.weight, base.weight.quant_state, base.bias,
                                 self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                 mask, p, compute_dtype, out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
