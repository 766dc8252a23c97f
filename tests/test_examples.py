"""examples/qlora_finetune.py runs end to end on the CPU (tiny Llama, a few steps): the loss
falls, only the adapters are saved, and reloading them reproduces the trained model's logits
(the example asserts that itself and raises otherwise)."""
import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from nf4.testing import fixtures_dir

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qlora_finetune.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("qlora_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qlora_finetune_runs(example, fixtures, tmp_path):
    out = tmp_path / "adapter"
    result = example.main([str(fixtures / "tiny_llama_bf16"), "--device", "cpu", "--steps", "4",
                           "--lines", "80", "--batch-size", "2", "--seq-len", "32", "--rank", "4",
                           "--out", str(out)])
    losses = result["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    tensors = load_file(str(out / example.ADAPTER_FILE))
    # 2 layers x 7 projections x (lora_A, lora_B), nothing else (no 4-bit base weights).
    assert len(tensors) == 28
    assert all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
    assert all(v.shape[0] == 4 for k, v in tensors.items() if k.endswith(".lora_A"))
    config = json.loads((out / example.CONFIG_FILE).read_text())
    assert config["lora_rank"] == 4 and config["base_model"] == str(fixtures / "tiny_llama_bf16")


def test_load_adapter_rejects_foreign_keys(example, fixtures, tmp_path):
    out = tmp_path / "adapter"
    example.main([str(fixtures / "tiny_llama_bf16"), "--device", "cpu", "--steps", "1", "--lines", "40",
                  "--batch-size", "1", "--seq-len", "32", "--rank", "2", "--out", str(out)])
    tensors = load_file(str(out / example.ADAPTER_FILE))
    tensors["model.layers.9.self_attn.q_proj.lora_A"] = next(iter(tensors.values())).clone()
    save_file(tensors, str(out / example.ADAPTER_FILE))
    with pytest.raises(ValueError, match="adapter keys do not match"):
        example.load_adapter(out, "cpu")


def test_dataset_too_small(example):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        example.batches(example.make_dataset(2), example.ByteTokenizer(1024), 512, 4, "cpu")


def test_default_model_ships_with_the_repository(example, monkeypatch):
    """With nothing beside the clone and no NF4_FIXTURES, the example's default model is the
    tiny Llama in tests/fixtures of its own checkout."""
    monkeypatch.delenv("NF4_FIXTURES", raising=False)
    model = Path(example.parse_args([]).model)
    assert model == Path(__file__).resolve().parent / "fixtures" / "tiny_llama_bf16"
    assert (model / "model.safetensors.index.json").is_file()


def test_fixtures_dir_defaults_to_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("NF4_FIXTURES", raising=False)
    assert fixtures_dir(tmp_path) == tmp_path / "tests" / "fixtures"
    monkeypatch.setenv("NF4_FIXTURES", str(tmp_path))
    assert fixtures_dir() == tmp_path
