"""Gradient checkpointing per decoder layer that can keep each layer's saved input in pinned CPU
memory instead of on the GPU.

A checkpointed layer keeps only its input hidden states ([batch, seq, hidden]: 16 MB a layer at
2048 tokens x 4096 in bf16, 0.5 GB for 32 layers) and recomputes the rest in backward. With
``offload=True`` that input is copied to pinned host memory on a side CUDA stream as soon as the
layer's forward is issued (the copy overlaps the next layers' compute), and copied back on the
same stream while the layer after it runs its backward (``_Offload``).

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


class _Offload:
    """The offloaded inputs of one model's layers: one side stream for the copies both ways, and
    the saved inputs of the current forward in layer order, so that a layer's backward can start
    bringing back the input of the layer before it (the next to run backward) while its own
    recomputation runs. Without that prefetch each layer's backward began with a 16 MB copy on
    the compute stream (0.5 GB a step at 2048 tokens x 4096 x 32 layers); and the compute stream
    waits for a copy's event instead of the host synchronizing on it, so the host keeps queueing
    work ahead of the GPU."""

    def __init__(self) -> None:
        self.stream: Optional[torch.cuda.Stream] = None
        self.saved: list = []  # the current forward's contexts, by layer index

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def start(self, index: int, ctx) -> None:
        if index == 0:  # a new forward: forget the last one's (a graph dropped without backward)
            self.saved = []
        ctx.position = len(self.saved)
        self.saved.append(ctx)

    def bring_back(self, ctx) -> None:
        """Issue ``ctx``'s copy to the GPU on the side stream (once): ``ctx.back`` = (tensor, event)."""
        if ctx.back is not None or ctx.saved is None:
            return
        stream = self.stream
        hidden = torch.empty(ctx.saved.shape, dtype=ctx.saved.dtype, device=ctx.device)  # compute stream's
        with torch.cuda.stream(stream):  # after the copy out (same stream)
            hidden.copy_(ctx.saved, non_blocking=True)
        hidden.record_stream(stream)
        ctx.back = (hidden, stream.record_event())

    def restore(self, ctx) -> torch.Tensor:
        """``ctx``'s input on the GPU, ordered before the compute stream's next work; and the
        previous layer's copy started."""
        self.bring_back(ctx)
        position = ctx.position
        if 0 < position <= len(self.saved) and self.saved[position - 1] is not None:
            self.bring_back(self.saved[position - 1])
        if position < len(self.saved) and self.saved[position] is ctx:
            self.saved[position] = None
        hidden, ready = ctx.back
        torch.cuda.current_stream(ctx.device).wait_event(ready)
        return hidden


class _CheckpointedLayer(torch.autograd.Function):
    """forward: run the layer without a graph, keep (maybe offload) its input. backward: bring the
    input back, rerun the layer with a graph and backpropagate through it; parameter gradients
    accumulate into ``.grad`` directly. ``anchor`` (a 0-dim tensor that requires grad) makes
    autograd call backward even when the hidden states do not require grad (frozen embeddings)."""

    @staticmethod
    def forward(ctx, run, offload: Optional[_Offload], index: int, anchor, hidden):
        ctx.run = run
        ctx.device = hidden.device
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        ctx.input_requires_grad = hidden.requires_grad
        ctx.offload, ctx.back = offload, None
        if offload is not None:
            stream = offload.side_stream(hidden.device)
            saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                saved.copy_(hidden, non_blocking=True)
            hidden.record_stream(stream)  # not reused before the copy has read it
            offload.start(index, ctx)
        else:
            saved = hidden
        ctx.saved = saved
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.saved if ctx.offload is None else ctx.offload.restore(ctx)
        hidden = hidden.detach().requires_grad_(ctx.input_requires_grad)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        ctx.saved = ctx.run = ctx.back = ctx.offload = None
        return None, None, None, None, hidden.grad if ctx.input_requires_grad else None


def _layer_forward(self, hidden_states, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()):
        return self._nf4_unchecked_forward(hidden_states, *args, **kwargs)

    def run(h):
        return self._nf4_unchecked_forward(h, *args, **kwargs)

    offload = self._nf4_offload if hidden_states.is_cuda else None
    anchor = self._nf4_anchor
    if anchor.device != hidden_states.device:
        anchor = self._nf4_anchor = torch.zeros((), device=hidden_states.device, requires_grad=True)
    return _CheckpointedLayer.apply(run, offload, self._nf4_index, anchor, hidden_states)


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
    shared = _Offload() if offload else None
    for index, layer in enumerate(layers):
        if not hasattr(layer, "_nf4_unchecked_forward"):
            layer._nf4_unchecked_forward = layer.forward
            layer.forward = types.MethodType(_layer_forward, layer)
        layer._nf4_offload = shared
        layer._nf4_index = index
        layer._nf4_anchor = torch.zeros((), requires_grad=True)
    return len(layers)


def disable(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        if hasattr(layer, "_nf4_unchecked_forward"):
            layer.forward = layer._nf4_unchecked_forward
            for attr in ("_nf4_unchecked_forward", "_nf4_offload", "_nf4_index", "_nf4_anchor"):
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
