"""The fused few-token matmul of the CUDA backend (csrc/matmul.cu through nf4.cuda_backend).

Every tile configuration the launcher accepts, on shapes whose rows, tokens and K split unevenly
over CTAs and warps, against the fp32 oracle of tests/test_matmul.py (same error bound); plus
the heuristic's choices and the binding's refusals. GPU only, except the pure-Python heuristic.
"""
import itertools

import pytest
import torch

import nf4
from nf4 import backends
from tests.test_matmul import check, fp32_weight

gpu = pytest.mark.gpu
# `from nf4 import _C` fails with ImportError, not ModuleNotFoundError, when the extension was not
# built: importorskip must be told, or collection stops the whole run.
cuda_backend = pytest.importorskip("nf4.cuda_backend", reason="nf4._C not built", exc_type=ImportError)


def _weight(out_f, in_f, quant_type="nf4", double_quant=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g).add(0.1)).cuda()
    return nf4.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def _x(tokens, in_f, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, in_f, generator=g).to(dtype).cuda()


def _args(packed, state):
    s2 = state.state2
    nested = (s2.absmax, s2.code, state.offset) if state.nested else (None, None, None)
    return (packed.reshape(-1), state.absmax, *nested, state.blocksize, s2.blocksize if s2 else 256,
            state.quant_type, *state.shape)


CONFIGS = [(tt, rows, warps) for tt, rows, warps in itertools.product((8, 16, 32), (16, 32, 64), (1, 3, 4, 8))
           if not (tt == 32 and rows == 64)]


@gpu
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_config(config):
    # 200 rows (no tile divides it), K = 64 * 7 (warps get uneven group ranges; 8 warps > 7
    # groups leaves a warp without work; a warp's last chunk can be partial), tokens not a
    # multiple of any token tile.
    packed, state = _weight(200, 64 * 7)
    W32 = fp32_weight(packed, state)
    bias = _x(1, 200, torch.bfloat16, seed=5).reshape(-1)
    for tokens in (1, 7, config[0] + 3):
        x = _x(tokens, 64 * 7, torch.bfloat16)
        y = cuda_backend.fused_matmul(x, *_args(packed, state), bias, config=config)
        check(y, x, W32, bias)


@gpu
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("warps", [1, 2])
def test_long_chunks(double_quant, warps):
    # One token tile and 16 rows per CTA take chunks of 4 groups once a warp holds 32 groups or
    # more (csrc/matmul.cu, kLongChunkMinGroups): 75 groups over 1 or 2 warps (75 and 37/38 per
    # warp) end in a partial chunk; 100 rows leave a partial row tile.
    packed, state = _weight(100, 64 * 75, double_quant=double_quant)
    W32 = fp32_weight(packed, state)
    for tokens in (1, 5, 8):
        x = _x(tokens, 64 * 75, torch.bfloat16)
        check(cuda_backend.fused_matmul(x, *_args(packed, state), None, config=(8, 16, warps)), x, W32)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 1024])
@pytest.mark.parametrize("tokens", [1, 2, 8, 9, 16, 17, 32])
def test_formats(dtype, quant_type, double_quant, blocksize, tokens):
    packed, state = _weight(96, 2048, quant_type, double_quant, blocksize)
    x = _x(tokens, 2048, dtype)
    y = cuda_backend.fused_matmul(x, *_args(packed, state), None)
    check(y, x, fp32_weight(packed, state))


@gpu
def test_through_the_api_and_odd_inputs():
    nf4.set_backend("cuda")
    try:
        packed, state = _weight(4096, 1024)
        W32 = fp32_weight(packed, state)
        # Leading dims, a column-sliced (non-contiguous) x, and an x at an 8-byte offset.
        x = _x(6, 1024, torch.bfloat16).reshape(2, 3, 1024)
        check(nf4.matmul_4bit(x, packed.t(), state), x, W32)
        wide = _x(4, 2048, torch.bfloat16)
        check(nf4.matmul_4bit(wide[:, ::2], packed.t(), state), wide[:, ::2], W32)
        flat = _x(1, 1024 * 3 + 4, torch.bfloat16).reshape(-1)
        shifted = flat[4:].reshape(3, 1024)
        assert shifted.data_ptr() % 16 == 8
        check(nf4.matmul_4bit(shifted, packed.t(), state), shifted, W32)
        # A float bias for a bf16 input is cast; an empty batch gives an empty result.
        bias = torch.randn(4096, device="cuda")
        check(nf4.matmul_4bit(shifted, packed.t(), state, bias=bias), shifted, W32, bias.to(torch.bfloat16))
        assert nf4.matmul_4bit(shifted[:0], packed.t(), state).shape == (0, 4096)
    finally:
        nf4.set_backend(None)


