"""The fused 4-bit matmul: ``matmul_4bit(x, W) == x @ dequantize(W).T + bias`` within a rounding bound.

Runs the kernel backends on DEVICE (the GPU, or the Triton interpreter on CPU; interpreter shapes
are tiny). The oracle is computed in fp32 from the reference's fp32 dequantization.

Note: the error bound.
    With u the unit roundoff of x's dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32), the kernel's
    result differs from the exact product by at most
        (u + K * 2^-24) * (|x| @ |W|^T + |bias|)  +  u * |y|
    elementwise: the dequantized weight may be rounded to x's dtype before the tensor-core product
    (relative error <= u per term), fp32 accumulation over K terms adds at most K * 2^-24 of the
    absolute sum (first-order worst case), and the output is rounded once to x's dtype (u * |y|).
    This is a worst-case bound, so it never flakes, yet a wrong nibble, block or scale breaks it
    by two orders of magnitude (|x| @ |W| is ~sqrt(K) times |y|, and u <= 2^-8).
"""
import pytest
import torch

import nf4
from nf4 import codebook, reference, reference_backend
from tests.conftest import DEVICE, HAS_CUDA

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# Interpreter-sized shapes: odd multiples of the block size (64 * 3 rows, 64 * 5 columns).
OUT_F, IN_F = 64 * 3, 64 * 5


def make_weight(out_f, in_f, quant_type="nf4", double_quant=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g).to(DEVICE)
    packed, state = nf4.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant,
                                      quant_type=quant_type)
    return packed, state


def fp32_weight(packed, state):
    """The oracle's weight: the reference backend's dequantization in fp32."""
    am, nested, ncode, offset = state.absmax, None, None, None
    if state.nested:
        nested, ncode, offset = state.state2.absmax, state.state2.code, state.offset
    return reference_backend.dequantize(packed.reshape(-1), am, nested, ncode, offset, state.blocksize,
                                        codebook.NESTED_BLOCKSIZE, state.quant_type,
                                        list(state.shape), torch.float32)


def check(y, x, W32, bias=None):
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], W32.shape[0])
    x32 = x.float()
    b32 = bias.float() if bias is not None else torch.zeros(W32.shape[0], device=x.device)
    ref = x32 @ W32.T + b32
    u = UNIT_ROUNDOFF[x.dtype]
    K = x.shape[-1]
    bound = (u + K * 2.0**-24) * (x32.abs() @ W32.abs().T + b32.abs()) + u * ref.abs()
    err = (y.float() - ref).abs()
    assert torch.isfinite(y).all()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error exceeds the bound by {worst:.3g}x (max abs error {err.max().item():.3g})"


