"""The hot path's weight (nf4/weight.py): checked once, re-checked after every change that could
make its cached pointers or sizes wrong (See Note: validate once), and routed by one function."""
import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

import nf4
from nf4 import backends
from nf4.nn import Params4bit, QuantLinear4bit
from nf4.quant_state import QuantState
from nf4 import weight as weight_module
from nf4.weight import PackedWeight, packed_weight

from tests.conftest import DEVICE

IN, OUT = 128, 48


@pytest.fixture
def checks(monkeypatch):
    """The number of QuantState.validate calls so far (a list; its length)."""
    calls = []
    validate = QuantState.validate
    monkeypatch.setattr(QuantState, "validate", lambda self, *a: calls.append(1) or validate(self, *a))
    return calls


def _layer(rank=0, dq=True):
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=True, device=DEVICE)
    return QuantLinear4bit.from_linear(linear, lora_rank=rank, compress_statistics=dq,
                                       compute_dtype=torch.float32)


def _x(tokens=3):
    return torch.randn(tokens, IN, device=DEVICE)


def test_one_check_for_many_calls(checks):
    layer = _layer(rank=4)       # checked when made (from_linear -> load_quantized)
    assert len(checks) == 1
    x = _x()
    y = layer(x)
    first = len(checks)
    assert first == 1
    for _ in range(5):
        assert torch.equal(layer(x), y)
    packed, state = layer.weight, layer.weight.quant_state
    for _ in range(5):
        nf4.matmul_4bit(x, packed.t(), state)
        nf4.dequantize_4bit(packed, state)
    assert len(checks) == first


@pytest.mark.parametrize("field", ["absmax", "offset", "shape", "blocksize", "quant_type", "code"])
def test_assigning_a_state_field_rechecks(checks, field):
    layer = _layer()
    x = _x()
    layer(x)
    state = layer.weight.quant_state
    before = len(checks)
    setattr(state, field, getattr(state, field))
    assert state._packed_weight is None
    layer(x)
    assert len(checks) == before + 1


def test_assigning_a_nested_field_rechecks(checks):
    layer = _layer()
    x = _x()
    y = layer(x)
    state = layer.weight.quant_state
    before = len(checks)
    state.state2.absmax = state.state2.absmax.clone()
    assert torch.equal(layer(x), y)
    assert len(checks) == before + 1
    # A nested absmax too short for the codes is refused, never read past its end.
    state.state2.absmax = state.state2.absmax[:0]
    with pytest.raises(ValueError, match="nested_absmax"):
        layer(x)


def test_a_shorter_absmax_is_refused_at_the_next_call():
    layer = _layer(dq=False)
    x = _x()
    layer(x)
    state = layer.weight.quant_state
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="absmax"):
        layer(x)
    with pytest.raises(ValueError, match="absmax"):
        nf4.matmul_4bit(x, layer.weight.t(), state)


@pytest.mark.parametrize("how", ["data", "set_", "resize_"])
def test_replacing_the_packed_bytes_rechecks(checks, how):
    layer = _layer()
    x = _x()
    y = layer(x)
    weight = layer.weight
    before = len(checks)
    fresh = weight.data.clone()
    if how == "data":
        weight.data = fresh
    elif how == "set_":
        with torch.no_grad():
            weight.set_(fresh)
    else:
        with torch.no_grad():
            weight.resize_(weight.shape[0] - 1, 1)
        with pytest.raises(ValueError, match="packed weight holds"):
            layer(x)
        return
    assert torch.equal(layer(x), y)
    assert len(checks) == before + 1


def test_freed_packed_memory_is_refused():
    """FSDP frees a gathered weight by resizing its storage to 0 bytes, keeping the shape."""
    layer = _layer()
    x = _x()
    layer(x)
    layer.weight.data = layer.weight.data.clone()
    layer.weight.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="storage was freed"):
        layer(x)


def test_a_shorter_packed_view_is_refused():
    layer = _layer()
    x = _x()
    layer(x)
    layer.weight.data = layer.weight.data[:-1]
    with pytest.raises(ValueError, match="packed weight holds"):
        layer(x)


def test_moving_the_layer_rechecks(checks):
    layer = _layer(rank=2)
    x = _x()
    y = layer(x)
    before = len(checks)
    layer.to(DEVICE)           # no move: nothing to check again
    assert torch.equal(layer(x), y)
    assert len(checks) == before
    layer.weight.to(DEVICE)    # an explicit move of the weight reassigns its state's tensors
    assert torch.equal(layer(x), y)
    assert len(checks) == before + 1
    layer.to("meta")
    with pytest.raises(RuntimeError, match="meta"):
        layer(x)


def test_new_quant_state_and_load_state_dict_recheck(checks):
    layer = _layer()
    x = _x()
    y = layer(x)
    before = len(checks)
    other = _layer()
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), y)
    assert len(checks) > before
    before = len(checks)
    layer.weight.quant_state = copy.deepcopy(layer.weight.quant_state)
    assert layer.weight.quant_state._packed_weight is None
    assert torch.equal(layer(x), y)
    assert len(checks) == before + 1


