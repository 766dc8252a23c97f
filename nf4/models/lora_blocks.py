"""Fused LoRA blocks: a gated MLP (gate, up, activation, down; or Phi-3's gate_up, activation,
down) and the attention's q, k, v projections, each with their adapters on 4-bit weights, as one
``autograd.Function`` apiece.

    y = lora_blocks.mlp(mlp_module, x, SWIGLU)        # None: run the module's own layers
    y = lora_blocks.gate_up_mlp(phi3_mlp, x, SWIGLU)  # one gate_up_proj, gate first
    qkv = lora_blocks.qkv(attention_module, x)         # (q, k, v) or None

(Phi-3's one ``qkv_proj`` is one layer call already: no block.)

Each projection is ``x W^T + b + s x A^T B^T`` with W a frozen 4-bit weight (``PackedWeight``), b a
frozen bias and (A, B) a trainable adapter, computed by ``nf4.autograd.adapted_matmul`` (the
route the layer itself takes). Gradients go to x and every A and B; the base gets none.

Note: what the MLP block keeps.
    Unfused, autograd keeps every [tokens, intermediate] tensor some function needs: the GLU's
    gate and up, and the down projection's input act(gate) * up. At Llama-3-8B shapes (hidden
    4096, intermediate 14336, bf16) that is 3 x 28,672 = 86,016 bytes a token a layer (176 MB
    at 2048 tokens, 2.8 GB at 32k; with per-layer checkpointing one layer's worth is alive at a
    time, during its backward). The block keeps the input x (which the unfused gate and up keep
    too) and the rank-r products x A^T of gate and up and h A^T of down: 3r values, 96 bytes a
    token at r = 16. Backward recomputes gate and up from x: two more 4-bit matmuls (2 x 2 x
    4096 x 14336 FLOP a token, 481 GFLOP a layer at 2048 tokens), the MLP's base GEMMs going
    from 9 to 11 a step with checkpointing (forward, recompute, dx). The activation's backward
    then writes dgate over gate, dup over up and act(gate) * up (for the down adapter's dA)
    over dh, so backward holds 3 [tokens, intermediate] buffers where the unfused path holds 6.
    ``recompute=False`` keeps gate and up instead (2 of the 3 tensors, no extra matmul; backward
    overwrites them, so that graph cannot be run backward twice): the other trade, for the
    benchmark to weigh.

Note: what the QKV block shares.
    q, k and v read one input: one saved x, one GEMM x [A_q; A_k; A_v]^T for the three rank-r
    products ([tokens, 3r]), and in backward one dA GEMM and one dx buffer that the adapters'
    share (one GEMM) and the three base products dq W_q, dk W_k, dv W_v accumulate into in place.

Note: when a block falls back.
    ``mlp``/``qkv`` return None, and the caller runs the module's own layers (each one fused in
    itself), unless every projection of the block is an eager call of nf4's plain LoRA layer:
      - the layer is a ``QuantLinear4bit`` (or ``Linear4bit``) with a built-in adapter
        (``lora_rank > 0``), or peft's ``LoraQuantLinear4bit`` around one with exactly one active
        plain adapter (not disabled, not merged, no DoRA/aLoRA/lora_bias: its own fused case);
      - its weight is quantized, on the input's device, and the input and parameters are plain
        tensors outside torch.compile (FakeTensors and FSDP's DTensors take the layers' traced
        path);
      - no adapter dropout while training (p > 0 draws a mask per layer; in eval it is off);
      - no hooks or instance-level ``forward`` on the layers (they would be skipped; peft's
        mixed-batch ``adapter_names`` is such a hook; global module hooks are not looked at), and
        no bias that requires a gradient;
      - one compute dtype for all the block's projections; in the MLP, gate/up's output width
        equals down's input width (Phi-3's gate_up: twice it).
    A block that falls back costs only these checks.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nf4.autograd import adapted_matmul, resolve_dtypes, scaled_mm
from nf4.kernels.glu import GEGLU, SWIGLU, glu_backward_with_output, glu_forward
from nf4.nn import QuantLinear4bit
from nf4.weight import PackedWeight, eager, packed_weight

__all__ = ["mlp", "gate_up_mlp", "qkv", "LoraMLP", "LoraGateUpMLP", "LoraQKV", "SWIGLU", "GEGLU"]


class Projection(NamedTuple):
    """One projection of a block, as the layer holds it: ``x W^T + bias + scale * x A^T B^T``."""
    weight: PackedWeight          # checked 4-bit weight
    source: torch.Tensor          # the Params4bit its bytes were checked against
    bias: Optional[torch.Tensor]  # frozen [out] or None
    A: torch.Tensor               # [r, in] parameter
    B: torch.Tensor               # [out, r] parameter
    scale: float                  # LoRA scaling (alpha / r)
    compute_dtype: Optional[torch.dtype]


def _plain(module: nn.Module) -> bool:
    """Whether calling ``module`` runs just its class' forward: no hooks, no instance override."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _base(layer: nn.Module, x: torch.Tensor) -> Optional[tuple[PackedWeight, torch.Tensor, Optional[torch.Tensor]]]:
    """(checked weight, its Params4bit, bias) of a ``QuantLinear4bit`` that an eager call on a
    tensor like ``x`` would take, or None."""
    if not isinstance(layer, QuantLinear4bit) or type(layer).forward is not QuantLinear4bit.forward \
            or not _plain(layer):
        return None
    params = layer._parameters
    source, bias = params["weight"], params["bias"]
    if not source.bnb_quantized or source.is_meta or not eager(source):
        return None
    if bias is not None and (bias.requires_grad or not eager(bias)):
        return None
    w = packed_weight(source, source.quant_state)  # the cached one while current
    index = x.get_device()
    if index != w.device_index or (index < 0 and x.device != w.device) or not w.matrix:
        return None
    return w, source, bias