@gpu
def test_same_result_on_a_side_stream():
    packed, state = _weight(512, 1024)
    x = _x(3, 1024, torch.float16)
    expected = cuda_backend.fused_matmul(x, *_args(packed, state), None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuda_backend.fused_matmul(x, *_args(packed, state), None)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@gpu
def test_binding_refuses_what_the_kernel_cannot_do():
    packed, state = _weight(64, 128)
    x = _x(2, 128, torch.bfloat16)
    for config, what in [((32, 64, 4), "64 rows x 32 tokens"), ((8, 48, 4), "row tile"),
                         ((12, 16, 4), "token tile"), ((8, 16, 0), "no warps"), ((8, 16, 9), "too many warps")]:
        with pytest.raises(RuntimeError, match="BAD_SIZE"):
            cuda_backend.fused_matmul(x, *_args(packed, state), None, config=config)
    # fp32 input: the kernel is fp16/bf16 only; matmul falls back to dequantize + cuBLAS.
    x32 = _x(2, 128, torch.float32)
    assert not cuda_backend.fused_matmul_supported(x32.dtype, 64, 64, 128)
    check(cuda_backend.matmul(x32, *_args(packed, state), None), x32, fp32_weight(packed, state))


def test_config_heuristic_stays_within_the_kernel_limits():
    """Pure Python: every choice is one the launcher accepts, for shapes from 64 to 128K rows."""
    for tokens in range(1, cuda_backend.FEW_MAX_TOKENS_NARROW + 1):
        for out_f, in_f in [(64, 64), (4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192),
                            (128256, 4096), (256, 64 * 3)]:
            for sms in (1, 108, 132):
                tt, rows, warps = cuda_backend.matmul_config(tokens, out_f, in_f, sms)
                assert tt in cuda_backend.TOKEN_TILES and (tokens <= tt or tt == cuda_backend.TOKEN_TILES[-1])
                assert rows in cuda_backend.ROW_TILES and not (tt == 32 and rows == 64)
                assert 1 <= warps <= 8 and warps * (tt // 8) <= 64


def test_fused_path_is_the_cuda_backends_few_token_matmul():
    assert backends._AUTO_ORDER_CUDA["matmul"][0] == "cuda"
    x = torch.empty(3, 128, dtype=torch.bfloat16)
    assert cuda_backend.fused_matmul_supported(x.dtype, 64, 256, 128)
    assert not cuda_backend.fused_matmul_supported(x.dtype, 32, 256, 128)    # groups straddle blocks
    assert not cuda_backend.fused_matmul_supported(x.dtype, 64, 256, 96)     # K not whole groups
    assert not cuda_backend.fused_matmul_supported(x.dtype, 256, 256, 384)   # K not whole blocks
    assert not cuda_backend.fused_matmul_supported(x.dtype, 64, 2**25, 2**12)  # 2^31 groups: 32-bit indices


@gpu
@pytest.mark.parametrize("rows", [384, 8192])
@pytest.mark.parametrize("tokens", [1, 32, 33, 64, 65, 128, 129, 200])
def test_automatic_choice_across_the_token_threshold(tokens, rows):
    """Auto backend: the few-token kernel up to FUSED_MAX_TOKENS (FEW_MAX_TOKENS_NARROW below
    TILED_MIN_ROWS rows), the wgmma kernel up to WGMMA_MAX_TOKENS on Hopper (else the tiled
    kernel up to TILED_MAX_TOKENS), Triton's matmul (or dequantize + cuBLAS without Triton)
    above; with the cuda backend forced, dequantize + cuBLAS above."""
    packed, state = _weight(rows, 1024)
    W32 = fp32_weight(packed, state)
    x = _x(tokens, 1024, torch.bfloat16)
    nf4.set_backend(None)
    check(nf4.matmul_4bit(x, packed.t(), state), x, W32)
    nf4.set_backend("cuda")
    try:
        check(nf4.matmul_4bit(x, packed.t(), state), x, W32)
    finally:
        nf4.set_backend(None)


def test_fused_kernel_routing(monkeypatch):
    """Which fused kernel ``matmul`` runs, with and without the wgmma kernel."""
    for hopper in (True, False):
        monkeypatch.setattr(cuda_backend, "wgmma_available", lambda device, h=hopper: h)
        middle = "wgmma" if hopper else "tiled"
        top = cuda_backend.WGMMA_MAX_TOKENS if hopper else cuda_backend.TILED_MAX_TOKENS
        for rows in (4096, 14336):
            narrow = rows < cuda_backend.TILED_MIN_ROWS
            for tokens in (1, cuda_backend.FUSED_MAX_TOKENS, cuda_backend.FUSED_MAX_TOKENS + 1,
                           cuda_backend.FEW_MAX_TOKENS_NARROW, cuda_backend.FEW_MAX_TOKENS_NARROW + 1,
                           top, top + 1):
                got = cuda_backend.fused_kernel(tokens, rows, torch.device("cuda", 0))
                if tokens <= cuda_backend.FUSED_MAX_TOKENS or (narrow and tokens <= cuda_backend.FEW_MAX_TOKENS_NARROW):
                    assert got == "few"
                elif tokens <= top:
                    assert got == middle
                else:
                    assert got is None


# --- the tiled kernel (csrc/matmul_tiled.cu) ---

def _exact_check(y, x, packed, state, bias=None):
    """See Note: exact dequantization in csrc/matmul_tiled.cu: y differs from x @ W.T, with W the
    reference's dequantization in x's dtype, only by fp32 summation order and the output's
    rounding."""
    from nf4 import codebook, reference_backend
    s2 = state.state2
    nested = (s2.absmax, s2.code, state.offset) if state.nested else (None, None, None)
    W = reference_backend.dequantize(packed.reshape(-1), state.absmax, *nested, state.blocksize,
                                     codebook.NESTED_BLOCKSIZE, state.quant_type, list(state.shape), x.dtype)
    x32, W32 = x.float(), W.float()
    b32 = bias.float() if bias is not None else torch.zeros(W.shape[0], device=x.device)
    ref = x32 @ W32.T + b32
    u = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-11
    bound = x.shape[-1] * 2.0**-24 * (x32.abs() @ W32.abs().T + b32.abs()) + u * ref.abs() + 1e-30
    worst = ((y.float() - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"error exceeds the summation-order bound by {worst:.3g}x"


@gpu
@pytest.mark.parametrize("config", cuda_backend.tiled_configs(), ids=str)
def test_every_tiled_config(config):
    # 200 rows (no CTA row count divides it), K = 64 * 11 (the last stage is partial for 2 and 4
    # warps along K), tokens below, at and past one CTA's token tile.
    packed, state = _weight(200, 64 * 11)
    W32 = fp32_weight(packed, state)
    bias = _x(1, 200, torch.bfloat16, seed=5).reshape(-1)
    for tokens in (1, 33, 8 * config[1], 8 * config[1] + 5):
        x = _x(tokens, 64 * 11, torch.bfloat16)
        y = cuda_backend.tiled_matmul(x, *_args(packed, state), bias, config=config)
        check(y, x, W32, bias)
        _exact_check(y, x, packed, state, bias)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256, 1024])
@pytest.mark.parametrize("tokens", [33, 128, 300])
def test_tiled_formats(dtype, quant_type, double_quant, blocksize, tokens):
    packed, state = _weight(96, 2048, quant_type, double_quant, blocksize)
    x = _x(tokens, 2048, dtype)
    y = cuda_backend.tiled_matmul(x, *_args(packed, state), None)
    check(y, x, fp32_weight(packed, state))
    _exact_check(y, x, packed, state)


@gpu
def test_tiled_on_a_side_stream_and_large_shapes():
    packed, state = _weight(4096, 4096)
    x = _x(128, 4096, torch.bfloat16)
    expected = cuda_backend.tiled_matmul(x, *_args(packed, state), None)
    _exact_check(expected, x, packed, state)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuda_backend.tiled_matmul(x, *_args(packed, state), None)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@gpu
def test_tiled_binding_refuses_unbuilt_tiles():
    packed, state = _weight(64, 128)
    x = _x(40, 128, torch.bfloat16)
    for config in [(2, 16, 4), (3, 8, 1), (2, 4, 1), (2, 8, 3), (2, 8, 8), (2, 8, 0)]:
        with pytest.raises(RuntimeError, match="BAD_SIZE"):
            cuda_backend.tiled_matmul(x, *_args(packed, state), None, config=config)


def test_tiled_heuristic_picks_built_tiles():
    built = set(cuda_backend.tiled_configs())
    assert (2, 16, 4) not in built and len(built) == 8
    for tokens in range(cuda_backend.FUSED_MAX_TOKENS + 1, cuda_backend.TILED_MAX_TOKENS + 1, 7):
        for out_f, in_f in [(64, 64), (4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (128256, 4096)]:
            for sms in (1, 108, 132):
                assert cuda_backend.tiled_config(tokens, out_f, in_f, sms) in built


# --- the Hopper kernel (csrc/matmul_wgmma.cu) ---

def _need_wgmma():
    if not cuda_backend.wgmma_available(torch.device("cuda")):
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU and an sm_90a build")


@gpu
@pytest.mark.parametrize("config", cuda_backend.WGMMA_CONFIGS, ids=str)
@pytest.mark.parametrize("groups", [11, 2, 1], ids=lambda g: f"K=64*{g}")
def test_every_wgmma_config(config, groups):
    _need_wgmma()
    # 200 rows (the CTA's 128 do not divide it); K = 64 * 11: an odd group count (the last stage
    # holds one group), 6 stages split unevenly across 2 or 4 CTAs; K = 128 and 64: one stage,
    # so that with k_split > 1 some CTAs of the cluster have no stage and add zeros.
    K = 64 * groups
    packed, state = _weight(200, K)
    W32 = fp32_weight(packed, state)
    bias = _x(1, 200, torch.bfloat16, seed=5).reshape(-1)
    for tokens in (1, 33, 64 * config[0], 64 * config[0] + 5):
        x = _x(tokens, K, torch.bfloat16)
        y = cuda_backend.wgmma_matmul(x, *_args(packed, state), bias, config=config)
        check(y, x, W32, bias)
        _exact_check(y, x, packed, state, bias)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256, 1024])
@pytest.mark.parametrize("tokens", [33, 128, 300])
def test_wgmma_formats(dtype, quant_type, double_quant, blocksize, tokens):
    _need_wgmma()
    packed, state = _weight(96, 2048, quant_type, double_quant, blocksize)
    x = _x(tokens, 2048, dtype)
    y = cuda_backend.wgmma_matmul(x, *_args(packed, state), None)
    check(y, x, fp32_weight(packed, state))
    _exact_check(y, x, packed, state)


@gpu
def test_wgmma_large_shape_and_side_stream():
    _need_wgmma()
    packed, state = _weight(4096, 4096)
    x = _x(128, 4096, torch.bfloat16)
    expected = cuda_backend.wgmma_matmul(x, *_args(packed, state), None)
    _exact_check(expected, x, packed, state)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuda_backend.wgmma_matmul(x, *_args(packed, state), None)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@gpu
def test_wgmma_refusals():
    packed, state = _weight(64, 128)
    x = _x(40, 128, torch.bfloat16)
    if not cuda_backend.wgmma_available(torch.device("cuda")):
        with pytest.raises(RuntimeError, match="UNSUPPORTED_DEVICE"):
            cuda_backend.wgmma_matmul(x, *_args(packed, state), None, config=(1, 1))
        return
    for config in [(3, 1), (1, 3), (0, 1), (4, 2), (1, 8), (2, 0)]:
        with pytest.raises(RuntimeError, match="BAD_SIZE"):
            cuda_backend.wgmma_matmul(x, *_args(packed, state), None, config=config)


def test_wgmma_heuristic_picks_built_configs():
    for tokens in range(cuda_backend.FUSED_MAX_TOKENS + 1, 4 * cuda_backend.WGMMA_MAX_TOKENS + 1, 7):
        for out_f, in_f in [(64, 64), (4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]:
            for sms in (1, 132):
                assert cuda_backend.wgmma_config(tokens, out_f, in_f, sms) in cuda_backend.WGMMA_CONFIGS
