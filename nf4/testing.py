"""Shared by tests and benchmarks: the shape registry and the location of bnb's test vectors.

Shapes are (out_features, in_features) of the linear layers that dominate Llama models; tests
sweep small stand-ins, benchmarks the real sizes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# (out_features, in_features) of one transformer block's projections.
LLAMA_SHAPES: dict[str, tuple[int, int]] = {
    "llama8b.attn_o": (4096, 4096),      # also q_proj of 7B/8B
    "llama8b.mlp_up": (14336, 4096),     # gate_proj / up_proj
    "llama8b.mlp_down": (4096, 14336),   # down_proj
    "llama70b.mlp_up": (28672, 8192),    # the largest matrix of Llama-3-70B
}
# The four shapes every kernel benchmark reports (the issues' targets are stated on these).
BENCH_SHAPES = [LLAMA_SHAPES[k] for k in ("llama8b.attn_o", "llama8b.mlp_up", "llama8b.mlp_down",
                                          "llama70b.mlp_up")]
# Token counts the matmul benchmark sweeps.
BENCH_TOKENS = [1, 4, 16, 64, 128, 512, 4096]


# The checkout nf4 was imported from, when it runs from source (an editable install).
CHECKOUT = Path(__file__).resolve().parents[1]


def fixtures_dir(checkout: Optional[Path] = None) -> Path:
    """Where bnb's test vectors and the tiny checkpoints are: ``NF4_FIXTURES`` if set, else
    ``tests/fixtures`` of ``checkout`` (default: the checkout nf4 runs from).

    They ship with the repository (~9 MB), so a clone runs the tests and examples with nothing
    beside it. Tests and examples pass their own checkout: with nf4 installed from a wheel, the
    package's parent is site-packages, which has no tests/."""
    env = os.environ.get("NF4_FIXTURES")
    if env:
        return Path(env)
    return (CHECKOUT if checkout is None else Path(checkout)) / "tests" / "fixtures"