def projection(layer: nn.Module, x: torch.Tensor) -> Optional[Projection]:
    """The projection ``layer`` computes on an input like ``x`` (x's width is not checked here),
    or None when the block must fall back for it (See Note: when a block falls back)."""
    # peft's wrapper exists only once nf4.peft was imported (which imports peft: 1.7 s, not paid
    # by a model without it).
    nf4_peft = sys.modules.get("nf4.peft")
    if nf4_peft is not None and isinstance(layer, nf4_peft.LoraQuantLinear4bit):
        if not _plain(layer) or layer.disable_adapters or layer.merged:
            return None
        name = layer._fused_adapter()
        if name is None:
            return None
        dropout = layer.lora_dropout[name]
        if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout)
                                                         and (dropout.p == 0 or not dropout.training)):
            return None
        base = layer.get_base_layer()
        A, B, scale = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    elif isinstance(layer, QuantLinear4bit):
        base = layer
        A, B = layer._parameters.get("lora_A"), layer._parameters.get("lora_B")
        if A is None or B is None or (layer.training and layer.lora_dropout > 0):
            return None
        scale = layer.scaling
    else:
        return None
    if not (eager(A) and eager(B)):
        return None
    found = _base(base, x)
    if found is None:
        return None
    return Projection(*found, A, B, float(scale), base.compute_dtype)


def _dtypes(x: torch.Tensor, projections) -> Optional[tuple[torch.dtype, torch.dtype]]:
    """(compute, output) dtype shared by the projections (each resolved as its layer does), or
    None when they differ. Without autocast the output is x's dtype, so a later projection's
    input (the activation) resolves as x does."""
    found = {resolve_dtypes(x, p.compute_dtype) for p in projections}
    return found.pop() if len(found) == 1 else None


