"""QuantLinear4bit and the bitsandbytes-compatible modules.

Every forward and gradient is checked against an fp32 autograd model of the same maths,
``x @ dequant(W).T + b + s * dropout(x) @ A.T @ B.T``, with the dequantized weight from the
reference (so quantization error is not part of the comparison, only compute precision).
"""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

import nf4
from nf4 import autograd as nf4_autograd
from nf4 import functional
from nf4.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit, QuantLinear4bit
from nf4.quant_state import QuantState

from tests.conftest import DEVICE

# max|got - want| <= tol * max|want|. Operands are rounded to the compute dtype (relative 2^-9
# for bf16, 2^-12 for fp16) and each GEMM rounds its output once; over K = 64..96 terms with random
# signs that is ~1 unit in the last place of the largest output, measured at most 0.93% (bf16),
# 0.09% (fp16) here. fp32 only reorders sums: ~sqrt(K) * 2^-24 = 6e-7 expected, measured at most
# 3.2e-7 (dB), so 1e-6. The bounds leave a 2-3x margin over the measured worst case.
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-6}
IN, OUT = 96, 40


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


def make_layer(rank: int, bias: bool, dropout: float, compute_dtype, device=DEVICE, seed=0, in_features=IN):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, OUT, bias=bias, device=device)
    layer = QuantLinear4bit.from_linear(linear, lora_rank=rank, lora_alpha=2.0 * rank if rank else None,
                                        lora_dropout=dropout, compute_dtype=compute_dtype)
    if rank:
        # B starts at zero (a no-op adapter); a random B makes dA and the adapter's dx non-zero.
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
    return layer


def fp32_model(layer: QuantLinear4bit, x: torch.Tensor, mask):
    """The layer's maths in fp32 autograd: returns (y, x_leaf, A_leaf, B_leaf)."""
    W = layer.dequantize().float()
    x32 = x.detach().float().requires_grad_()
    y = x32 @ W.t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    A = B = None
    if layer.lora_rank:
        A = layer.lora_A.detach().float().requires_grad_()
        B = layer.lora_B.detach().float().requires_grad_()
        xd = x32 if mask is None else x32 * mask / (1 - layer.lora_dropout)
        y = y + layer.scaling * (xd @ A.t() @ B.t())
    return y, x32, A, B


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_route_on_cpu(bias, dropout):
    """The layer's fused-kernel branch (base product, then the adapter added in place) where the
    CPU can run it: Triton's gemv under the interpreter."""
    if not nf4.backends.supports("triton", torch.device("cpu")) or DEVICE.type != "cpu":
        pytest.skip("the GPU runs this branch in test_forward_backward_match_fp32_model")
    nf4.set_backend("triton")
    # 128 inputs: whole blocks of 64 per row, which Triton's fused kernels need (96 would decode).
    layer = make_layer(4, bias, dropout, torch.bfloat16, device="cpu", in_features=128)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x[:1])
    assert layer.weight.quant_state._packed_weight.route(3, torch.bfloat16).kernel == "gemv"
    torch.manual_seed(123)
    y = layer(x)
    mask = None
    if dropout:
        torch.manual_seed(123)
        mask = nf4_autograd.dropout_mask(x, dropout)
    want, x32, A, B = fp32_model(layer, x, mask)
    close(y, want, torch.bfloat16, "y")
    dy = torch.randn_like(want)
    y.backward(dy)
    want.backward(dy)
    close(x.grad, x32.grad, torch.bfloat16, "dx")
    close(layer.lora_A.grad, A.grad, torch.bfloat16, "dA")
    close(layer.lora_B.grad, B.grad, torch.bfloat16, "dB")


