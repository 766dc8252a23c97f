"""nf4.loading: Hub resolution (offline cache layout), streaming quantization, bnb checkpoints,
saving, and every kind of bad checkpoint. CPU (reference backend) unless marked gpu."""
import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nf4 import reference
from nf4.loading import from_pretrained, quantize_model, save_pretrained, summarize
from nf4.loading import save as save_module
from nf4.nn import QuantLinear4bit

transformers = pytest.importorskip("transformers", reason="nf4.loading builds transformers models ([hf] extra)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Codes that may differ from bnb's: values within ~1 ulp of a decision threshold (bnb's GPU build
# uses an approximate reciprocal). None seen so far on these fixtures; each must be one code apart.
MAX_TIES = 8
# The logits of the tiny Llama are O(1) (max |logit| ~1.3) and computed in bf16 (8 significant
# bits): bnb and nf4 decode the same 4-bit weights to the same bf16 values but accumulate the
# matmuls in a different order, so outputs drift by a few bf16 ulps (1 ulp = 0.0078 at 1..2).
LOGITS_ATOL = 0.03


# ------------------------------------------------------------------------------- helpers
def make_hub(tmp_path, monkeypatch, repos: dict) -> None:
    """Hub cache layout under tmp_path (models--ORG--NAME/snapshots/<sha>, refs/main), offline."""
    cache = tmp_path / "hub"
    for repo_id, folder in repos.items():
        root = cache / ("models--" + repo_id.replace("/", "--"))
        sha = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(folder, root / "snapshots" / sha)
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def copy_fixture(fixtures, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixtures / name, dst)
    return dst


def assert_codes_match(ours, theirs, numel):
    a, b = reference.unpack(ours.reshape(-1), numel), reference.unpack(theirs.reshape(-1), numel)
    diff = a != b
    assert int(diff.sum()) <= MAX_TIES, f"{int(diff.sum())} codes differ"
    assert bool(((a.int() - b.int()).abs()[diff] <= 1).all())


def assert_matches_bnb_checkpoint(state: dict, bnb_file):
    """Every tensor of bnb's tiny_llama_bnb4 against ours (see the fixtures README for ties)."""
    with safe_open(str(bnb_file), "pt") as f:
        keys = set(f.keys())
        assert set(state) == keys
        for k in sorted(keys):
            theirs, ours = f.get_tensor(k), state[k].cpu()
            if ".quant_state." in k:
                # JSON whose nested_offset may differ in its last digits (see below): compare fields.
                a, b = json.loads(bytes(ours.tolist())), json.loads(bytes(theirs.tolist()))
                assert a.pop("nested_offset") == pytest.approx(b.pop("nested_offset"), rel=1e-6)
                assert a == b, k
                continue
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, k
            if k.endswith(".weight") and theirs.dtype == torch.uint8:
                numel = 2 * theirs.numel()
                assert_codes_match(ours, theirs, numel)
            elif k.endswith("absmax") and theirs.dtype == torch.uint8:
                diff = ours != theirs
                assert int(diff.sum()) <= MAX_TIES and bool(((ours.int() - theirs.int()).abs()[diff] <= 1).all())
            elif k.endswith("nested_absmax"):
                # Derived from the mean of all absmax values, reduced in another order on the
                # GPU: 1-2 ulp apart (as in tests/test_bnb_parity.py).
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
            else:
                assert torch.equal(ours, theirs), k


def logits_fixture(fixtures):
    with safe_open(str(fixtures / "tiny_llama_logits.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ------------------------------------------------------------------------------- the tiny Llama
def test_bf16_checkpoint_quantizes_to_bnb_bytes(fixtures, tmp_path, monkeypatch):
    make_hub(tmp_path, monkeypatch, {"nf4-test/tiny-llama": fixtures / "tiny_llama_bf16"})
    model = from_pretrained("nf4-test/tiny-llama", device="cpu", progress=False)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear4bit)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert_matches_bnb_checkpoint(model.state_dict(), fixtures / "tiny_llama_bnb4" / "model.safetensors")


def test_bnb_checkpoint_logits_match_bnb(fixtures, tmp_path, monkeypatch):
    make_hub(tmp_path, monkeypatch, {"nf4-test/tiny-llama-bnb4": fixtures / "tiny_llama_bnb4"})
    model = from_pretrained("nf4-test/tiny-llama-bnb4", device="cpu", progress=False)
    ref = logits_fixture(fixtures)
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits.float()
    torch.testing.assert_close(logits, ref["logits_bnb4"], atol=LOGITS_ATOL, rtol=0)
    # The tolerance is far below what quantization itself changes, so a wrong weight would show.
    assert (ref["logits_bf16"] - ref["logits_bnb4"]).abs().max() > 5 * LOGITS_ATOL


def test_save_load_roundtrip_exact(fixtures, tmp_path):
    model = from_pretrained(fixtures / "tiny_llama_bnb4", device="cpu", progress=False)
    out = save_pretrained(model, tmp_path / "saved", max_shard_size=300_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert (out / "generation_config.json").is_file()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = json.loads((fixtures / "tiny_llama_bnb4" / "config.json").read_text())["quantization_config"]
    assert qc == {**expected, "llm_int8_skip_modules": ["lm_head"]}
    again = from_pretrained(out, device="cpu", progress=False)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = logits_fixture(fixtures)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert not list(tmp_path.glob(".saved.*")), "temporary folders left behind"


def test_quantize_model_matches_from_pretrained(fixtures):
    float_model = transformers.AutoModelForCausalLM.from_pretrained(fixtures / "tiny_llama_bf16", dtype=torch.bfloat16)
    quantize_model(float_model, device="cpu")
    loaded = from_pretrained(fixtures / "tiny_llama_bf16", device="cpu", progress=False)
    a, b = float_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_targets_and_options(fixtures):
    model = from_pretrained(fixtures / "tiny_llama_bf16", device="cpu", progress=False, lora_rank=4,
                            lora_alpha=8, quant_type="fp4", blocksize=128, compress_statistics=False,
                            skip_modules=["down_proj"])
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.lora_rank == 4 and layer.self_attn.q_proj.lora_A.shape == (4, 256)
    assert type(layer.mlp.down_proj) is nn.Linear
    state = layer.mlp.up_proj.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("fp4", 128, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "down_proj" in n or "norm" in n or "embed" in n or "lm_head" in n
                             for n in trainable)
    ids = torch.randint(0, 1024, (1, 8))
    model(ids).logits.float().sum().backward()
    assert layer.self_attn.q_proj.lora_B.grad is not None


# ------------------------------------------------------------------------------- other architectures
def _tiny_configs():
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "mistral": transformers.MistralConfig(**common),
        "qwen2": transformers.Qwen2Config(**common),
        "qwen3": transformers.Qwen3Config(**common, head_dim=16),
        "gemma2": transformers.Gemma2Config(**common, head_dim=16),
        "phi3": transformers.Phi3Config(**common, pad_token_id=0),
        "bert": transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64),
    }


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma2", "phi3", "bert"])
def test_architectures_load_run_save(model_type, tmp_path):
    config = _tiny_configs()[model_type]
    config.architectures = ["BertModel" if model_type == "bert" else
                            transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    torch.manual_seed(0)
    cls = getattr(transformers, config.architectures[0])
    reference_model = cls(config).to(torch.bfloat16).eval()
    reference_model.save_pretrained(tmp_path / "float")
    model = from_pretrained(tmp_path / "float", device="cpu", progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear4bit)]
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert quantized
    assert kept == ([] if model_type == "bert" else ["lm_head"])
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        ours = model(ids)[0].float()
        theirs = reference_model(ids)[0].float()
    assert torch.isfinite(ours).all()
    # The quantized layers' part of the output: the output minus that of the float model with
    # those layers zeroed. Residual streams make the whole outputs similar even when every
    # quantized layer outputs zeros (BERT: cosine > 0.9), so the comparison is on this part.
    zeroed = copy.deepcopy(reference_model)
    for name in quantized:
        for p in zeroed.get_submodule(name).parameters():
            p.data.zero_()
    with torch.no_grad():
        base = zeroed(ids)[0].float()
    # 4-bit weights (SQNR ~20 dB per layer) move the outputs by ~10-20% of their norm; a weight in
    # the wrong place, or a layer that outputs nothing, would make them unrelated (cosine near 0).
    cos = nn.functional.cosine_similarity((ours - base).flatten(), (theirs - base).flatten(), dim=0)
    assert cos > 0.9, f"cosine {cos:.3f}"
    out = save_pretrained(model, tmp_path / "q")
    s = summarize(out)
    assert s.quantized_weights == len(quantized) and s.model_type == model_type
    again = from_pretrained(out, device="cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(again(ids)[0], model(ids)[0])


def test_unknown_architecture_falls_back_with_warning(caplog):
    from nf4.loading.architectures import FALLBACK, architecture

    with caplog.at_level("WARNING"):
        assert architecture("no-such-model") is FALLBACK
    assert "no-such-model" in caplog.text


# ------------------------------------------------------------------------------- bad input
def _rewrite(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_truncated_shard(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    shard = folder / "model-00003-of-00011.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model-00003-of-00011.safetensors.*truncated"):
        from_pretrained(folder, device="cpu", progress=False)


def test_corrupt_shard_header(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    shard = folder / "model-00002-of-00011.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model-00002-of-00011.safetensors.*(JSON|corrupt)"):
        from_pretrained(folder, device="cpu", progress=False)


def test_index_names_missing_shard(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    (folder / "model-00007-of-00011.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00007-of-00011.safetensors"):
        from_pretrained(folder, device="cpu", progress=False)


def test_index_names_tensor_its_shard_lacks(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00011.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_pretrained(folder, device="cpu", progress=False)


def test_shapes_disagree_with_config(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        from_pretrained(folder, device="cpu", progress=False)


def test_missing_tensor(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    _rewrite(folder / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        from_pretrained(folder, device="cpu", progress=False)


@pytest.mark.parametrize("corruption", ["blocksize", "absmax_length", "json_shape", "missing_absmax"])
def test_quant_state_that_does_not_fit_its_data(fixtures, tmp_path, corruption):
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    key = "model.layers.1.self_attn.o_proj.weight"
    blob_key = f"{key}.quant_state.bitsandbytes__nf4"

    def edit(t):
        meta = json.loads(bytes(t[blob_key].tolist()))
        if corruption == "blocksize":
            meta["blocksize"] = 128
        elif corruption == "json_shape":
            meta["shape"] = [256, 128]
        elif corruption == "absmax_length":
            t[f"{key}.absmax"] = t[f"{key}.absmax"][:-1].clone()
        else:
            del t[f"{key}.absmax"]
        t[blob_key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)

    _rewrite(folder / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"o_proj\.weight"):
        from_pretrained(folder, device="cpu", progress=False)


@pytest.mark.parametrize("name,value", [("model.layers.0.mlp.up_proj.weight", float("nan")),
                                        ("model.embed_tokens.weight", float("inf"))])
def test_non_finite_weights(fixtures, tmp_path, name, value):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]

    def edit(t):
        t[name][3, 5] = value

    _rewrite(shard, edit)
    with pytest.raises(ValueError, match=rf"{shard.name}.*{name}.*non-finite"):
        from_pretrained(folder, device="cpu", progress=False)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ValueError, match="unpickling"):
        from_pretrained(tmp_path, device="cpu", progress=False)


def test_missing_folder_and_repo(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nope", device="cpu", progress=False)
    make_hub(tmp_path, monkeypatch, {})
    with pytest.raises(FileNotFoundError):  # offline and not in the cache
        from_pretrained("nf4-test/not-cached", device="cpu", progress=False)


def test_other_quantization_methods_refused(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq"):
        from_pretrained(folder, device="cpu", progress=False)


def test_interrupted_save_leaves_nothing(fixtures, tmp_path, monkeypatch):
    model = from_pretrained(fixtures / "tiny_llama_bnb4", device="cpu", progress=False)
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(save_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "out", max_shard_size=300_000)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_load_matches_bnb_bytes(fixtures):
    model = from_pretrained(fixtures / "tiny_llama_bf16", device="cuda", progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert_matches_bnb_checkpoint(model.state_dict(), fixtures / "tiny_llama_bnb4" / "model.safetensors")


@pytest.mark.gpu
def test_saved_folder_loads_in_transformers_bitsandbytes(fixtures, tmp_path):
    pytest.importorskip("bitsandbytes", reason="interoperability check needs bitsandbytes")
    model = from_pretrained(fixtures / "tiny_llama_bf16", device="cuda", progress=False)
    out = save_pretrained(model, tmp_path / "nf4-saved", max_shard_size=300_000)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cuda")
    ids = logits_fixture(fixtures)["input_ids"].cuda()
    with torch.no_grad():
        a, b = model(ids).logits.float(), theirs(ids).logits.float()
    torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)