def _fresh(p: Projection) -> PackedWeight:
    # Its memory changed since forward (FSDP gathers again for backward): checked again.
    return p.weight if p.weight.current(p.source) else packed_weight(p.source, p.weight.state)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _adapter_grads(G: torch.Tensor, projections, x2: torch.Tensor, A: torch.Tensor, needs_A, ranks,
                   lora_dtypes):
    """(alpha, [dA_i or None]) from G = [dY_i B_i] ([T, sum r]) and the stacked A ([sum r, in]):
    dA in one GEMM, and the alpha with which ``G A`` is dx's adapter share. With one scaling for
    all (the usual case) it is the GEMMs' alpha; otherwise G's column blocks are scaled first
    (T x sum r values)."""
    scales = {p.scale for p in projections}
    if len(scales) == 1:
        alpha = scales.pop()
    else:
        for g, p in zip(G.split(ranks, 1), projections):
            g.mul_(p.scale)
        alpha = 1.0
    dA = [None] * len(projections)
    if any(needs_A):
        stacked = scaled_mm(G.t(), x2, alpha, A, lora_dtypes[0])
        dA = [None if not needs else _cast(d, dtype)
              for d, needs, dtype in zip(stacked.split(ranks, 0), needs_A, lora_dtypes)]
    return alpha, dA


def _input_grad(x2: torch.Tensor, G: torch.Tensor, A: torch.Tensor, alpha: float, pairs, c: torch.dtype,
                x_dtype: torch.dtype) -> torch.Tensor:
    """dx = alpha G A (the adapters' share) + sum of dY_i W_i over ``pairs`` of (dY_i, projection),
    accumulated in one [T, in] buffer, one dequantized weight alive at a time."""
    dx = torch.addmm(x2, G, A, beta=0, alpha=alpha)                        # x2 lends its shape
    for d, p in pairs:
        W = _fresh(p).dequantize(c)
        dx.addmm_(d, W)
        del W
    return _cast(dx, x_dtype)


def _down_backward(dy2: torch.Tensor, g: torch.Tensor, u: torch.Tensor, xa_d: torch.Tensor, Ad: torch.Tensor,
                   Bd: torch.Tensor, down: Projection, act: int, c: torch.dtype, need_dA: bool, need_dB: bool,
                   A_dtype: torch.dtype, B_dtype: torch.dtype):
    """Both MLP blocks' backward from dy to dgate, dup: (dA_down, dB_down), with dgate and dup
    written over ``g`` and ``u`` (gate and up, [T, intermediate]). dB_down comes from the saved
    h A_down^T; dh = dy (s B_d A_d + W_d), in one buffer; then act(gate) * up over dh for dA_down.

    Kept (not recomputed) gate and up are overwritten too: the saved tensors cannot be freed
    before backward returns, and a second copy would hold 2 more [T, intermediate] buffers, as many
    as the layers' backward. A second backward through the same graph (retain_graph) then fails
    autograd's check of the saved tensors' versions instead of reading them."""
    g_d = dy2 @ Bd                                                          # [T, rd]
    dB_down = scaled_mm(dy2.t(), xa_d, down.scale, Bd, B_dtype) if need_dB else None
    dh = torch.addmm(g, g_d, Ad, beta=0, alpha=down.scale)                 # g lends its shape
    W = _fresh(down).dequantize(c)
    dh.addmm_(dy2, W)
    del W
    glu_backward_with_output(dh, g, u, act, g, u)                          # dh now holds h
    dA_down = scaled_mm(g_d.t(), dh, down.scale, Ad, A_dtype) if need_dA else None
    return dA_down, dB_down