# 7 tokens: a fused kernel on the GPU (the reference decodes on the CPU: test_fused_route_on_cpu);
# 300: decode + GEMM on every backend (tests/test_autograd.py checks the route).
@pytest.mark.parametrize("tokens", [7, 300], ids=["fused", "dequant"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [0, 4])
def test_forward_backward_match_fp32_model(rank, bias, dropout, compute_dtype, tokens):
    layer = make_layer(rank, bias, dropout, compute_dtype)
    x = torch.randn(tokens, IN, device=DEVICE, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    mask = None
    if rank and dropout:
        torch.manual_seed(123)
        mask = nf4_autograd.dropout_mask(x, dropout)
    want, x32, A, B = fp32_model(layer, x, mask)
    assert y.dtype == x.dtype and y.shape == (tokens, OUT)
    close(y, want, compute_dtype, "y")
    dy = torch.randn_like(want)
    y.backward(dy)
    want.backward(dy)
    close(x.grad, x32.grad, compute_dtype, "dx")
    if rank:
        close(layer.lora_A.grad, A.grad, compute_dtype, "dA")
        close(layer.lora_B.grad, B.grad, compute_dtype, "dB")
        assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_output_follows_input_dtype_and_shape():
    layer = make_layer(4, True, 0.0, torch.float32)
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16, device=DEVICE)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, OUT)


def test_base_is_frozen_and_adapter_is_the_only_trainable_part():
    layer = make_layer(4, True, 0.0, torch.float32)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert isinstance(layer.weight, Params4bit) and layer.weight.dtype == torch.uint8
    assert layer.scaling == 2.0
    fresh = QuantLinear4bit(IN, OUT, lora_rank=4, device=DEVICE)
    assert torch.count_nonzero(fresh.lora_B) == 0 and torch.count_nonzero(fresh.lora_A) > 0
    bound = (1 / IN) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound, as nn.Linear
    assert fresh.lora_A.abs().max() <= bound


def test_rank_zero_has_no_adapter_keys():
    layer = make_layer(0, True, 0.0, torch.float32)
    assert layer.lora_A is None and layer.lora_B is None
    assert not any(k.startswith("lora_") for k in layer.state_dict())
    assert {"lora_A", "lora_B"} <= set(make_layer(4, True, 0.0, torch.float32).state_dict())


def test_dropout_only_in_training_and_only_on_the_adapter():
    layer = make_layer(4, True, 0.5, torch.float32)
    x = torch.randn(16, IN, device=DEVICE)
    layer.eval()
    y_eval = layer(x)
    want, *_ = fp32_model(layer, x, None)
    close(y_eval, want, torch.float32, "eval output")
    layer.train()
    assert not torch.allclose(layer(x), y_eval)


# ------------------------------------------------------------------ state_dict: bnb format
def _fixture_layer(fixtures, name="model.layers.0.self_attn.q_proj"):
    index = json.loads((fixtures / "tiny_llama_bf16" / "model.safetensors.index.json").read_text())
    key = name + ".weight"
    w = load_file(fixtures / "tiny_llama_bf16" / index["weight_map"][key])[key]
    bnb = load_file(fixtures / "tiny_llama_bnb4" / "model.safetensors")
    bnb_layer = {k[len(name) + 1:]: v for k, v in bnb.items() if k.startswith(name + ".")}
    return w, bnb_layer


def test_state_dict_matches_bnb_checkpoint(fixtures):
    w, bnb_layer = _fixture_layer(fixtures)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = QuantLinear4bit.from_linear(linear)
    sd = layer.state_dict()
    assert set(sd) == set(bnb_layer)
    for k, v in bnb_layer.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
    blob = "weight.quant_state.bitsandbytes__nf4"
    assert json.loads(bytes(sd[blob].tolist())) == json.loads(bytes(bnb_layer[blob].tolist()))
    # This layer has no value on a decision threshold: every byte agrees with bitsandbytes'.
    for k in ("weight", "weight.absmax", "weight.nested_absmax", "weight.quant_map"):
        assert torch.equal(sd[k], bnb_layer[k]), k