def rand_x(*shape, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


TOKENS = [1, 2, 3, 7, 16, 33, 128, pytest.param(4096, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", TOKENS)
def test_tokens(kernel_backend, tokens, dtype):
    packed, state = make_weight(OUT_F, IN_F)
    x = rand_x(tokens, IN_F, dtype=dtype)
    bias = rand_x(OUT_F, dtype=dtype, seed=2)
    check(nf4.matmul_4bit(x, packed.t(), state, bias=bias), x, fp32_weight(packed, state), bias)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("tokens", [1, 33])  # the GEMV and the tensor-core path
def test_formats(kernel_backend, quant_type, double_quant, tokens):
    packed, state = make_weight(OUT_F, IN_F, quant_type, double_quant)
    x = rand_x(tokens, IN_F)
    check(nf4.matmul_4bit(x, packed.t(), state), x, fp32_weight(packed, state))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024])
@pytest.mark.parametrize("tokens", [2, 16])
def test_blocksizes(kernel_backend, blocksize, tokens):
    """Blocks smaller, equal and larger than a kernel iteration (scales per tile row: 1 or more)."""
    packed, state = make_weight(48, blocksize * 3, blocksize=blocksize)
    x = rand_x(tokens, blocksize * 3)
    check(nf4.matmul_4bit(x, packed.t(), state), x, fp32_weight(packed, state))


def test_leading_dims_and_fp32(kernel_backend):
    packed, state = make_weight(OUT_F, IN_F, double_quant=False)
    W32 = fp32_weight(packed, state)
    x = rand_x(2, 3, IN_F)
    check(nf4.matmul_4bit(x, packed.t(), state), x, W32)
    x = rand_x(5, IN_F, dtype=torch.float32)
    check(nf4.matmul_4bit(x, packed.t(), state), x, W32)
    # A non-contiguous x (a column slice) and an empty batch.
    wide = rand_x(3, 2 * IN_F)
    check(nf4.matmul_4bit(wide[:, ::2], packed.t(), state), wide[:, ::2], W32)
    assert nf4.matmul_4bit(x[:0], packed.t(), state).shape == (0, OUT_F)


def test_shape_off_the_block_grid(kernel_backend):
    """in_features not a multiple of the block size (odd, rows straddling bytes) still computes."""
    W = torch.randn(5, 33).to(DEVICE)
    packed, state = nf4.quantize_4bit(W, blocksize=64, quant_type="nf4")
    x = rand_x(3, 33)
    check(nf4.matmul_4bit(x, packed.t(), state), x, fp32_weight(packed, state))


def _triton_configs():
    Config = pytest.importorskip("nf4.kernels.matmul").Config
    return [
        Config("gemv", block_m=8, block_n=4, block_k=64),               # several K iterations
        Config("gemv", block_m=2, block_n=8, block_k=32, split_k=3, select=True),  # split-K, atomics
        Config("dot", block_m=16, block_n=16, block_k=64, split_k=2),
        Config("dot", block_m=32, block_n=64, block_k=256, select=True),  # 4 absmax blocks per tile
        Config("dequant"),
    ]


@pytest.mark.parametrize("cfg_index", range(5))
def test_triton_configs(cfg_index):
    """Each kernel variant the config table may pick, forced on one shape (triton backend only)."""
    km = pytest.importorskip("nf4.kernels.matmul")  # the module (the package exports the function)
    nf4.set_backend("triton")
    cfg = _triton_configs()[cfg_index]
    packed, state = make_weight(OUT_F, IN_F)
    tokens = min(cfg.block_m, 2) if cfg.kind == "gemv" else 20
    x = rand_x(tokens, IN_F)
    bias = rand_x(OUT_F, seed=3)
    s2 = state.state2
    y = km.matmul(x, packed.reshape(-1), state.absmax, s2.absmax, s2.code, state.offset,
                  state.blocksize, s2.blocksize, state.quant_type, OUT_F, IN_F, bias, config=cfg)
    check(y, x, fp32_weight(packed, state), bias)


def test_gradient_flows(kernel_backend):
    packed, state = make_weight(OUT_F, IN_F)
    x = rand_x(4, IN_F, dtype=torch.float32).requires_grad_()
    nf4.matmul_4bit(x, packed.t(), state).sum().backward()
    W32 = fp32_weight(packed, state)
    torch.testing.assert_close(x.grad, W32.sum(0).expand(4, -1), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_torch_compile_fullgraph(tokens):
    nf4.set_backend("triton")
    packed, state = make_weight(1024, 512)
    bias = rand_x(1024, seed=4)

    def f(x):
        return torch.nn.functional.silu(nf4.matmul_4bit(x, packed.t(), state, bias=bias)) * 2

    compiled = torch.compile(f, fullgraph=True)
    x = rand_x(tokens, 512)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("tokens", [1, 4, 16, 64, 128, 512])
def test_llama_shapes(shape, tokens):
    nf4.set_backend("triton")
    packed, state = make_weight(*shape)
    x = rand_x(tokens, shape[1])
    check(nf4.matmul_4bit(x, packed.t(), state), x, fp32_weight(packed, state))


@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("tokens", [1, 33])  # the GEMV and the tensor-core path
@pytest.mark.parametrize("double_quant", [False, True])
def test_strided_and_expanded_state_and_bias(any_backend, layout, tokens, double_quant):
    """State, nested table, packed bytes and bias as strided views or stride-0 expansions give the
    product of their dense copies: no backend may read them as if contiguous."""
    packed, state = make_weight(OUT_F, IN_F, double_quant=double_quant)
    packed = packed.reshape(-1)
    s2 = state.state2
    dense_args = [packed, state.absmax, s2.absmax if double_quant else None,
                  s2.code if double_quant else None, state.offset if double_quant else None]
    bias = rand_x(OUT_F, seed=3)
    if layout == "strided":
        def odd(t):
            wide = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
            wide[::2] = t.reshape(-1)
            return wide[::2]
        args = [None if t is None else odd(t) for t in dense_args]
        bias = odd(bias)
    else:
        # One element each, expanded: a constant weight, every block with the same scale.
        def odd(t):
            return t.reshape(-1)[:1].clone().expand(t.numel())
        args = [None if t is None else odd(t) for t in dense_args]
        bias = odd(bias)
    if double_quant:
        args[4] = args[4][:1]  # offset: one element, as the op requires
    dense = [None if t is None else t.contiguous() for t in args]
    x = rand_x(tokens, IN_F)
    fixed = (state.blocksize, codebook.NESTED_BLOCKSIZE, "nf4", OUT_F, IN_F)
    y = torch.ops.nf4.matmul(x, *args, *fixed, bias)
    W32 = reference_backend.dequantize(dense[0], dense[1], *dense[2:], state.blocksize,
                                       codebook.NESTED_BLOCKSIZE, "nf4", [OUT_F, IN_F],
                                       torch.float32)
    check(y, x, W32, bias.contiguous())
