"""Gradient checkpointing per decoder layer that can keep each layer's saved input in pinned CPU
memory instead of on the GPU.

A checkpointed layer keeps only its input hidden states ([batch, seq, hidden]: 16 MB a layer at
2048 tokens x 4096 in bf16, 0.5 GB for 32 layers) and recomputes the rest in backward. With
``offload=True`` that input is copied to pinned host memory on a side CUDA stream as soon as the
layer's forward is issued (the copy overlaps the next layers' compute), and copied back at the
start of the layer's backward.

    nf4.models.checkpointing.enable(model, offload=True)    # instead of gradient_checkpointing_enable
    nf4.models.checkpointing.disable(model)

The layer's other arguments (mask, position embeddings) are kept by reference, as transformers'
checkpointing keeps them.

A frozen input embedding table can live in pinned host memory too (``offload_embeddings``): the
lookup gathers the batch's rows on the CPU and only those travel to the GPU (16 MB at 2048 tokens
x 4096 in bf16, ~1 ms of copy), instead of the whole table staying resident (1.05 GB for
Llama-3's 128,256 x 4096: a sixth of a QLoRA 8B model's GPU memory). Dropout inside a layer is not replayed with the same random state:
use it with dropout 0 (the default of every supported family and of QLoRA recipes' base model).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _CheckpointedLayer(torch.autograd.Function):
    """forward: run the layer without a graph, keep (maybe offload) its input. backward: bring the
    input back, rerun the layer with a graph and backpropagate through it; parameter gradients
    accumulate into ``.grad`` directly. ``anchor`` (a 0-dim tensor that requires grad) makes
    autograd call backward even when the hidden states do not require grad (frozen embeddings)."""

    @staticmethod
    def forward(ctx, run, offload_stream: Optional[torch.cuda.Stream], anchor, hidden):
        ctx.run = run
        ctx.device = hidden.device
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        ctx.input_requires_grad = hidden.requires_grad
        if offload_stream is not None:
            saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            offload_stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(offload_stream):
                saved.copy_(hidden, non_blocking=True)
            hidden.record_stream(offload_stream)  # not reused before the copy has read it
            ctx.copied = offload_stream.record_event()
        else:
            saved, ctx.copied = hidden, None
        ctx.saved = saved
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad):
        if ctx.run is None:
            raise RuntimeError("a checkpointed layer's backward ran twice (retain_graph=True): nf4's checkpointing "
                               "frees the layer's saved input after the first; recompute with a new forward")
        if ctx.copied is not None:
            ctx.copied.synchronize()
            hidden = ctx.saved.to(ctx.device, non_blocking=True)
        else:
            hidden = ctx.saved
        hidden = hidden.detach().requires_grad_(ctx.input_requires_grad)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        ctx.saved = ctx.run = None
        return None, None, None, hidden.grad if ctx.input_requires_grad else None


def _layer_forward(self, hidden_states, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()):
        return self._nf4_unchecked_forward(hidden_states, *args, **kwargs)

    def run(h):
        return self._nf4_unchecked_forward(h, *args, **kwargs)

    stream = self._nf4_offload_stream if hidden_states.is_cuda else None
    if self._nf4_offload and hidden_states.is_cuda and stream is None:
        stream = self._nf4_offload_stream = torch.cuda.Stream(hidden_states.device)
    anchor = self._nf4_anchor
    if anchor.device != hidden_states.device:
        anchor = self._nf4_anchor = torch.zeros((), device=hidden_states.device, requires_grad=True)
    return _CheckpointedLayer.apply(run, stream if self._nf4_offload else None, anchor, hidden_states)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers (a ModuleList)")
    return layers


def enable(model: nn.Module, offload: bool = True) -> int:
    """Checkpoint every decoder layer of ``model`` (a ``*ForCausalLM`` or its base model), its
    input offloaded to pinned CPU memory when ``offload`` and the layer runs on CUDA. Turns
    transformers' own gradient checkpointing off (it would recompute twice) and sets
    ``config.use_cache = False``. Returns the number of layers."""
    if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5.2x
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    # A KV cache filled in forward would be filled again by the recomputation (as with
    # transformers' own checkpointing, which also turns the cache off for training).
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    layers = decoder_layers(model)
    for layer in layers:
        if not hasattr(layer, "_nf4_unchecked_forward"):
            layer._nf4_unchecked_forward = layer.forward
            layer.forward = types.MethodType(_layer_forward, layer)
        layer._nf4_offload = bool(offload)
        layer._nf4_offload_stream = None
        layer._nf4_anchor = torch.zeros((), requires_grad=True)
    return len(layers)


def disable(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        if hasattr(layer, "_nf4_unchecked_forward"):
            layer.forward = layer._nf4_unchecked_forward
            for attr in ("_nf4_unchecked_forward", "_nf4_offload", "_nf4_offload_stream", "_nf4_anchor"):
                delattr(layer, attr)


# ------------------------------------------------------------------------------- embeddings
def _host_embedding_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids.to("cpu")
    device = self._nf4_device
    if device.type == "cpu":
        return F.embedding(ids, self.weight, self.padding_idx)
    # Gathered straight into pinned memory, so the copy to the GPU is asynchronous (the caching
    # host allocator keeps the buffer until the copy has read it).
    rows = torch.empty((*ids.shape, self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=True)
    torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, self.weight.shape[1]))
    return rows.to(device, non_blocking=True)


def offload_embeddings(model: nn.Module) -> bool:
    """Keep ``model``'s input embedding table in (pinned) host memory and look tokens up there;
    the embeddings come out on the device the table was on. Only a frozen ``nn.Embedding`` not
    shared with the output layer (tied embeddings would move ``lm_head`` too), without max_norm
    (which would write to the table) qualifies; returns whether it was offloaded. Moving the model
    afterwards (``.to``/``.cuda()``) moves the table as any parameter; ``restore_embeddings`` puts it
    back on its device and restores the forward."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(emb) is not nn.Embedding or emb.weight.requires_grad or emb.max_norm is not None:
        return False
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return False
    if hasattr(emb, "_nf4_device"):
        return True
    emb._nf4_device = emb.weight.device
    if emb.weight.is_cuda:
        emb.weight.data = emb.weight.data.to("cpu").pin_memory()
    emb._nf4_embedding_forward = vars(emb).get("forward")  # an instance's own forward, if any
    emb.forward = types.MethodType(_host_embedding_forward, emb)
    return True


def restore_embeddings(model: nn.Module) -> None:
    emb = model.get_input_embeddings()
    if hasattr(emb, "_nf4_device"):
        emb.weight.data = emb.weight.data.to(emb._nf4_device)
        if emb._nf4_embedding_forward is None:
            del emb.forward  # the class's forward again
        else:
            emb.forward = emb._nf4_embedding_forward
        del emb._nf4_device, emb._nf4_embedding_forward
