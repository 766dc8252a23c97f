"""Fused output projection + cross-entropy that never holds the full [tokens, vocab] logits.

    loss = sum over tokens t with labels[t] != ignore_index of
           logsumexp(z_t) - z_t[labels[t]],   z_t = cap * tanh((h_t W^T + b) / cap)  (cap optional)
    divided by ``denominator`` (the count of such tokens, or transformers' num_items_in_batch)

The tokens are processed in chunks: for each chunk a torch GEMM makes its logits in the
hidden states' dtype, one Triton program per token turns that row in place into the gradient of
the loss with respect to the logits (online logsumexp over the vocabulary in blocks, then
``softmax - onehot``, times the soft-cap's derivative, divided by the denominator), and two more
GEMMs take the gradient to the hidden states (and to the weight when it trains). So the forward
computes every gradient that will be needed (none under ``no_grad``; the backward only scales them
by the incoming gradient, a scalar), and
the peak extra memory is one chunk of logits: at Llama-3's 128,256 words and 512 tokens a chunk,
131 MB in bf16 instead of 1.05 GB of fp32 logits plus their gradient for 2048 tokens.

The logits are rounded to the hidden states' dtype before the loss, and the logit gradient to
that dtype before its GEMMs, as ``lm_head(h).float()`` followed by ``F.cross_entropy`` does.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


IGNORE_INDEX = -100
# Chunk size: tokens * vocab <= 2^25 logits (64 MiB in bf16), rounded down to a power of two:
# 256 tokens at 128,256 words (eight GEMMs of M=256 per 2048-token step, each bound by the 1 GB
# weight read, not by the rows). At 2^26 the H200 measured 268 MB above the inputs for 2048
# tokens (a chunk's logits and one more buffer of their size), over half the full bf16 logits.
_CHUNK_LOGITS = 2**25
# Vocabulary columns one program reads per loop step (16 fp32 values a thread with 8 warps).
_BLOCK_V = 4096


@triton.jit
def _softcap(z, CAP: tl.constexpr):
    # cap * tanh(z / cap), tanh through sigmoid (an exact identity)
    return CAP * (2.0 * tl.sigmoid(2.0 * z / CAP) - 1.0)


@triton.jit
def _cross_entropy_kernel(logits_ptr, labels_ptr, loss_ptr, denominator_ptr, vocab, logits_stride,
                          IGNORE: tl.constexpr,   # ignore_index
                          CAP: tl.constexpr,      # final logit soft-cap, 0.0 for none
                          BLOCK: tl.constexpr):   # vocabulary columns per loop step
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != IGNORE
    target = tl.where(valid, label, 0)
    # pass 1: running max and sum of exponentials over the row
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < vocab, other=0.0).to(tl.float32)
        if CAP > 0.0:
            z = _softcap(z, CAP)
        z = tl.where(cols < vocab, z, float("-inf"))  # after the cap, which maps -inf to -CAP
        m_new = tl.maximum(m, z)
        # a lane that has seen only padding (-inf) subtracts 0 instead of -inf (no -inf - -inf = nan)
        # and keeps d = exp(-inf) = 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
    row_max = tl.max(m, axis=0)
    total = tl.sum(d * tl.exp(m - row_max), axis=0)
    z_target = tl.load(base + target).to(tl.float32)
    if CAP > 0.0:
        z_target = _softcap(z_target, CAP)
    lse = row_max + tl.log(total)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
    # pass 2: the row becomes d loss / d logits (zero for ignored tokens)
    scale = tl.where(valid, 1.0 / tl.load(denominator_ptr), 0.0)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        raw = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        z = raw
        if CAP > 0.0:
            z = _softcap(raw, CAP)
        g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        if CAP > 0.0:
            t = z / CAP
            g = g * (1.0 - t * t)
        tl.store(base + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def chunk_rows(vocab: int) -> int:
    rows = max(1, _CHUNK_LOGITS // max(vocab, 1))
    return 1 << (rows.bit_length() - 1)


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             denominator: torch.Tensor, softcap: float, chunk: int, hidden_grad: bool, weight_grad: bool,
             bias_grad: bool):
    """(loss, d loss/d hidden, d loss/d weight, d loss/d bias; each None when not asked for) for
    hidden [N, H]."""
    n, vocab = hidden.shape[0], weight.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if hidden_grad else None
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad else None
    dbias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if bias_grad else None
    for start in range(0, n, chunk):
        h = hidden[start:start + chunk]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        _cross_entropy_kernel[(h.shape[0],)](logits, labels[start:start + chunk], losses[start:start + chunk],
                                             denominator, vocab, logits.stride(0), IGNORE=IGNORE_INDEX,
                                             CAP=softcap, BLOCK=_BLOCK_V, num_warps=8)
        # ``logits`` now holds the gradient of the loss with respect to them.
        if dhidden is not None:
            torch.matmul(logits, weight, out=dhidden[start:start + chunk])
        if dweight is not None:
            dweight.addmm_(logits.t().float(), h.float())
        if dbias is not None:
            dbias += logits.float().sum(0)
    loss = losses.sum() / denominator[0]
    return (loss, dhidden, None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Computes the loss and every gradient in forward; backward scales them by the incoming
    gradient (a scalar), so nothing of size vocab outlives the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denominator, softcap, chunk, grad_enabled):
        # Inputs arrive in their compute dtype (cast by the caller under autocast); autocast off so
        # the fp32 weight-gradient accumulation stays fp32.
        with torch.autocast(hidden.device.type, enabled=False):
            needs = [grad_enabled and n for n in ctx.needs_input_grad[:3]]
            loss, dh, dw, db = _forward(hidden, weight, bias, labels, denominator, softcap, chunk,
                                        needs[0], needs[1], bias is not None and needs[2])
        ctx.save_for_backward(dh, dw, db)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dw, db = ctx.saved_tensors
        return (None if dh is None else dh * dloss.to(dh.dtype), None if dw is None else dw * dloss.to(dw.dtype),
                None if db is None else db * dloss.to(db.dtype), None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, shift: bool = True,
                         num_items_in_batch=None, softcap: Optional[float] = None,
                         chunk: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, as transformers'
    causal-LM loss computes it, without the full logits.

    hidden [..., seq, H] (float), weight [vocab, H] in hidden's dtype, labels [..., seq] (int64, -100
    ignored). ``shift``: position t predicts labels[t + 1] (transformers pads labels with -100 and
    shifts left); pass False with already shifted labels. ``num_items_in_batch``: divide the sum by
    it (gradient accumulation) instead of the count of labelled tokens. ``softcap``: Gemma-2's
    ``final_logit_softcapping``. ``chunk``: tokens per chunk (default: 2^26 logits a chunk).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have shape {list(hidden.shape[:-1])} (hidden's without its last "
                         f"dimension), got {list(labels.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}], got {list(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")
    vocab = weight.shape[0]
    labels = labels.to(hidden.device)
    if shift:
        labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    labels = labels.reshape(-1).contiguous()
    # A label outside [0, vocab) would make the kernel read past its row: refuse it (one host sync
    # per loss, as F.cross_entropy's own check).
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or be {IGNORE_INDEX}, got "
                         f"{labels[bad][:5].tolist()}")
    if num_items_in_batch is None:
        denominator = (labels != IGNORE_INDEX).sum().to(torch.float32)
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    # The projection runs in the autocast dtype when autocast is on (as lm_head would), else in
    # hidden's; the casts stay outside the Function so autograd casts the gradients back.
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden2.dtype
    hidden2, weight = hidden2.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    # Under no_grad (evaluation with labels) no gradient GEMM runs.
    return LinearCrossEntropyFunction.apply(hidden2, weight, bias, labels, denominator.reshape(1),
                                            float(softcap or 0.0), chunk or chunk_rows(vocab),
                                            torch.is_grad_enabled())