class LoraMLP(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with the three adapters; See Note: what the MLP block keeps.

    Inputs: x [T, hidden] (2-D), then A and B of gate, up, down, then ``rest`` = (gate, up, down
    ``Projection``s, act (SWIGLU or GEGLU), compute dtype, output dtype, recompute). Returns
    [T, hidden] in the output dtype.
    """

    @staticmethod
    def forward(ctx, x, A_gate, B_gate, A_up, B_up, A_down, B_down, rest):
        gate, up, down, act, compute_dtype, out_dtype, recompute = rest
        c = compute_dtype
        x2 = _cast(x, c)
        A_gu = _cast(torch.cat((A_gate, A_up)), c)
        Bg, Bu, Ad, Bd = _cast(B_gate, c), _cast(B_up, c), _cast(A_down, c), _cast(B_down, c)
        ranks = (A_gate.shape[0], A_up.shape[0])
        xa_gu = F.linear(x2, A_gu)                                          # [T, rg + ru]
        xa_g, xa_u = xa_gu.split(ranks, 1)
        g = adapted_matmul(x2, _cast(gate.bias, c), xa_g, Bg, gate.weight, gate.scale, c)
        u = adapted_matmul(x2, _cast(up.bias, c), xa_u, Bu, up.weight, up.scale, c)
        h = glu_forward(g, u, act)
        if recompute:
            g = u = None  # freed here, rebuilt in backward
        xa_d = F.linear(h, Ad)                                              # [T, rd]
        y = adapted_matmul(h, _cast(down.bias, c), xa_d, Bd, down.weight, down.scale, c)
        del h
        ctx.save_for_backward(x2, xa_gu, xa_d, A_gu, Bg, Bu, Ad, Bd, g, u)
        ctx.meta = (gate, up, down, act, c, x.dtype, ranks, (A_gate.dtype, A_up.dtype, A_down.dtype),
                    (B_gate.dtype, B_up.dtype, B_down.dtype))
        return _cast(y, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, xa_gu, xa_d, A_gu, Bg, Bu, Ad, Bd, g, u = ctx.saved_tensors
        gate, up, down, act, c, x_dtype, ranks, A_dtypes, B_dtypes = ctx.meta
        needs = ctx.needs_input_grad
        dy2 = _cast(dy, c)
        xa_g, xa_u = xa_gu.split(ranks, 1)
        if g is None:  # See Note: what the MLP block keeps.
            g = adapted_matmul(x2, _cast(gate.bias, c), xa_g, Bg, _fresh(gate), gate.scale, c)
            u = adapted_matmul(x2, _cast(up.bias, c), xa_u, Bu, _fresh(up), up.scale, c)
        else:  # the kernel's writes below bypass autograd's version counters: bumped here
            for t in (g, u):
                torch.autograd.graph.increment_version(t)
        dA_down, dB_down = _down_backward(dy2, g, u, xa_d, Ad, Bd, down, act, c, needs[5], needs[6],
                                          A_dtypes[2], B_dtypes[2])
        dgate, dup = g, u
        del g, u
        dB_gate = scaled_mm(dgate.t(), xa_g, gate.scale, Bg, B_dtypes[0]) if needs[2] else None
        dB_up = scaled_mm(dup.t(), xa_u, up.scale, Bu, B_dtypes[1]) if needs[4] else None
        dx = dA_gate = dA_up = None
        if needs[0] or needs[1] or needs[3]:
            G = torch.cat((dgate @ Bg, dup @ Bu), 1)                        # [T, rg + ru]
            alpha, (dA_gate, dA_up) = _adapter_grads(G, (gate, up), x2, A_gu, (needs[1], needs[3]), ranks,
                                                     A_dtypes[:2])
            if needs[0]:
                dx = _input_grad(x2, G, A_gu, alpha, ((dgate, gate), (dup, up)), c, x_dtype)
        return dx, dA_gate, dB_gate, dA_up, dB_up, dA_down, dB_down, None


class LoraGateUpMLP(torch.autograd.Function):
    """``down(act(gate) * up)`` where gate and up are the two halves of one projection's output
    (Phi-3's ``gate_up_proj``, gate first), with both adapters; otherwise as ``LoraMLP`` (See Note:
    what the MLP block keeps: here gate and up are one [T, 2 x intermediate] buffer, and dgate,
    dup are written over it, so backward's dgu is that buffer).

    Inputs: x [T, hidden] (2-D), A and B of gate_up, A and B of down, then ``rest`` = (gate_up,
    down ``Projection``s, act, compute dtype, output dtype, recompute). Returns [T, hidden] in the
    output dtype.
    """

    @staticmethod
    def forward(ctx, x, A_gu, B_gu, A_down, B_down, rest):
        gate_up, down, act, compute_dtype, out_dtype, recompute = rest
        c = compute_dtype
        x2 = _cast(x, c)
        A, B, Ad, Bd = _cast(A_gu, c), _cast(B_gu, c), _cast(A_down, c), _cast(B_down, c)
        xa = F.linear(x2, A)                                                # [T, r]
        gu = adapted_matmul(x2, _cast(gate_up.bias, c), xa, B, gate_up.weight, gate_up.scale, c)
        width = gu.shape[1] // 2
        h = glu_forward(gu[:, :width], gu[:, width:], act)
        if recompute:
            gu = None  # freed here, rebuilt in backward
        xa_d = F.linear(h, Ad)                                              # [T, rd]
        y = adapted_matmul(h, _cast(down.bias, c), xa_d, Bd, down.weight, down.scale, c)
        del h
        ctx.save_for_backward(x2, xa, xa_d, A, B, Ad, Bd, gu)
        ctx.meta = (gate_up, down, act, c, x.dtype, (A_gu.dtype, A_down.dtype), (B_gu.dtype, B_down.dtype))
        return _cast(y, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, xa_d, A, B, Ad, Bd, gu = ctx.saved_tensors
        gate_up, down, act, c, x_dtype, A_dtypes, B_dtypes = ctx.meta
        needs = ctx.needs_input_grad
        dy2 = _cast(dy, c)
        if gu is None:  # See Note: what the MLP block keeps.
            gu = adapted_matmul(x2, _cast(gate_up.bias, c), xa, B, _fresh(gate_up), gate_up.scale, c)
        else:  # the kernel's writes below bypass autograd's version counters: bumped here
            torch.autograd.graph.increment_version(gu)
        width = gu.shape[1] // 2
        # dgate and dup land in gu's halves: gu becomes d(gate_up).
        dA_down, dB_down = _down_backward(dy2, gu[:, :width], gu[:, width:], xa_d, Ad, Bd, down, act, c,
                                          needs[3], needs[4], A_dtypes[1], B_dtypes[1])
        dgu = gu
        dB_gu = scaled_mm(dgu.t(), xa, gate_up.scale, B, B_dtypes[0]) if needs[2] else None
        dx = dA_gu = None
        if needs[0] or needs[1]:
            G = dgu @ B                                                     # [T, r]
            alpha, (dA_gu,) = _adapter_grads(G, (gate_up,), x2, A, (needs[1],), (A.shape[0],), A_dtypes[:1])
            if needs[0]:
                dx = _input_grad(x2, G, A, alpha, ((dgu, gate_up),), c, x_dtype)
        return dx, dA_gu, dB_gu, dA_down, dB_down, None


class LoraQKV(torch.autograd.Function):
    """q, k, v projections of one input with their adapters; See Note: what the QKV block shares.

    Inputs: x [T, hidden] (2-D), A and B of q, k, v, then ``rest`` = (the three ``Projection``s,
    compute dtype, output dtype). Returns (q, k, v), [T, out_i] each in the output dtype.
    """

    @staticmethod
    def forward(ctx, x, A_q, B_q, A_k, B_k, A_v, B_v, rest):
        projections, compute_dtype, out_dtype = rest
        c = compute_dtype
        x2 = _cast(x, c)
        A = _cast(torch.cat((A_q, A_k, A_v)), c)
        Bs = tuple(_cast(B, c) for B in (B_q, B_k, B_v))
        ranks = (A_q.shape[0], A_k.shape[0], A_v.shape[0])
        xa = F.linear(x2, A)                                                # [T, rq + rk + rv]
        outs = tuple(_cast(adapted_matmul(x2, _cast(p.bias, c), xa_i, B, p.weight, p.scale, c), out_dtype)
                     for p, xa_i, B in zip(projections, xa.split(ranks, 1), Bs))
        ctx.save_for_backward(x2, xa, A, *Bs)
        ctx.meta = (projections, c, x.dtype, ranks, (A_q.dtype, A_k.dtype, A_v.dtype),
                    (B_q.dtype, B_k.dtype, B_v.dtype))
        return outs

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, xa, A, *Bs = ctx.saved_tensors
        projections, c, x_dtype, ranks, A_dtypes, B_dtypes = ctx.meta
        needs = ctx.needs_input_grad
        dys = tuple(_cast(d, c) for d in (dq, dk, dv))
        dB = [scaled_mm(d.t(), xa_i, p.scale, B, dtype) if needs[2 + 2 * i] else None
              for i, (d, xa_i, B, p, dtype) in enumerate(zip(dys, xa.split(ranks, 1), Bs, projections, B_dtypes))]
        dx, dA = None, [None] * 3
        if needs[0] or needs[1] or needs[3] or needs[5]:
            G = torch.cat([d @ B for d, B in zip(dys, Bs)], 1)              # [T, rq + rk + rv]
            alpha, dA = _adapter_grads(G, projections, x2, A, (needs[1], needs[3], needs[5]), ranks, A_dtypes)
            if needs[0]:
                dx = _input_grad(x2, G, A, alpha, zip(dys, projections), c, x_dtype)
        return dx, dA[0], dB[0], dA[1], dB[1], dA[2], dB[2], None


def mlp(module: nn.Module, x: torch.Tensor, act: int, recompute: bool = True) -> Optional[torch.Tensor]:
    """``module.down_proj(act(module.gate_proj(x)) * module.up_proj(x))`` through ``LoraMLP``, or
    None when the block falls back (See Note: when a block falls back). ``act``: SWIGLU or GEGLU;
    ``recompute``: rebuild gate and up in backward (True) or keep them (See Note: what the MLP
    block keeps)."""
    if not eager(x) or x.dim() == 0 or not x.dtype.is_floating_point:
        return None
    projections = tuple(projection(getattr(module, n, None), x) for n in ("gate_proj", "up_proj", "down_proj"))
    if None in projections:
        return None
    gate, up, down = projections
    hidden, width = x.shape[-1], gate.weight.out_features
    if (gate.weight.in_features != hidden or up.weight.in_features != hidden or up.weight.out_features != width
            or down.weight.in_features != width):
        return None
    dtypes = _dtypes(x, projections)
    if dtypes is None:
        return None
    x2 = x.reshape(-1, hidden)
    # 2-D in and out, reshaped out here: an output that is not a view made inside the Function
    # may be modified in place by the caller.
    y = LoraMLP.apply(x2, gate.A, gate.B, up.A, up.B, down.A, down.B, (gate, up, down, act, *dtypes, recompute))
    return y.view(*x.shape[:-1], down.weight.out_features)


def gate_up_mlp(module: nn.Module, x: torch.Tensor, act: int, recompute: bool = True) -> Optional[torch.Tensor]:
    """``module.down_proj(act(gate) * up)`` with ``gate, up = module.gate_up_proj(x).chunk(2, -1)``
    (Phi-3) through ``LoraGateUpMLP``, or None when the block falls back (See Note: when a block
    falls back; gate_up's output width must be twice down's input width)."""
    if not eager(x) or x.dim() == 0 or not x.dtype.is_floating_point:
        return None
    projections = tuple(projection(getattr(module, n, None), x) for n in ("gate_up_proj", "down_proj"))
    if None in projections:
        return None
    gate_up, down = projections
    hidden = x.shape[-1]
    if gate_up.weight.in_features != hidden or gate_up.weight.out_features != 2 * down.weight.in_features:
        return None
    dtypes = _dtypes(x, projections)
    if dtypes is None:
        return None
    x2 = x.reshape(-1, hidden)
    y = LoraGateUpMLP.apply(x2, gate_up.A, gate_up.B, down.A, down.B, (gate_up, down, act, *dtypes, recompute))
    return y.view(*x.shape[:-1], down.weight.out_features)


def qkv(module: nn.Module, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(module.q_proj(x), module.k_proj(x), module.v_proj(x))`` through ``LoraQKV``, or None when
    the block falls back (See Note: when a block falls back)."""
    if not eager(x) or x.dim() == 0 or not x.dtype.is_floating_point:
        return None
    projections = tuple(projection(getattr(module, n, None), x) for n in ("q_proj", "k_proj", "v_proj"))
    if None in projections:
        return None
    hidden = x.shape[-1]
    if any(p.weight.in_features != hidden for p in projections):
        return None
    dtypes = _dtypes(x, projections)
    if dtypes is None:
        return None
    x2 = x.reshape(-1, hidden)
    # The q, k, v the caller rotates in place: 2-D Function outputs, viewed out here (as in mlp).
    outs = LoraQKV.apply(x2, *(t for p in projections for t in (p.A, p.B)), (projections, *dtypes))
    lead = x.shape[:-1]
    return tuple(o.view(*lead, p.weight.out_features) for o, p in zip(outs, projections))
