"""nf4.models.lora_blocks: the fused gated-MLP and q/k/v blocks against the layers they replace
(nf4's QuantLinear4bit and peft's LoraQuantLinear4bit called one by one): forward and every
gradient (x, each A, each B), what the MLP block keeps for backward, and when a block falls back.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import nf4
from nf4 import models
from nf4.kernels.glu import GEGLU, SWIGLU, glu_backward_with_output
from nf4.models import lora_blocks
from nf4.nn import QuantLinear4bit
from tests.conftest import DEVICE

ACTS = {SWIGLU: F.silu, GEGLU: lambda g: F.gelu(g, approximate="tanh")}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
GATE_UP_NAMES = ("gate_up_proj", "down_proj")
# fp32: the block computes the layers' sums in another grouping (x [A_g; A_u]^T as one GEMM, dx as
# G [A_g; A_u] + dgate W_g + dup W_u instead of two per-layer sums added by autograd). Rounding
# of a sum scales with the sum of its terms' magnitudes, not with the result: a gradient whose
# terms cancel (a 1x1 dB over 9 tokens came out at 4e-5 of its own size) is off by more than its
# size says. So errors are measured against ``magnitudes`` (the same computation in float64 with
# every input, weight and output gradient made positive, which sums magnitudes instead of values):
# measured at most 3e-8 of the largest (160 hypothesis-drawn configs). 1e-5 fails on any maths
# error: a lost scaling, a missing bias or base product, a wrong activation were 3.5x to 35x over it.
FP32_REL = 1e-5
# bf16 (compute and autocast): the block rounds to bf16 at the same points as the layers, in
# another grouping of the sums; its largest error against the fp32 result stays within twice the
# layers' own plus one unit roundoff (2^-8): measured 0.3-1.4% for both, the block at most 2.2x
# the layers' on the smallest errors.
BF16_SLACK = 2.0 ** -8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``b``."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def quant_layer(in_features, out_features, rank, alpha, bias=False, compute_dtype=torch.float32, dropout=0.0):
    linear = nn.Linear(in_features, out_features, bias=bias, device=DEVICE)
    layer = QuantLinear4bit.from_linear(linear, lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                                        compute_dtype=compute_dtype)
    with torch.no_grad():  # B starts at zero, which would hide every gradient but dB
        layer.lora_B.normal_(0, 0.5)
    return layer


class Block(nn.Module):
    """A module with the three projections a block reads (``names``)."""

    def __init__(self, names, layers):
        super().__init__()
        for name, layer in zip(names, layers):
            setattr(self, name, layer)


def mlp_block(hidden, width, ranks=(4, 4, 4), alphas=(8.0, 8.0, 8.0), bias=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    shapes = ((hidden, width), (hidden, width), (width, hidden))
    return Block(MLP_NAMES, [quant_layer(i, o, r, a, bias, **kwargs)
                             for (i, o), r, a in zip(shapes, ranks, alphas)])


def qkv_block(hidden, outs=(24, 8, 8), ranks=(4, 4, 4), alphas=(8.0, 8.0, 8.0), bias=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Block(QKV_NAMES, [quant_layer(hidden, o, r, a, bias, **kwargs) for o, r, a in zip(outs, ranks, alphas)])


def gate_up_block(hidden, width, ranks=(4, 4), alphas=(8.0, 8.0), bias=False, seed=0, **kwargs):
    """Phi-3's MLP: one gate_up_proj (gate first) and down_proj."""
    torch.manual_seed(seed)
    shapes = ((hidden, 2 * width), (width, hidden))
    return Block(GATE_UP_NAMES, [quant_layer(i, o, r, a, bias, **kwargs) for (i, o), r, a in zip(shapes, ranks, alphas)])


def unfused_gate_up(module, x, act):
    gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
    return module.down_proj(ACTS[act](gate) * up)


def unfused_mlp(module, x, act):
    return module.down_proj(ACTS[act](module.gate_proj(x)) * module.up_proj(x))


