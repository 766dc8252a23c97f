"""Write a quantized model as a bitsandbytes 4-bit checkpoint folder.

The folder is what ``transformers`` + ``bitsandbytes`` write for a 4-bit model (and what they
load): ``config.json`` with a ``quantization_config`` carrying bnb's keys, and safetensors whose
quantized weights are stored as packed bytes plus ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*`` and ``weight.quant_state.bitsandbytes__<type>``. Large models are sharded
with a ``model.safetensors.index.json``. Everything is written into a temporary sibling folder
that is renamed into place at the end, so an interrupted save never leaves a half folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from nf4 import functional
from nf4.loading.adapter import adapter_layers, save_adapter
from nf4.loading.checkpoint import PICKLE_SUFFIXES, SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME
from nf4.loading.model import _shared_parameters
from nf4.loading.resolve import AUX_FILES
from nf4.nn import QuantLinear4bit
from nf4.quant_state import dtype_name

log = logging.getLogger(__name__)

# transformers' default shard size: 5 GB keeps each file below common upload/FS limits.
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                            skip_modules: list[str]) -> dict:
    """``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` as transformers writes it."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _quant_settings(model: nn.Module) -> tuple[str, bool, torch.dtype, list[str]]:
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear4bit)}
    if not quantized:
        raise ValueError("the model has no QuantLinear4bit layers; quantize it first "
                         "(nf4.quantize_model or nf4.from_pretrained)")
    formats = {(m.weight.quant_type, bool(m.weight.compress_statistics)) for m in quantized.values()}
    if len(formats) > 1:
        raise ValueError(f"a bitsandbytes config holds one quant type and one double-quant setting; "
                         f"this model mixes {sorted(formats)}")
    unquantized = [m for m in quantized.values() if not m.quantized]
    if unquantized:
        raise ValueError(f"{len(unquantized)} QuantLinear4bit layer(s) are not quantized yet (move the "
                         f"model to a device first)")
    quant_type, double = formats.pop()
    compute = next(iter(quantized.values())).compute_dtype or torch.bfloat16
    kept = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    return quant_type, double, compute, kept


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # LoRA adapters are no part of a bitsandbytes checkpoint: save_pretrained writes them beside
    # it in peft's format (nf4.loading.adapter).
    lora = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, QuantLinear4bit) and m.lora_rank
            for p in ("lora_A", "lora_B")}
    # Tied parameters (an lm_head sharing the embedding) are saved once, under their first name,
    # as transformers does; quantization states may share tables (quant_map) and are all kept.
    tied = {n for names in _shared_parameters(model).values() for n in names[1:]}
    # The config says bnb_4bit_quant_storage "uint8": bytes viewed as another dtype (FSDP) are
    # written as the uint8 [n, 1] tensor they are.
    packed = {f"{n}.weight" for n, m in model.named_modules()
              if isinstance(m, QuantLinear4bit) and m.weight.bnb_quantized}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in lora or name in tied:
            continue
        tensors[name] = functional._as_uint8(t).view(-1, 1) if name in packed else t
    return tensors


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir():
        contents = [p for p in out.iterdir()]
        looks_like_model = (out / "config.json").is_file() and all(
            p.suffix in (".json", ".safetensors", ".txt", ".model", ".jinja", ".md") for p in contents)
        if contents and not looks_like_model:
            raise FileExistsError(f"{out} exists and holds files other than a model's; refusing to "
                                  f"replace it (pick another output folder)")


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, *,
                    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
                    source_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write ``model`` (with QuantLinear4bit layers) to ``out_dir`` as a bnb 4-bit checkpoint.

    ``source_dir`` (default: the folder ``from_pretrained`` read) supplies tokenizer and
    generation files to copy alongside. An existing ``out_dir`` is replaced only if it looks
    like a model folder. Built-in LoRA adapters (bnb checkpoints have no place for them) are
    written beside the weights in peft's format (``adapter_model.safetensors`` +
    ``adapter_config.json``): ``PeftModel.from_pretrained(nf4.from_pretrained(out_dir), out_dir)``
    reloads both. Returns the folder.
    """
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    out = Path(out_dir).expanduser().absolute()
    _check_destination(out)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("save_pretrained needs a transformers model (with .config)")
    quant_type, double, compute, kept = _quant_settings(model)
    tensors = _tensors(model)
    shards = _shards(tensors, max_shard_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        names = ([SAFE_WEIGHTS_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for file_name, keys in zip(names, shards):
            # One shard at a time in host memory (packed weights are ~0.56 bytes per parameter);
            # copies, because quantization states share their tables and safetensors refuses aliases.
            save_file({k: tensors[k].detach().to("cpu", copy=True).contiguous() for k in keys}, str(tmp / file_name),
                      metadata={"format": "pt"})
            weight_map.update({k: file_name for k in keys})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / SAFE_INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
        config_dict = config.to_dict()
        config_dict["quantization_config"] = bnb_quantization_config(quant_type, double, compute, kept)
        config_dict["torch_dtype" if "torch_dtype" in config_dict else "dtype"] = dtype_name(compute)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        source = source_dir if source_dir is not None else getattr(model, "nf4_source_dir", None)
        if source is not None:
            for name in AUX_FILES:
                src = Path(source) / name
                if src.is_file() and src.suffix not in PICKLE_SUFFIXES:
                    shutil.copyfile(src, tmp / name)
        if adapter_layers(model):
            save_adapter(model, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a saved model is an ordinary folder
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d tensors in %d file(s) to %s", len(tensors), len(shards), out)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing one is renamed away first, then removed.
    If a step fails, the existing folder is back at ``out`` when this raises (the caller removes
    ``tmp``): the destination is never left missing with the old model in a hidden folder."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / out.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(tmp, out)
    except BaseException:
        # Put the old folder back. Should that fail too, it is left in ``old`` (never deleted):
        # the error then names where it is.
        try:
            os.replace(old / out.name, out)
        except OSError as e:
            raise OSError(f"saving to {out} failed and the previous folder could not be put back; "
                          f"it is at {old / out.name}") from e
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
