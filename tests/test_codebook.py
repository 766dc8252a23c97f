"""The codebook against literal tables and bitsandbytes' own copies (fixtures)."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nf4 import codebook

# bitsandbytes' NF4 table as printed in the QLoRA paper's appendix / bnb's source (float32 values).
NF4_LITERALS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_levels_match_literals_bit_for_bit():
    expected = torch.tensor(NF4_LITERALS, dtype=torch.float32)
    assert torch.equal(codebook.levels("nf4").view(torch.int32), expected.view(torch.int32))


def test_nf4_levels_match_bnb_quant_map(fixtures):
    with safe_open(fixtures / "bnb_parity.safetensors", "pt") as f:
        bnb = f.get_tensor("normal_f32_512x64.bs64.dq0.state.quant_map")
    assert torch.equal(codebook.levels("nf4"), bnb)


def test_dynamic_map_matches_bnb(fixtures):
    with safe_open(fixtures / "bnb_parity.safetensors", "pt") as f:
        bnb = f.get_tensor("normal_f32_512x64.bs64.dq1.state.nested_quant_map")
    ours = codebook.dynamic_map()
    assert ours.shape == (256,)
    assert torch.equal(ours.view(torch.int32), bnb.view(torch.int32))


def test_nf4_thresholds_are_float64_midpoints_rounded_to_float32():
    lv = np.array(NF4_LITERALS, dtype=np.float64)
    mids = (lv[:-1] + lv[1:]) / 2
    t = codebook.nf4_thresholds()
    half_even = torch.tensor(mids, dtype=torch.float32)
    for i, m in enumerate(mids):
        # A correct rounding of m: no farther from it than round-half-to-even's result (ties may
        # go either way; which way is bitsandbytes' choice, see Note: decision thresholds).
        assert abs(Fraction(float(t[i])) - Fraction(m)) <= abs(Fraction(float(half_even[i])) - Fraction(m))
    assert bool((t[1:] > t[:-1]).all())


def test_nf4_thresholds_round_like_bitsandbytes_decimal_literals():
    """The four thresholds where a decimal-literal rounding and round-half-to-even disagree."""
    lv = np.array(NF4_LITERALS, dtype=np.float64)
    mids = (lv[:-1] + lv[1:]) / 2
    half_even = torch.tensor(mids, dtype=torch.float32)
    differs = (codebook.nf4_thresholds() != half_even).nonzero().reshape(-1).tolist()
    assert differs == [0, 8, 12, 14]
    # The decimal literal of threshold 14 is 0.8614784181118011: check the single rounding.
    assert codebook.decimal_to_float32("0.8614784181118011") == float(codebook.nf4_thresholds()[14])


def test_decimal_to_float32_rounds_once_from_the_decimal():
    # 1 + 2^-24 is halfway between 1.0 and the next float32. The decimal "1.0000000596046448" (its
    # shortest float64 repr) lies just above it, so a single rounding goes up; rounding through
    # float64 first would land exactly on the halfway point and go down to even (1.0).
    next_up = float(np.nextafter(np.float32(1), np.float32(2)))
    assert codebook.decimal_to_float32("1.0000000596046448") == next_up
    assert float(np.float32(float("1.0000000596046448"))) == 1.0
    assert codebook.decimal_to_float32("1.0000000596046447") == 1.0
    assert codebook.decimal_to_float32("1.000000059604644775390625") == 1.0  # exact tie: to even


def test_fp4_table_and_thresholds():
    mags = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12
    lv = codebook.levels("fp4")
    assert torch.equal(lv[:8], mags)
    assert torch.equal(lv[8:], -mags)
    assert torch.signbit(lv[8])  # code 8 is -0.0: dequantizing is sign * magnitude
    # Each threshold separates the magnitudes sorted ascending through fp4_sorted_codes.
    sorted_mags = mags[codebook.fp4_sorted_codes().long()]
    assert bool((sorted_mags[1:] > sorted_mags[:-1]).all())
    t = codebook.fp4_thresholds()
    assert bool(((t > sorted_mags[:-1]) & (t < sorted_mags[1:])).all())


def test_zero_codes():
    assert codebook.levels("nf4")[codebook.zero_code("nf4")] == 0.0
    assert codebook.levels("fp4")[codebook.zero_code("fp4")] == 0.0


@pytest.mark.parametrize("bad", ["int4", "NF4", None, 4])
def test_unknown_quant_type_is_rejected(bad):
    with pytest.raises(ValueError, match="quant_type"):
        codebook.levels(bad)
