"""What one QLoRA step costs the host: the kernels nf4.autograd.QuantLoraLinear dispatches and the
checks it repeats (the maths itself is tested against an fp32 model in test_nn.py).

See Note: scaling in the GEMMs and Note: eager calls skip the op dispatch in nf4/autograd.py.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nf4 import autograd as nf4_autograd
from nf4 import ops
from nf4.nn import QuantLinear4bit

from tests.conftest import DEVICE

IN, OUT, RANK = 96, 40, 4
TOKENS = nf4_autograd.FUSED_MAX_TOKENS + 9  # the dequantize + GEMM regime
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
    monkeypatch.setattr(nf4_autograd, "_dequantize", lambda backend, wargs, dtype: W)
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


@pytest.mark.parametrize("tokens", [7, TOKENS], ids=["fused", "dequant"])
def test_backward_does_not_check_the_weight_again(monkeypatch, tokens):
    """The forward checks the weight (a backend may check again inside, e.g. a matmul that falls
    back to the dequantize op); backward decodes the saved, already checked tensors as they are."""
    layer = _layer(0.0, bias=True)
    calls = []
    check = ops.check_dequantize_args
    monkeypatch.setattr(ops, "check_dequantize_args", lambda *a: calls.append(1) or check(*a))
    x = torch.randn(tokens, IN, device=DEVICE, requires_grad=True)
    y = layer(x)
    in_forward = len(calls)
    y.backward(torch.randn_like(y))
    assert in_forward >= 1 and len(calls) == in_forward
    assert x.grad is not None and layer.lora_A.grad is not None


def test_backward_uses_the_forward_backend(monkeypatch):
    """The backend that decoded the weight in forward decodes it in backward, not a new lookup."""
    layer = _layer(0.0)
    x = torch.randn(TOKENS, IN, device=DEVICE, requires_grad=True)
    y = layer(x)
    monkeypatch.setattr(nf4_autograd.backends, "resolve",
                        lambda *a: pytest.fail("backward resolved a backend again"))
    y.backward(torch.randn_like(y))
    assert x.grad is not None


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
    # The traced graph runs the same GEMMs, but functionalization may turn addmm_ into addmm and
    # cuBLAS may pick another algorithm for it: allow one bf16 rounding of the largest value
    # (2^-8 relative) rather than bit equality. A lost or doubled scale is off by 50-100%.
    for name, a, b in zip(("y", "dx", "dA", "dB"), (y, *got), (y_eager, x.grad, layer.lora_A.grad,
                                                              layer.lora_B.grad)):
        assert a.dtype == b.dtype, name
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2**-8 * b.float().abs().max().item(), f"{name}: max difference {err:.3g}"
