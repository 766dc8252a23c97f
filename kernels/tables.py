"""The codebook tables as device tensors, made once per device for the Triton kernels.

Every value comes from ``nf4.codebook`` (the single source); the kernels receive these tensors as
arguments and read them through the L1 cache (16 levels are 64 bytes: one cache line).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from nf4 import codebook


class Tables(NamedTuple):
    nf4_levels: torch.Tensor          # float32 [16]
    fp4_levels: torch.Tensor          # float32 [16]
    nf4_thresholds: torch.Tensor      # float32 [15]
    fp4_thresholds: torch.Tensor      # float32 [7], on |x|
    fp4_sorted_codes: torch.Tensor    # int32 [8]: bucket index -> fp4 magnitude code
    dynamic_thresholds: torch.Tensor  # float32 [255], double quantization

    def levels(self, quant_type: str) -> torch.Tensor:
        return self.nf4_levels if quant_type == "nf4" else self.fp4_levels


@functools.lru_cache(maxsize=None)
def device_tables(device: torch.device) -> Tables:
    return Tables(
        nf4_levels=codebook.levels("nf4").to(device),
        fp4_levels=codebook.levels("fp4").to(device),
        nf4_thresholds=codebook.nf4_thresholds().to(device),
        fp4_thresholds=codebook.fp4_thresholds().to(device),
        fp4_sorted_codes=codebook.fp4_sorted_codes().to(torch.int32).to(device),
        dynamic_thresholds=codebook.dynamic_map_thresholds().to(device),
    )


def dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with its elements laid out one after another, as the kernels index it (base pointer +
    element index). A strided view would be read at the wrong elements and an expanded (stride-0)
    tensor past its allocation: ``torch.tensor([2.0]).expand(4096)`` owns 4 bytes, not 16 KiB.
    ``.contiguous()`` returns ``t`` itself when it already is, so the common call pays nothing."""
    return None if t is None else t.contiguous()
