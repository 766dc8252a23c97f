"""nf4's built-in LoRA adapters (``QuantLinear4bit(lora_rank=r)``) in peft's format.

    nf4.save_adapter(model, "adapter")      # adapter_model.safetensors + adapter_config.json
    model = PeftModel.from_pretrained(nf4.from_pretrained(base), "adapter")   # peft reloads it

Keys are peft's (``base_model.model.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r])
and the config is a LoRA ``adapter_config.json``, so peft loads the folder onto a base model
loaded without adapters (``lora_rank=0``), by nf4 or by transformers with ``nf4.hf``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nf4.nn import QuantLinear4bit

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# peft's prefix for a LoRA model's keys (``PeftModel`` -> ``LoraModel`` -> the wrapped model).
PEFT_PREFIX = "base_model.model."
# Importing torch.distributed.tensor (for DTensor) costs 0.63-0.77 s (sympy, the sharding
# rules), which `import nf4` would pay for every user. A DTensor exists only once that module is
# imported (by FSDP, nf4.distributed or the user), so it is looked up there when needed.
_DTENSOR_MODULE = "torch.distributed.tensor"


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole of a sharded DTensor (a collective)."""
    dtensor = sys.modules.get(_DTENSOR_MODULE)
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def adapter_layers(model: nn.Module) -> dict[str, QuantLinear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear4bit) and m.lora_rank}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of every ``QuantLinear4bit`` as complete CPU tensors, under peft's keys.
    Collective for a sharded model (each adapter is all-gathered); every rank gets the dict."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for part in ("lora_A", "lora_B"):
            t = _full_tensor(layer._parameters[part])
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = t.detach().to("cpu", copy=True).contiguous()
    if not tensors:
        raise ValueError("the model has no LoRA adapters (QuantLinear4bit layers with lora_rank > 0)")
    return tensors


def adapter_config(model: nn.Module) -> dict:
    """peft's ``adapter_config.json`` for the model's built-in adapters (one rank and alpha)."""
    layers = adapter_layers(model)
    settings = {(m.lora_rank, m.lora_alpha, m.lora_dropout) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"an adapter config holds one (rank, alpha, dropout); the model has {sorted(settings)}")
    rank, alpha, dropout = settings.pop()
    config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "bias": "none",
        "target_modules": sorted({n.rpartition(".")[2] for n in layers}),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def write_adapter(tensors: dict[str, torch.Tensor], config: dict, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the model's built-in LoRA adapters as peft does; returns the folder. (For a model
    sharded with FSDP, ``nf4.distributed.save_adapter``.)"""
    return write_adapter(lora_state_dict(model), adapter_config(model), out_dir)