def unfused_qkv(module, x):
    return tuple(getattr(module, n)(x) for n in QKV_NAMES)


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def run(fn, x, params, seed=1, positive=False):
    """(outputs, gradients of x and params) for random output gradients (their magnitudes when
    ``positive``)."""
    x = x.detach().clone().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    dys = [dy.abs() for dy in dys] if positive else dys
    return outs, torch.autograd.grad(outs, [x, *params], dys)


class PositiveTwin(nn.Module):
    """A float64 dense copy of a QuantLinear4bit with every weight made positive: run on positive
    inputs and output gradients, each value it computes is the sum of the magnitudes of the terms
    that the layer sums (for the MLP's activations, an upper bound on them)."""

    def __init__(self, layer: QuantLinear4bit):
        super().__init__()
        self.weight = layer.dequantize().double().abs()
        self.bias = None if layer.bias is None else layer.bias.detach().double().abs()
        self.lora_A = nn.Parameter(layer.lora_A.detach().double().abs())
        self.lora_B = nn.Parameter(layer.lora_B.detach().double().abs())
        self.scaling = abs(layer.scaling)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def magnitudes(module, unfused, x):
    """Outputs and gradients of ``unfused`` on ``module``'s PositiveTwin: the scale of each sum."""
    twin = Block([n for n, _ in module.named_children()], [PositiveTwin(m) for m in module.children()])
    return run(unfused(twin), x.double().abs(), trainable(twin), positive=True)


