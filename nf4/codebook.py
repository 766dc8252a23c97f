"""The single source of every quantization table in nf4.

Nothing else in the project spells out a level or a threshold: the reference engine, the Triton
kernels and the CUDA kernels all receive them from here as kernel arguments (a generated header
would need torch and scipy inside pip's isolated build environment, which has neither).

Note: NF4 derivation.
    NF4 places 16 levels at quantiles of a standard normal distribution so that each level is
    used about equally often by normally distributed weights (Dettmers et al., QLoRA, 2023).
    Following the published construction, 8 positive levels sit at the quantiles
    ``linspace(0.9677083, 0.5, 9)[:-1]`` and 7 negative ones at ``linspace(0.9677083, 0.5, 8)[:-1]``
    (mirrored), plus an exact zero; the table is normalized by its largest entry. The quantile grid
    is built in float32 and the levels end in float32, exactly as bitsandbytes builds its table, so
    the 16 values agree bit for bit (``tests/test_codebook.py`` checks them against the literals).

Note: decision thresholds.
    A value is encoded as the level nearest to it. The decision boundaries are the midpoints of
    adjacent levels, computed in float64 and rounded to float32; a value strictly above a
    threshold takes the upper code, a value equal to it the lower one. Every float64 midpoint of
    two float32 levels lies exactly halfway between two float32 values, so "rounded" needs a
    tie rule, and bitsandbytes' is the one that decides every existing checkpoint: its kernel
    holds each midpoint as a decimal literal (the shortest repr of the float64), which the
    compiler rounds to the nearest float32 from the decimal. That decimal sits just above or
    below the halfway point, so 4 of the 15 thresholds (indices 0, 8, 12, 14) end one ulp away
    from round-half-to-even. We round the same way, so values lying exactly on a threshold
    encode as bitsandbytes encodes them (the CUDA backend then matches its bytes with no
    exceptions: 0 of 786K threshold-adjacent values differ on an H100). For FP4 the thresholds
    are bitsandbytes' published constants (the midpoints to 7 or 8 digits), read the same way.
"""
from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import torch
# The standard normal's quantile function itself (scipy.stats.norm.ppf is ndtri times scale 1 plus
# loc 0: the same float64s). scipy.stats would cost `import nf4` 0.57-0.92 s on the 2-core
# development VM (0.65 s on the GPU machine's host); scipy.special costs 0.12 s over numpy.
from scipy.special import ndtri

QUANT_TYPES = ("nf4", "fp4")

# Offset of the outermost quantile: chosen by QLoRA so that the largest level sits at the
# quantile that the 16-level table can still represent symmetrically (1 - 1/(2*15.5)-ish).
NF4_QUANTILE_OFFSET = 0.9677083

# FP4 (E2M1 as bitsandbytes lays it out): codes 0..7 are magnitudes, bit 3 is the sign.
FP4_MAGNITUDES_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_SIGN_BIT = 0b1000
# bitsandbytes' decision constants on |x| (x > t takes the upper magnitude).
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)

# Double quantization: the absmax values are quantized blockwise with the signed dynamic map.
NESTED_BLOCKSIZE = 256
# The code stored for every absmax of a nested block whose absmax is 0 (all its first-level absmax
# equal their mean: a constant tensor, or a tensor of one block). Scaling gives 0 * inf = NaN there,
# and bitsandbytes' search stores code 0 for NaN; any code decodes to the offset (code * 0 +
# offset), so storing what bnb stores keeps the saved bytes identical at no cost in accuracy.
NESTED_FLAT_CODE = 0
DYNAMIC_MAP_EXPONENT_BITS = 7


@functools.cache
def _nf4_levels() -> tuple[float, ...]:
    pos_q = torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 9)[:-1].numpy().astype(np.float64)
    neg_q = torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 8)[:-1].numpy().astype(np.float64)
    values = np.concatenate([ndtri(pos_q), -ndtri(neg_q), [0.0]])
    levels = torch.tensor(values, dtype=torch.float32).sort().values
    levels = levels / levels.max()
    return tuple(levels.tolist())


