"""quantize: every kernel backend against the reference, and bad input.

Kernel backends run on the GPU when there is one, else Triton under the interpreter (CI). The CUDA
backend uses bitsandbytes' approximate reciprocal, so a value within ~1 ulp of a decision
threshold may land one code away from the reference's IEEE result: such ties are counted and
bounded, never waved through. Triton takes the reciprocal with IEEE rounding (div_rn), so its
codes equal the reference's exactly; so do its nested codes on the CPU, where the double-quant
mean is the same torch reduction as the reference's (on a GPU it sums in another order).
"""
import pytest
import torch

import nf4
from nf4 import reference
from tests.conftest import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (63, 65), (3000,), (7, 129)]  # odd counts, partial last blocks, a single element


def ties_bound(numel: int, backend: str) -> int:
    """Codes allowed to differ from the reference's: none but for the cuda backend."""
    if backend != "cuda":
        return 0
    # An approximate reciprocal is off by <= 2 ulp, so only values within ~2^-22 (relative) of one of
    # 15 thresholds can flip; for normal data that is ~1e-5 of the elements. 1e-4 leaves margin.
    return 2 + numel // 10_000


def assert_codes_close(ours: torch.Tensor, ref: torch.Tensor, numel: int, backend: str,
                       what: str = "codes"):
    a, b = reference.unpack(ours.cpu(), numel), reference.unpack(ref.cpu(), numel)
    diff = a != b
    assert int(diff.sum()) <= ties_bound(numel, backend), f"{int(diff.sum())} of {numel} {what} differ"
    # A tie moves one step in level order: for nf4 that is one code; for fp4 compare level values.
    assert bool(((a - b).abs()[diff] <= 1).all()) or what == "fp4 codes"


def make_input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x.view(-1)[::97] *= 8.0  # a few outliers so that blocks have different absmax
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_matches_reference(kernel_backend, shape, dtype, quant_type, blocksize):
    x = make_input(shape, dtype)
    packed, absmax, _, _ = torch.ops.nf4.quantize(x.to(DEVICE), blocksize, quant_type, False)
    ref_packed, ref_absmax = reference.quantize(x, blocksize, quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(absmax.cpu(), ref_absmax)
    assert_codes_close(packed, ref_packed, x.numel(), kernel_backend, f"{quant_type} codes")


@pytest.mark.parametrize("shape", [(63, 65), (300, 128), (5000,)])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_double_quant_matches_reference(kernel_backend, shape, blocksize):
    x = make_input(shape, torch.bfloat16, seed=1)
    packed, codes, nested, offset = torch.ops.nf4.quantize(x.to(DEVICE), blocksize, "nf4", True)
    ref = reference.quantize(x, blocksize, "nf4")
    ref_codes, ref_nested, ref_offset = reference.quantize_absmax(ref[1])
    assert_codes_close(packed, ref[0], x.numel(), kernel_backend)
    if DEVICE.type == "cpu":  # the same torch mean as the reference: everything exact
        assert torch.equal(offset, ref_offset) and torch.equal(nested, ref_nested)
        assert torch.equal(codes, ref_codes)
        return
    # The mean is a parallel reduction on the device: a different summation order, 1-2 ulp.
    torch.testing.assert_close(offset.cpu(), ref_offset, rtol=2e-6, atol=0)
    torch.testing.assert_close(nested.cpu(), ref_nested, rtol=2e-6, atol=0)
    diff = codes.cpu() != ref_codes
    assert int(diff.sum()) <= ties_bound(codes.numel(), "cuda")
    assert bool(((codes.cpu().int() - ref_codes.int()).abs()[diff] <= 1).all())


def test_zero_block_and_odd_padding(kernel_backend):
    x = torch.zeros(64 * 3 + 1)
    x[64:128] = torch.linspace(-1, 1, 64)
    packed, absmax, _, _ = torch.ops.nf4.quantize(x.to(DEVICE), 64, "nf4", False)
    ref_packed, ref_absmax = reference.quantize(x, 64, "nf4")
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
    assert int(packed[-1]) == 0x07  # last block all zero: code 0, then the pad nibble (code of 0.0)


@pytest.mark.parametrize("x", [torch.full((64 * 10,), 0.375),      # constant: every absmax equal
                               torch.linspace(-2, 2, 48),            # one block
                               torch.zeros(64 * 300)],               # 300 blocks: two nested blocks
                         ids=["constant", "one_block", "zeros"])
def test_flat_nested_block_stores_bnb_code(any_backend, x):
    """A nested block whose absmax is 0 stores code 0 for its absmax bytes, as bitsandbytes' CUDA
    kernel does (See codebook.NESTED_FLAT_CODE), and still decodes to the offset exactly."""
    packed, state = nf4.quantize_4bit(x.to(DEVICE), blocksize=64, quant_type="nf4",
                                      compress_statistics=True)
    assert bool((state.state2.absmax == 0).all())
    assert state.absmax.dtype == torch.uint8 and bool((state.absmax == 0).all())
    nf4.set_backend("reference")
    expected = reference.dequantize(*reference.quantize(x, 64, "nf4"), 64, "nf4", x.numel(),
                                    torch.float32)
    assert torch.equal(nf4.dequantize_4bit(packed.cpu(), state.to("cpu")).view(torch.int32),
                       expected.view(torch.int32))


def test_non_contiguous_input(kernel_backend):
    x = make_input((128, 96), torch.float16).t()  # a transposed view
    packed, state = nf4.quantize_4bit(x.to(DEVICE), blocksize=64, quant_type="nf4")
    ref_packed, _ = reference.quantize(x.contiguous(), 64, "nf4")
    assert state.shape == x.shape
    assert_codes_close(packed.reshape(-1), ref_packed, x.numel(), kernel_backend)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 64 * 7 + 32)])
