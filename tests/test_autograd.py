"""What one QLoRA step costs the host: the kernels nf4.autograd.QuantLoraLinear dispatches and the
checks it repeats (the maths itself is tested against an fp32 model in test_nn.py).

See Note: scaling in the GEMMs in nf4/autograd.py and Note: validate once in nf4/weight.py.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nf4 import backends
from nf4.nn import QuantLinear4bit
from nf4.quant_state import QuantState
from nf4.weight import PackedWeight

from tests.conftest import DEVICE

IN, OUT, RANK = 96, 40, 4
# The dequantize + GEMM regime on every backend (the CUDA fused kernels stop at 256 tokens, Triton's
# at 64, the reference always decodes); test_every_route_runs_the_layer checks it.
TOKENS = 300
# Views and allocations launch nothing.
NO_KERNEL = {"view", "t", "reshape", "_reshape_alias", "unsqueeze", "expand", "alias", "empty",
             "new_empty", "detach"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _layer(dropout: float, bias: bool = False) -> QuantLinear4bit:
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=bias, device=DEVICE)
    layer = QuantLinear4bit.from_linear(linear, lora_rank=RANK, lora_alpha=2.0 * RANK,
                                        lora_dropout=dropout, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_step_scales_inside_the_gemms(monkeypatch, dropout):
    """bf16 compute, fp32 adapter: no elementwise multiply for the scaling (only the dropout
    mask, once forward and once backward), and on CUDA the fp32 dA/dB come out of their GEMMs."""
    layer = _layer(dropout)
    W = layer.dequantize().to(torch.bfloat16)
    # The weight's decoding is the backend's business (its own kernels): left out of the count.
    monkeypatch.setattr(PackedWeight, "dequantize", lambda self, dtype=None, out=None: W)
    x = torch.randn(TOKENS, IN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(TOKENS, OUT, device=DEVICE, dtype=torch.bfloat16)
    with _Ops() as seen:
        y = layer(x)
        torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], dy)
    kernels = [n for n in seen.names if n not in NO_KERNEL]
    masks = 2 if dropout else 0
    assert sum(n in ("mul", "mul_", "div", "div_") for n in kernels) == masks, kernels
    if dropout:
        assert kernels.count("bernoulli_") == 1, kernels
    # Casts: A and B to bf16 in forward; on devices without the fp32-output GEMM, dA and dB too.
    casts = 2 if DEVICE.type == "cuda" else 4
    assert kernels.count("_to_copy") == casts, kernels
    # Forward: x A^T, the adapter's output, the base GEMM; backward: dy B, dB, dA, dx's two.
    assert sum(n in ("mm", "addmm", "addmm_") for n in kernels) == 8, kernels
    assert len(kernels) == 8 + casts + masks + (1 if dropout else 0), kernels


@pytest.mark.parametrize("tokens", [7, TOKENS], ids=["few", "many"])
def test_the_weight_is_checked_once(monkeypatch, tokens):
    """The weight is checked when the layer is made (QuantState.validate); forward, backward and
    every later step reuse that check (See Note: validate once)."""
    layer = _layer(0.0, bias=True)
    calls = []
    validate = QuantState.validate
    monkeypatch.setattr(QuantState, "validate", lambda self, *a: calls.append(1) or validate(self, *a))
    for step in range(3):
        x = torch.randn(tokens, IN, device=DEVICE, requires_grad=True)
        y = layer(x)
        y.backward(torch.randn_like(y))
        assert x.grad is not None and layer.lora_A.grad is not None
        assert not calls, f"step {step}: {len(calls)} checks"


def test_backward_uses_the_forward_backend(monkeypatch):
    """The backend that decoded the weight in forward decodes it in backward, not a new lookup."""
    layer = _layer(0.0)
    x = torch.randn(TOKENS, IN, device=DEVICE, requires_grad=True)
    y = layer(x)
    monkeypatch.setattr(backends, "resolve", lambda *a: pytest.fail("backward resolved a backend again"))
    y.backward(torch.randn_like(y))
    assert x.grad is not None


def test_route_of_the_dequantize_regime():
    """TOKENS is in the decode + GEMM regime of the automatic backend here."""
    layer = _layer(0.0)
    layer(torch.randn(1, IN, device=DEVICE))
    r = layer.weight.quant_state._packed_weight.route(TOKENS, torch.bfloat16)
    assert r.kernel == "dequant", r


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_torch_compile_traces_the_scaled_gemms(dropout):
    """bf16 compute with an fp32 adapter in the dequantize regime (test_nn compiles the fused one):
    the beta=0 GEMMs and, on CUDA, the fp32-output ones trace and give the eager results."""
    layer = _layer(dropout, bias=True)
    x = torch.randn(TOKENS, IN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    y = compiled(x)
    y.float().square().sum().backward()
    got = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(5)
    y_eager = layer(x)
    y_eager.float().square().sum().backward()
    # The traced maths (nf4.autograd._traced_lora_linear) forms the same sums in another order
    # (the base product is rounded to bf16 before the adapter's share is added), and cuBLAS may
    # pick other algorithms: one bf16 rounding of the largest value may differ, at most 2^-7 of
    # it. A lost or doubled scale is off by 50-100%.
    for name, a, b in zip(("y", "dx", "dA", "dB"), (y, *got), (y_eager, x.grad, layer.lora_A.grad,
                                                              layer.lora_B.grad)):
        assert a.dtype == b.dtype, name
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2**-7 * b.float().abs().max().item(), f"{name}: max difference {err:.3g}"


@pytest.mark.parametrize("tokens", [1, 8, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2d_output_is_not_a_view_and_can_be_changed_in_place(any_backend, tokens, dtype):
    # A view leaving the layer's autograd Function may not be modified in place (the patched
    # attention rotates q and k in place): every route must hand a 2-D input its own tensor.
    layer = QuantLinear4bit.from_linear(nn.Linear(64, 96, device=DEVICE), lora_rank=2, compute_dtype=dtype)
    x = torch.randn(tokens, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert not y._is_view(), (any_backend, tokens, dtype)
    y.mul_(2)
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None
