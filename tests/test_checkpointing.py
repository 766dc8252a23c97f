"""nf4.models.checkpointing: per-layer recomputation (and CPU offload on CUDA) gives the same
loss and gradients as the model without checkpointing."""
import copy
import gc
import weakref

import pytest
import torch

from nf4 import models
from nf4.models import checkpointing
from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers")
from tests.test_models import batch, tiny_model  # noqa: E402


def loss_and_grads(model, ids, labels):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("offload", [False, pytest.param(True, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("frozen_embeddings, patched", [(False, False), (True, False), (True, True)])
def test_same_gradients_as_without_checkpointing(offload, frozen_embeddings, patched):
    ref = tiny_model("llama")
    ref.train()
    if frozen_embeddings:  # QLoRA: the first layer's input does not require grad
        ref.model.embed_tokens.weight.requires_grad_(False)
    if patched:  # the kernels are deterministic: recomputing them gives the same bits
        models.patch(ref)
    ref = ref.to(DEVICE)
    model = copy.deepcopy(ref)
    assert checkpointing.enable(model, offload=offload) == ref.config.num_hidden_layers
    ids, labels = (t.to(DEVICE) for t in batch(ref.config.vocab_size))
    want_loss, want = loss_and_grads(ref, ids, labels)
    got_loss, got = loss_and_grads(model, ids, labels)
    # the same torch ops in the same order, run twice: bit for bit
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_second_backward_is_refused_clearly():
    model = tiny_model("llama")
    model.train()
    checkpointing.enable(model, offload=False)
    ids, labels = batch(model.config.vocab_size)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="checkpointed layer's backward ran twice"):
        loss.backward()


def test_disable_restores_layers_and_eval_skips_recompute():
    model = tiny_model("llama")
    checkpointing.enable(model, offload=False)
    model.eval()
    ids, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        model(input_ids=ids)  # eval/no-grad runs the layer directly
    checkpointing.disable(model)
    assert not any(hasattr(layer, "_nf4_unchecked_forward") for layer in model.model.layers)


@pytest.mark.gpu
def test_offload_keeps_layer_inputs_on_the_host():
    model = tiny_model("llama").to(DEVICE)
    model.train()
    checkpointing.enable(model, offload=True)
    ids, labels = batch(model.config.vocab_size)
    saved = []
    original = checkpointing._CheckpointedLayer.forward

    def spy(ctx, *args):
        out = original(ctx, *args)
        saved.append((ctx.saved.device.type, ctx.saved.is_pinned()))
        return out

    checkpointing._CheckpointedLayer.forward = staticmethod(spy)
    try:
        model(input_ids=ids.to(DEVICE), labels=labels.to(DEVICE)).loss.backward()
    finally:
        checkpointing._CheckpointedLayer.forward = staticmethod(original)
    assert len(saved) == model.config.num_hidden_layers
    assert saved == [("cpu", True)] * model.config.num_hidden_layers


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offloaded_embeddings_give_the_same_loss_and_gradients(device):
    ref = tiny_model("llama").to(device)
    ref.train()
    ref.model.embed_tokens.weight.requires_grad_(False)  # QLoRA: the table is frozen
    model = copy.deepcopy(ref)
    assert checkpointing.offload_embeddings(model)
    assert checkpointing.offload_embeddings(model)  # a second call changes nothing
    table = model.model.embed_tokens.weight
    assert table.device.type == "cpu" and (device == "cpu" or table.is_pinned())
    ids, labels = (t.to(device) for t in batch(ref.config.vocab_size))
    want_loss, want = loss_and_grads(ref, ids, labels)
    got_loss, got = loss_and_grads(model, ids, labels)
    assert torch.equal(got_loss, want_loss)  # the same rows: the same bits downstream
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    checkpointing.restore_embeddings(model)
    assert model.model.embed_tokens.weight.device == ref.model.embed_tokens.weight.device
    assert "forward" not in vars(model.model.embed_tokens)


def test_trainable_or_tied_embeddings_stay():
    model = tiny_model("llama")
    assert not checkpointing.offload_embeddings(model)  # trains: its gradient is computed here
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.model.embed_tokens.weight.requires_grad_(False)
    assert not checkpointing.offload_embeddings(tied)  # lm_head would move with it
    assert "forward" not in vars(tied.model.embed_tokens)


def test_a_graph_dropped_without_backward_frees_the_saved_inputs():
    # A forward whose loss is never backpropagated (an evaluation in train mode, an exception
    # before backward): the layer inputs checkpointing kept belong to that graph and go with it,
    # not only at the next forward (a model-wide list of the last forward's contexts would hold
    # every non-offloaded layer's [batch, seq, hidden] input and its call's arguments until then).
    model = tiny_model("llama", layers=3)
    model.train()
    checkpointing.enable(model, offload=False)
    inputs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    ids, labels = batch(model.config.vocab_size)
    loss = model(input_ids=ids, labels=labels).loss
    assert len(inputs) == 3 and all(ref() is not None for ref in inputs)
    del loss
    gc.collect()
    assert [ref() is None for ref in inputs] == [True] * 3