def test_from_prequantized_checks_and_calls():
    layer = _layer()
    sd = {k.removeprefix("weight."): v for k, v in layer.state_dict().items() if k.startswith("weight.")}
    p = Params4bit.from_prequantized(layer.weight.data, sd, device=DEVICE)
    x = _x()
    assert torch.equal(nf4.matmul_4bit(x, p.t(), p.quant_state),
                       nf4.matmul_4bit(x, layer.weight.t(), layer.weight.quant_state))


def test_backward_rechecks_a_weight_replaced_after_forward(checks):
    """FSDP frees the gathered weight after forward and gathers it again (new memory) for
    backward: backward checks it again instead of reading the freed bytes."""
    layer = _layer(rank=2)
    x = _x().requires_grad_()
    y = layer(x)
    y.sum().backward()
    want = x.grad.clone()
    x.grad = None
    y = layer(x)
    layer.weight.data = layer.weight.data.clone()
    before = len(checks)
    y.sum().backward()
    assert torch.equal(x.grad, want) and len(checks) == before + 1
    y = layer(x)
    layer.weight.data = layer.weight.data[:-1]
    with pytest.raises(ValueError, match="packed weight holds"):
        y.sum().backward()


def test_copies_and_pickles_carry_no_cached_weight():
    layer = _layer(rank=2)
    x = _x()
    y = layer(x)
    state = layer.weight.quant_state
    assert state._packed_weight is not None
    for clone in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert clone._packed_weight is None and clone == state
    restored = pickle.loads(pickle.dumps(layer))
    assert isinstance(restored.weight, Params4bit) and restored.weight.quant_state == state
    assert torch.equal(restored(x), y)


def test_half_and_float_leave_the_packed_bytes_alone():
    layer = _layer()
    packed = layer.weight.data.clone()
    for cast in (nn.Module.half, nn.Module.float, nn.Module.double, nn.Module.bfloat16):
        cast(layer)
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight.data, packed)
    assert layer.bias.dtype == torch.bfloat16
    # Stored as bf16 (FSDP's view): still never converted.
    stored = QuantLinear4bit.from_linear(nn.Linear(IN, OUT, device=DEVICE), quant_storage=torch.bfloat16)
    raw = stored.weight.data.view(torch.uint8).clone()
    stored.half()
    stored.float()
    assert stored.weight.dtype == torch.bfloat16 and torch.equal(stored.weight.data.view(torch.uint8), raw)


def test_non_float_and_meta_inputs_are_refused():
    layer = _layer(rank=2)
    layer(_x())
    for bad in (torch.ones(2, IN, dtype=torch.int64, device=DEVICE),
                torch.ones(2, IN, dtype=torch.bool, device=DEVICE),
                torch.ones(2, IN, dtype=torch.complex64, device=DEVICE)):
        with pytest.raises(TypeError, match="floating-point"):
            layer(bad)
    with pytest.raises(ValueError, match="meta"):
        layer(torch.ones(2, IN, device="meta"))
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.ones(2, IN + 1, device=DEVICE))


def test_an_uncacheable_view_is_checked_each_call(checks):
    """A packed weight handed over as a non-contiguous view is copied for the call and never
    cached (its copy would go stale if the source were edited)."""
    W = torch.randn(OUT, IN, device=DEVICE)
    packed, state = nf4.quantize_4bit(W, quant_type="nf4")
    strided = torch.stack([packed.reshape(-1), packed.reshape(-1)], 1)[:, 0]
    assert not strided.is_contiguous()
    x = _x()
    want = nf4.matmul_4bit(x, packed.t(), state)
    before = len(checks)
    for _ in range(3):
        assert torch.equal(nf4.matmul_4bit(x, strided, state), want)
    assert len(checks) == before + 3


def test_routes_are_one_decision():
    """The layer and matmul_4bit ask the same function, per (tokens, dtype, forced backend)."""
    W = torch.randn(OUT, IN, device=DEVICE)
    packed, state = nf4.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    w = packed_weight(packed, state)
    assert isinstance(w, PackedWeight)
    r = w.route(5, torch.bfloat16)
    assert r == backends.route(DEVICE, torch.bfloat16, 5, OUT, IN, 64)
    nf4.set_backend("reference")
    assert w.route(5, torch.bfloat16).backend == "reference"
    nf4.set_backend(None)
    assert w.route(5, torch.bfloat16) is r


# --- bad input on the hot path (issue #17's items that live here) ---

