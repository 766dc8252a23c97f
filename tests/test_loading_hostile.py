"""nf4.loading against hostile folders: resource bombs (deep JSON, huge files, absurd config
sizes), headers that lie, repository code, configs that drop weights, concurrent loads and failing
saves. Every case must end in a clear error (or the right result), never a crash, a hang, a large
allocation or executed code. CPU only."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from nf4 import safe_json
from nf4.loading import checkpoint as ckpt_module
from nf4.loading import from_pretrained, save_pretrained, summarize
from nf4.loading import model as model_module
from nf4.loading import save as save_module
from nf4.loading.checkpoint import Checkpoint, TensorEntry, read_header, read_quant_state_json
from nf4.loading.config_check import check_config_sizes
from tests.test_loading import _rewrite, copy_fixture

transformers = pytest.importorskip("transformers", reason="nf4.loading builds transformers models ([hf] extra)")

DEEP = safe_json.MAX_JSON_DEPTH + 1
# Deep enough that json.loads itself would raise RecursionError (its limit is ~1000 levels).
BOMB_DEPTH = 5000


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def write_safetensors(path, header: str, data: bytes = b"") -> None:
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def load(folder):
    return from_pretrained(folder, device="cpu", progress=False)


# ------------------------------------------------------------------------------- JSON caps
@pytest.mark.parametrize("depth", [DEEP, BOMB_DEPTH])
def test_deep_json_is_a_value_error(depth):
    with pytest.raises(ValueError, match="nested"):
        safe_json.loads(nested(depth), "x", 10**6)
    # Exactly at the cap it parses; brackets inside strings do not count.
    assert safe_json.loads(nested(safe_json.MAX_JSON_DEPTH), "x", 10**6)
    assert safe_json.loads(json.dumps({"k": "[" * 100}), "x", 10**6) == {"k": "[" * 100}


def test_duplicate_keys_refused_at_any_level():
    with pytest.raises(ValueError, match="'a' appears twice"):
        safe_json.loads('{"b": {"a": 1, "a": 2}}', "x", 100)


def test_deep_safetensors_header(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", '{"x": ' + nested(BOMB_DEPTH) + "}")
    with pytest.raises(ValueError, match="model.safetensors.*nested"):
        read_header(tmp_path / "model.safetensors")


def test_deep_index_and_config(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    index = folder / "model.safetensors.index.json"
    good_index = index.read_text()
    index.write_text('{"weight_map": {}, "metadata": ' + nested(BOMB_DEPTH) + "}")
    with pytest.raises(ValueError, match="index.json.*nested"):
        Checkpoint(folder)
    index.write_text(good_index)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config)[:-1] + ', "x": ' + nested(BOMB_DEPTH) + "}")
    with pytest.raises(ValueError, match="config.json.*nested"):
        load(folder)


def test_deep_quant_state_blob(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"

    def edit(t):
        t[key] = torch.tensor(list(nested(2000).encode()), dtype=torch.uint8)

    _rewrite(folder / "model.safetensors", edit)
    with pytest.raises(ValueError, match="q_proj.*nested"):
        load(folder)
    with pytest.raises(ValueError, match="q_proj.*nested"):
        summarize(folder)


def _no_reads(monkeypatch, name: str):
    """Fail the test if the file ``name`` is opened by safe_json, or any tensor read, from here on."""
    def guarded_open(path, *args, **kwargs):
        if Path(path).name == name:
            raise AssertionError(f"{path} opened before the size check")
        return open(path, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("tensor read before the size check")
    monkeypatch.setattr(safe_json, "open", guarded_open, raising=False)
    monkeypatch.setattr(ckpt_module, "read_tensor", refuse)


def test_huge_config_and_index_refused_by_size_before_reading(fixtures, tmp_path, monkeypatch):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    with open(folder / "config.json", "r+b") as f:
        f.truncate(32 * 2**30)  # a 32 GiB sparse file: reading it would take minutes and the RAM
    _no_reads(monkeypatch, "config.json")
    with pytest.raises(ValueError, match=r"config.json: 34359738368 bytes, more than"):
        Checkpoint(folder)
    monkeypatch.undo()
    (folder / "config.json").write_bytes((fixtures / "tiny_llama_bf16" / "config.json").read_bytes())
    with open(folder / "model.safetensors.index.json", "r+b") as f:
        f.truncate(32 * 2**30)
    _no_reads(monkeypatch, "model.safetensors.index.json")
    with pytest.raises(ValueError, match=r"index.json: 34359738368 bytes, more than"):
        Checkpoint(folder)


def test_huge_quant_state_blob_refused_before_reading(tmp_path, monkeypatch):
    """A header claiming a 32 GiB quantization state over a sparse file: refused from the header."""
    size = 32 * 2**30
    name = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    header = json.dumps({name: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    shard = tmp_path / "model.safetensors"
    write_safetensors(shard, header)
    with open(shard, "r+b") as f:
        f.truncate(8 + len(header) + size)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _no_reads(monkeypatch, "model.safetensors")
    entry = TensorEntry(name, shard, torch.uint8, (size,), 8 + len(header), size)
    with pytest.raises(ValueError, match="34359738368 bytes, more than a quantization state"):
        read_quant_state_json(entry)
    with pytest.raises(ValueError, match="34359738368 bytes, more than a quantization state"):
        summarize(tmp_path)


# ------------------------------------------------------------------------------- headers that lie
def test_duplicate_tensor_name_in_header(tmp_path):
    entry = '{"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}'
    write_safetensors(tmp_path / "model.safetensors", f'{{"w": {entry}, "w": {entry}}}', b"ab")
    with pytest.raises(ValueError, match="'w' appears twice"):
        read_header(tmp_path / "model.safetensors")


@pytest.mark.parametrize("shape", [[2**64, 0], [2**62, 4, 0], [2**63, 0]])
def test_zero_byte_shape_that_overflows_torch(tmp_path, shape):
    header = json.dumps({"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 0]}})
    write_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(ValueError, match="overflows"):
        read_header(tmp_path / "model.safetensors")


def test_large_zero_byte_shape_that_torch_can_make_is_accepted(tmp_path):
    header = json.dumps({"w": {"dtype": "U8", "shape": [2**31, 2**31, 0], "data_offsets": [0, 0]}})
    write_safetensors(tmp_path / "model.safetensors", header)
    entries, _ = read_header(tmp_path / "model.safetensors")
    assert entries["w"].nbytes == 0


# ------------------------------------------------------------------------------- config sizes
@pytest.mark.parametrize("key,value", [("hidden_size", 10**12), ("vocab_size", 10**12),
                                       ("intermediate_size", 10**12), ("num_hidden_layers", 10**9),
                                       ("max_position_embeddings", 10**12), ("hidden_size", -4),
                                       ("num_attention_heads", 2.5)])
@pytest.mark.parametrize("fixture", ["tiny_llama_bf16", "tiny_llama_bnb4"])
def test_config_sizes_checked_before_building(fixtures, tmp_path, monkeypatch, key, value, fixture):
    folder = copy_fixture(fixtures, fixture, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))

    def never(*args):
        raise AssertionError("the model was built before the config sizes were checked")

    monkeypatch.setattr(model_module, "_build_meta_model", never)
    with pytest.raises(ValueError, match=rf"config.json: {key}"):
        load(folder)


def test_config_sizes_nested_in_sub_config(fixtures, tmp_path, monkeypatch):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"] = {"vocab_size": 10**12}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"text_config.vocab_size = 1000000000000"):
        load(folder)


@pytest.mark.parametrize("fixture", ["tiny_llama_bf16", "tiny_llama_bnb4"])
def test_real_config_sizes_pass(fixtures, fixture):
    """The check's bounds admit real checkpoints (bnb's packed weights included)."""
    ckpt = Checkpoint(fixtures / fixture)
    check_config_sizes(ckpt.config, ckpt.entries, "config.json")


# ------------------------------------------------------------------------------- config drops weights
@pytest.mark.parametrize("fixture", ["tiny_llama_bf16", "tiny_llama_bnb4"])
def test_config_with_fewer_layers_than_the_weights(fixtures, tmp_path, fixture):
    folder = copy_fixture(fixtures, fixture, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    # bnb checkpoints already failed (a quantization state for a layer the model lacks).
    with pytest.raises(ValueError, match=r"model\.layers\.1\.") as e:
        load(folder)
    assert "fewer layers" in str(e.value) or "not a linear layer" in str(e.value)


def test_config_of_an_unrelated_architecture(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bf16", tmp_path)
    config = transformers.BertConfig(vocab_size=1024, hidden_size=256, intermediate_size=704,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=256).to_dict()
    config["architectures"] = ["BertModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no place in the BertModel|lacks"):
        load(folder)


def test_unrelated_tensors_outweighing_the_model_are_refused(fixtures, tmp_path):
    """A model the checkpoint fully satisfies, but most of the checkpoint's bytes unused."""
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    _rewrite(folder / "model.safetensors", lambda t: t.update(
        {"vision_tower.blocks.weight": torch.zeros(4096, 1024, dtype=torch.bfloat16)}))
    with pytest.raises(ValueError, match=r"another architecture.*vision_tower\.blocks\.weight"):
        load(folder)