def test_load_bnb_checkpoint_and_round_trip(fixtures):
    w, bnb_layer = _fixture_layer(fixtures, "model.layers.0.mlp.down_proj")
    layer = QuantLinear4bit(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.load_state_dict(bnb_layer)
    assert layer.quantized and layer.weight.device.type == "cpu"
    state = QuantState.from_dict({k[7:]: v for k, v in bnb_layer.items() if k.startswith("weight.")})
    assert torch.equal(layer.dequantize(), functional.dequantize_4bit(bnb_layer["weight"], state))
    # Our own state dict loads back (strictly) into a layer that was quantized elsewhere.
    other = QuantLinear4bit(w.shape[1], w.shape[0], bias=False, device="cpu")
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dequantize(), layer.dequantize())
    # ... and a bnb-named module with an adapter-free layout takes it too.
    bnb_named = LinearNF4(w.shape[1], w.shape[0], bias=False)
    bnb_named.load_state_dict(layer.state_dict())
    assert torch.equal(bnb_named.dequantize(), layer.dequantize())


def test_meta_layer_loads_every_parameter():
    src = make_layer(4, True, 0.0, torch.float32, device="cpu")
    dst = QuantLinear4bit(IN, OUT, lora_rank=4, lora_alpha=8.0, compute_dtype=torch.float32, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        dst(torch.randn(2, IN))
    dst.load_state_dict(src.state_dict())
    assert not any(p.is_meta for p in dst.parameters())
    assert {n for n, p in dst.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x = torch.randn(3, IN)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_load_float_state_dict_quantizes_like_bnb():
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    q = Linear4bit(IN, OUT, quant_type="nf4")
    assert not q.quantized
    q.load_state_dict(linear.state_dict())
    q = q.to("cpu")  # the weight reaches a device: quantized now
    assert q.quantized
    want = functional.dequantize_4bit(*functional.quantize_4bit(linear.weight.detach(), quant_type="nf4",
                                                                compress_statistics=True))
    assert torch.equal(q.dequantize(), want)
    # A layer that is already quantized quantizes an incoming float weight.
    q2 = Linear4bit(IN, OUT, quant_type="nf4", device="cpu")
    q2.load_state_dict(linear.state_dict())
    assert torch.equal(q2.dequantize(), want)


def test_load_state_dict_rejects_wrong_shapes():
    layer = QuantLinear4bit(IN, OUT, device="cpu")
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"weight": torch.zeros(OUT + 1, IN), "bias": torch.zeros(OUT)})
    other = QuantLinear4bit(IN, OUT + 2, device="cpu")
    with pytest.raises(RuntimeError, match="expected"):
        layer.load_state_dict(other.state_dict())


def test_bnb_constructor_signatures():
    lin = Linear4bit(IN, OUT)
    assert lin.weight.quant_type == "fp4" and lin.compute_dtype is None and lin.weight.blocksize == 64
    assert LinearNF4(IN, OUT).weight.quant_type == "nf4"
    assert LinearFP4(IN, OUT, bias=False).bias is None
    p = Params4bit(torch.randn(OUT, IN), quant_type="nf4").to("cpu")
    assert p.bnb_quantized and p.quant_state.shape == (OUT, IN) and not p.requires_grad
    sd = {k: v for k, v in p.quant_state.as_dict(packed=True).items()}
    p2 = Params4bit.from_prequantized(p.data, sd, device="cpu")
    assert p2.quant_state == p.quant_state and torch.equal(p2, p)
    with pytest.raises(ValueError, match="quant_type"):
        Params4bit(torch.randn(4, 4), quant_type="int4")


# ------------------------------------------------------------------ loader API
def test_meta_construction_allocates_nothing_and_load_quantized():
    layer = QuantLinear4bit(IN, OUT, lora_rank=4, device="meta")
    assert all(p.device.type == "meta" for p in layer.parameters())
    w = torch.randn(OUT, IN)
    packed, state = functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    layer.load_quantized(packed, state)
    assert layer.weight.device.type == "cpu" and layer.quantized
    # to_empty materializes the adapter and bias but keeps the installed weight.
    layer.to_empty(device="cpu")
    layer.reset_lora_parameters()
    assert torch.equal(layer.dequantize(), functional.dequantize_4bit(packed, state))
    assert torch.count_nonzero(layer.lora_B) == 0
    bad_packed, bad_state = functional.quantize_4bit(torch.randn(IN, OUT), quant_type="nf4")
    with pytest.raises(ValueError, match=r"expected \(40, 96\)"):
        layer.load_quantized(bad_packed, bad_state)
    with pytest.raises(ValueError, match="bytes"):
        layer.load_quantized(packed[:-2], state)
    with pytest.raises(ValueError, match="shape"):
        layer.quantize_weight_(torch.randn(IN, OUT))
    layer.quantize_weight_(w.to(torch.bfloat16))
    assert layer.dequantize().dtype == torch.bfloat16


