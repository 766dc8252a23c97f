"""What ``import nf4`` costs a fresh process (issue 20): heavy modules it must leave unimported,
and a load that leaves peft unimported yet makes peft wrap nf4's layers once it is imported.

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
    "peft": "nf4's dispatch is enabled when the user imports it (nf4.loading.peft_dispatch)",
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


LOAD_THEN_PEFT = """
import json, sys
import nf4
from nf4.loading import peft_dispatch
model = nf4.from_pretrained(sys.argv[1], device="cpu", progress=False)
state = {"peft imported by the load": "peft" in sys.modules, "waiting": peft_dispatch.waiting()}
import importlib.util
importlib.util.find_spec("peft")  # as transformers' is_peft_available() asks: imports nothing
state["waiting after find_spec"] = peft_dispatch.waiting() and "peft" not in sys.modules
import peft
import nf4.peft
state.update({"enabled": nf4.peft.enabled(), "waiting after": peft_dispatch.waiting(),
              "peft's loader": type(peft.__spec__.loader).__name__ + "/" + type(peft.__loader__).__name__})
wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
state["q_proj"] = type(wrapped.base_model.model.model.layers[0].self_attn.q_proj).__name__
print(json.dumps(state))
"""

PEFT_THEN_LOAD = """
import json, sys
import peft
import nf4
import nf4.peft
before = nf4.peft.enabled()
nf4.from_pretrained(sys.argv[1], device="cpu", progress=False)
from nf4.loading import peft_dispatch
print(json.dumps({"before": before, "after": nf4.peft.enabled(), "waiting": peft_dispatch.waiting()}))
"""


def _child(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=240)
    if proc.returncode:
        pytest.fail(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_load_leaves_peft_alone_until_it_is_imported(fixtures):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    state = _child(LOAD_THEN_PEFT, fixtures / "tiny_llama_bf16")
    assert state == {"peft imported by the load": False, "waiting": True, "waiting after find_spec": True,
                     "enabled": True, "waiting after": False, "peft's loader": "SourceFileLoader/SourceFileLoader",
                     "q_proj": "LoraQuantLinear4bit"}


def test_peft_imported_first_is_enabled_by_the_load(fixtures):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    assert _child(PEFT_THEN_LOAD, fixtures / "tiny_llama_bf16") == {"before": False, "after": True, "waiting": False}
