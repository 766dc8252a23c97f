"""The reference engine against an fp32/fp64 model of the maths written independently here.

The model: scale each block by its absmax, pick the NEAREST level by brute force (argmin over all
16), compare. Properties from hypothesis (fixed seed, capped examples): codes are the nearest
level, round-trip error within half a code step times absmax, idempotence, block independence,
dtype/shape preservation, and the double-quant error bound.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import nf4
from nf4 import codebook, reference

# 150 examples: each costs a few ms on these sizes (<= 3000 values); the whole file takes ~20 s.
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw, max_numel=3000):
    ndim = draw(st.integers(1, 3))
    dims = [draw(st.integers(1, 40)) for _ in range(ndim - 1)]
    rest = max(1, max_numel // max(1, math.prod(dims)))
    shape = dims + [draw(st.integers(1, rest))]
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    dist = draw(st.sampled_from(["normal", "uniform", "outliers", "sparse", "tiny", "on_thresholds",
                                 "signed_zeros"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if dist == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    elif dist == "outliers":
        x = x + (torch.rand(shape, generator=g) < 0.01) * 100.0
    elif dist == "sparse":
        x = x * (torch.rand(shape, generator=g) < 0.3)
    elif dist == "tiny":
        x = x * 1e-3
    elif dist == "on_thresholds":
        # Every value a decision threshold (either format's, either sign) times m, and every 32nd
        # value m itself, so that each block's absmax is m and its values scale onto thresholds.
        thr = torch.cat([codebook.nf4_thresholds(), codebook.fp4_thresholds(), -codebook.fp4_thresholds()])
        m = draw(st.sampled_from([1.0, 0.75, 3.0, 1e-3]))
        x = thr[torch.randint(thr.numel(), shape, generator=g)] * m
        x.view(-1)[::32] = m
    elif dist == "signed_zeros":
        zeros = torch.rand(shape, generator=g) < 0.3
        x = torch.where(zeros, torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0), x)
    return x.to(dtype)


blocksizes = st.sampled_from([32, 64, 128, 256, 1024, 4096])
quant_types = st.sampled_from(["nf4", "fp4"])


def model_codes(x: torch.Tensor, blocksize: int, quant_type: str):
    """Nearest level by brute force in float64: (codes, scaled values, absmax per element)."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    scaled = torch.where(absmax > 0, blocks / absmax, torch.zeros_like(blocks)).reshape(-1)[:n]
    levels = codebook.levels(quant_type).double()
    codes = (scaled[:, None] - levels[None, :]).abs().argmin(1)
    return codes, scaled, absmax.expand(-1, blocksize).reshape(-1)[:n]


def near_a_midpoint(scaled: torch.Tensor, quant_type: str, tol: float = 1e-6) -> torch.Tensor:
    lv = codebook.levels(quant_type).double().sort().values
    mids = (lv[:-1] + lv[1:]) / 2
    return ((scaled[:, None] - mids[None, :]).abs() < tol).any(1)


@SETTINGS
@given(x=tensors(), blocksize=blocksizes, quant_type=quant_types)
def test_codes_are_the_nearest_level(x, blocksize, quant_type):
    packed, absmax = reference.quantize(x, blocksize, quant_type)
    ours = reference.unpack(packed, x.numel())
    expected, scaled, am = model_codes(x, blocksize, quant_type)
    levels = codebook.levels(quant_type).double()
    # The model ranks levels by value; where two codes share a value (fp4's +0/-0) compare values.
    same = levels[ours] == levels[expected]
    zero_block = am == 0
    undecided = near_a_midpoint(scaled, quant_type)
    assert bool((same | zero_block | undecided).all())
    assert bool((ours[zero_block] == 0).all())
    torch.testing.assert_close(absmax, reference.blockwise_absmax(x.reshape(-1), blocksize), rtol=0, atol=0)


@SETTINGS
@given(x=tensors(), blocksize=blocksizes, quant_type=quant_types)
def test_round_trip_error_within_half_a_step(x, blocksize, quant_type):
    packed, state = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    out = nf4.dequantize_4bit(packed, state)
    assert out.dtype == x.dtype and out.shape == x.shape
    _, scaled, am = model_codes(x, blocksize, quant_type)
    lv = codebook.levels(quant_type).double().sort().values
    # Half the gap between the two levels around each scaled value.
    idx = torch.bucketize(scaled.clamp(-1, 1), lv).clamp(1, len(lv) - 1)
    half_gap = (lv[idx] - lv[idx - 1]) / 2
    err = (out.reshape(-1).double() - x.reshape(-1).double()).abs()
    # Plus the rounding of the output dtype (half an ulp of |x| <= absmax) and of fp32 scaling.
    eps = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[x.dtype]
    bound = am * (half_gap + 1e-6) + am * eps
    assert bool((err <= bound).all()), float((err - bound).max())


