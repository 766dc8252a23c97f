"""QuantState: bnb's dictionary format both ways, and validation of untrusted metadata."""
import json

import pytest
import torch
from safetensors import safe_open

import nf4
from nf4.quant_state import QuantState


def state_dict_of(dq=True, quant_type="nf4", shape=(64, 96)):
    x = torch.randn(shape, dtype=torch.bfloat16)
    packed, state = nf4.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type=quant_type)
    return packed, state, state.as_dict(packed=True)


def with_json(d, **changes):
    d = dict(d)
    key = next(k for k in d if "bitsandbytes__" in k)
    meta = json.loads(bytes(d[key].tolist()))
    meta.update(changes)
    d[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return d


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip(dq, quant_type):
    packed, state, d = state_dict_of(dq, quant_type)
    back = QuantState.from_dict(d, device="cpu")
    assert back == state
    assert torch.equal(nf4.dequantize_4bit(packed, back), nf4.dequantize_4bit(packed, state))
    plain = QuantState.from_dict(state.as_dict(packed=False))
    assert plain == state


def test_reads_prefixed_keys_from_a_bnb_checkpoint(fixtures):
    prefix = "model.layers.0.self_attn.q_proj.weight."
    with safe_open(fixtures / "tiny_llama_bnb4" / "model.safetensors", "pt") as f:
        d = {k[len(prefix) - len("weight."):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        packed = f.get_tensor(prefix[:-1])
    state = QuantState.from_dict(d, device="cpu")
    assert state.quant_type == "nf4" and state.nested and state.dtype == torch.bfloat16
    assert tuple(state.shape) == (256, 256)
    assert nf4.dequantize_4bit(packed, state).shape == (256, 256)


@pytest.mark.parametrize("change,match", [
    (dict(blocksize=48), "blocksize must be one of"),
    (dict(quant_type="fp4"), "names quant type 'bitsandbytes__nf4' but its JSON says 'fp4'"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(shape=[64, 97]), r"absmax has shape \(96,\), expected \[97\]"),
    (dict(shape="64x96"), "shape must be a list of ints"),
    (dict(nested_offset=float("nan")), "nested_offset must be a finite number"),
    (dict(nested_offset="1.0"), "nested_offset must be a finite number"),
    (dict(evil="x"), r"unknown fields \['evil'\]"),
    (dict(nested_blocksize=32), r"nested_absmax has shape \(1,\), expected \[3\]"),
])
def test_rejects_bad_json(change, match):
    _, _, d = state_dict_of()
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(with_json(d, **change))


def test_rejects_malformed_blobs():
    _, _, d = state_dict_of()
    key = "quant_state.bitsandbytes__nf4"
    for blob, match in [(torch.tensor([0xFF, 0xFE], dtype=torch.uint8), "not valid UTF-8 JSON"),
                        (torch.tensor(list(b"[1, 2]"), dtype=torch.uint8), "JSON object"),
                        (torch.zeros(100_000, dtype=torch.uint8), "more than a quant state"),
                        (torch.zeros(4, dtype=torch.float32), "1-D uint8 tensor")]:
        with pytest.raises(ValueError, match=match):
            QuantState.from_dict({**d, key: blob})


def test_rejects_inconsistent_tensors():
    _, _, d = state_dict_of()
    with pytest.raises(ValueError, match="incomplete double-quantization state"):
        QuantState.from_dict({k: v for k, v in d.items() if k != "nested_absmax"})
    with pytest.raises(TypeError, match="must be uint8 codes"):
        QuantState.from_dict({**d, "absmax": d["absmax"].float()})
    with pytest.raises(ValueError, match="256 float32"):
        QuantState.from_dict({**d, "nested_quant_map": d["nested_quant_map"][:10]})
    with pytest.raises(ValueError, match="expected one quant_state"):
        QuantState.from_dict({**d, "quant_state.bitsandbytes__fp4": d["quant_state.bitsandbytes__nf4"]})
    with pytest.raises(ValueError, match="no quant_type"):
        QuantState.from_dict({"absmax": d["absmax"]})
    with pytest.raises(TypeError, match="must be a tensor"):
        QuantState.from_dict({**d, "absmax": [1, 2, 3]})
    with pytest.raises(TypeError, match="mapping"):
        QuantState.from_dict([("absmax", d["absmax"])])


def test_to_moves_every_tensor():
    _, state, _ = state_dict_of()
    state.to("meta")
    assert {state.absmax.device.type, state.offset.device.type, state.state2.absmax.device.type,
            state.state2.code.device.type, state.code.device.type} == {"meta"}


def test_bits_per_parameter():
    _, state, _ = state_dict_of(shape=(4096, 4096))
    # 4 bits + 8-bit absmax per 64 values + 32-bit nested scale per 256 blocks: 4.127 bits.
    assert nf4.functional.bits_per_parameter(state) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)


@pytest.mark.parametrize("dq,part", [(False, "absmax"), (True, "absmax"), (True, "offset"),
                                     (True, "nested_absmax")])
def test_equality_compares_every_tensor(dq, part):
    """Two states that differ in one tensor only (one absmax value) are not equal."""
    _, state, _ = state_dict_of(dq, "nf4")
    other = QuantState.from_dict({k: v.clone() if isinstance(v, torch.Tensor) else v
                                  for k, v in state.as_dict(packed=False).items()})
    assert other == state
    t = {"absmax": other.absmax, "offset": other.offset,
         "nested_absmax": other.state2.absmax if dq else None}[part]
    t.view(-1)[0] = t.view(-1)[0] + 1
    assert other != state and state != other
