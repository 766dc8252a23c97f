"""peft's get_peft_model on nf4 models (nf4.peft): the fused path equals nf4's built-in adapter,
peft's own textbook path agrees with it, merge requantizes exactly, save/load round-trips.

peft is optional (not a dependency, not on CI): the module is skipped where it is not installed.
"""
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import nf4  # noqa: E402
import nf4.peft  # noqa: E402
from nf4 import functional  # noqa: E402
from nf4.nn import QuantLinear4bit  # noqa: E402

from tests.conftest import DEVICE  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IN, OUT, RANK, ALPHA = 96, 40, 4, 8.0


def wrap(compute_dtype=torch.float32, bias=True, seed=0):
    """(peft-wrapped layer with a random B, the same base with nf4's built-in adapter = A, B)."""
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias, device=DEVICE)
    base = QuantLinear4bit.from_linear(linear, compute_dtype=compute_dtype)
    builtin = QuantLinear4bit.from_linear(linear, lora_rank=RANK, lora_alpha=ALPHA, compute_dtype=compute_dtype)
    config = nf4.peft.register(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    layer = nf4.peft.LoraQuantLinear4bit(base, "default", config=config, r=RANK, lora_alpha=ALPHA)
    # peft creates adapters in the base's compute dtype and get_peft_model upcasts them to float32
    # (autocast_adapter_dtype=True, its default); built here by hand, do the same.
    layer.lora_A.float()
    layer.lora_B.float()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
        builtin.lora_A.copy_(layer.lora_A["default"].weight)
        builtin.lora_B.copy_(layer.lora_B["default"].weight)
    return layer, builtin


def grads(module, x, params):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    dy = torch.randn_like(y, generator=torch.Generator(y.device).manual_seed(1))
    return [y, *torch.autograd.grad(y, [x, *params], dy)]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [5, 80])  # the fused-matmul and the dequantize+GEMM regimes
def test_fused_path_is_the_builtin_adapter(compute_dtype, tokens):
    layer, builtin = wrap(compute_dtype)
    x = torch.randn(tokens, IN, device=DEVICE)
    ours = grads(layer, x, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    ref = grads(builtin, x, [builtin.lora_A, builtin.lora_B])
    for name, a, b in zip(("y", "dx", "dA", "dB"), ours, ref):
        # Same autograd function on the same tensors: bit for bit.
        assert torch.equal(a, b), f"{name} differs from the built-in adapter"


def test_textbook_path_agrees():
    """lora_bias=False but two active adapters forces peft's base + sum of deltas; with the
    second adapter's B at zero it must equal the fused single-adapter result (fp32 compute:
    only summation order differs, measured <= 3e-7 relative; bound 1e-5 as tests/test_nn.py's fp32)."""
    layer, _ = wrap(torch.float32)
    x = torch.randn(33, IN, device=DEVICE)
    fused = layer(x)
    config = nf4.peft.register(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    layer.update_layer("other", RANK, lora_alpha=ALPHA, config=config)
    layer.set_adapter(["default", "other"])
    assert layer._fused_adapter() is None
    both = layer(x)
    err = (both - fused).abs().max().item()
    assert err <= 1e-5 * fused.abs().max().item(), err


def test_merge_requantizes_exactly():
    layer, _ = wrap(torch.float32, bias=False)
    base = layer.get_base_layer()
    with torch.no_grad():
        W = base.dequantize()
        delta = layer.get_delta_weight("default")
        want_packed, want_state = functional.quantize_4bit((W.float() + delta).to(W.dtype), quant_type="nf4",
                                                           compress_statistics=True)
    with pytest.warns(UserWarning, match="requantizes"):
        layer.merge()
    assert layer.merged
    assert torch.equal(functional._as_uint8(base.weight).flatten(), want_packed.flatten())
    assert torch.equal(base.quant_state.absmax, want_state.absmax)
    x = torch.randn(7, IN, device=DEVICE)
    assert torch.equal(layer(x), base(x))  # merged: the adapter is not applied twice


def test_tiny_llama_train_save_load(fixtures, tmp_path):
    model = nf4.from_pretrained(fixtures / "tiny_llama_bf16", device=DEVICE, lora_rank=0, progress=False)
    config = nf4.peft.register(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    pm = peft.get_peft_model(model, config)
    wrapped = [m for m in pm.modules() if isinstance(m, nf4.peft.LoraQuantLinear4bit)]
    assert len(wrapped) == 2 * len(TARGETS)  # two layers in the tiny Llama
    ids = torch.randint(1024, (2, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        before = pm(input_ids=ids).logits
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    pm.eval()
    with torch.no_grad():
        trained = pm(input_ids=ids).logits
    assert not torch.equal(trained, before)
    pm.save_pretrained(tmp_path / "adapter")

    fresh = nf4.from_pretrained(fixtures / "tiny_llama_bf16", device=DEVICE, lora_rank=0, progress=False)
    loaded_config = nf4.peft.register(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter", config=loaded_config)
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert torch.equal(again, trained)


def test_bad_input():
    with pytest.raises(TypeError, match="LoraConfig"):
        nf4.peft.register({"r": 4})
    linear = nn.Linear(IN, OUT, device=DEVICE)
    config = nf4.peft.register(peft.LoraConfig(r=RANK, target_modules=["proj"]))
    with pytest.raises(TypeError, match="wraps a QuantLinear4bit"):
        nf4.peft.LoraQuantLinear4bit(linear, "default", config=config, r=RANK)
    with_adapter = QuantLinear4bit.from_linear(linear, lora_rank=2)
    with pytest.raises(ValueError, match="built-in adapter"):
        nf4.peft.LoraQuantLinear4bit(with_adapter, "default", config=config, r=RANK)
    dora = nf4.peft.register(peft.LoraConfig(r=RANK, target_modules=["proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        nf4.peft.LoraQuantLinear4bit(QuantLinear4bit.from_linear(linear), "default", config=dora, r=RANK)


@pytest.mark.gpu
def test_autocast_training_step_gpu():
    """Under bf16 autocast (the QLoRA recipe) with float32 adapters, gradients reach the adapters
    in float32 and equal the built-in layer's."""
    layer, builtin = wrap(torch.bfloat16)
    x = torch.randn(300, IN, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = grads(layer, x, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
        ref = grads(builtin, x, [builtin.lora_A, builtin.lora_B])
    assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
