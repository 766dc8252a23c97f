"""Test configuration shared by every test file.

Without a GPU, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, read when a kernel
is decorated, so it is set here before anything imports ``nf4.kernels``); the ``triton`` backend
then accepts CPU tensors and CI checks every Triton kernel for correctness.
"""
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nf4  # noqa: E402  (after TRITON_INTERPRET is set)
from nf4 import backends  # noqa: E402
from nf4.testing import fixtures_dir  # noqa: E402

# This checkout: its tests/fixtures, wherever nf4 itself was installed from.
ROOT = Path(__file__).resolve().parents[1]
# Where kernel tests put their tensors: the GPU when there is one, else the CPU (interpreter).
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
KERNEL_BACKENDS = ("triton", "cuda")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    nf4.set_backend(None)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Each kernel backend that can run on DEVICE here, forced for the duration of the test.

    The cuda backend is skipped without a GPU (CI); triton runs everywhere (interpreter on CPU)."""
    name = request.param
    if not backends.supports(name, DEVICE):
        pytest.skip(f"backend {name} cannot run {DEVICE.type} tensors here")
    nf4.set_backend(name)
    return name


@pytest.fixture(params=("reference",) + KERNEL_BACKENDS)
def any_backend(request):
    """Every backend that can run on DEVICE here (the reference included), forced for the test."""
    name = request.param
    if not backends.supports(name, DEVICE):
        pytest.skip(f"backend {name} cannot run {DEVICE.type} tensors here")
    nf4.set_backend(name)
    return name


@pytest.fixture(scope="session")
def fixtures():
    path = fixtures_dir(ROOT)
    if not (path / "bnb_parity.safetensors").exists():
        pytest.fail(f"bitsandbytes test vectors not found at {path} (tests/fixtures ships them; "
                    f"NF4_FIXTURES overrides)")
    return path