def graph_names(outs) -> set[str]:
    """The names of every backward node reachable from ``outs``."""
    seen, names = set(), set()
    stack = [o.grad_fn for o in (outs if isinstance(outs, tuple) else (outs,)) if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def check_fp32(fused, unfused, module, x):
    """``unfused(module)`` is the layers' computation; its outputs and gradients against the
    block's, relative to the largest magnitude sum (FP32_REL)."""
    params = trainable(module)
    outs, grads = run(fused, x, params)
    want_outs, want_grads = run(unfused(module), x, params)
    scale_outs, scale_grads = magnitudes(module, unfused, x)
    for got, want, scale in zip(outs + grads, want_outs + want_grads, scale_outs + scale_grads, strict=True):
        assert got.shape == want.shape == scale.shape and got.dtype == want.dtype
        err = (got.double() - want.double()).abs().max().item()
        assert err <= FP32_REL * scale.abs().max().item(), (err, want.abs().max().item(), scale.abs().max().item())


# ------------------------------------------------------------------------------- MLP, fp32
@settings(max_examples=20, deadline=None)
@given(hidden=st.integers(1, 70), width=st.integers(1, 130), batch=st.integers(1, 2), seq=st.integers(1, 9),
       ranks=st.tuples(*[st.integers(1, 5)] * 3), alphas=st.tuples(*[st.sampled_from([0.5, 8.0, 40.0])] * 3),
       bias=st.booleans(), act=st.sampled_from([SWIGLU, GEGLU]), recompute=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_mlp_block_matches_the_layers_fp32(hidden, width, batch, seq, ranks, alphas, bias, act, recompute, seed):
    module = mlp_block(hidden, width, ranks, alphas, bias, seed)
    x = torch.randn(batch, seq, hidden, device=DEVICE)

    def fused(x):
        y = lora_blocks.mlp(module, x, act, recompute)
        assert y is not None and "LoraMLPBackward" in graph_names(y)
        return y

    check_fp32(fused, lambda m: lambda x: unfused_mlp(m, x, act), module, x)


# ------------------------------------------------------------------------------- Phi-3 MLP, fp32
@settings(max_examples=20, deadline=None)
@given(hidden=st.integers(1, 70), width=st.integers(1, 130), tokens=st.integers(1, 13),
       ranks=st.tuples(*[st.integers(1, 5)] * 2), alphas=st.tuples(*[st.sampled_from([0.5, 8.0, 40.0])] * 2),
       bias=st.booleans(), act=st.sampled_from([SWIGLU, GEGLU]), recompute=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_gate_up_block_matches_the_layers_fp32(hidden, width, tokens, ranks, alphas, bias, act, recompute, seed):
    module = gate_up_block(hidden, width, ranks, alphas, bias, seed)
    x = torch.randn(tokens, hidden, device=DEVICE)

    def fused(x):
        y = lora_blocks.gate_up_mlp(module, x, act, recompute)
        assert y is not None and "LoraGateUpMLPBackward" in graph_names(y)
        return y

    check_fp32(fused, lambda m: lambda x: unfused_gate_up(m, x, act), module, x)


# ------------------------------------------------------------------------------- QKV, fp32
@settings(max_examples=20, deadline=None)
@given(hidden=st.integers(1, 70), outs=st.tuples(*[st.integers(1, 50)] * 3), tokens=st.integers(1, 13),
       ranks=st.tuples(*[st.integers(1, 5)] * 3), alphas=st.tuples(*[st.sampled_from([0.5, 8.0, 40.0])] * 3),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_qkv_block_matches_the_layers_fp32(hidden, outs, tokens, ranks, alphas, bias, seed):
    module = qkv_block(hidden, outs, ranks, alphas, bias, seed)
    x = torch.randn(tokens, hidden, device=DEVICE)

    def fused(x):
        qkv = lora_blocks.qkv(module, x)
        assert qkv is not None and "LoraQKVBackward" in graph_names(qkv)
        return qkv

    check_fp32(fused, lambda m: lambda x: unfused_qkv(m, x), module, x)


def test_qkv_outputs_may_be_modified_in_place():
    """q, k, v are views made outside the Function (of 2-D outputs it allocated), so a caller may
    rotate them in place (RoPE); the layers' own outputs, views made inside their Function, may not."""
    module = qkv_block(16, (8, 8, 8))
    x = torch.randn(2, 3, 16, device=DEVICE)

    def rotated(x, in_place):
        q, k, v = lora_blocks.qkv(module, x)
        q = q.view(2, 3, 2, 4).transpose(1, 2)
        q = q.mul_(3.0) if in_place else q * 3.0
        return q.sum() + (k * v).sum()

    params = trainable(module)
    (_,), grads = run(lambda x: (rotated(x, True),), x, params)
    (_,), want = run(lambda x: (rotated(x, False),), x, params)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    q = module.q_proj(x.requires_grad_()).view(2, 3, 2, 4).transpose(1, 2)
    with pytest.raises(RuntimeError, match="created inside a custom Function"):
        q.mul_(3.0)


# ------------------------------------------------------------------------------- bf16
def check_bf16(module, fused, unfused, x, autocast):
    """The block's and the layers' bf16 results against the layers in fp32: BF16_SLACK."""
    layers = [m for m in module.children()]
    params = trainable(module)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        outs, grads = run(fused, x, params)
        want_outs, want_grads = run(unfused, x, params)
    for layer in layers:
        layer.compute_dtype = torch.float32
    truth_outs, truth_grads = run(unfused, x, params)
    for got, want, truth in zip(outs + grads, want_outs + want_grads, truth_outs + truth_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel_err(got, truth) <= 2 * rel_err(want, truth) + BF16_SLACK, (rel_err(got, truth),
                                                                               rel_err(want, truth))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-compute", "autocast"])
@pytest.mark.parametrize("act", [SWIGLU, GEGLU])
@pytest.mark.parametrize("recompute", [True, False])
def test_mlp_block_bf16(autocast, act, recompute):
    module = mlp_block(96, 200, ranks=(8, 8, 8), alphas=(16.0, 16.0, 16.0), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 37, 96, device=DEVICE)  # fp32 input: bf16 compute inside, fp32 (or bf16) out
    check_bf16(module, lambda x: lora_blocks.mlp(module, x, act, recompute), lambda x: unfused_mlp(module, x, act),
               x, autocast)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-compute", "autocast"])
@pytest.mark.parametrize("recompute", [True, False])
def test_gate_up_block_bf16(autocast, recompute):
    module = gate_up_block(96, 200, ranks=(8, 8), alphas=(16.0, 16.0), bias=True, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 37, 96, device=DEVICE)
    check_bf16(module, lambda x: lora_blocks.gate_up_mlp(module, x, SWIGLU, recompute),
               lambda x: unfused_gate_up(module, x, SWIGLU), x, autocast)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-compute", "autocast"])
def test_qkv_block_bf16(autocast):
    module = qkv_block(96, (64, 16, 16), ranks=(8, 8, 8), alphas=(16.0, 16.0, 16.0), bias=True,
                       compute_dtype=torch.bfloat16)
    x = torch.randn(2, 41, 96, device=DEVICE)
    check_bf16(module, lambda x: lora_blocks.qkv(module, x), lambda x: unfused_qkv(module, x), x, autocast)


def test_blocks_keep_the_adapters_dtypes():
    """bf16 adapters (as bnb + LoRA trains them) get bf16 gradients; the output is the autocast dtype."""
    module = mlp_block(40, 72)
    for layer in module.children():
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.bfloat16(), layer.lora_B.data.bfloat16()
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = lora_blocks.mlp(module, x, SWIGLU)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.bfloat16 for p in trainable(module))


# ------------------------------------------------------------------------------- what is kept
def saved_shapes(fn, x) -> list[tuple[int, ...]]:
    """The shapes of every tensor autograd keeps for backward while ``fn(x)`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return shapes


def test_mlp_block_keeps_no_intermediate_activation():
    """See Note: what the MLP block keeps. Recomputing: no [tokens, intermediate] tensor is kept
    (the unfused layers keep gate, up and the activation: 3); keeping: exactly gate and up."""
    tokens, hidden, width, rank = 16, 32, 256, 4
    module = mlp_block(hidden, width, ranks=(rank,) * 3)
    x = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)
    wide = (tokens, width)
    unfused = saved_shapes(lambda x: unfused_mlp(module, x, SWIGLU), x)
    assert unfused.count(wide) >= 3
    kept = saved_shapes(lambda x: lora_blocks.mlp(module, x, SWIGLU, recompute=False), x)
    assert kept.count(wide) == 2
    shapes = saved_shapes(lambda x: lora_blocks.mlp(module, x, SWIGLU), x)
    assert wide not in shapes
    # x, x [A_g; A_u]^T, h A_d^T, [A_g; A_u], B_g, B_u, A_d, B_d: the input plus rank-sized tensors
    assert sorted(shapes) == sorted([(tokens, hidden), (tokens, 2 * rank), (tokens, rank), (2 * rank, hidden),
                                     (width, rank), (width, rank), (rank, width), (hidden, rank)])


def test_gate_up_block_keeps_no_intermediate_activation():
    """Phi-3's block: recomputing keeps no [tokens, 2 x intermediate] gate_up output (the layers
    keep it, and the activation's input halves and output); keeping, exactly that one."""
    tokens, hidden, width, rank = 16, 32, 256, 4
    module = gate_up_block(hidden, width, ranks=(rank, rank))
    x = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)
    unfused = saved_shapes(lambda x: unfused_gate_up(module, x, SWIGLU), x)
    assert unfused.count((tokens, width)) >= 3  # gate, up (views of gate_up) and act(gate) * up
    kept = saved_shapes(lambda x: lora_blocks.gate_up_mlp(module, x, SWIGLU, recompute=False), x)
    assert kept.count((tokens, 2 * width)) == 1 and (tokens, width) not in kept
    shapes = saved_shapes(lambda x: lora_blocks.gate_up_mlp(module, x, SWIGLU), x)
    # x, x A_gu^T, h A_d^T, A_gu, B_gu, A_d, B_d: the input plus rank-sized tensors
    assert sorted(shapes) == sorted([(tokens, hidden), (tokens, rank), (tokens, rank), (rank, hidden),
                                     (2 * width, rank), (rank, width), (hidden, rank)])


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [True, False])
def test_mlp_block_memory_at_llama_8b_shapes(recompute):
    """Llama-3-8B's MLP (4096 -> 14336 -> 4096), 2048 tokens, r = 16, bf16 autocast on the GPU (the
    CUDA backend's routes): the block matches the layers (BF16_SLACK), keeps no [tokens, 14336]
    tensor after forward when recomputing (gate and up when not; the layers keep three), and its
    peak over forward + backward is below the layers' (See Note: what the MLP block keeps: 3
    such buffers in backward where the layers hold 6)."""
    tokens, hidden, width = 2048, 4096, 14336
    module = mlp_block(hidden, width, ranks=(16,) * 3, alphas=(32.0,) * 3, compute_dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    activation = tokens * width * 2
    measured = {}
    for name, fn in (("block", lambda x: lora_blocks.mlp(module, x, SWIGLU, recompute)),
                     ("layers", lambda x: unfused_mlp(module, x, SWIGLU))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        torch.autograd.grad(y, [x, *trainable(module)], torch.ones_like(y))
        measured[name] = (kept, torch.cuda.max_memory_allocated() - before)
        del y
    (kept, peak), (layers_kept, layers_peak) = measured["block"], measured["layers"]
    assert layers_kept >= 3 * activation
    # the rest of what the block keeps: rank-16 products and bf16 copies of the adapters (~2 MB)
    wide = 0 if recompute else 2 * activation  # gate and up when kept
    assert wide <= kept < wide + activation / 10
    assert peak < layers_peak
    check_bf16(module, lambda x: lora_blocks.mlp(module, x, SWIGLU, recompute),
               lambda x: unfused_mlp(module, x, SWIGLU), x.detach().float(), autocast=True)


@pytest.mark.parametrize("gate_up", [False, True], ids=["gate+up", "gate_up"])
def test_second_backward_recomputes_or_refuses(gate_up):
    """Recomputing, the graph can be run backward twice (retain_graph) with the same result; keeping
    gate and up, backward overwrites them and a second backward is refused by autograd's version
    check instead of reading them."""
    module = gate_up_block(40, 72) if gate_up else mlp_block(40, 72)
    block = lora_blocks.gate_up_mlp if gate_up else lora_blocks.mlp
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    y = block(module, x, SWIGLU)
    first = torch.autograd.grad(y.sum(), x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], first, rtol=0, atol=0)
    y = block(module, x, SWIGLU, recompute=False)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x, retain_graph=True)[0], first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), x)


