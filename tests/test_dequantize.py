"""dequantize: every kernel backend bit-exact against the reference, out=, and bad input."""
import pytest
import torch

import nf4
from nf4 import codebook, reference
from nf4.quant_state import QuantState
from tests.conftest import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def quantized(shape, dtype, blocksize, quant_type, dq, seed=0):
    """Packed data + state made by the reference on the CPU (so every backend decodes the same)."""
    nf4.set_backend("reference")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed, state = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                      compress_statistics=dq)
    expected = nf4.dequantize_4bit(packed, state)
    nf4.set_backend(None)
    return packed, state, expected


@pytest.mark.parametrize("shape", [(1,), (63, 65), (3000,), (7, 129)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dq", [False, True])
def test_bit_exact_against_reference(kernel_backend, shape, dtype, quant_type, blocksize, dq):
    packed, state, expected = quantized(shape, dtype, blocksize, quant_type, dq)
    nf4.set_backend(kernel_backend)
    out = nf4.dequantize_4bit(packed.to(DEVICE), state.to(DEVICE))
    assert out.dtype == dtype and out.shape == expected.shape and out.device.type == DEVICE.type
    assert torch.equal(bits(out.cpu()), bits(expected))


@pytest.mark.parametrize("dq", [False, True])
def test_out_buffer(kernel_backend, dq):
    packed, state, expected = quantized((33, 64), torch.bfloat16, 64, "nf4", dq)
    nf4.set_backend(kernel_backend)
    out = torch.full(expected.shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)
    ret = nf4.dequantize_4bit(packed.to(DEVICE), state.to(DEVICE), out=out)
    assert ret is out
    assert torch.equal(bits(out.cpu()), bits(expected))


def test_out_buffer_is_checked():
    packed, state, _ = quantized((8, 64), torch.float16, 64, "nf4", False)
    with pytest.raises(ValueError, match="out must be"):
        nf4.dequantize_4bit(packed, state, out=torch.empty(8, 64, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        nf4.dequantize_4bit(packed, state, out=torch.empty(64, 8, dtype=torch.float16).t())


def test_bnb_style_call_without_state():
    packed, state, expected = quantized((4, 64), torch.float32, 64, "fp4", False)
    out = torch.empty(4, 64)
    nf4.functional.dequantize_fp4(packed, absmax=state.absmax, out=out)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="needs quant_state"):
        nf4.dequantize_4bit(packed)


# ------------------------------------------------------------------------------------ bad input
def test_rejects_state_that_does_not_fit_packed():
    packed, state, _ = quantized((16, 64), torch.float16, 64, "nf4", True)
    with pytest.raises(ValueError, match="packed weight holds 256 bytes, expected 512"):
        nf4.dequantize_4bit(packed[:256], state)
    state.shape = torch.Size((32, 64))
    with pytest.raises(ValueError, match=r"absmax has shape \(16,\), expected \[32\]"):
        nf4.dequantize_4bit(packed, state)


def test_rejects_truncated_nested_absmax():
    packed, state, _ = quantized((64, 1024), torch.float16, 64, "nf4", True)
    state.state2.absmax = state.state2.absmax[:2]
    with pytest.raises(ValueError, match=r"nested_absmax has shape \(2,\), expected \[4\]"):
        nf4.dequantize_4bit(packed, state)


def test_rejects_mismatched_devices():
    packed, state, _ = quantized((8, 64), torch.float16, 64, "nf4", False)
    state.absmax = torch.empty_like(state.absmax, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        nf4.dequantize_4bit(packed, state)


def test_ops_validate_even_when_called_directly():
    packed, state, _ = quantized((8, 64), torch.float16, 64, "nf4", False)
    with pytest.raises(ValueError, match="absmax has 8 values, expected 16"):
        torch.ops.nf4.dequantize(packed.view(-1), state.absmax, None, None, None, 32, 256, "nf4",
                                 [8, 64], torch.float16)
    with pytest.raises(TypeError, match="packed must be uint8"):
        torch.ops.nf4.dequantize(packed.view(-1).view(torch.int8), state.absmax, None, None, None, 64,
                                 256, "nf4", [8, 64], torch.float16)
    with pytest.raises(ValueError, match="need nested_absmax, nested_code and offset together|needs nested_absmax"):
        torch.ops.nf4.dequantize(packed.view(-1), state.absmax.to(torch.uint8), state.absmax[:1], None,
                                 None, 64, 256, "nf4", [8, 64], torch.float16)


def test_rejects_wrong_absmax_dtype():
    packed, state, _ = quantized((8, 64), torch.float16, 64, "nf4", False)
    state.absmax = state.absmax.half()
    with pytest.raises(TypeError, match="absmax must be float32"):
        nf4.dequantize_4bit(packed, state)


def test_reference_unpack_inverts_pack():
    codes = torch.randint(0, 16, (101,), dtype=torch.uint8)
    assert torch.equal(reference.unpack(reference.pack(codes, "nf4"), 101), codes.long())


# ------------------------------------------------------------------------------------ layouts
def strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as every other element of a buffer twice as long (a strided view); the
    elements in between are poison, so a kernel that reads the view as contiguous picks them up."""
    wide = torch.full((2 * t.numel(),), 255 if t.dtype == torch.uint8 else float("nan"),
                      dtype=t.dtype, device=t.device)
    wide[::2] = t.reshape(-1)
    return wide[::2]


def expanded(value, n: int, dtype: torch.dtype) -> torch.Tensor:
    """n copies of one value backed by a single element (stride 0)."""
    return torch.tensor([value], dtype=dtype, device=DEVICE).expand(n)


LAYOUTS = ["strided_absmax", "expanded_absmax", "strided_packed", "expanded_packed",
           "strided_nested", "expanded_nested"]


def _layout_args(layout):
    """(args of torch.ops.nf4.dequantize with one odd layout, the same values made dense)."""
    shape, bs = [5, 256], 64
    nested = layout.endswith("nested")
    packed, state, _ = quantized(shape, torch.float32, bs, "nf4", nested)
    packed = packed.reshape(-1).to(DEVICE)
    state = state.to(DEVICE)
    absmax = state.absmax
    s2 = state.state2
    n2 = (s2.absmax, s2.code, state.offset) if nested else (None, None, None)
    if layout == "strided_absmax":
        absmax = strided(absmax)
    elif layout == "expanded_absmax":
        absmax = expanded(0.75, absmax.numel(), torch.float32)
    elif layout == "strided_packed":
        packed = strided(packed)
    elif layout == "expanded_packed":
        packed = expanded(0x3C, packed.numel(), torch.uint8)
    elif layout == "strided_nested":
        absmax = strided(absmax)
        n2 = (strided(n2[0]), strided(n2[1]), n2[2])
    else:
        absmax = expanded(200, absmax.numel(), torch.uint8)
        n2 = (expanded(0.5, n2[0].numel(), torch.float32), n2[1],
              torch.tensor([0.25], device=DEVICE).expand(1))
    odd = (packed, absmax, *n2, bs, 256, "nf4", shape, torch.float32)
    dense_args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in odd)
    return odd, dense_args


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_and_expanded_inputs(any_backend, layout):
    """Strided views and stride-0 (expanded) state, nested table and packed bytes decode as their
    dense copies: ops.py checks sizes, so each backend must not read them as contiguous (an
    expanded 1-element tensor read as contiguous is an out-of-bounds read)."""
    odd, dense_args = _layout_args(layout)
    nf4.set_backend("reference")
    expected = torch.ops.nf4.dequantize(*[a.cpu() if isinstance(a, torch.Tensor) else a
                                          for a in dense_args])
    nf4.set_backend(any_backend)
    got = torch.ops.nf4.dequantize(*odd)
    assert torch.isfinite(expected).all()
    assert torch.equal(bits(got.cpu()), bits(expected))


@pytest.mark.parametrize("nested_blocksize", [32, 128, 1024])
def test_nested_blocksize_other_than_256_is_honoured(any_backend, nested_blocksize):
    """A state whose nested block size is not bnb's 256 (the format allows any) decodes with its
    own: 300 absmax values make nested blocks of 128 differ from blocks of 256."""
    x = torch.randn(300 * 64, generator=torch.Generator().manual_seed(3))
    packed, absmax = reference.quantize(x, 64, "nf4")
    codes, nested, offset = reference.quantize_absmax(absmax, nested_blocksize)
    code = codebook.dynamic_map()
    state2 = QuantState(absmax=nested, code=code, blocksize=nested_blocksize, dtype=torch.float32)
    state = QuantState(absmax=codes, shape=x.shape, code=codebook.levels("nf4"), blocksize=64,
                       quant_type="nf4", dtype=torch.float32, offset=offset, state2=state2)
    # Each absmax code scaled by its own nested block's value, written out here (not through the
    # reference's dequantize_absmax, which is under test too).
    scale = code[codes.long()] * nested[torch.arange(codes.numel()) // nested_blocksize] + offset
    own = reference.dequantize(packed, scale, 64, "nf4", x.numel(), torch.float32)
    got = nf4.dequantize_4bit(packed.view(-1, 1).to(DEVICE), state.to(DEVICE)).cpu()
    assert torch.equal(bits(got), bits(own))