# ------------------------------------------------------------------ merge, dequantize, moves
@pytest.mark.parametrize("rank", [0, 4])
def test_merge_and_dequantize(rank):
    layer = make_layer(rank, True, 0.2, torch.float32).eval()
    W = layer.dequantize()
    assert W.shape == (OUT, IN) and W.dtype == torch.float32
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and not isinstance(merged, QuantLinear4bit)
    x = torch.randn(5, IN, device=DEVICE)
    close(merged(x), layer(x), torch.float32, "merged output")


def test_moves_keep_the_state():
    layer = make_layer(4, True, 0.0, torch.float32)
    before = layer.dequantize()
    data_ptr = layer.weight.data_ptr()
    layer.to(DEVICE)
    layer.to(torch.bfloat16)  # float parameters cast; packed bytes untouched
    assert layer.weight.dtype == torch.uint8 and layer.weight.data_ptr() == data_ptr
    assert layer.lora_A.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), before)
    assert isinstance(layer.weight, Params4bit) and layer.weight.quant_state.absmax.device == layer.weight.device
    copied = copy.deepcopy(layer)
    assert copied.weight.quant_state is not layer.weight.quant_state
    assert torch.equal(copied.dequantize(), before)


def test_unmoved_layer_quantizes_at_first_forward():
    layer = QuantLinear4bit(IN, OUT, compute_dtype=torch.float32)
    assert not layer.quantized and layer.weight.dtype == torch.float32
    layer(torch.randn(2, IN, device=DEVICE))
    assert layer.quantized and layer.weight.device.type == DEVICE.type


# ------------------------------------------------------------------ training features
def test_gradient_checkpointing_replays_the_same_dropout():
    layer = make_layer(4, True, 0.3, torch.float32)
    x = torch.randn(20, IN, device=DEVICE, requires_grad=True)
    torch.manual_seed(7)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(7)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for g, t in zip(grads, (x, layer.lora_A, layer.lora_B)):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


