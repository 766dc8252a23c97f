"""Triton-specific checks: the backend's import contract, bit-exactness on edge cases under the
interpreter, and quantize/dequantize equality with the reference at Llama sizes on the GPU."""
import subprocess
import sys

import pytest
import torch

import nf4
from nf4 import codebook, reference, reference_backend
from nf4.testing import LLAMA_SHAPES
from tests.conftest import DEVICE

kernels = pytest.importorskip("nf4.kernels")


def test_import_without_triton_raises_import_error():
    """nf4.backends treats ImportError as "backend unavailable"; anything else would break import."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "try:\n    import nf4.kernels\nexcept ImportError:\n    sys.exit(0)\nsys.exit(1)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _both(A, blocksize, quant_type, double_quant):
    return (reference_backend.quantize(A, blocksize, quant_type, double_quant),
            kernels.quantize(A, blocksize, quant_type, double_quant))


def _dequant_args(q, blocksize, quant_type, double_quant, shape, dtype):
    nested = double_quant
    return (q[0], q[1], q[2] if nested else None,
            codebook.dynamic_map().to(q[0].device) if nested else None, q[3] if nested else None,
            blocksize, codebook.NESTED_BLOCKSIZE, quant_type, list(shape), dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_edge_values_exact(quant_type):
    """Zero blocks, values exactly on a threshold (x == t * absmax), odd length, a lone block."""
    bs = 64
    thr = codebook.nf4_thresholds() if quant_type == "nf4" else codebook.fp4_thresholds()
    x = torch.randn(5 * bs + 1)
    x[:bs] = 0                                   # absmax 0: every code 0
    x[bs:3 * bs] = 0.5 * x[bs:3 * bs].clamp(-1, 1)
    x[bs:bs + thr.numel()] = thr                 # absmax 1 (set below): scaled == threshold
    x[bs + thr.numel()] = 1.0
    x[2 * bs:2 * bs + thr.numel()] = -thr
    x[2 * bs + thr.numel()] = -1.0
    x[3 * bs:4 * bs] = 3.0                       # constant block: nested centred values tie
    x = x.to(DEVICE)
    for dq in (False, True):
        ref, got = _both(x, bs, quant_type, dq)
        for a, b in zip(ref, got):
            assert torch.equal(a, b)
        args = _dequant_args(ref, bs, quant_type, dq, x.shape, torch.bfloat16)
        assert torch.equal(kernels.dequantize(*args), reference_backend.dequantize(*args))


def test_dequantize_out_and_dtypes():
    x = torch.randn(3, 96).to(DEVICE)
    q = kernels.quantize(x, 32, "nf4", True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        args = _dequant_args(q, 32, "nf4", True, x.shape, dtype)
        out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE)
        assert kernels.dequantize(*args, out=out) is out
        assert torch.equal(out, reference_backend.dequantize(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama8b.attn_o", "llama8b.mlp_up"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_llama_sizes_exact(name, quant_type, double_quant):
    """Bit-exact with the reference (same device, IEEE reciprocal on both sides) at full size."""
    A = torch.randn(LLAMA_SHAPES[name], device="cuda", dtype=torch.bfloat16)
    ref, got = _both(A, 64, quant_type, double_quant)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    args = _dequant_args(ref, 64, quant_type, double_quant, A.shape, torch.bfloat16)
    assert torch.equal(kernels.dequantize(*args), reference_backend.dequantize(*args))


@pytest.mark.gpu
def test_functional_api_uses_triton():
    nf4.set_backend("triton")
    W = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    packed, state = nf4.quantize_4bit(W, blocksize=128, compress_statistics=True, quant_type="nf4")
    nf4.set_backend("reference")
    packed_ref, state_ref = nf4.quantize_4bit(W, blocksize=128, compress_statistics=True,
                                              quant_type="nf4")
    assert torch.equal(packed, packed_ref) and torch.equal(state.absmax, state_ref.absmax)


def test_quantize_entry_makes_expanded_input_dense():
    """The backend entry itself (not only ops.py) makes A dense: a 1-D expansion keeps stride 0
    through reshape, and read as contiguous it would run past its one element."""
    x = torch.tensor([1.5], device=DEVICE).expand(300)
    ref = reference_backend.quantize(x.contiguous(), 64, "nf4", True)
    for a, b in zip(ref, kernels.quantize(x, 64, "nf4", True)):
        assert torch.equal(a, b)


def test_fp4_exact_zero_inside_a_non_zero_block_has_no_sign_bit():
    """0.0 and -0.0 among non-zero values scale to (-)0.0, which is not below 0: code 0 (bnb's),
    never the sign bit's code 8."""
    x = torch.zeros(64)
    x[0], x[1], x[2], x[3], x[5] = 1.0, -0.5, 0.0, -0.0, 0.25
    x[6:] = torch.linspace(-1, 1, 58)
    x[40] = -0.0
    x = x.to(DEVICE)
    ref = reference_backend.quantize(x.cpu(), 32, "fp4", False)
    got = kernels.quantize(x, 32, "fp4", False)
    codes = reference.unpack(got[0].cpu(), 64)
    assert torch.equal(got[0].cpu(), ref[0])
    assert codes[2] == 0 and codes[3] == 0 and codes[4] == 0 and codes[40] == 0


def test_bf16_output_rounds_ties_to_even():
    """level 1.0 (nf4 code 15) times absmax 1 + 2^-8 is halfway between two bf16 values: ties go
    to the even one (1.0); 1 + 3 * 2^-8 rounds up to the even 1.015625; just above a tie rounds up."""
    absmax = torch.tensor([1.00390625, 1.01171875, 1.00390625 + 2.0**-20, 1.0], device=DEVICE)
    packed = torch.full((2 * 32,), 0xFF, dtype=torch.uint8, device=DEVICE)  # 4 blocks of 32 codes 15
    args = (packed, absmax, None, None, None, 32, 256, "nf4", [128], torch.bfloat16)
    got = kernels.dequantize(*args).cpu().view(4, 32)
    expected = torch.tensor([1.0, 1.015625, 1.0078125, 1.0], dtype=torch.bfloat16)
    assert torch.equal(got, expected[:, None].expand(4, 32))
    assert torch.equal(got.reshape(-1), reference_backend.dequantize(
        *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args]))