def test_extra_head_is_named_in_a_warning(fixtures, tmp_path, caplog):
    """A small extra tensor (a pretraining head) loads, as in transformers, named at WARNING;
    an old per-layer rotary_emb.inv_freq is ignored silently, as transformers does."""
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    _rewrite(folder / "model.safetensors", lambda t: t.update(
        {"cls.predictions.bias": torch.zeros(16), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    with caplog.at_level("WARNING", logger="nf4.loading.model"):
        load(folder)
    assert "cls.predictions.bias" in caplog.text and "inv_freq" not in caplog.text


@pytest.mark.parametrize("archs", [5, "LlamaForCausalLM", [5], {"a": 1}])
def test_architectures_must_be_a_list_of_names(fixtures, tmp_path, archs):
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = archs
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures must be a list"):
        load(folder)
    with pytest.raises(ValueError, match="architectures must be a list"):
        summarize(folder)


# ------------------------------------------------------------------------------- remote code
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("repository code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.mark.parametrize("model_type", ["evil", "llama"])
def test_loading_never_runs_repository_code(fixtures, tmp_path, model_type):
    """A folder with auto_map and a Python file: even with "y" on stdin (transformers' prompt),
    the file is never imported. An unknown model_type then fails; a known one loads the library's
    own class."""
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                            "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    code = (f"import nf4\ntry:\n    m = nf4.from_pretrained({str(folder)!r}, device='cpu', progress=False)\n"
            f"    print('loaded', type(m).__name__)\nexcept ValueError as e:\n    print('refused', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True,
                         timeout=300, env=env)
    assert not marker.exists(), run.stdout + run.stderr
    assert run.returncode == 0, run.stderr
    if model_type == "evil":
        assert run.stdout.startswith("refused")
    else:
        assert run.stdout.strip() == "loaded LlamaForCausalLM"


# ------------------------------------------------------------------------------- concurrency
def test_meta_building_affects_only_the_building_thread(fixtures, monkeypatch):
    """A module built by another thread during a load gets real parameters; the patch is gone
    afterwards, also when the build fails."""
    original = nn.Module.register_parameter
    seen = {}
    post_init = transformers.LlamaForCausalLM.post_init

    def post_init_with_a_neighbour(self):
        def build():
            seen["other"] = nn.Linear(4, 4).weight.device.type
        t = threading.Thread(target=build)
        t.start()
        t.join()
        seen["own"] = nn.Linear(4, 4).weight.device.type
        post_init(self)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "post_init", post_init_with_a_neighbour)
    model = load(fixtures / "tiny_llama_bnb4")
    assert seen == {"other": "cpu", "own": "meta"}
    assert nn.Module.register_parameter is original
    assert all(p.device.type == "cpu" for p in model.parameters())

    def failing_post_init(self):
        raise RuntimeError("build failed")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "post_init", failing_post_init)
    with pytest.raises(RuntimeError, match="build failed"):
        load(fixtures / "tiny_llama_bnb4")
    assert nn.Module.register_parameter is original


def test_overlapping_meta_contexts_in_two_threads():
    original = nn.Module.register_parameter
    inside, release = threading.Event(), threading.Event()
    devices = {}

    def other():
        with model_module._parameters_on_meta():
            inside.set()
            release.wait(10)
            devices["other"] = nn.Linear(2, 2).weight.device.type

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with model_module._parameters_on_meta():
        devices["main"] = nn.Linear(2, 2).weight.device.type
    # The main thread left first: the other thread's context must still hold.
    devices["main_after"] = nn.Linear(2, 2).weight.device.type
    release.set()
    t.join()
    assert devices == {"main": "meta", "main_after": "cpu", "other": "meta"}
    assert nn.Module.register_parameter is original


# ------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("failing_call", [1, 2])
def test_save_rolls_back_when_a_rename_fails(fixtures, tmp_path, monkeypatch, failing_call):
    """Replacing an existing folder: whichever rename fails (moving the old folder aside, or the
    new one into place), the old folder is back in place, unchanged, and nothing else is left."""
    model = load(fixtures / "tiny_llama_bnb4")
    out = save_pretrained(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(save_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained(model, out, max_shard_size=300_000)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------- each header check
def _entry(dtype="U8", shape=(2,), offsets=(0, 2)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_byte_span_must_equal_numel_times_itemsize(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, json.dumps({"w": _entry("F16", (2,), (0, 3))}), b"abc")
    with pytest.raises(ValueError, match="'w': 3 bytes of data for F16 \\[2\\], expected 4"):
        read_header(path)
    write_safetensors(path, json.dumps({"w": _entry("F16", (2,), (0, 4))}), b"abcd")
    assert read_header(path)[0]["w"].nbytes == 4


def test_overlapping_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, json.dumps({"a": _entry("U8", (4,), (0, 4)), "b": _entry("U8", (4,), (2, 6))}),
                      b"abcdef")
    with pytest.raises(ValueError, match="'a' and 'b' overlap"):
        read_header(path)


def test_data_past_the_end_of_the_file_caught_at_the_header(tmp_path):
    """The header check, not the later read, must refuse it: read_header reads no tensor data."""
    path = tmp_path / "model.safetensors"
    write_safetensors(path, json.dumps({"w": _entry("U8", (100,), (0, 100))}), b"x" * 10)
    with pytest.raises(ValueError, match="data ends at byte 100 but the file holds 10"):
        read_header(path)


def _sharded(tmp_path, weight_map, files):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for name, tensors in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        header = {k: _entry("U8", (1,), (i, i + 1)) for i, k in enumerate(tensors)}
        write_safetensors(folder / name, json.dumps(header), b"x" * len(tensors))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard", ["sub/a.safetensors", "../ckpt/a.safetensors"])
def test_index_shard_names_must_be_plain_file_names(tmp_path, shard):
    folder = _sharded(tmp_path, {"w": shard}, {"sub/a.safetensors": ["w"], "a.safetensors": ["w"]})
    with pytest.raises(ValueError, match="file name in the same folder"):
        Checkpoint(folder)


@pytest.mark.parametrize("case", ["wrong_shard", "ghost"])
def test_index_entries_cross_checked_against_the_shards(tmp_path, case):
    files = {"a.safetensors": ["w", "v"], "b.safetensors": ["u"]}
    weight_map = {"w": "a.safetensors", "v": "a.safetensors", "u": "b.safetensors"}
    if case == "wrong_shard":
        weight_map["v"] = "b.safetensors"  # v is in a, which is still read (w lives there)
    else:
        weight_map["ghost"] = "a.safetensors"
    folder = _sharded(tmp_path, weight_map, files)
    with pytest.raises(ValueError, match="should be in"):
        Checkpoint(folder)


# ------------------------------------------------------------------------------- bnb config and pieces
def test_bnb_checkpoint_without_quant_map(fixtures, tmp_path):
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    _rewrite(folder / "model.safetensors", lambda t: t.pop("model.layers.0.mlp.up_proj.weight.quant_map"))
    with pytest.raises(ValueError, match=r"up_proj\.weight\.quant_map"):
        load(folder)


@pytest.mark.parametrize("flags", [{"load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True,
                                    "_load_in_8bit": True},
                                   {"load_in_4bit": False, "_load_in_4bit": False}])
def test_bnb_8bit_config_refused(fixtures, tmp_path, flags):
    folder = copy_fixture(fixtures, "tiny_llama_bnb4", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(flags)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not 4-bit"):
        load(folder)