# ------------------------------------------------------------------------------- fall-backs
def dropout_in_training(module):
    module.gate_proj.lora_dropout = 0.1
    module.train()


def rank_zero(module):
    module.up_proj = QuantLinear4bit.from_linear(nn.Linear(module.up_proj.in_features, module.up_proj.out_features,
                                                           bias=False, device=DEVICE), compute_dtype=torch.float32)


def plain_linear(module):
    module.down_proj = nn.Linear(module.down_proj.in_features, module.down_proj.out_features, device=DEVICE)


def forward_hook(module):
    module.gate_proj.register_forward_hook(lambda m, args, out: out)


def instance_forward(module):
    layer = module.up_proj
    layer.forward = lambda x: QuantLinear4bit.forward(layer, x)


def other_compute_dtype(module):
    module.down_proj.compute_dtype = torch.bfloat16


def trainable_bias(module):
    layer = module.gate_proj
    layer.bias = nn.Parameter(torch.zeros(layer.out_features, device=DEVICE))


def missing_projection(module):
    del module.gate_proj


FALLBACKS = [dropout_in_training, rank_zero, plain_linear, forward_hook, instance_forward, other_compute_dtype,
             trainable_bias, missing_projection]


@pytest.mark.parametrize("change", FALLBACKS, ids=lambda f: f.__name__)
def test_mlp_block_falls_back(change):
    module = mlp_block(40, 72)
    change(module)
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    assert lora_blocks.mlp(module, x, SWIGLU) is None


