"""The torch.library ops: schemas, fake implementations, autograd, torch.compile."""
import pytest
import torch
from torch.library import opcheck

import nf4
from tests.conftest import DEVICE


def weight(out_features=48, in_features=128, dq=True, dtype=torch.bfloat16):
    W = torch.randn(out_features, in_features, dtype=dtype)
    packed, state = nf4.quantize_4bit(W, blocksize=64, compress_statistics=dq, quant_type="nf4")
    return packed, state


def op_args(packed, s):
    nested = (s.state2.absmax, s.state2.code, s.offset) if s.nested else (None, None, None)
    return (packed.reshape(-1), s.absmax, *nested, s.blocksize, 256, s.quant_type)


@pytest.mark.parametrize("dq", [False, True])
def test_opcheck_reference(dq):
    x = torch.randn(33, 64, dtype=torch.float16)
    opcheck(torch.ops.nf4.quantize.default, (x, 64, "nf4", dq))
    packed, s = weight(dq=dq)
    opcheck(torch.ops.nf4.dequantize.default, (*op_args(packed, s), list(s.shape), torch.bfloat16))
    out = torch.empty(tuple(s.shape), dtype=torch.bfloat16)
    opcheck(torch.ops.nf4.dequantize_out.default, (*op_args(packed, s), list(s.shape), torch.bfloat16, out))
    A = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(48, dtype=torch.bfloat16, requires_grad=True)
    opcheck(torch.ops.nf4.matmul.default, (A, *op_args(packed, s), 48, 128, bias))


def test_opcheck_kernel_backend(kernel_backend):
    x = torch.randn(33, 64, dtype=torch.bfloat16, device=DEVICE)
    opcheck(torch.ops.nf4.quantize.default, (x, 64, "nf4", True))
    nf4.set_backend("reference")  # the CPU test weight: kernel backends need DEVICE tensors
    packed, s = weight()
    nf4.set_backend(kernel_backend)
    packed, s = packed.to(DEVICE), s.to(DEVICE)
    opcheck(torch.ops.nf4.dequantize.default, (*op_args(packed, s), list(s.shape), torch.bfloat16))


def test_matmul_gradients_reach_input_and_bias():
    packed, s = weight(dtype=torch.float32)
    W = nf4.dequantize_4bit(packed, s)
    A = torch.randn(2, 5, 128, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    y = nf4.matmul_4bit(A, packed.t(), s, bias=b)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(y, A @ W.T + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(A.grad, g @ W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_matmul_rejects_wrong_input_width():
    packed, s = weight()
    with pytest.raises(ValueError, match=r"expected last dimension 128"):
        nf4.matmul_4bit(torch.randn(2, 64, dtype=torch.bfloat16), packed.t(), s)
    with pytest.raises(ValueError, match=r"bias must have shape \[48\]"):
        nf4.matmul_4bit(torch.randn(2, 128, dtype=torch.bfloat16), packed.t(), s,
                        bias=torch.zeros(47, dtype=torch.bfloat16))


def test_compile_fullgraph_traces_every_op():
    packed, s = weight(dtype=torch.float32)

    def f(x, A):
        p, st = nf4.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        return nf4.dequantize_4bit(p, st), nf4.matmul_4bit(A, packed.t(), s)

    x, A = torch.randn(16, 64), torch.randn(4, 128)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (d1, y1), (d2, y2) = compiled(x, A), f(x, A)
    assert torch.equal(d1, d2) and torch.equal(y1, y2)


def test_meta_tensors_mixed_with_real_ones_are_rejected():
    """A meta input makes the dispatcher pick the fake kernel; it must fail, not return garbage."""
    packed, s = weight()
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.nf4.matmul(torch.randn(2, 128, dtype=torch.bfloat16), *op_args(packed, s), 48, 128,
                             torch.zeros(48, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.nf4.dequantize(packed.reshape(-1), s.absmax.to("meta"), s.state2.absmax,
                                 s.state2.code, s.offset, 64, 256, "nf4", list(s.shape), torch.bfloat16)
