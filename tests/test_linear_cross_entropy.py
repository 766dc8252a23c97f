"""kernels.linear_cross_entropy against F.cross_entropy on the full logits (transformers' loss)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from tests.conftest import DEVICE
from nf4.kernels.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy

# fp32: logsumexp over <= 300 words and GEMMs in another order: a few fp32 ulps of values ~5.
# bf16: both sides round the logits to bf16 before the loss and the logit gradient to bf16 before
# its GEMMs; the rest is fp32 on both, so the bound is fp32's, widened for the bf16 GEMM outputs
# (one bf16 ulp, 2^-8 relative).
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def reference(hidden, weight, bias, labels, shift, num_items, softcap):
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="mean" if num_items is None else "sum")
    return loss if num_items is None else loss / num_items


def check(batch, seq, hidden_size, vocab, dtype=torch.float32, *, seed=0, shift=True, num_items=None,
          softcap=None, chunk=None, bias=False, ignore_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden_size, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5 * 3).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignore_fraction] = IGNORE_INDEX
    labels = labels.to(DEVICE)
    leaves = (h, w) + ((b,) if bias else ())
    want = reference(h, w, b, labels, shift, num_items, softcap)
    grads_want = torch.autograd.grad(want * 2.5, leaves)
    got = linear_cross_entropy(h, w, labels, bias=b, shift=shift, num_items_in_batch=num_items,
                               softcap=softcap, chunk=chunk)
    grads = torch.autograd.grad(got * 2.5, leaves)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want.to(got.dtype), equal_nan=True, **tol)  # all ignored: nan
    for a, b_ in zip(grads, grads_want):
        assert a.dtype == b_.dtype
        torch.testing.assert_close(a, b_, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_matches_full_logits(dtype, chunk):
    check(2, 7, 24, 301, dtype, chunk=chunk)


def test_softcap():
    check(1, 9, 16, 130, softcap=2.0, chunk=4)


def test_num_items_in_batch_and_no_shift():
    check(2, 5, 8, 40, shift=False, num_items=torch.tensor(17))


def test_bias_gradient():
    check(1, 6, 8, 33, bias=True, chunk=2)


def test_vocab_longer_than_one_block():
    check(1, 3, 8, 4096 + 37)


def test_no_grad_gives_the_same_loss_without_gradients():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 8, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(40, 8, generator=g).to(DEVICE)
    labels = torch.randint(0, 40, (2, 5), generator=g).to(DEVICE)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(h, w, None, labels, True, None, None).detach(), **TOLERANCES[torch.float32])


def test_all_ignored_is_nan_as_in_torch():
    h = torch.randn(1, 3, 8, device=DEVICE, requires_grad=True)
    labels = torch.full((1, 3), IGNORE_INDEX, device=DEVICE)
    assert torch.isnan(linear_cross_entropy(h, torch.randn(10, 8, device=DEVICE), labels))


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 2), seq=st.integers(1, 9), hidden_size=st.integers(1, 20), vocab=st.integers(2, 70),
       chunk=st.sampled_from([None, 1, 2, 5]), seed=st.integers(0, 2**16))
def test_matches_full_logits_any_shape(batch, seq, hidden_size, vocab, chunk, seed):
    check(batch, seq, hidden_size, vocab, chunk=chunk, seed=seed)


def test_rejects_out_of_range_labels():
    h = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        linear_cross_entropy(h, torch.randn(10, 8), torch.tensor([[1, 10, 2]]))
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(h, torch.randn(10, 8), torch.tensor([[1, 2]]))


@pytest.mark.gpu
def test_llama3_vocab_never_holds_the_full_logits():
    n, hidden_size, vocab = 2048, 1024, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1, n, hidden_size, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden_size, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (1, n), device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(h, w, labels)
    (grad,) = torch.autograd.grad(loss, h)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # bf16 logits alone are n * vocab * 2 = 525 MB; a 256-token chunk is 66 MB (its logits and one
    # more buffer of their size measured on the H200: ~134 MB, + 4 MB of dh).
    assert extra < n * vocab * 2 / 2, f"{extra / 1e6:.0f} MB above the inputs"
    want = reference(h, w, None, labels, True, None, None)
    (grad_want,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(loss, want, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(grad, grad_want, **TOLERANCES[torch.bfloat16])