def test_autocast_computes_in_the_autocast_dtype():
    layer = make_layer(4, True, 0.0, torch.float32)
    x = torch.randn(9, IN, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    want, x32, *_ = fp32_model(layer, x, None)
    close(y, want, torch.bfloat16, "autocast y")
    y.float().sum().backward()
    want.sum().backward()
    assert x.grad.dtype == torch.float32
    close(x.grad, x32.grad, torch.bfloat16, "autocast dx")


def test_torch_compile_fullgraph():
    layer = make_layer(4, True, 0.0, torch.float32)
    x = torch.randn(12, IN, device=DEVICE, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    gx, gA = x.grad.clone(), layer.lora_A.grad.clone()
    x.grad = None
    layer.lora_A.grad = None
    y_eager = layer(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gA, layer.lora_A.grad)


def test_lora_finetune_tiny_llama_loss_falls(fixtures):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(fixtures / "tiny_llama_bf16",
                                                              dtype=torch.float32)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, QuantLinear4bit.from_linear(
                        getattr(parent, name), lora_rank=8, lora_alpha=16,
                        compute_dtype=torch.float32))
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = [p for m in model.modules() if isinstance(m, QuantLinear4bit)
                for p in (m.lora_A, m.lora_B)]
    for p in adapters:
        p.requires_grad_(True)
    assert len(adapters) == 2 * 7 * len(model.model.layers)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(adapters, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # A random 2-layer model starts near ln(1024) = 6.9; memorizing 24 tokens with 14 rank-8
    # adapters brings it well under half of that within 30 AdamW steps.
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 300])
def test_gpu_backends_match_fp32_model(tokens):
    layer = make_layer(8, True, 0.0, torch.bfloat16, device="cuda")
    x = torch.randn(tokens, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    want, x32, A, B = fp32_model(layer, x, None)
    close(y, want, torch.bfloat16, "y")
    dy = torch.randn_like(want)
    y.backward(dy.to(y.dtype))
    want.backward(dy.to(y.dtype).float())
    close(x.grad, x32.grad, torch.bfloat16, "dx")
    close(layer.lora_A.grad, A.grad, torch.bfloat16, "dA")
    close(layer.lora_B.grad, B.grad, torch.bfloat16, "dB")


@pytest.mark.gpu
def test_gpu_no_float_weight_kept_between_forward_and_backward():
    out_f, in_f, tokens = 4096, 4096, 256
    layer = QuantLinear4bit(in_f, out_f, lora_rank=16, device="cuda")
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    kept = torch.cuda.memory_allocated() - before
    # The output, x @ A^T and the bf16 copies of A and B: far below the 32 MiB of a bf16 weight.
    assert kept < y.numel() * 2 + 4 * 2**20, kept
    y.sum().backward()


@pytest.mark.gpu
def test_gpu_moves_keep_the_state():
    layer = make_layer(4, True, 0.0, torch.float32, device="cpu")
    before = layer.dequantize()
    layer.cuda()
    assert layer.weight.is_cuda and layer.quant_state.absmax.is_cuda and layer.quant_state.state2.absmax.is_cuda
    assert torch.equal(layer.dequantize().cpu(), before)
    layer.cpu()
    assert torch.equal(layer.dequantize(), before)


@pytest.mark.gpu
def test_gpu_state_dict_interoperates_with_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = nn.Linear(256, 192, dtype=torch.bfloat16, device="cuda")
    ours = Linear4bit(256, 192, compute_dtype=torch.bfloat16, quant_type="nf4", device="cuda")
    ours.load_state_dict(linear.state_dict())
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    # bitsandbytes' Linear4bit has no loader for quantized keys; Params4bit.from_prequantized
    # is how bnb (and transformers) install a saved state.
    sd = ours.state_dict()
    theirs = bnb.nn.Linear4bit(256, 192, compute_dtype=torch.bfloat16, quant_type="nf4", device="cuda")
    theirs.weight = bnb.nn.Params4bit.from_prequantized(
        sd["weight"], {k[7:]: v for k, v in sd.items() if k.startswith("weight.")}, device="cuda")
    theirs.bias = nn.Parameter(sd["bias"].clone(), requires_grad=False)
    close(ours(x), theirs(x), torch.bfloat16, "nf4 state in bnb")
    # ... and back: bnb quantizes its own copy, we load its state_dict.
    theirs2 = bnb.nn.Linear4bit(256, 192, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs2.load_state_dict(linear.state_dict())
    theirs2 = theirs2.cuda()
    back = QuantLinear4bit(256, 192, compute_dtype=torch.bfloat16, device="meta")
    back.load_state_dict(theirs2.state_dict())
    assert back.weight.is_cuda
    close(back(x), theirs2(x), torch.bfloat16, "bnb state in nf4")


@pytest.mark.parametrize("dq", [False, True])
def test_params4bit_to_moves_the_quant_state(dq):
    """``Params4bit.to`` carries its quantization state along (``meta`` stands in for a GPU)."""
    weight = Params4bit(torch.randn(64, 96), quant_type="nf4", compress_statistics=dq).to("cpu")
    state = weight.quant_state
    assert weight.bnb_quantized and state.absmax.device.type == "cpu"
    moved = weight.to("meta")
    assert moved.device.type == "meta" and moved.quant_state is state
    tensors = [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code]
                                            if dq else [])
    assert {t.device.type for t in tensors} == {"meta"}