def _per_element_dequantize(packed, absmax, blocksize, quant_type, numel, dtype):
    """The formula the byte-pair decoder replaced (see Note: byte-pair decoding in nf4/reference.py):
    one code per element, its level times its block's absmax in float32, then the cast."""
    codes = reference.unpack(packed, numel)
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (codebook.levels(quant_type)[codes] * scale).to(dtype)


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@SETTINGS
@given(numel=st.integers(0, 5000), blocksize=blocksizes, quant_type=quant_types,
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       scales=st.sampled_from(["normal", "zeros", "extreme"]), into_out=st.booleans())
def test_byte_pair_decoding_is_bit_identical_to_the_per_element_formula(numel, blocksize, quant_type, dtype,
                                                                         seed, scales, into_out):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), generator=g, dtype=torch.uint8)
    blocks = -(-numel // blocksize)
    absmax = torch.rand(blocks, generator=g) * 4
    if scales == "zeros":  # all-zero blocks decode to signed zeros
        absmax = absmax * (torch.rand(blocks, generator=g) < 0.5)
    elif scales == "extreme":  # overflow to inf in fp16/bf16, subnormals, rounding at every magnitude
        absmax = torch.exp2(torch.randint(-140, 128, (blocks,), generator=g).float()) * (1 + absmax)
    want = _per_element_dequantize(packed, absmax, blocksize, quant_type, numel, dtype)
    out = torch.full((numel,), float("nan"), dtype=dtype) if into_out else None
    got = reference.dequantize(packed, absmax, blocksize, quant_type, numel, dtype, out=out)
    assert got.dtype == dtype and got.shape == (numel,)
    assert torch.equal(got.view(_BITS[dtype]), want.view(_BITS[dtype]))
    if into_out:
        assert got.data_ptr() == out.data_ptr()


@SETTINGS
@given(x=tensors(), blocksize=blocksizes, quant_type=quant_types)
def test_quantizing_a_dequantized_tensor_is_idempotent(x, blocksize, quant_type):
    x = x.float()  # fp32 output keeps level * absmax exact enough to land on the same code
    packed, state = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    again, state2 = nf4.quantize_4bit(nf4.dequantize_4bit(packed, state), blocksize=blocksize,
                                      quant_type=quant_type)
    assert torch.equal(state.absmax, state2.absmax)
    a, b = reference.unpack(packed, x.numel()), reference.unpack(again, x.numel())
    levels = codebook.levels(quant_type)
    assert torch.equal(levels[a], levels[b])


@SETTINGS
@given(x=tensors(), blocksize=blocksizes, quant_type=quant_types, data=st.data())
def test_blocks_are_independent(x, blocksize, quant_type, data):
    flat = x.reshape(-1).clone()
    n = flat.numel()
    blocks = -(-n // blocksize)
    b = data.draw(st.integers(0, blocks - 1))
    packed, state = nf4.quantize_4bit(flat, blocksize=blocksize, quant_type=quant_type)
    changed = flat.clone()
    changed[b * blocksize: (b + 1) * blocksize] *= -3
    packed2, state2 = nf4.quantize_4bit(changed, blocksize=blocksize, quant_type=quant_type)
    keep = torch.ones(n, dtype=torch.bool)
    keep[b * blocksize: (b + 1) * blocksize] = False
    assert torch.equal(reference.unpack(packed, n)[keep], reference.unpack(packed2, n)[keep])
    others = torch.arange(blocks) != b
    assert torch.equal(state.absmax[others], state2.absmax[others])


@SETTINGS
@given(x=tensors(max_numel=20000), blocksize=st.sampled_from([32, 64, 128]), quant_type=quant_types)
def test_double_quant_error_bound(x, blocksize, quant_type):
    _, plain = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    _, dq = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    absmax = reference.dequantize_absmax(dq.absmax, dq.state2.absmax, dq.state2.code, dq.offset, 256)
    m = codebook.dynamic_map().double()
    half_gap = float((m[1:] - m[:-1]).max() / 2)  # 0.007: the map's coarsest step, near +-1
    scale = dq.state2.absmax.double().repeat_interleave(256)[: absmax.numel()]
    err = (absmax.double() - plain.absmax.double()).abs()
    # Plus fp32 rounding of code * scale + offset (a few ulp of the offset's magnitude).
    bound = scale * half_gap + 4 * 2**-24 * (plain.absmax.double().abs() + abs(float(dq.offset)))
    assert bool((err <= bound).all())
    assert float(dq.offset) == pytest.approx(float(plain.absmax.double().mean()), rel=1e-5)


def test_fp4_signed_zero_and_sign_bit():
    x = torch.tensor([-0.0, 0.0, -1.0, 1.0, -0.25, 0.25])
    packed, absmax = reference.quantize(x, 32, "fp4")
    codes = reference.unpack(packed, x.numel()).tolist()
    assert codes == [0, 0, 0b1011, 0b0011, 0b1111, 0b0111]


def _reciprocal_vs_division_cases(quant_type):
    """(x, absmax) pairs, one per threshold t where one exists, with x * (1/absmax) and
    x / absmax on opposite sides of t (each rounds once in float32, differently)."""
    thr = (codebook.nf4_thresholds() if quant_type == "nf4" else codebook.fp4_thresholds()).tolist()
    a = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 3 + 0.1
    cases = []
    for t in thr:
        x = torch.tensor(t) * a
        for x in (x, torch.nextafter(x, x - 1), torch.nextafter(x, x + 1)):
            split = ((x * torch.reciprocal(a)) > t) != ((x / a) > t)
            if bool(split.any()):
                j = int(split.nonzero()[0])
                cases.append((float(x[j]), float(a[j])))
                break
    return cases


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_scaling_is_the_reciprocal_product_not_a_division(quant_type):
    """bitsandbytes scales by x * (1/absmax) (See reference's Note: reciprocal scaling); on these
    values a division gives another code, so this test tells the two apart exactly."""
    cases = _reciprocal_vs_division_cases(quant_type)
    assert len(cases) >= 6  # measured: 15 of 15 nf4 thresholds, 7 of 7 fp4 ones
    bs = 32
    x = torch.zeros(len(cases) * bs)
    for i, (v, a) in enumerate(cases):
        x[i * bs], x[i * bs + 1] = a, v  # the block's absmax is a, exactly
    packed, absmax = reference.quantize(x, bs, quant_type)
    got = reference.unpack(packed, x.numel()).view(-1, bs)[:, 1]
    v = torch.tensor([c[0] for c in cases])
    a = torch.tensor([c[1] for c in cases])
    assert torch.equal(absmax, a)
    product = reference.encode(v * torch.reciprocal(a), quant_type).long()
    division = reference.encode(v / a, quant_type).long()
    assert torch.equal(got, product)
    assert not bool((got == division).any())


def test_double_quant_midpoint_ties_take_the_lower_code():
    """A centred absmax exactly on a dynamic-map midpoint takes the lower code (x > t: upper),
    as bitsandbytes' search does: offset 0 and nested absmax 1 make scaled == the midpoint."""
    thresholds = codebook.dynamic_map_thresholds()
    for i, t in enumerate(thresholds.tolist()):
        absmax = torch.tensor([1.0, -1.0, t, -t])
        codes, nested, offset = reference.quantize_absmax(absmax)
        assert float(offset) == 0.0 and float(nested[0]) == 1.0
        assert int(codes[2]) == i, (i, t)
        assert int(codes[3]) == int(torch.bucketize(torch.tensor(-t), thresholds))


@SETTINGS
@given(x=tensors(), blocksize=blocksizes, quant_type=quant_types)
def test_signed_zeros_decode_to_exact_zeros(x, blocksize, quant_type):
    """0.0 and -0.0 (alone or in a block of zeros) decode to exactly 0, in every output dtype."""
    packed, absmax = reference.quantize(x, blocksize, quant_type)
    zero = x.reshape(-1) == 0
    for dtype in DTYPES:
        out = reference.dequantize(packed, absmax, blocksize, quant_type, x.numel(), dtype)
        assert bool((out[zero] == 0).all())


@SETTINGS
@given(x=tensors(), blocksize=blocksizes, quant_type=quant_types, data=st.data())
def test_a_non_finite_value_poisons_only_its_block(x, blocksize, quant_type, data):
    """What the reference does with NaN/Inf today (the policy to refuse them sits above it): the
    block holding one gets a non-finite absmax and decodes to non-finite values; every other
    block's codes, absmax and decoded values are unchanged."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    i = data.draw(st.integers(0, n - 1))
    bad = flat.clone()
    bad[i] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    b = i // blocksize
    packed, absmax = reference.quantize(flat, blocksize, quant_type)
    packed2, absmax2 = reference.quantize(bad, blocksize, quant_type)
    assert not bool(torch.isfinite(absmax2[b]))
    others = torch.arange(absmax.numel()) != b
    assert torch.equal(absmax[others], absmax2[others])
    keep = torch.arange(n) // blocksize != b
    assert torch.equal(reference.unpack(packed, n)[keep], reference.unpack(packed2, n)[keep])
    out = reference.dequantize(packed2, absmax2, blocksize, quant_type, n, torch.float32)
    assert not bool(torch.isfinite(out[~keep]).any())
