"""QLoRA under PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): shard, train, save.

    dist.init_process_group("nccl")                      # torchrun --nproc-per-node N
    model = nf4.from_pretrained(path, device=f"cuda:{rank}", lora_rank=16)
    nf4.distributed.shard_model(model)                   # fully_shard per decoder layer + root
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ... train as on one GPU ...
    nf4.distributed.save_pretrained(model, "out")       # every rank calls; rank 0 writes
    nf4.distributed.save_adapter(model, "adapter")      # the same, for the LoRA weights

``save_pretrained``/``save_adapter``/``lora_state_dict`` also take an unsharded model, so a
single-GPU run and an N-GPU run write their files through the same code.

Note: sharding the packed weight.
    FSDP2 shards every parameter of a group on dim 0 and all-gathers the group before its
    forward; the 4-bit weight ``[ceil(out*in/2), 1]`` is a parameter like any other, so FSDP
    shards the packed bytes as they are: each rank holds 1/N of them, and the layer sees the
    complete bytes when it runs. Three ways were weighed:
    - Replicating the 4-bit weights (``ignored_params``) and sharding only the adapters is
      simplest, but it is DDP for the adapters: the 4-bit weights, the bulk of the memory
      (3.6 GB of 5.7 GB for Llama-3-8B, 35 of 39 GB for 70B), stay whole on every GPU, which is
      the very thing FSDP + QLoRA is for (a 70B model on GPUs that cannot hold 35 GB each).
    - bitsandbytes' ``quant_storage=torch.bfloat16`` view exists for FSDP1, whose flat
      parameters need one dtype per group. FSDP2 shards per parameter and all-gathers mixed
      dtypes through a uint8 buffer, so the view buys nothing; worse, FSDP2 casts floating
      parameters under ``MixedPrecisionPolicy(param_dtype=...)`` (a bf16 view of packed bytes
      cast to fp32 would be garbage) while it never casts integer ones. So uint8 storage is
      the safe default; a bf16 view still works and ``shard_model`` refuses a policy that
      would cast it. One exception: FSDP2 in torch 2.11 (and, by the same code, earlier)
      wraps every shard as ``nn.Parameter(shard)`` before restoring ``requires_grad``, which
      raises for integer dtypes ("only Tensors of floating point dtype can require
      gradients"); later versions pass ``requires_grad`` through. ``shard_model`` finds out
      which by sharding a one-parameter probe module, and on the older ones views the packed
      bytes as bfloat16 first (``quant_storage=torch.bfloat16``, bitsandbytes' choice for
      FSDP). Checkpoints are written as uint8 either way.
    - A tensor subclass with ``fsdp_pre_all_gather``/``fsdp_post_all_gather`` could shard the
      quant state too and gather it in the same collective, but the sharded tensor must then
      implement every op FSDP applies while sharding (chunk, pad, view, copy_): a large second
      weight type, for the replicated state's cost below.
    The quant state (absmax codes, 1 byte per 64 weights; nested absmax and offset, 4 bytes
    per 16384) is not a parameter, so it stays whole on every rank, on the weight's device:
    1/32 of the packed bytes, i.e. 6% of a rank's 4-bit bytes on 2 GPUs, 20% on 8.

Note: the weight's attributes.
    FSDP2 replaces each managed parameter with a new ``nn.Parameter``: a sharded ``DTensor``
    between steps, a plain unsharded tensor inside the group's forward/backward. Neither is a
    ``Params4bit``, so neither carries ``.quant_state``, ``.quant_type`` and the rest, which
    ``QuantLinear4bit`` reads from its weight. ``shard_model`` copies those attributes onto the
    sharded parameter once and onto the unsharded one from a forward pre-hook on each
    ``QuantLinear4bit`` (FSDP2 creates that parameter once, at the first all-gather, and reuses
    it, so the hook finds it tagged on every later call; one dict lookup per forward).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from nf4 import functional
from nf4.loading import save_pretrained as _save_pretrained_local
from nf4.loading.adapter import adapter_config, lora_state_dict, write_adapter
from nf4.nn import Params4bit, QuantLinear4bit

__all__ = ["shard_model", "save_pretrained", "save_adapter", "lora_state_dict", "full_parameters"]

# (major, minor) of this torch: 2.11's FSDP2 on the CPU fails on uneven shards (shard_model).
_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])
log = logging.getLogger(__name__)



def _quant_layers(model: nn.Module) -> dict[str, QuantLinear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear4bit)}


def _weight_attributes(layer: QuantLinear4bit) -> dict:
    """What a ``Params4bit`` carries besides its data (quant_state, quant_type, blocksize, ...)."""
    return dict(vars(layer.weight))


def _tag_weight(layer: QuantLinear4bit, attributes: dict) -> None:
    # See Note: the weight's attributes.
    weight = layer._parameters["weight"]
    if "quant_state" not in vars(weight):
        vars(weight).update(attributes)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (no module class "
                         f"listed in model._no_split_modules={sorted(names)}); pass layers=[...]")
    return layers


def _check_layer(name: str, layer: QuantLinear4bit, device: torch.device) -> None:
    if not layer.quantized:
        raise ValueError(f"{name}: the QuantLinear4bit weight is not quantized yet; move the model to "
                         f"its device (or load it with nf4.from_pretrained) before sharding")
    weight = layer.weight
    if not isinstance(weight, Params4bit):
        raise ValueError(f"{name}: weight is a {type(weight).__name__}, expected Params4bit; is the "
                         f"model sharded already?")
    if weight.device != device:
        raise ValueError(f"{name}: weight is on {weight.device}, the mesh shards onto {device}; load "
                         f"the model on each rank's own device (e.g. cuda:LOCAL_RANK) first")
    layer.quant_state.validate(functional._as_uint8(weight))


_INTEGER_PARAMETERS: dict[str, bool] = {}


def _fsdp_shards_integer_parameters(mesh: DeviceMesh, device: torch.device) -> bool:
    """Whether this torch's ``fully_shard`` accepts a frozen uint8 parameter (a probe module;
    no communication: sharding a module only splits its local tensors)."""
    if device.type not in _INTEGER_PARAMETERS:
        probe = nn.Module()
        probe.packed = nn.Parameter(torch.zeros(2 * mesh.size(), 1, dtype=torch.uint8, device=device),
                                    requires_grad=False)
        try:
            fully_shard(probe, mesh=mesh)
            _INTEGER_PARAMETERS[device.type] = True
        except RuntimeError as e:
            if "floating point" not in str(e):
                raise
            _INTEGER_PARAMETERS[device.type] = False
            log.info("this torch's FSDP2 cannot shard uint8 parameters (%s); packed weights are "
                     "viewed as bfloat16 for sharding", e)
    return _INTEGER_PARAMETERS[device.type]


def _store_as(layer: QuantLinear4bit, dtype: torch.dtype) -> None:
    """View a layer's packed bytes as ``dtype`` (same memory; ``quant_storage`` follows)."""
    weight = layer.weight
    if weight.dtype == dtype:
        return
    raw = functional._as_uint8(weight.data)
    if raw.numel() % dtype.itemsize:
        raise ValueError(f"torch {torch.__version__}'s FSDP2 cannot shard uint8 parameters, and a weight "
                         f"of {raw.numel()} packed bytes (shape {tuple(weight.quant_state.shape)}) cannot "
                         f"be viewed as {dtype}; use a newer torch (2.13 shards uint8) or an even "
                         f"out_features * in_features")
    data = functional._view_storage(raw, dtype)
    layer.weight = Params4bit(data, weight.requires_grad, weight.quant_state, weight.blocksize,
                              weight.compress_statistics, weight.quant_type, dtype, weight.module,
                              weight.bnb_quantized)


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def shard_model(model: nn.Module, mesh: Optional[DeviceMesh] = None, *,
                layers: Optional[Iterable[nn.Module]] = None, **fully_shard_kwargs) -> nn.Module:
    """Apply ``fully_shard`` to each decoder layer, then to ``model``; returns ``model``.

    ``model`` holds ``QuantLinear4bit`` layers, already quantized on this rank's device (every
    rank loads the same model, e.g. ``nf4.from_pretrained(..., device=f"cuda:{local_rank}")``).
    The packed 4-bit weights, LoRA adapters and float parameters are sharded over ``mesh``
    (default: a 1-D mesh of all ranks on the weights' device type); quant states stay whole on
    every rank. See Note: sharding the packed weight. Until this call each rank holds the whole
    4-bit model (5.7 GB for Llama-3-8B): sharding saves memory from then on, not while loading.

    ``layers``: the modules that each become one FSDP group (one all-gather each); default: every
    module whose class is in ``model._no_split_modules`` (transformers' decoder layers).
    ``fully_shard_kwargs`` go to ``fully_shard`` (``reshard_after_forward``, ``mp_policy``, ...).
    ``MixedPrecisionPolicy.param_dtype`` would cast floating parameters, so it is refused when a
    packed weight is stored in a floating dtype (``quant_storage=torch.bfloat16``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is sharded already (fully_shard was applied)")
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialized (torchrun and "
                           "dist.init_process_group)")
    quant = _quant_layers(model)
    if not quant:
        raise ValueError("the model has no QuantLinear4bit layers (nf4.from_pretrained or "
                         "nf4.quantize_model first)")
    if mesh is None:
        device_type = next(iter(quant.values())).weight.device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh, got {type(mesh).__name__}")
    device = _mesh_device(mesh)
    for name, layer in quant.items():
        _check_layer(name, layer, device)
    integer = _fsdp_shards_integer_parameters(mesh, device)
    if device.type == "cpu" and _TORCH_VERSION < (2, 12):
        # Measured on torch 2.11 (gloo, 2 ranks): a packed weight whose rows do not split evenly
        # over the ranks reads freed memory once gathered (a segfault in the first dequantize).
        uneven = {}
        for name, layer in quant.items():
            w = layer.weight
            itemsize = w.element_size() if integer or w.dtype.is_floating_point else 2  # viewed as bf16
            if (w.numel() * w.element_size() // itemsize) % mesh.size():
                uneven[name] = w.numel() * w.element_size() // itemsize
        if uneven:
            name, rows = next(iter(uneven.items()))
            raise ValueError(f"torch {torch.__version__}'s FSDP2 on the CPU cannot shard a packed weight "
                             f"whose rows do not split evenly over {mesh.size()} ranks ({len(uneven)} layers, "
                             f"e.g. {name}: {rows} rows); use torch >= 2.12, or CUDA")
    if not integer:
        # See Note: sharding the packed weight (torch 2.11's FSDP2 and integer parameters).
        for layer in quant.values():
            _store_as(layer, torch.bfloat16)
    policy = fully_shard_kwargs.get("mp_policy")
    if isinstance(policy, MixedPrecisionPolicy) and policy.param_dtype is not None:
        floating = sorted({layer.weight.dtype for layer in quant.values() if layer.weight.dtype.is_floating_point
                           and layer.weight.dtype != policy.param_dtype}, key=str)
        if floating:
            raise ValueError(f"mp_policy.param_dtype={policy.param_dtype} would cast packed 4-bit "
                             f"weights stored as {floating}; quantize with quant_storage=torch.uint8 "
                             f"(the default) or use param_dtype=None")
    trainable = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable.setdefault(p.dtype, name)
    if len(trainable) > 1:
        # FSDP2 reduce-scatters a group's gradients in one dtype and asserts it at the first step.
        raise ValueError(f"trainable parameters have several dtypes ({', '.join(f'{n}: {d}' for d, n in trainable.items())}); "
                         f"FSDP needs one: freeze the base model (model.requires_grad_(False), then the "
                         f"adapters' requires_grad_(True)) or cast")
    groups = list(layers) if layers is not None else _decoder_layers(model)
    attributes = {layer: _weight_attributes(layer) for layer in quant.values()}
    for group in groups:
        fully_shard(group, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    for layer, attrs in attributes.items():
        _tag_weight(layer, attrs)
        layer.register_forward_pre_hook(lambda module, args, attrs=attrs: _tag_weight(module, attrs))
    log.info("sharded %d QuantLinear4bit layers in %d groups over %d ranks (%s)", len(quant),
             len(groups) + 1, mesh.size(), mesh.device_type)
    return model


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every module of ``model`` holds its complete parameters (on every rank).

    Collective: every rank must enter. Sharded parameters are all-gathered one at a time
    (``DTensor.full_tensor``) and put in place of the shards; quantized weights keep their
    ``Params4bit`` attributes, tied parameters stay tied. The shards are put back on exit. The
    complete parameters take what the unsharded model takes on one device (5.7 GB for an 8B
    model in 4 bits). An unsharded model passes through unchanged. Do not train inside.
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.reshard()  # the modules must hold their shards, not parameters mid-step
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    full: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if not isinstance(param, DTensor):
                    continue
                if id(param) not in full:
                    new = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                    vars(new).update({k: v for k, v in vars(param).items() if not k.startswith("_")})
                    full[id(param)] = new
                saved.append((module, name, param))
                module._parameters[name] = full[id(param)]
        yield model
    finally:
        for module, name, param in reversed(saved):
            module._parameters[name] = param


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, **kwargs) -> Optional[Path]:
    """``nf4.save_pretrained`` for a sharded (or unsharded) model: the same bitsandbytes folder
    a single GPU writes. Collective; rank 0 writes and returns the folder, other ranks None."""
    with full_parameters(model):
        out = _save_pretrained_local(model, out_dir, **kwargs) if _is_rank0() else None
    if dist.is_initialized():
        dist.barrier()
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Optional[Path]:
    """Write the LoRA adapters as peft does (``adapter_model.safetensors`` +
    ``adapter_config.json``). Collective; rank 0 writes and returns the folder."""
    tensors = lora_state_dict(model)
    out = write_adapter(tensors, adapter_config(model), out_dir) if _is_rank0() else None
    if dist.is_initialized():
        dist.barrier()
    return out
