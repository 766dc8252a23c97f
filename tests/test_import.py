"""What ``import nf4`` costs a fresh process (issue 20): heavy modules it must leave unimported.

Every script that loads a model pays ``import nf4`` before its first byte moves. Measured with
``python -X importtime`` on the 2-core development VM: scipy.stats 0.57-0.92 s, torch.distributed.
tensor 0.63-0.77 s, transformers + a model class 2-5 s, peft 0.17-0.3 s (on top of transformers),
triton ~0.5 s; ``import nf4`` went from 3.8 s to 1.2 s (of which torch 0.9 s) without the first two.
"""
import json
import subprocess
import sys

import pytest

# Module -> why nf4 must not import it at ``import nf4``.
HEAVY = {
    "scipy.stats": "the NF4 levels need only scipy.special.ndtri (nf4.codebook)",
    "torch.distributed.tensor": "looked up in sys.modules when a DTensor can exist (nf4.loading.adapter)",
    "transformers": "imported by from_pretrained when it builds a model (an optional dependency)",
    "peft": "imported after a load, only where installed (nf4.loading.model._enable_peft)",
    "triton": "imported by the backend that first needs a Triton kernel (nf4.backends)",
}

CHILD = """
import json, sys
import torch
before = set(sys.modules)
import nf4
nf4.from_pretrained, nf4.quantize_4bit, nf4.save_adapter, nf4.QuantLinear4bit
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.fixture(scope="module")
def imported_by_nf4() -> set[str]:
    """Modules a fresh ``import nf4`` imports beyond what ``import torch`` already did."""
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=240)
    if proc.returncode:
        pytest.fail(f"import nf4 failed:\n{proc.stderr[-3000:]}")
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(HEAVY))
def test_import_nf4_does_not_import(imported_by_nf4, module):
    assert module not in imported_by_nf4, f"import nf4 imported {module}: {HEAVY[module]}"


def test_the_check_sees_what_nf4_imports(imported_by_nf4):
    # The test above is only as good as the snapshot: nf4's own modules and scipy.special must be in it.
    assert {"nf4", "nf4.codebook", "nf4.loading.model", "scipy.special"} <= imported_by_nf4