def test_gate_up_block_falls_back():
    module = gate_up_block(40, 36)
    x = torch.randn(5, 40, device=DEVICE)
    assert lora_blocks.gate_up_mlp(module, x, SWIGLU) is not None
    module.down_proj.lora_dropout = 0.1  # a layer that cannot join
    assert lora_blocks.gate_up_mlp(module, x, SWIGLU) is None
    odd = gate_up_block(40, 36)
    odd.down_proj = quant_layer(35, 40, 4, 8.0)  # gate_up's 72 outputs are not 2 x 35
    assert lora_blocks.gate_up_mlp(odd, x, SWIGLU) is None
    del module.gate_up_proj
    assert lora_blocks.gate_up_mlp(module, x, SWIGLU) is None


def test_dropout_falls_back_only_while_training():
    module = mlp_block(40, 72, dropout=0.1)
    x = torch.randn(5, 40, device=DEVICE)
    assert lora_blocks.mlp(module, x, SWIGLU) is None   # layers are built in training mode
    module.eval()
    assert lora_blocks.mlp(module, x, SWIGLU) is not None


def test_qkv_block_falls_back():
    module = qkv_block(40)
    x = torch.randn(5, 40, device=DEVICE)
    assert lora_blocks.qkv(module, x) is not None
    handle = module.v_proj.register_forward_pre_hook(lambda m, args: None)
    assert lora_blocks.qkv(module, x) is None
    handle.remove()
    module.k_proj = QuantLinear4bit.from_linear(nn.Linear(40, 8, bias=False, device=DEVICE),
                                                compute_dtype=torch.float32)  # no adapter
    assert lora_blocks.qkv(module, x) is None


