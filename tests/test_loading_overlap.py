"""Quantizing while the model is built (nf4.loading.model, See Note: quantizing while the model is
built): the loaded state is bit for bit the sequential load's, whatever the worker guessed, and an
error on either thread surfaces as raised, with no thread left behind. CPU; GPU where marked."""
import json
import logging
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from nf4.loading import from_pretrained, model as loader

transformers = pytest.importorskip("transformers", reason="nf4.loading builds transformers models ([hf] extra)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Projections of the tiny Llama (2 layers x q, k, v, o, gate, up, down): every one is quantized.
PROJECTIONS = 14


def load(folder, monkeypatch, overlap: bool, device="cpu", **kw):
    monkeypatch.setenv(loader.OVERLAP_ENV, "1" if overlap else "0")
    torch.manual_seed(0)  # LoRA's random init, drawn in the same order either way
    return from_pretrained(folder, device=device, progress=False, **kw)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k].cpu(), sb[k].cpu()
        assert (x.dtype, x.shape) == (y.dtype, y.shape), k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k


def early_threads():
    return [t for t in threading.enumerate() if t.name.startswith("nf4-early")]


def copy_fixture(fixtures, tmp_path, name="tiny_llama_bf16"):
    return shutil.copytree(fixtures / name, tmp_path / name)


def shard_of(folder, name):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def rewrite(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------- same bytes
@pytest.mark.parametrize("options", [
    {},
    dict(lora_rank=4, lora_alpha=8, skip_modules=["down_proj"]),
    dict(compute_dtype=torch.float16, quant_type="fp4", blocksize=128, compress_statistics=False),
])
def test_overlap_loads_the_sequential_bytes(fixtures, monkeypatch, caplog, options):
    with caplog.at_level(logging.INFO, logger="nf4.loading.model"):
        early = load(fixtures / "tiny_llama_bf16", monkeypatch, True, **options)
    kept = 2 if options.get("skip_modules") else 0  # one down_proj per layer
    done = PROJECTIONS - kept
    assert f"{done} quantized ({done} while the model was built)" in caplog.text
    assert "quantize (worker)" in early.nf4_load_phases
    sequential = load(fixtures / "tiny_llama_bf16", monkeypatch, False, **options)
    assert "quantize (worker)" not in sequential.nf4_load_phases
    assert_same_state(early, sequential)
    assert not early_threads()


def test_a_wrong_guess_costs_time_not_bytes(fixtures, monkeypatch, caplog):
    """The worker quantizes the embedding and the head too (the plan keeps both in bf16): those
    results are dropped and the tensors read again as the plan says."""
    every_matrix = loader._early_entries

    def guess_all(ckpt, opts):
        return every_matrix(ckpt, opts) + [ckpt.entries[n] for n in ("model.embed_tokens.weight", "lm_head.weight")]

    monkeypatch.setattr(loader, "_early_entries", guess_all)
    with caplog.at_level(logging.DEBUG, logger="nf4.loading.model"):
        early = load(fixtures / "tiny_llama_bf16", monkeypatch, True)
    assert "2 tensors quantized early are not quantized by the plan" in caplog.text
    assert f"({PROJECTIONS} while the model was built)" in caplog.text
    assert_same_state(early, load(fixtures / "tiny_llama_bf16", monkeypatch, False))


def test_overlap_off_for_unknown_architectures_and_observers(fixtures, monkeypatch, tmp_path):
    folder = copy_fixture(fixtures, tmp_path)
    assert len(loader._early_entries(loader.Checkpoint(folder), loader.QuantOptions())) == PROJECTIONS
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "not-a-model"}))
    assert loader._early_entries(loader.Checkpoint(folder), loader.QuantOptions()) == []
    monkeypatch.setenv(loader.OVERLAP_ENV, "1")
    seen = []
    model = loader.load_folder(fixtures / "tiny_llama_bf16", device="cpu", opts=loader.QuantOptions(),
                               observer=lambda name, module, weight: seen.append(name), progress=False)
    assert len(seen) == PROJECTIONS and "quantize (worker)" not in model.nf4_load_phases


def test_overlap_setting(fixtures, monkeypatch):
    monkeypatch.setenv(loader.OVERLAP_ENV, "yes")
    with pytest.raises(ValueError, match="NF4_LOAD_OVERLAP must be auto, 0 or 1, got 'yes'"):
        from_pretrained(fixtures / "tiny_llama_bf16", device="cpu", progress=False)
    monkeypatch.delenv(loader.OVERLAP_ENV)
    # auto: CUDA devices only (the CPU's quantization competes with the import for the cores).
    assert "quantize (worker)" not in from_pretrained(fixtures / "tiny_llama_bf16", device="cpu",
                                                      progress=False).nf4_load_phases
    assert loader._overlap_enabled(torch.device("cuda", 0)) and not loader._overlap_enabled(torch.device("cpu"))