@functools.cache
def _fp4_levels() -> tuple[float, ...]:
    mags = torch.tensor(FP4_MAGNITUDES_UNSCALED, dtype=torch.float32) / 12.0
    # Code 8 (sign bit, magnitude 0) decodes to -0.0, so that dequantizing is sign * magnitude.
    return tuple(mags.tolist()) + tuple((-mags).tolist())


def levels(quant_type: str) -> torch.Tensor:
    """The 16 float32 values that codes 0..15 decode to (before scaling by absmax)."""
    check_quant_type(quant_type)
    table = _nf4_levels() if quant_type == "nf4" else _fp4_levels()
    return torch.tensor(table, dtype=torch.float32)


def decimal_to_float32(text: str) -> float:
    """The float32 nearest to the decimal number ``text`` (ties to even), rounded once, from the
    decimal itself as a C compiler reads a float literal; numpy rounds through float64 first."""
    exact = Fraction(text)
    f = np.float32(float(exact))
    candidates = (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf)))
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact),
                                          int(np.array(c, dtype=np.float32).view(np.int32)) & 1))
    return float(best)


@functools.cache
def _nf4_thresholds() -> tuple[float, ...]:
    lv = np.array(_nf4_levels(), dtype=np.float64)
    # See Note: decision thresholds (float64 midpoint -> shortest decimal -> float32).
    return tuple(decimal_to_float32(repr(float(m))) for m in (lv[:-1] + lv[1:]) / 2.0)


def nf4_thresholds() -> torch.Tensor:
    """15 float32 decision thresholds between adjacent NF4 levels (x > t: upper code)."""
    return torch.tensor(_nf4_thresholds(), dtype=torch.float32)


def fp4_thresholds() -> torch.Tensor:
    """7 float32 decision thresholds on |x| between FP4 magnitudes sorted ascending."""
    return torch.tensor([decimal_to_float32(repr(t)) for t in FP4_THRESHOLDS], dtype=torch.float32)


def fp4_sorted_codes() -> torch.Tensor:
    """FP4 magnitude codes (0..7) in ascending order of magnitude: index i of a bucketize over
    :func:`fp4_thresholds` maps to code ``fp4_sorted_codes()[i]``."""
    mags = torch.tensor(FP4_MAGNITUDES_UNSCALED)
    return torch.argsort(mags).to(torch.uint8)


def zero_code(quant_type: str) -> int:
    """The code of 0.0, used to pad the last nibble of an odd element count."""
    check_quant_type(quant_type)
    return levels("nf4").tolist().index(0.0) if quant_type == "nf4" else 0


@functools.cache
def _dynamic_map() -> tuple[float, ...]:
    values: list[float] = []
    for i in range(DYNAMIC_MAP_EXPONENT_BITS):
        boundaries = torch.linspace(0.1, 1, 2**i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scaled = 10 ** (i - (DYNAMIC_MAP_EXPONENT_BITS - 1)) * means
        values += scaled.tolist()
        values += (-scaled).tolist()
    values += [0.0, 1.0]
    return tuple(torch.tensor(sorted(values), dtype=torch.float32).tolist())


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 float32 values, ascending) used for double quantization."""
    return torch.tensor(_dynamic_map(), dtype=torch.float32)


def dynamic_map_thresholds() -> torch.Tensor:
    """255 float32 midpoints of adjacent dynamic-map values (x > t: upper code).

    Computed in float32 as (a + b) * 0.5, the rounding bitsandbytes' nearest-value search uses."""
    m = dynamic_map()
    return (m[:-1] + m[1:]) * 0.5


def check_levels(code, quant_type: str) -> None:
    """A state's decode table (bnb's ``quant_map``) must be exactly the levels of its quant type:
    the kernels decode with ``levels(quant_type)``, so another table (the other type's, or edited
    values) would be ignored by some backends and used by others. None means "the type's own".
    Reads the values (a device sync for a GPU table): call it when a weight is made, not per call."""
    if code is None:
        return
    want = levels(quant_type)
    got = code.detach().reshape(-1).to("cpu", torch.float32) if isinstance(code, torch.Tensor) else None
    if got is None or not torch.equal(got, want):
        raise ValueError(f"the state's code table (quant_map) is not the {quant_type} table "
                         f"{want.tolist()}: got {None if got is None else got.tolist()}")


def check_quant_type(quant_type: str) -> None:
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