def test_blocks_fall_back_for_unquantized_weights_and_other_devices():
    module = mlp_block(40, 72)
    module.gate_proj = QuantLinear4bit(40, 72, bias=False, lora_rank=4, compute_dtype=torch.float32)  # no device yet
    assert lora_blocks.mlp(module, torch.randn(5, 40, device=DEVICE), SWIGLU) is None
    qkv = qkv_block(40)
    assert lora_blocks.qkv(qkv, torch.randn(5, 40, device="meta")) is None


# ------------------------------------------------------------------------------- in a patched model
transformers = pytest.importorskip("transformers")
from tests.test_models import batch, tiny_model  # noqa: E402


def quantized_tiny(model_type, lora_rank=4):
    model = tiny_model(model_type, layers=1)
    nf4.quantize_model(model, device=DEVICE, compute_dtype=torch.float32, lora_rank=lora_rank, lora_alpha=8.0)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.5)
    return model


def loss_and_grads(model, **options):
    model = copy.deepcopy(model)
    assert models.patch(model, **options)
    ids, labels = batch(model.config.vocab_size, shape=(2, 7))
    loss = model(input_ids=ids, labels=labels).loss
    names = graph_names(loss)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, names


@pytest.mark.parametrize("model_type, recompute", [("llama", True), ("llama", False), ("qwen2", True),
                                                   ("gemma2", True), ("phi3", True), ("phi3", False)])
def test_patched_model_with_blocks_matches_without(model_type, recompute):
    # SwiGLU, q/k/v biases, GeGLU, Phi-3's gate_up (its one qkv_proj is one layer call: no block)
    model = quantized_tiny(model_type)
    loss, grads, names = loss_and_grads(model, fused_lora=True, recompute_mlp=recompute)
    want, want_grads, plain_names = loss_and_grads(model, fused_lora=False)
    blocks = {"LoraGateUpMLPBackward"} if model_type == "phi3" else {"LoraMLPBackward", "LoraQKVBackward"}
    assert blocks <= names
    assert not {"LoraMLPBackward", "LoraGateUpMLPBackward", "LoraQKVBackward"} & plain_names
    # fp32, one layer: the blocks' other grouping of sums (FP32_REL), carried through attention and
    # the loss: 2e-5 as tests/test_models.py's TOL.
    torch.testing.assert_close(loss, want, atol=2e-5, rtol=2e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert rel_err(grads[name], want_grads[name]) <= 2e-5, name


def test_patch_rejects_non_bool_switches():
    model = tiny_model("llama", layers=1)
    with pytest.raises(TypeError, match="fused_lora must be a bool"):
        models.patch(model, fused_lora="yes")
    with pytest.raises(TypeError, match="recompute_mlp must be a bool"):
        models.patch(model, recompute_mlp=1)


def test_unpatch_removes_the_switch():
    model = quantized_tiny("llama")
    models.patch(model)
    models.unpatch(model)
    assert not any(hasattr(m, "_nf4_fused_lora") for m in model.modules())


# ------------------------------------------------------------------------------- peft
def peft_tiny(model_type="llama"):
    peft = pytest.importorskip("peft")
    import nf4.peft

    model = quantized_tiny(model_type, lora_rank=0)
    config = nf4.peft.register(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(MLP_NAMES + QKV_NAMES)))
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def layer0(model):
    return model.get_base_model().model.layers[0]


