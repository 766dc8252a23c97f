"""The ``cuda`` backend: the compiled extension ``nf4._C`` behind the backend protocol
(``quantize``, ``dequantize``, ``matmul`` with the signatures of ``nf4.reference_backend``).

Importing this module raises ImportError when ``nf4._C`` was not built, so that
``nf4.backends`` falls back to another backend.

The extension takes raw device pointers, element counts, the device index and the current
stream's handle, and returns a status code; this module owns allocation and turns a non-OK
status into an exception naming the sizes. Metadata has been validated by ``nf4.ops`` already;
the extension checks pointers, sizes and 32-bit grid limits again before any launch.

Note: double-quantization offset.
    The offset is ``absmax.mean()`` computed by torch on the GPU, between the two quantize
    launches, because that is the reduction bitsandbytes uses: its result (and hence every nested
    code) then matches bnb bit for bit. The CPU reference's mean may differ in the last bit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nf4 import _C, backends, codebook
from nf4.quant_state import num_blocks, packed_nbytes
from nf4.weight import kernel_tensors

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_QUANT_TYPE_CODES = {"nf4": 0, "fp4": 1}

# Encoder cells (see EncodeTable in csrc/common.cuh): cell k = floor(key * 16 + offset) mod 64 with
# key = x in [-1, 1] (NF4, offset 16) or |x| in [0, 1] (FP4, offset 0). 1/16 is narrower than the
# closest pair of thresholds (FP4's 0.208 and 0.292, 0.083 apart), so a cell holds at most one.
ENCODE_CELLS = 64
CELL_SCALE = 16.0
CELL_OFFSET = {"nf4": 16.0, "fp4": 0.0}


def encode_cells(thresholds: Sequence[float], offset: float) -> tuple[list[float], list[int]]:
    """(inside, below) per cell: the threshold inside it (+inf if none) and the number below it.

    Cell k covers keys in [(j - offset) / 16, (j + 1 - offset) / 16) with j = k, or j = k - 64 for
    k >= 48 (a negative floor wraps around; NaN's bits 0x7fffffff land in k = 63, j = -1)."""
    inside, below = [], []
    for k in range(ENCODE_CELLS):
        j = k if k < ENCODE_CELLS * 3 // 4 else k - ENCODE_CELLS
        lo, hi = (j - offset) / CELL_SCALE, (j + 1 - offset) / CELL_SCALE
        within = [t for t in thresholds if lo <= t < hi]
        if len(within) > 1:
            raise ValueError(f"encoder cell [{lo}, {hi}) holds {len(within)} thresholds {within}; "
                             f"cells must be narrower than the closest pair of thresholds")
        inside.append(within[0] if within else math.inf)
        below.append(sum(t < lo for t in thresholds))
    return inside, below


def _encode_table(quant_type: str) -> "_C.EncodeTable":
    if quant_type == "nf4":
        thresholds = codebook.nf4_thresholds().tolist()
    else:
        thresholds = codebook.fp4_thresholds().tolist()
    inside, below = encode_cells(thresholds, CELL_OFFSET[quant_type])
    fp4_codes = sum(int(c) << (4 * i) for i, c in enumerate(codebook.fp4_sorted_codes().tolist()))
    return _C.EncodeTable(inside, below, CELL_SCALE, CELL_OFFSET[quant_type], fp4_codes,
                          codebook.zero_code(quant_type))


# Tables for the kernels, built once from nf4.codebook (the kernels hold no copy of their own).
_ENCODE = {qt: _encode_table(qt) for qt in codebook.QUANT_TYPES}
_DECODE = {qt: _C.DecodeTable(codebook.levels(qt).tolist()) for qt in codebook.QUANT_TYPES}
_NESTED = _C.NestedTable(codebook.dynamic_map_thresholds().tolist() + [math.inf],
                         codebook.NESTED_FLAT_CODE)


# The current stream's raw handle without building a torch.cuda.Stream object (~30 us of host
# time per call on the H100 machine's CPU, twice a QLoRA step): the private binding Triton's
# launcher uses too, with the public call where a torch build lacks it.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    return _stream_of(device.index)


def _stream_of(index: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


_OK = _C.Status.OK


def _check(status, op: str, **sizes) -> None:
    if status == _OK:
        return
    detail = ", ".join(f"{k}={v}" for k, v in sizes.items())
    why = status.name
    if status in (_C.Status.LAUNCH_FAILED, _C.Status.BAD_DEVICE):
        why += f" ({_C.last_cuda_error()})"
    raise RuntimeError(f"nf4 CUDA {op} failed: {why} for {detail}")


def native_weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                  quant_type, rows, cols) -> "_C.QuantWeight":
    """The extension's ``QuantWeight`` (device pointers, sizes, decode table) of a weight given as
    the backends' positional arguments. The tensors must be contiguous and stay alive as long as
    the result is used (``nf4.weight.PackedWeight`` holds both)."""
    nested = nested_absmax is not None
    return _C.QuantWeight(packed.data_ptr(), absmax.data_ptr(), nested,
                          nested_absmax.data_ptr() if nested else 0,
                          nested_code.data_ptr() if nested else 0,
                          offset.data_ptr() if nested else 0, blocksize, nested_blocksize if nested else 0,
                          rows, cols, _DECODE[quant_type])


def _require_cuda(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got {name} on {t.device}")


def quantize(A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    _require_cuda(A, "A")
    A = A.contiguous()
    n = A.numel()
    blocks = num_blocks(n, blocksize)
    device = A.device
    packed = torch.empty(packed_nbytes(n), dtype=torch.uint8, device=device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    stream = _stream(device)
    status = _C.quantize(A.data_ptr(), _DTYPE_CODES[A.dtype], n, blocksize, _QUANT_TYPE_CODES[quant_type],
                         packed.data_ptr(), absmax.data_ptr(), _ENCODE[quant_type], device.index, stream)
    _check(status, "quantize", n=n, dtype=A.dtype, blocksize=blocksize, quant_type=quant_type)
    if not double_quant:
        return packed, absmax, absmax.new_empty(0), absmax.new_zeros(())
    # See Note: double-quantization offset.
    offset = absmax.mean()
    nested_bs = codebook.NESTED_BLOCKSIZE
    codes = torch.empty(blocks, dtype=torch.uint8, device=device)
    nested_absmax = torch.empty(num_blocks(blocks, nested_bs), dtype=torch.float32, device=device)
    status = _C.quantize_absmax(absmax.data_ptr(), blocks, offset.data_ptr(), nested_bs, codes.data_ptr(),
                                nested_absmax.data_ptr(), _NESTED, device.index, stream)
    _check(status, "quantize (nested absmax)", blocks=blocks, nested_blocksize=nested_bs)
    return packed, codes, nested_absmax, offset


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
               nested_blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    _require_cuda(packed, "packed")
    n = math.prod(shape)
    tensors = kernel_tensors(packed, absmax, nested_absmax, nested_code, offset)
    native = native_weight(*tensors, blocksize, nested_blocksize, quant_type, 1, n)
    return _dequantize(native, packed.device, list(shape), dtype, out)


def launch_dequantize(weight, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode a ``nf4.weight.PackedWeight`` (checked when it was built) into ``dtype``."""
    return _dequantize(weight.native(), weight.device, list(weight.shape), dtype, out)


def _dequantize(native, device: torch.device, shape: list, dtype: torch.dtype, out: Optional[torch.Tensor]):
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    status = _C.dequantize(native, out.data_ptr(), _DTYPE_CODES[dtype], device.index, _stream(device))
    if status != _OK:
        _check(status, "dequantize", shape=shape, dtype=dtype, blocksize=native.blocksize)
    return out


# Tokens up to which ``matmul`` runs the few-token kernel of csrc/matmul.cu (one read of the
# packed weight, decoded in registers, tensor-core products; it reads the weight once per 32
# tokens), and up to FEW_MAX_TOKENS_NARROW on weights of fewer than TILED_MIN_ROWS rows. Above
# that, up to WGMMA_MAX_TOKENS, the Hopper kernel of csrc/matmul_wgmma.cu where it runs (TMA
# copies, wgmma), elsewhere the tiled mma.sync kernel of csrc/matmul_tiled.cu up to
# TILED_MAX_TOKENS. Above: dequantization and cuBLAS. All from the H100 sweeps (``python -m
# bench.bench_matmul --sweep --cuda``, bench/RESULTS.md): at 64 tokens the wgmma kernel beat the
# few-token one on 14336 and 28672 rows (0.73x / 0.82x bf16 against 1.33x / 1.26x) and lost on
# 4096 rows (1.21x / 1.10x against 1.00x / 0.92x); at 128 tokens it beat the tiled kernel on all
# four Llama shapes (0.86-1.17x against 1.46-1.75x); at 512 it lost to dequantization + cuBLAS.
# (Without wgmma: at 64 tokens the tiled kernel beat the few-token one on 14336 and 28672 rows
# and lost on 4096; at 128 it beat Triton's matmul on all four shapes; at 256 and 512 it lost to
# dequantization + cuBLAS.)
FUSED_MAX_TOKENS = 32
FEW_MAX_TOKENS_NARROW = 64
TILED_MIN_ROWS = 8192
TILED_MAX_TOKENS = 128
WGMMA_MAX_TOKENS = 256
# The kernel's tile choices: tokens per CTA (8, 16, 32), output rows per CTA (16, 32, 64; 64 only
# with token tiles up to 16) and warps per CTA (they split K; at most 8, the kernel's launch
# bound, and warps * token_tile / 8 <= 64). FEW_WARPS: the warp counts the sweep tries.
TOKEN_TILES = (8, 16, 32)
ROW_TILES = (16, 32, 64)
FEW_WARPS = (4, 8)
# Groups per warp from which the kernel takes chunks of 4 groups (kLongChunkMinGroups in
# csrc/matmul.cu; one token tile of 16 rows).
LONG_CHUNK_MIN_GROUPS = 32


def fused_matmul_supported(dtype: torch.dtype, blocksize: int, out_features: int, in_features: int) -> bool:
    """Whether the fused kernel takes this input: fp16/bf16, whole 64-wide groups per row, absmax
    blocks that hold whole groups (see Note: one scale per group in csrc/matmul.cu) and fewer
    than 2^31 groups in the weight (the kernel's 32-bit block indices)."""
    return (dtype in (torch.float16, torch.bfloat16) and in_features % 64 == 0
            and blocksize >= 64 and in_features % blocksize == 0
            and out_features * (in_features // 64) < 2**31)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def matmul_config(tokens: int, out_features: int, in_features: int, sms: int) -> tuple[int, int, int]:
    """(token_tile, rows_per_cta, warps) for the fused kernel, from the H100 sweep
    (``python -m bench.bench_matmul --sweep --cuda``, bench/RESULTS.md):

    - up to 16 tokens: 16 rows per CTA; warps (which split K) as many as keep about 2048 warps in
      the grid, at least 4; with one token tile, 4 warps wherever that gives each 32 or more
      64-wide groups (the kernel then takes chunks of 4 groups: 4096x14336 and 28672x8192);
    - more: 32 rows per CTA, 8 warps up to 32 tokens and 4 above (several token tiles).

    In every case no more warps than leave each one two groups."""
    token_tile = next((t for t in TOKEN_TILES if tokens <= t), TOKEN_TILES[-1])
    groups = in_features // 64
    if token_tile == TOKEN_TILES[-1]:
        rows, warps = ROW_TILES[1], (FEW_WARPS[-1] if tokens <= token_tile else FEW_WARPS[0])
    else:
        rows = ROW_TILES[0]
        ctas = -(-out_features // rows) * -(-tokens // token_tile)
        warps = FEW_WARPS[-1]
        while warps > 4 and ctas * warps > 2048:
            warps //= 2
        if token_tile == TOKEN_TILES[0] and groups >= LONG_CHUNK_MIN_GROUPS * FEW_WARPS[0]:
            warps = FEW_WARPS[0]
    while warps > 1 and groups < 2 * warps:
        warps //= 2
    warps = min(warps, 64 // (token_tile // 8))
    return token_tile, rows, warps


def few_token_kernel_preferred(tokens: int, out_features: int) -> bool:
    """Whether ``matmul`` runs the few-token kernel rather than the tiled or wgmma one (see the
    thresholds above)."""
    return tokens <= FUSED_MAX_TOKENS or (tokens <= FEW_MAX_TOKENS_NARROW and out_features < TILED_MIN_ROWS)


def fused_kernel(tokens: int, out_features: int, device: torch.device) -> Optional[str]:
    """The fused kernel ``matmul`` runs for this many tokens on ``device`` ("few", "wgmma" or
    "tiled"), or None for dequantization + cuBLAS (callers check ``fused_matmul_supported``)."""
    if few_token_kernel_preferred(tokens, out_features):
        return "few"
    if tokens <= WGMMA_MAX_TOKENS and wgmma_available(device):
        return "wgmma"
    if tokens <= TILED_MAX_TOKENS:
        return "tiled"
    return None


# The tiled kernel of csrc/matmul_tiled.cu for mid-size batches: x staged in shared memory and
# shared by all warps of a CTA. Its tiles: (row_tiles, token_tiles) m16 / n8 tiles per warp, and
# warps along K (8 warps per CTA); (2, 16) is not built with 4 warps along K (shared memory).
TILED_TILES = ((2, 8), (4, 8), (2, 16))
TILED_K_WARPS = (1, 2, 4)


def tiled_configs() -> list[tuple[int, int, int]]:
    """Every (row_tiles, token_tiles, k_warps) the tiled kernel is built for."""
    return [(r, nt, wk) for r, nt in TILED_TILES for wk in TILED_K_WARPS if not (nt == 16 and wk == 4)]

def tiled_config(tokens: int, out_features: int, in_features: int, sms: int) -> tuple[int, int, int]:
    """(row_tiles, token_tiles, k_warps) for the tiled kernel, from the H100 sweep: 64 tokens per
    CTA up to 64 tokens, 128 above; warps along K only while the rows alone would leave more than
    a fifth of the SMs without a CTA (a CTA holds 8 / k_warps * 16 * row_tiles rows): at 64 and
    128 tokens that picked the fastest k_warps on all four Llama shapes."""
    if tokens <= 64:
        r, nt = (4, 8) if out_features > 16384 else (2, 8)
    else:
        r, nt = (2, 8) if out_features <= 4096 else (2, 16)
    token_ctas = -(-tokens // (8 * nt))
    built = tiled_configs()
    choices = [wk for wk in TILED_K_WARPS if (r, nt, wk) in built]
    for wk in choices:
        rows = 8 // wk * 16 * r
        if 5 * token_ctas * -(-out_features // rows) >= 4 * sms:
            return r, nt, wk
    return r, nt, choices[-1]


# The Hopper kernel of csrc/matmul_wgmma.cu (wgmma, sm_90a builds on compute capability 9.0):
# (token_chunks of 64 tokens per CTA, k_split CTAs along K in a thread-block cluster). A CTA holds
# 128 output rows.
WGMMA_TOKEN_CHUNKS = (1, 2)
WGMMA_SPLITS = (1, 2, 4)
WGMMA_CONFIGS = tuple((c, s) for c in WGMMA_TOKEN_CHUNKS for s in WGMMA_SPLITS)
_WGMMA: dict[int, bool] = {}


def wgmma_available(device: torch.device) -> bool:
    """Whether ``wgmma_matmul`` runs on ``device`` (cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _WGMMA:
        _WGMMA[index] = bool(_C.wgmma_available(index))
    return _WGMMA[index]


def wgmma_config(tokens: int, out_features: int, in_features: int, sms: int) -> tuple[int, int]:
    """(token_chunks, k_split), from the H100 sweep (bench/RESULTS.md): two CTAs along K where
    the tiles alone would leave more than half of the SMs idle (and each CTA still gets 8 stages
    of 2 groups); 128 tokens per CTA above 64 tokens where that, split or not, gives the SMs four
    fifths of a wave or more, else 64. At 64, 128 and 256 tokens that picked the fastest
    configuration on all four Llama shapes (four CTAs along K never won)."""
    row_tiles = -(-out_features // 128)
    can_split = in_features // 128 >= 2 * 8

    def split_for(ctas: int) -> int:
        return 2 if can_split and 2 * ctas <= sms else 1

    wide = -(-tokens // 128) * row_tiles
    if tokens > 64 and 5 * wide * split_for(wide) >= 4 * sms:
        return WGMMA_TOKEN_CHUNKS[-1], split_for(wide)
    narrow = -(-tokens // 64) * row_tiles
    return WGMMA_TOKEN_CHUNKS[0], split_for(narrow)


# The fused kernels by the names ``fused_kernel`` returns: the extension's kernel number and the
# default configuration function.
MATMUL_KERNELS = {"few": _C.MATMUL_FEW_TOKEN, "tiled": _C.MATMUL_TILED, "wgmma": _C.MATMUL_WGMMA}
FUSED_CONFIGS = {"few": matmul_config, "wgmma": wgmma_config, "tiled": tiled_config}


def route(dtype: torch.dtype, tokens: int, out_features: int, in_features: int, blocksize: int,
          device: torch.device) -> tuple[str, object]:
    """(kernel, config) of ``nf4.backends.route`` for this backend: the fused kernel that
    ``fused_kernel`` names where ``fused_matmul_supported``, with its launch arguments (the
    extension's kernel number and three config values); otherwise Triton's fused kernels where
    they run and no backend was forced (fp32 inputs at a few tokens), else ``"dequant"``: this
    backend's dequantization (the fastest) and cuBLAS."""
    if fused_matmul_supported(dtype, blocksize, out_features, in_features):
        kernel = fused_kernel(tokens, out_features, device)
        if kernel is not None:
            return kernel, _launch_config(kernel, FUSED_CONFIGS[kernel](tokens, out_features, in_features,
                                                                        _sm_count(device)))
    if backends.forced() is None and backends.supports("triton", device):
        kernel, config = backends._load("triton").route(dtype, tokens, out_features, in_features, blocksize,
                                                         device)
        if kernel != "dequant":
            return "triton:" + kernel, config
    return "dequant", None


def _launch_config(kernel: str, config: tuple) -> tuple[int, int, int, int]:
    """The extension's (kernel number, c0, c1, c2) for a fused kernel's config."""
    return (MATMUL_KERNELS[kernel], *config, *(0,) * (3 - len(config)))


def launch_matmul(weight, A2: torch.Tensor, tokens: int, bias: Optional[torch.Tensor],
                  launch: tuple[int, int, int, int]) -> torch.Tensor:
    """y [tokens, rows] = A2 [tokens, cols] @ W.T + bias by a fused kernel, for a
    ``nf4.weight.PackedWeight`` (checked when built) or an object with the same ``native()``,
    ``out_features``, ``in_features``, ``device_index``; ``launch`` from ``route``. A2: 2-D, at
    least one row; bias in A2's dtype on its device."""
    if A2.data_ptr() % 16 or not A2.is_contiguous():  # the kernels load 16 bytes of x at a time
        A2 = A2.clone(memory_format=torch.contiguous_format)  # the caching allocator aligns to 512
    y = A2.new_empty((tokens, weight.out_features))
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    index = weight.device_index
    kernel, c0, c1, c2 = launch
    status = _C.matmul(weight.native(), kernel, c0, c1, c2, A2.data_ptr(), _DTYPE_CODES[A2.dtype], tokens,
                       0 if bias is None else bias.data_ptr(), y.data_ptr(), index, _stream_of(index))
    if status != _OK:
        _check(status, "matmul", kernel=kernel, tokens=tokens, out_features=weight.out_features,
               in_features=weight.in_features, dtype=A2.dtype, config=(c0, c1, c2))
    return y


class _Unchecked:
    """A weight given as the backends' positional arguments (checked by nf4.ops), with the
    ``PackedWeight`` attributes ``launch_matmul`` reads."""

    def __init__(self, tensors, blocksize, nested_blocksize, quant_type, out_features, in_features):
        self.tensors = tensors  # keeps the memory alive while the struct points at it
        self._native = native_weight(*tensors, blocksize, nested_blocksize, quant_type, out_features,
                                     in_features)
        self.out_features, self.in_features = out_features, in_features
        self.device_index = tensors[0].get_device()

    def native(self):
        return self._native


def matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
           quant_type, out_features, in_features, bias, config=None, kernel: Optional[str] = None):
    """Backend protocol: ``A @ W.T + bias`` in A's dtype, on the route ``route`` picks (or the
    fused ``kernel`` with ``config``, for tests and the sweep; ``config`` None: its default)."""
    _require_cuda(A, "A")
    lead = A.shape[:-1]
    A2 = A.reshape(-1, in_features)
    tokens = A2.shape[0]
    if tokens == 0:
        return A.new_empty((*lead, out_features))
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)
    if kernel is None:
        kernel, routed = route(A.dtype, tokens, out_features, in_features, blocksize, A.device)
        config = config or routed
    elif config is None:
        config = FUSED_CONFIGS[kernel](tokens, out_features, in_features, _sm_count(A.device))
    tensors = kernel_tensors(packed, absmax, nested_absmax, nested_code, offset)
    if kernel == "dequant":
        W = dequantize(*tensors, blocksize, nested_blocksize, quant_type, (out_features, in_features), A.dtype)
        y = F.linear(A2, W, bias)
    elif kernel.startswith("triton:"):
        y = backends._load("triton").matmul(A2, *tensors, blocksize, nested_blocksize, quant_type,
                                             out_features, in_features, bias, config=config)
    else:
        weight = _Unchecked(tensors, blocksize, nested_blocksize, quant_type, out_features, in_features)
        launch = config if len(config) == 4 else _launch_config(kernel, config)
        y = launch_matmul(weight, A2, tokens, bias, launch)
    # A 2-D input gets y itself: reshape to the same shape would return a view, which autograd
    # forbids modifying in place when it leaves a custom Function (RoPE rotates q, k in place).
    return y if A.dim() == 2 else y.reshape(*lead, out_features)


def fused_matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                 quant_type, out_features, in_features, bias, config=None):
    """``A @ W.T + bias`` by the few-token kernel (callers check ``fused_matmul_supported``).
    ``config``: (token_tile, rows_per_cta, warps), default ``matmul_config``'s."""
    return matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                  quant_type, out_features, in_features, bias, config=config, kernel="few")


def tiled_matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                 quant_type, out_features, in_features, bias, config=None):
    """``A @ W.T + bias`` by the tiled kernel. ``config``: (row_tiles, token_tiles, k_warps)."""
    return matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                  quant_type, out_features, in_features, bias, config=config, kernel="tiled")


def wgmma_matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                 quant_type, out_features, in_features, bias, config=None):
    """``A @ W.T + bias`` by the Hopper kernel (callers check ``wgmma_available``). ``config``:
    (token_chunks, k_split)."""
    return matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                  quant_type, out_features, in_features, bias, config=config, kernel="wgmma")


def dequantized_matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                       quant_type, out_features, in_features, bias):
    """``A @ W.T + bias`` with W dequantized by this backend into A's dtype, then cuBLAS."""
    return matmul(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                  quant_type, out_features, in_features, bias, kernel="dequant")


# The fused kernels by name, for the sweep and profile_matmul.
FUSED_MATMULS = {"few": fused_matmul, "wgmma": wgmma_matmul, "tiled": tiled_matmul}
