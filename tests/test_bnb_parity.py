"""The reference engine against vectors made by bitsandbytes 0.50.2 itself (../shared/fixtures).

Expected agreement (fixtures README): packed codes equal except rare threshold ties (bnb's GPU
build uses an approximate reciprocal; the reference an IEEE one), absmax equal, nested codes equal
but for such ties; dequantizing bnb's stored state reproduces bnb's output bit for bit. On these
vectors no tie occurs (measured: 0 differing codes in all 48 quantize cases), so codes compare
exactly: a tie allowance here would hide a wrong code.
"""
import json

import pytest
import torch
from safetensors import safe_open

import nf4
from nf4 import reference
from nf4.quant_state import QuantState

CASES = ["normal_f32_512x64", "normal_bf16_256x256", "normal_f16_128x512", "studentt_f32_300x128",
         "zeros_blocks_f32_64x256", "outliers_f32_128x256", "odd_f32_63x65", "tail_f32_3000"]


@pytest.fixture(scope="module")
def vectors(fixtures):
    with safe_open(fixtures / "bnb_parity.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def bnb_state(vectors, prefix) -> QuantState:
    keys = {k[len(prefix) + len(".state."):]: v for k, v in vectors.items() if k.startswith(prefix + ".state.")}
    return QuantState.from_dict(keys, device="cpu")


def assert_codes_match(ours_packed, bnb_packed, numel):
    ours = reference.unpack(ours_packed, numel)
    theirs = reference.unpack(bnb_packed, numel)
    diff = ours != theirs
    assert not bool(diff.any()), f"{int(diff.sum())} codes differ from bitsandbytes"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dq", [0, 1])
def test_quantize_matches_bnb(vectors, case, blocksize, dq):
    x = vectors[f"{case}.input"]
    prefix = f"{case}.bs{blocksize}.dq{dq}"
    packed, state = nf4.quantize_4bit(x, blocksize=blocksize, compress_statistics=bool(dq), quant_type="nf4")
    bnb_packed = vectors[f"{prefix}.packed"]
    assert packed.shape == bnb_packed.shape and packed.dtype == bnb_packed.dtype
    assert_codes_match(packed, bnb_packed, x.numel())
    theirs = bnb_state(vectors, prefix)
    if dq:
        assert torch.equal(state.absmax, theirs.absmax)  # nested codes: exact too
        # The mean of the absmax is reduced in a different order on the GPU: 1-2 ulp apart.
        torch.testing.assert_close(state.offset, theirs.offset, rtol=1e-6, atol=0)
        torch.testing.assert_close(state.state2.absmax, theirs.state2.absmax, rtol=1e-6, atol=0)
        assert torch.equal(state.state2.code, theirs.state2.code)
    else:
        assert torch.equal(state.absmax, theirs.absmax)
    assert torch.equal(state.code, theirs.code)
    assert state.shape == theirs.shape and state.dtype == theirs.dtype and state.blocksize == blocksize


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dq", [0, 1])
def test_dequantize_bnb_state_is_bit_exact(vectors, case, dq):
    prefix = f"{case}.bs64.dq{dq}"
    state = bnb_state(vectors, prefix)
    out = nf4.dequantize_4bit(vectors[f"{prefix}.packed"], state)
    expected = vectors[f"{prefix}.dequant"]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    bits = {4: torch.int32, 2: torch.int16}[out.element_size()]
    assert torch.equal(out.view(bits), expected.view(bits))  # -0.0 of zero blocks included


@pytest.mark.parametrize("case", ["normal_bf16_256x256", "odd_f32_63x65"])
def test_as_dict_reproduces_bnb_keys_and_json(vectors, case):
    prefix = f"{case}.bs64.dq1"
    x = vectors[f"{case}.input"]
    _, state = nf4.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = state.as_dict(packed=True)
    theirs = {k[len(prefix) + len(".state."):]: v for k, v in vectors.items() if k.startswith(prefix + ".state.")}
    assert set(ours) == set(theirs)
    ours_json = json.loads(bytes(ours["quant_state.bitsandbytes__nf4"].tolist()))
    theirs_json = json.loads(bytes(theirs["quant_state.bitsandbytes__nf4"].tolist()))
    assert list(ours_json) == list(theirs_json)  # same keys in the same order
    offset_ours, offset_theirs = ours_json.pop("nested_offset"), theirs_json.pop("nested_offset")
    assert ours_json == theirs_json
    assert offset_ours == pytest.approx(offset_theirs, rel=1e-6)


def test_odd_count_pads_with_code_of_zero(vectors):
    packed = vectors["odd_f32_63x65.bs64.dq0.packed"]
    assert int(packed.reshape(-1)[-1]) & 0xF == 7  # bnb's own padding
    x = vectors["odd_f32_63x65.input"]
    ours, _ = nf4.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert int(ours.reshape(-1)[-1]) & 0xF == 7


def test_zero_blocks_store_code_zero_and_decode_to_negative_zero(vectors):
    x = vectors["zeros_blocks_f32_64x256.input"].reshape(-1)
    packed, state = nf4.quantize_4bit(x, blocksize=64, quant_type="nf4")
    zero_blocks = (state.absmax == 0).nonzero().reshape(-1)
    assert zero_blocks.numel() > 0
    codes = reference.unpack(packed, x.numel()).view(-1, 64)
    assert bool((codes[zero_blocks] == 0).all())
    out = nf4.dequantize_4bit(packed, state).view(-1, 64)
    assert bool(torch.signbit(out[zero_blocks]).all()) and bool((out[zero_blocks] == 0).all())