def test_peft_adapters_use_the_blocks():
    model = peft_tiny()
    ids, labels = batch(model.config.vocab_size, shape=(2, 7))
    models.patch(model.get_base_model(), fused_lora=False)
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    models.patch(model.get_base_model())
    loss = model(input_ids=ids, labels=labels).loss
    assert {"LoraMLPBackward", "LoraQKVBackward"} <= graph_names(loss)
    loss.backward()
    torch.testing.assert_close(loss, want, atol=2e-5, rtol=2e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, want_grads[n]) <= 2e-5, n


def test_peft_states_that_fall_back():
    peft = pytest.importorskip("peft")
    model = peft_tiny()
    mlp, attention = layer0(model).mlp, layer0(model).self_attn
    x = torch.randn(1, 5, mlp.gate_proj.in_features, device=DEVICE)

    def fused():
        return lora_blocks.mlp(mlp, x, SWIGLU) is not None and lora_blocks.qkv(attention, x) is not None

    assert fused()
    with model.disable_adapter():
        assert not fused()
    assert fused()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(MLP_NAMES + QKV_NAMES)))
    model.base_model.set_adapter(["default", "other"])
    assert not fused()
    model.base_model.set_adapter("other")
    assert fused()
    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    assert not fused()
    model.unmerge_adapter()
    assert fused()
    for name in ("gate_proj", "q_proj"):  # dropout: only while training
        getattr(mlp if name == "gate_proj" else attention, name).lora_dropout["other"] = nn.Dropout(0.1)
    model.train()
    assert not fused()
    model.eval()
    assert fused()


# ------------------------------------------------------------------------------- the GLU kernel
@pytest.mark.parametrize("act", [SWIGLU, GEGLU])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("halves", [False, True], ids=["separate", "halves"])
def test_glu_backward_with_output(act, in_place, halves):
    g = torch.Generator().manual_seed(0)
    gate, up, dout = (torch.randn(3, 5, 37, generator=g).to(DEVICE) * s for s in (3, 1, 1))
    if halves:  # Phi-3: gate and up are the two halves of one projection's [rows, 2 x width] output
        gate_up = torch.cat((gate, up), -1).view(15, 74)
        gate, up, dout = gate_up[:, :37], gate_up[:, 37:], dout.view(15, 37)
    gate_ref = gate.detach().clone().requires_grad_()
    up_ref = up.detach().clone().requires_grad_()
    out_ref = ACTS[act](gate_ref) * up_ref
    dgate_ref, dup_ref = torch.autograd.grad(out_ref, [gate_ref, up_ref], dout)
    dgate, dup = (gate, up) if in_place else (torch.empty_like(gate), torch.empty_like(up))
    glu_backward_with_output(dout, gate, up, act, dgate, dup)
    # fp32: sigmoid/tanh through exp (tests/test_glu.py's bound)
    for got, want in ((dout, out_ref), (dgate, dgate_ref), (dup, dup_ref)):
        torch.testing.assert_close(got, want.detach(), atol=2e-5, rtol=2e-5)


def test_glu_backward_with_output_checks_buffers():
    t = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"dup must be .* with contiguous rows, got strides \(1, 4\)"):
        glu_backward_with_output(t, t.clone(), t.clone(), SWIGLU, t.clone(), torch.zeros(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match=r"dout must be torch.float32 \[4, 8\] .* got torch.float64"):
        glu_backward_with_output(t.double(), t, t, SWIGLU, t, t)
    wide = torch.zeros(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="gate must be .* with contiguous rows, got strides"):  # rows overlap
        glu_backward_with_output(t, wide.as_strided((4, 8), (4, 1)), t, SWIGLU, t, t)
    with pytest.raises(ValueError, match="up must be .* with contiguous rows, got strides"):  # 3-D, not dense
        glu_backward_with_output(t.view(2, 2, 8), t.view(2, 2, 8), wide.view(2, 2, 16)[..., 8:], SWIGLU,
                                 t.view(2, 2, 8), t.view(2, 2, 8))
