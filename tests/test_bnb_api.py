"""bitsandbytes API pieces scripts touch, with bitsandbytes' semantics: gemv_4bit, the legacy list
form of QuantState, Params4bit's views of its state (bnb 0.50's property names), copy.copy of a
weight, Linear4bit as an nn.Linear with quant_storage and set_compute_type."""
import copy

import pytest
import torch
from torch import nn

import nf4
from nf4.nn import Linear4bit, LinearNF4, Params4bit

from tests.conftest import DEVICE


def layer(double=True, compute_dtype=torch.float32):
    torch.manual_seed(0)
    return LinearNF4(96, 40, compute_dtype=compute_dtype, compress_statistics=double).to(DEVICE)


@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_4bit_is_x_times_dequantized_weight(rows):
    lin = layer()
    W = nf4.dequantize_4bit(lin.weight, lin.weight.quant_state)
    x = torch.randn(rows, 96, device=DEVICE)
    got = nf4.functional.gemv_4bit(x, lin.weight, state=lin.weight.quant_state)
    # fp32 throughout: only the summation order may differ from x @ W.T (<= 1e-5 relative,
    # as tests/test_matmul.py's fp32 bound).
    torch.testing.assert_close(got, x @ W.T, rtol=1e-5, atol=1e-5)
    out = torch.empty(rows, 40, device=DEVICE)
    assert nf4.functional.gemv_4bit(x, lin.weight, out=out, state=lin.weight.quant_state) is out
    assert torch.equal(out, got)
    with pytest.raises(ValueError, match="state"):
        nf4.functional.gemv_4bit(x, lin.weight)


@pytest.mark.parametrize("double", [True, False])
def test_quant_state_legacy_list(double):
    qs = layer(double).weight.quant_state
    assert qs[0] is qs.absmax and qs[1] == torch.Size([40, 96]) and qs[2] == torch.float32
    assert qs[3] == 64 and qs[5] == "nf4" and qs[-1] == "nf4"
    if double:
        assert qs[4][0] is qs.offset and qs[4][1] is qs.state2
    else:
        assert qs[4] is None
    with pytest.raises(IndexError):
        qs[6]


def test_params4bit_state_properties():
    w = layer(True).weight
    qs = w.quant_state
    assert w.absmax is qs.absmax and w.code is qs.code and w.quant_map is qs.code
    assert w.offset is qs.offset and w.state2 is qs.state2 and w.nested_offset is qs.offset
    assert w.nested_absmax is qs.state2.absmax and w.nested_quant_map is qs.state2.code
    assert w.nested_blocksize == 256 and w.nested_dtype == torch.float32
    plain = layer(False).weight
    assert plain.absmax.dtype == torch.float32 and plain.state2 is None
    with pytest.raises(AttributeError, match="double quantization"):
        plain.nested_absmax
    unquantized = Params4bit(torch.randn(4, 64), quant_type="nf4")
    with pytest.raises(AttributeError, match="not quantized"):
        unquantized.absmax
    assert not hasattr(unquantized, "quant_map")


def test_each_weight_owns_its_quant_map():
    # Shared tables made save_pretrained fail (safetensors refuses aliased tensors).
    a, b = layer().weight, layer().weight
    assert a.quant_map.data_ptr() != b.quant_map.data_ptr()
    assert a.nested_quant_map.data_ptr() != b.nested_quant_map.data_ptr()
    assert torch.equal(a.quant_map, b.quant_map)


def test_copy_of_a_weight_is_a_params4bit():
    w = layer().weight
    c = copy.copy(w)
    assert type(c) is Params4bit and c.quant_state is w.quant_state and c.bnb_quantized
    assert c.data_ptr() == w.data_ptr() and c.blocksize == w.blocksize and c.quant_type == "nf4"


def test_linear4bit_is_an_nn_linear_with_bnb_attributes():
    lin = Linear4bit(96, 40, quant_type="nf4", quant_storage=torch.uint8, device=DEVICE)
    assert isinstance(lin, nn.Linear) and lin.quant_storage == torch.uint8
    assert lin.weight.bnb_quantized  # built with a device: quantized at once, as in bnb
    x = torch.randn(2, 96, device=DEVICE)
    assert lin(x).shape == (2, 40)
    lin.set_compute_type(x.to(torch.bfloat16))
    assert lin.compute_dtype == torch.bfloat16
    lin.compute_dtype = None
    with pytest.warns(UserWarning, match="float16"):
        lin.set_compute_type(x.half())
    assert lin.compute_dtype is None
    packed = lin.weight.data.clone()
    lin.reset_parameters()  # a packed weight is data: nn.Linear's re-init must not touch it
    assert torch.equal(lin.weight.data, packed)