# ------------------------------------------------------------------------------- errors
def test_worker_error_is_raised_as_raised(fixtures, monkeypatch, caplog):
    class Boom(RuntimeError):
        pass

    def fail(t, opts):
        raise Boom("quantizing failed on the worker")

    monkeypatch.setattr(loader, "_quantize_tensor", fail)
    with pytest.raises(Boom, match="quantizing failed on the worker"):
        load(fixtures / "tiny_llama_bf16", monkeypatch, True)
    assert "failed too" not in caplog.text  # its own error, raised once, not reported as a second one
    assert not early_threads()


def test_truncated_shard_same_error_both_ways(fixtures, tmp_path, monkeypatch):
    """A projection's bytes cut off after the headers were read: the worker meets it."""
    folder = copy_fixture(fixtures, tmp_path)
    shard = shard_of(folder, "model.layers.0.mlp.up_proj.weight")
    real = loader.Checkpoint

    def truncate_after_headers(path):
        ckpt = real(path)
        shard.write_bytes(shard.read_bytes()[:-1000])
        return ckpt

    monkeypatch.setattr(loader, "Checkpoint", truncate_after_headers)
    errors = []
    for overlap in (True, False):
        shutil.copy(fixtures / "tiny_llama_bf16" / shard.name, shard)
        with pytest.raises(ValueError, match=rf"{shard.name}.*(truncated|past the end)") as e:
            load(folder, monkeypatch, overlap)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert not early_threads()


def test_main_thread_error_stops_the_worker(fixtures, monkeypatch):
    started = threading.Event()
    quantize = loader._quantize_tensor

    def slow(t, opts):
        started.set()
        return quantize(t, opts)

    def fail(folder):
        assert started.wait(30), "the worker never started"
        raise KeyError("the model could not be built")

    monkeypatch.setattr(loader, "_quantize_tensor", slow)
    monkeypatch.setattr(loader, "_build_meta_model", fail)
    with pytest.raises(KeyError, match="the model could not be built"):
        load(fixtures / "tiny_llama_bf16", monkeypatch, True)
    assert not early_threads()


def test_both_fail_the_main_error_wins_and_the_worker_is_reported(fixtures, monkeypatch, caplog):
    failed = threading.Event()

    def fail_worker(t, opts):
        failed.set()
        raise OSError("worker I/O failed")

    def fail_main(folder):
        assert failed.wait(30), "the worker never ran"
        raise ValueError("config.json describes another model")

    monkeypatch.setattr(loader, "_quantize_tensor", fail_worker)
    monkeypatch.setattr(loader, "_build_meta_model", fail_main)
    with pytest.raises(ValueError, match="another model"):
        load(fixtures / "tiny_llama_bf16", monkeypatch, True)
    assert "the early quantization worker failed too: OSError: worker I/O failed" in caplog.text
    assert not early_threads()


def test_plan_error_after_the_worker_read_the_bytes(fixtures, tmp_path, monkeypatch):
    """config.json's sizes pass the header check (no size above the largest dimension) but the
    projections' shapes disagree with the model: the plan refuses, as without the worker."""
    folder = copy_fixture(fixtures, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    messages = []
    for overlap in (True, False):
        with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape") as e:
            load(folder, monkeypatch, overlap)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert not early_threads()


def test_non_finite_reported_in_plan_order(fixtures, tmp_path, monkeypatch):
    """One bad tensor the worker quantizes, one the main pass loads: the same one is named."""
    folder = copy_fixture(fixtures, tmp_path)
    for name in ("model.layers.1.self_attn.v_proj.weight", "model.embed_tokens.weight"):
        rewrite(shard_of(folder, name), lambda t, n=name: t[n].__setitem__((2, 3), float("nan")))
    messages = []
    for overlap in (True, False):
        with pytest.raises(ValueError, match="non-finite") as e:
            load(folder, monkeypatch, overlap)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


@pytest.mark.gpu
def test_overlap_on_the_gpu_loads_the_sequential_bytes(fixtures, monkeypatch):
    early = load(fixtures / "tiny_llama_bf16", monkeypatch, True, device="cuda")
    assert "quantize (worker)" in early.nf4_load_phases
    assert_same_state(early, load(fixtures / "tiny_llama_bf16", monkeypatch, False, device="cuda"))


@pytest.mark.skipif(torch.cuda.is_initialized(), reason="CUDA already initialized in this process")
def test_cuda_device_named_without_creating_a_context():
    """The worker creates the CUDA context (in a fresh process, while transformers imports): naming
    the device must not; before any context no thread has picked a device other than 0."""
    assert loader._load_device("cuda") == torch.device("cuda", 0)
    assert loader._load_device("cuda:1") == torch.device("cuda", 1)
    assert loader._load_device("cpu") == torch.device("cpu")
    assert not torch.cuda.is_initialized()