def test_matches_reference_at_model_sizes(kernel_backend, shape):
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    packed, state = nf4.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4.set_backend("reference")
    ref_packed, ref_state = nf4.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert_codes_close(packed.reshape(-1), ref_packed.reshape(-1), x.numel(), kernel_backend)
    diff = state.absmax != ref_state.absmax
    assert int(diff.sum()) <= ties_bound(state.absmax.numel(), "cuda")  # the GPU mean: see above


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("blocksize,match", [(48, "blocksize"), (16, "blocksize"), (8192, "blocksize"),
                                             (64.0, "blocksize"), (True, "blocksize")])
def test_rejects_bad_blocksize(blocksize, match):
    with pytest.raises(ValueError, match=match):
        nf4.quantize_4bit(torch.randn(64), blocksize=blocksize, quant_type="nf4")


def test_rejects_bad_quant_type():
    with pytest.raises(ValueError, match=r"quant_type must be one of .*'int4'"):
        nf4.quantize_4bit(torch.randn(64), quant_type="int4")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_rejects_bad_dtype(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        nf4.quantize_4bit(torch.ones(64, dtype=dtype), quant_type="nf4")


def test_rejects_empty_input():
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_4bit(torch.empty(0, 4), quant_type="nf4")


def test_rejects_bad_storage_and_out():
    with pytest.raises(ValueError, match="cannot be viewed as torch.float32"):
        nf4.quantize_4bit(torch.randn(6), quant_type="nf4", quant_storage=torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        nf4.quantize_4bit(torch.randn(64), quant_type="nf4", out=torch.empty(3, dtype=torch.uint8))


def test_storage_views_share_bytes():
    x = torch.randn(32, 64)
    p8, s8 = nf4.quantize_4bit(x, quant_type="nf4")
    p16, s16 = nf4.quantize_4bit(x, quant_type="nf4", quant_storage=torch.bfloat16)
    assert p16.dtype == torch.bfloat16 and p16.shape == (p8.numel() // 2, 1)
    assert torch.equal(p16.view(torch.uint8).reshape(-1), p8.reshape(-1))
    assert torch.equal(nf4.dequantize_4bit(p16, s16), nf4.dequantize_4bit(p8, s8))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_preallocated_absmax_and_out_are_filled(any_backend, storage):
    """bnb's convention: ``absmax=buf`` and ``out=buf`` receive the results, and are returned."""
    x = make_input((40, 64), torch.float32).to(DEVICE)
    expected_packed, expected_state = nf4.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                                        quant_storage=storage)
    absmax = torch.full_like(expected_state.absmax, float("nan"))
    out = torch.zeros_like(expected_packed)
    packed, state = nf4.quantize_4bit(x, absmax=absmax, out=out, blocksize=64, quant_type="nf4",
                                      quant_storage=storage)
    assert packed is out and state.absmax is absmax
    assert torch.equal(out.view(torch.uint8), expected_packed.view(torch.uint8))
    assert torch.equal(absmax, expected_state.absmax)