def test_a_code_table_of_the_other_type_is_refused():
    W = torch.randn(OUT, IN, device=DEVICE)
    packed, state = nf4.quantize_4bit(W, quant_type="nf4")
    state.code = nf4.codebook.levels("fp4").to(DEVICE)
    with pytest.raises(ValueError, match="quant_map"):
        nf4.matmul_4bit(_x(), packed.t(), state)
    with pytest.raises(ValueError, match="quant_map"):
        nf4.dequantize_4bit(packed, state)
    saved = nf4.quantize_4bit(W, quant_type="nf4")[1].as_dict(packed=True)
    saved["quant_map"] = nf4.codebook.levels("fp4")
    with pytest.raises(ValueError, match="quant_map"):
        QuantState.from_dict(saved)
    saved["quant_map"] = nf4.codebook.levels("nf4") * (1 + 2**-20)  # one level edited slightly
    with pytest.raises(ValueError, match="quant_map"):
        QuantState.from_dict(saved)


def test_matmul_out_must_match():
    W = torch.randn(OUT, IN, device=DEVICE)
    packed, state = nf4.quantize_4bit(W, quant_type="nf4")
    x = _x(2)
    want = nf4.matmul_4bit(x, packed.t(), state)
    out = torch.empty(2, OUT, device=DEVICE)
    assert nf4.matmul_4bit(x, packed.t(), state, out=out) is out and torch.equal(out, want)
    for bad in (torch.empty(1, OUT, device=DEVICE), torch.empty(2, OUT, dtype=torch.int32, device=DEVICE),
                torch.empty(2, 1, OUT, device=DEVICE)):
        with pytest.raises(ValueError, match="out must be"):
            nf4.matmul_4bit(x, packed.t(), state, out=bad)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_lora_alpha_must_be_finite(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        QuantLinear4bit(IN, OUT, lora_rank=4, lora_alpha=alpha)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_everywhere(value):
    W = torch.randn(OUT, IN, device=DEVICE)
    W[3, 7] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize_4bit(W, quant_type="nf4")
    linear = nn.Linear(IN, OUT, device=DEVICE)
    with torch.no_grad():
        linear.weight[0, 0] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantLinear4bit.from_linear(linear)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize_model(nn.Sequential(linear), device=DEVICE)
    # An explicit opt-out for callers that checked already (what the block then decodes to is the
    # backend's: the reference's max propagates NaN, the CUDA kernel's fmaxf drops it).
    packed, state = nf4.quantize_4bit(W, quant_type="nf4", check_finite=False)
    assert packed.numel() == OUT * IN // 2


@pytest.mark.parametrize("storage", [torch.int64, torch.bool, torch.float64, torch.complex64])
def test_unsupported_quant_storage_is_refused(storage):
    with pytest.raises(TypeError, match="quant_storage"):
        nf4.quantize_4bit(torch.randn(64, device=DEVICE), quant_type="nf4", quant_storage=storage)
    with pytest.raises(TypeError, match="quant_storage"):
        Params4bit(torch.randn(4, 64), quant_storage=storage)
    with pytest.raises(TypeError, match="quant_storage"):
        QuantLinear4bit(IN, OUT, quant_storage=storage)


def test_remembered_routes_stay_bounded():
    """Variable-length batches: one route per token count, never more than _MAX_ROUTES kept."""
    W = torch.randn(OUT, IN, device=DEVICE)
    packed, state = nf4.quantize_4bit(W, quant_type="nf4")
    w = packed_weight(packed, state)
    for tokens in range(1, 3 * weight_module._MAX_ROUTES):
        w.route(tokens, torch.float32)
        assert len(w._routes) <= weight_module._MAX_ROUTES


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_a_deleted_layer_frees_its_weight(storage):
    # The cached PackedWeight once held a view of the packed parameter, whose quant_state holds
    # the cached weight: a cycle through C++ that gc cannot break, so every deleted model kept
    # its 4-bit weights (3.6 GB for Llama-3-8B, charged to the next model of bench_qlora).
    def used_and_dropped():
        torch.manual_seed(0)
        layer = QuantLinear4bit.from_linear(nn.Linear(IN, OUT, device=DEVICE), lora_rank=4,
                                            compute_dtype=torch.float32, quant_storage=storage)
        layer(_x().requires_grad_()).sum().backward()
        packed_weight(layer.weight, layer.quant_state)
        return weakref.ref(layer.weight), weakref.ref(layer.quant_state)

    refs = used_and_dropped()
    gc.collect()
    assert [r() for r in refs] == [None, None]


@pytest.mark.gpu
def test_a_deleted_model_gives_its_gpu_memory_back():
    # What bench_qlora measures between setups: every byte of a trained 4-bit model comes back.
    def trained_and_dropped():
        torch.manual_seed(0)
        model = nn.Sequential(*(QuantLinear4bit.from_linear(nn.Linear(1024, 1024, device=DEVICE), lora_rank=8,
                                                            compute_dtype=torch.bfloat16) for _ in range(4)))
        model(torch.randn(64, 1024, device=DEVICE, dtype=torch.bfloat16)).float().sum().backward()
        assert all(layer.lora_B.grad is not None for layer in model)

    gc.collect()
    before = torch.cuda.memory_allocated()
    trained_and_dropped()
    gc.collect()
    assert torch.cuda.memory_allocated() == before
