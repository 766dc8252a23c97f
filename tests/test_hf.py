"""nf4.hf: nf4 as a transformers quantizer (Nf4Config), the bitsandbytes switch (install), peft
without register(), and the TRL SFTTrainer script both ways (CPU, the tiny Llama).

Needs the [train] extra: transformers and peft for the module, trl and datasets for the SFTTrainer
tests (skipped where missing: the GPU machine has no trl, and its GPU test still runs).
"""
import importlib.util
import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import nf4  # noqa: E402
from bench.bench_sft import tokenizer  # noqa: E402  (the word-level tokenizer over the model's ids)
import nf4.backends  # noqa: E402
import nf4.hf  # noqa: E402
from nf4.nn import Linear4bit, Params4bit  # noqa: E402
from nf4.peft import LoraQuantLinear4bit  # noqa: E402
from tests.test_loading import LOGITS_ATOL, assert_matches_bnb_checkpoint, logits_fixture  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING  # noqa: E402

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# The tiny Llama: 2 layers x 7 projections.
LINEARS = 14
# The bitsandbytes QLoRA recipe, as scripts write it.
BNB_KWARGS = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                  bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def _reference_backend_on_cpu():
    # These tests check the integration, not the kernels: on CPU the reference backend computes
    # in ~1/10 of the Triton interpreter's time (tests/test_triton_backend.py covers that one).
    if not torch.cuda.is_available():
        nf4.set_backend("reference")


@pytest.fixture
def installed():
    nf4.hf.install()
    yield
    nf4.hf.uninstall()


def load(folder, config=None):
    # quantization_config=None would override the folder's own (from_pretrained hands it to the config).
    kwargs = {} if config is None else {"quantization_config": config}
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs)


def logits(model, ids):
    model.eval()
    with torch.no_grad():  # nf4.from_pretrained puts the model on the GPU where there is one
        return model(input_ids=ids.to(model.device)).logits.cpu()


# ------------------------------------------------------------------------------- the quantizer
def test_nf4config_quantizes_on_load_to_bnb_bytes(fixtures):
    model = load(fixtures / "tiny_llama_bf16", nf4.hf.Nf4Config())
    assert model.is_loaded_in_4bit and model.is_quantized
    assert isinstance(model.hf_quantizer, nf4.hf.Nf4HfQuantizer)
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_serializable()
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == LINEARS and all(isinstance(m, torch.nn.Linear) for m in layers)
    assert type(model.lm_head) is torch.nn.Linear
    assert_matches_bnb_checkpoint(model.state_dict(), fixtures / "tiny_llama_bnb4" / "model.safetensors")
    # bnb's count: each packed byte is two weights (transformers' own method needs bitsandbytes).
    assert model.num_parameters() == sum(p.numel() for p in load(fixtures / "tiny_llama_bf16").parameters())


def test_save_pretrained_writes_the_bnb_folder(fixtures, tmp_path, installed):
    model = load(fixtures / "tiny_llama_bf16", nf4.hf.Nf4Config())
    ids = logits_fixture(fixtures)["input_ids"]
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "saved")
    bnb_dir = fixtures / "tiny_llama_bnb4"
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as ours, \
            safe_open(str(bnb_dir / "model.safetensors"), "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
    qc = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    # Read back by transformers (nf4 serving the bnb config) and by nf4 alone: the same logits.
    assert torch.equal(logits(load(tmp_path / "saved"), ids), want)
    assert torch.equal(logits(nf4.from_pretrained(tmp_path / "saved", progress=False, device="cpu"), ids), want)


def test_bnb_checkpoint_loads_without_bitsandbytes(fixtures, tmp_path, installed):
    ref = logits_fixture(fixtures)
    model = load(fixtures / "tiny_llama_bnb4")
    assert isinstance(model.hf_quantizer, nf4.hf.Nf4HfQuantizer)
    torch.testing.assert_close(logits(model, ref["input_ids"]).float(), ref["logits_bnb4"], atol=LOGITS_ATOL, rtol=0)
    # The checkpoint's compute dtype is honoured (transformers' and nf4's loaders alike) ...
    folder = shutil.copytree(fixtures / "tiny_llama_bnb4", tmp_path / "fp16")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_compute_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config))
    assert {m.compute_dtype for m in load(folder).modules() if isinstance(m, Linear4bit)} == {torch.float16}
    assert nf4.from_pretrained(folder, progress=False).model.layers[0].mlp.up_proj.compute_dtype == torch.float16
    # ... unless the caller says otherwise.
    override = nf4.from_pretrained(folder, progress=False, compute_dtype=torch.float32)
    assert override.model.layers[0].mlp.up_proj.compute_dtype == torch.float32


def test_nf4config_loads_a_bnb_checkpoint_as_stored(fixtures, caplog):
    # transformers refuses a config of another class than the checkpoint's; nf4.hf lets an
    # Nf4Config through for bitsandbytes 4-bit checkpoints: their format, the caller's compute
    # dtype and patch switch, and a log line for each format option it cannot honour.
    ref = logits_fixture(fixtures)
    with caplog.at_level("WARNING", logger="nf4.hf"):
        model = load(fixtures / "tiny_llama_bnb4", nf4.hf.Nf4Config(quant_type="fp4", compute_dtype="float32",
                                                                    skip_modules=["o_proj"]))
    assert "ignoring Nf4Config's quant_type 'fp4' (stored: 'nf4')" in caplog.text
    assert "not Nf4Config's skip_modules ['o_proj']" in caplog.text
    assert isinstance(model.hf_quantizer, nf4.hf.Nf4HfQuantizer) and not nf4.hf.installed()
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == LINEARS  # the checkpoint's own list: o_proj is 4-bit in it
    assert {(m.quant_state.quant_type, m.compute_dtype) for m in layers} == {("nf4", torch.float32)}
    torch.testing.assert_close(logits(model, ref["input_ids"]).float(), ref["logits_bnb4"], atol=LOGITS_ATOL, rtol=0)
    assert patched(load(fixtures / "tiny_llama_bnb4", nf4.hf.Nf4Config(patch=True)))


@pytest.mark.parametrize("storage, message", [("int8", "Nf4Config does not express"), (None, "8-bit")])
def test_nf4config_refuses_bnb_checkpoints_it_cannot_load(fixtures, tmp_path, storage, message):
    folder = shutil.copytree(fixtures / "tiny_llama_bnb4", tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    if storage is None:
        q.update(load_in_4bit=False, load_in_8bit=True, _load_in_4bit=False, _load_in_8bit=True)
    else:
        q["bnb_4bit_quant_storage"] = storage
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load(folder, nf4.hf.Nf4Config())


@pytest.mark.parametrize("how", ["install", "Nf4Config"])
def test_save_pretrained_after_a_prequantized_load(fixtures, tmp_path, how):
    # See Note: saving a model loaded from 4-bit bytes (transformers raised NotImplementedError).
    try:
        if how == "install":
            nf4.hf.install()
        model = load(fixtures / "tiny_llama_bnb4", nf4.hf.Nf4Config() if how == "Nf4Config" else None)
        model.save_pretrained(tmp_path)
    finally:
        nf4.hf.uninstall()
    # the checkpoint's own names and bytes back
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as ours, \
            safe_open(str(fixtures / "tiny_llama_bnb4" / "model.safetensors"), "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
        for k in theirs.keys():
            assert torch.equal(ours.get_tensor(k), theirs.get_tensor(k)), k
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_4bit"]


def test_skip_modules_survive_a_round_trip(fixtures, tmp_path, installed):
    model = load(fixtures / "tiny_llama_bf16", nf4.hf.Nf4Config(skip_modules=["o_proj"]))
    kept = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    assert kept == ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    model.save_pretrained(tmp_path / "saved")
    qc = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    # bnb's loader reads the list as complete: the output head must be on it.
    assert qc["llm_int8_skip_modules"] == ["lm_head", "o_proj"]
    again = load(tmp_path / "saved")
    assert sorted(n for n, m in again.named_modules() if type(m) is torch.nn.Linear) == kept


def test_install_changes_one_registry_entry(fixtures):
    before = dict(AUTO_QUANTIZER_MAPPING)
    nf4.hf.install()
    nf4.hf.install()  # idempotent
    try:
        assert nf4.hf.installed()
        changed = {k for k in before if AUTO_QUANTIZER_MAPPING[k] is not before[k]}
        assert changed == {"bitsandbytes_4bit"} and AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is nf4.hf.Nf4HfQuantizer
    finally:
        nf4.hf.uninstall()
    assert not nf4.hf.installed() and AUTO_QUANTIZER_MAPPING == before
    assert AUTO_QUANTIZER_MAPPING["nf4"] is nf4.hf.Nf4HfQuantizer  # registered at import, kept
    if not HAS_BNB:
        with pytest.raises(ImportError, match="bitsandbytes"):
            load(fixtures / "tiny_llama_bnb4")


def test_nf4config_checks_and_serializes():
    config = nf4.hf.Nf4Config(compute_dtype="float16", skip_modules=["o_proj"])
    assert config.compute_dtype == torch.float16
    assert config.to_dict() == BitsAndBytesConfig(**{**BNB_KWARGS, "bnb_4bit_compute_dtype": torch.float16},
                                                  llm_int8_skip_modules=["o_proj"]).to_dict()
    with pytest.raises(ValueError, match="quant_type"):
        nf4.hf.Nf4Config(quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        nf4.hf.Nf4Config(blocksize=48)
    with pytest.raises(TypeError, match="compute_dtype"):
        nf4.hf.Nf4Config(compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="unknown"):
        nf4.hf.Nf4Config(bnb_4bit_quant_type="nf4")
    with pytest.raises(ValueError, match="load_in_4bit"):
        nf4.hf.Nf4HfQuantizer(BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(TypeError, match="patch must be a bool, got str"):
        nf4.hf.Nf4Config(patch="yes")
    with pytest.raises(TypeError, match="patch must be a bool, got int"):
        nf4.hf.install(patch=1)
    assert not nf4.hf.installed()  # the refused call changed nothing
    # patch is a choice of the load, not part of the saved (bitsandbytes) format
    assert nf4.hf.Nf4Config(patch=True).to_dict() == nf4.hf.Nf4Config().to_dict()


def patched(model) -> bool:
    """Whether nf4.models.patch went over ``model``: its causal-LM forward and its norms."""
    return "_nf4_unpatched_forward" in vars(model) and all(
        "_nf4_unpatched_forward" in vars(m) for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")


@pytest.mark.parametrize("how", ["Nf4Config", "install"])
def test_patch_argument_patches_the_loaded_model(fixtures, how):
    folder = fixtures / ("tiny_llama_bf16" if how == "Nf4Config" else "tiny_llama_bnb4")

    def loaded(patch):
        if how == "Nf4Config":
            return load(folder, nf4.hf.Nf4Config(compute_dtype=torch.bfloat16, patch=patch))
        nf4.hf.install(patch=patch)
        return load(folder)

    try:
        plain, fused = loaded(False), loaded(True)
        assert not patched(plain) and patched(fused)
        if how == "install":
            nf4.hf.install()  # again, without patch: the next load is plain
            assert not patched(load(folder))
    finally:
        nf4.hf.uninstall()
    ids = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    # A bf16 model: the kernels round to bf16 at other points than transformers' modules. Measured
    # 0.012 on logits of at most 1.39 (1.5 bf16 units in the last place there); 0.05 is 6.
    torch.testing.assert_close(logits(fused, ids), logits(plain, ids), rtol=0, atol=0.05)
    fused.train()
    out = fused(input_ids=ids, labels=ids)
    assert out.logits is None  # the patched loss never builds them
    # The fused loss sums in fp32 from bf16 hidden states: measured 1e-4 relative.
    torch.testing.assert_close(out.loss, plain(input_ids=ids, labels=ids).loss, rtol=1e-3, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_patch_argument_with_a_device_map_over_two_gpus(fixtures):
    # transformers dispatches a multi-device map (accelerate hooks that move each module's inputs
    # to its device) before the quantizer's postprocess patches the model: the patched forwards
    # must run inside those hooks (before 6d7ed50 they replaced them: layer 1's norm got cuda:0
    # inputs with a cuda:1 weight).
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}

    def loaded(patch):
        return AutoModelForCausalLM.from_pretrained(
            fixtures / "tiny_llama_bf16", device_map=device_map,
            quantization_config=nf4.hf.Nf4Config(compute_dtype=torch.bfloat16, patch=patch))

    plain, fused = loaded(False), loaded(True)
    assert not patched(plain) and patched(fused)
    ids = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    # as test_patch_argument_patches_the_loaded_model: bf16 rounding at other points, 0.05
    torch.testing.assert_close(logits(fused, ids), logits(plain, ids), rtol=0, atol=0.05)
    fused.train()
    ids = ids.to(fused.device)
    torch.testing.assert_close(fused(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss,
                               rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------- peft
def test_peft_all_linear_prepare_and_merge(fixtures):
    model = load(fixtures / "tiny_llama_bf16", nf4.hf.Nf4Config())
    packed = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters() if isinstance(p, Params4bit)}
    model = peft.prepare_model_for_kbit_training(model)
    # Packed bytes are neither cast nor copied (peft upcasts every other bf16 parameter).
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters() if isinstance(p, Params4bit)} == packed
    assert all(dtype == torch.uint8 for _, dtype in packed.values())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert sum(isinstance(m, LoraQuantLinear4bit) for m in pm.modules()) == LINEARS
    with pytest.warns(UserWarning, match="requantizes"):
        merged = pm.merge_and_unload()
    assert sum(isinstance(m, Linear4bit) for m in merged.modules()) == LINEARS
    assert not any(isinstance(m, LoraQuantLinear4bit) for m in merged.modules())

    listed = peft.get_peft_model(load(fixtures / "tiny_llama_bf16", nf4.hf.Nf4Config()),
                                 peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert sum(isinstance(m, LoraQuantLinear4bit) for m in listed.modules()) == 4
    # nf4's own loader too (the form in nf4/peft.py's docstring), with no register() call.
    ours = peft.get_peft_model(nf4.from_pretrained(fixtures / "tiny_llama_bf16", progress=False),
                               peft.LoraConfig(r=4, target_modules="all-linear"))
    assert sum(isinstance(m, LoraQuantLinear4bit) for m in ours.modules()) == LINEARS


def test_peft_enable_disable():
    LoraModel = peft.tuners.lora.LoraModel
    nf4.peft.enable()
    ours = LoraModel._create_new_module
    nf4.peft.enable()  # idempotent: wraps peft's function once
    assert LoraModel._create_new_module is ours and nf4.peft.enabled()
    try:
        nf4.peft.disable()
        assert not nf4.peft.enabled() and LoraModel._create_new_module is not ours
        assert LoraModel._create_new_module.__module__.startswith("peft.")
    finally:
        nf4.peft.enable()


# ------------------------------------------------------------------------------- TRL, both ways
def sft_script(folder, quantization_config, out_dir, steps, resume=None):
    """The short QLoRA script a user writes: load in 4 bits, all-linear LoRA, SFTTrainer."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 1024, (16,), generator=g)) for _ in range(12)]
    # On the CPU like the trainer (use_cpu=True): the quantizer's default device is the GPU where
    # there is one, and a model built there has its RoPE frequencies computed by the GPU.
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config, device_map="cpu")
    args = trl.SFTConfig(output_dir=str(out_dir), max_steps=steps, save_steps=1, per_device_train_batch_size=2,
                         learning_rate=1e-2, max_length=16, report_to=[], use_cpu=True, seed=0,
                         logging_steps=1, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer(1024),
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         task_type="CAUSAL_LM"))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def adapters(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("how", ["bitsandbytes script + install()", "Nf4Config"])
def test_sft_trainer_checkpoints_resumes_and_reloads(fixtures, tmp_path, how):
    folder = fixtures / "tiny_llama_bf16"
    if how == "Nf4Config":
        config = nf4.hf.Nf4Config(compute_dtype=torch.bfloat16)
    else:
        nf4.hf.install()
        config = BitsAndBytesConfig(**BNB_KWARGS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' gradient_checkpointing rename
            full = sft_script(folder, config, tmp_path / "run", steps=3)
            assert sum(isinstance(m, LoraQuantLinear4bit) for m in full.model.modules()) == LINEARS
            assert {p.name for p in (tmp_path / "run").iterdir()} >= {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
            resumed = sft_script(folder, config, tmp_path / "run", steps=3,
                                 resume=str(tmp_path / "run" / "checkpoint-1"))
        # Resuming replays steps 2-3 from checkpoint 1's adapters, optimizer, scheduler and RNG.
        # Measured: within 1e-3 of the uninterrupted run's adapters, whose steps 2-3 moved them by
        # ~1e-2 (bf16 compute rounds differently after the reload); a lost optimizer or scheduler
        # state would put them a whole step apart.
        a, b = adapters(full.model), adapters(resumed.model)
        start = adapter_file(tmp_path / "run" / "checkpoint-1")
        assert len(a) == 2 * LINEARS and a.keys() == b.keys()
        moved = max((a[k] - start[k.replace(".default", "")]).abs().max().item() for k in a)
        apart = max((a[k] - b[k]).abs().max().item() for k in a)
        assert apart < 0.2 * moved, (apart, moved)

        resumed.save_model(str(tmp_path / "final"))
        ids = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
        want = logits(resumed.model, ids)
        # Reloaded by nf4 alone, and by transformers from the adapter folder: the same logits.
        # On the trainer's device (use_cpu=True), not nf4's default (the GPU where there is one).
        alone = peft.PeftModel.from_pretrained(nf4.from_pretrained(folder, device=resumed.model.device, progress=False),
                                               tmp_path / "final")
        got = logits(alone, ids)
        assert torch.equal(got, want), (describe(alone), describe(resumed.model), (got - want).abs().max().item())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            by_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "final", quantization_config=config,
                                                                   device_map="cpu")
        assert torch.equal(logits(by_transformers, ids), want)
    finally:
        nf4.hf.uninstall()


def test_sft_trainer_on_the_patched_path(fixtures, tmp_path):
    """Nf4Config(patch=True) under TRL: its fused LM head (which calls the backbone itself) over
    nf4's patched layers, peft's adapters in the fused LoRA blocks, transformers' checkpointing."""
    from nf4.models import lora_blocks
    folder = fixtures / "tiny_llama_bf16"
    backwards = []
    original = lora_blocks.LoraMLP.backward

    def spy(ctx, dy):
        backwards.append(dy.shape)
        return original(ctx, dy)

    losses = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for patch in (False, True):
            lora_blocks.LoraMLP.backward = staticmethod(spy)
            try:
                trainer = sft_script(folder, nf4.hf.Nf4Config(compute_dtype=torch.bfloat16, patch=patch),
                                     tmp_path / str(patch), steps=3)
            finally:
                lora_blocks.LoraMLP.backward = staticmethod(original)
            losses[patch] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            assert len(backwards) == (2 * 3 if patch else 0)  # 2 layers x 3 steps, only when patched
    # bf16 compute, rounded at other points: measured at most 0.006 apart over 4 steps at lr 1e-2.
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=0, atol=0.03)


def describe(model) -> dict:
    """Where a failed comparison's two models differ: devices and dtypes of their parameters."""
    return {"devices": sorted({str(p.device) for p in model.parameters()}),
            "adapters": sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n}),
            "others": sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" not in n})}


def adapter_file(checkpoint):
    """A checkpoint's adapters under peft's file keys (the state dict's without ``.default``)."""
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_bnb_checkpoint_logits_gpu(fixtures):
    """The bnb-4bit fixture through from_pretrained on the GPU against bitsandbytes' own logits
    (made on an H100): the same bytes decoded to the same bf16 values, only the matmul order may
    differ (tests/test_loading.py's bound)."""
    ref = logits_fixture(fixtures)
    nf4.hf.install()
    try:
        model = AutoModelForCausalLM.from_pretrained(fixtures / "tiny_llama_bnb4", device_map="cuda")
    finally:
        nf4.hf.uninstall()
    quantized_here = load_gpu(fixtures / "tiny_llama_bf16", nf4.hf.Nf4Config())
    for how, m in (("bnb-4bit folder", model), ("bf16 folder + Nf4Config", quantized_here)):
        got = logits(m, ref["input_ids"].cuda()).float().cpu()
        err = (got - ref["logits_bnb4"]).abs().max().item()
        print(f"{how}: max |nf4 - bnb| logits on the GPU {err:.4g}, "
              f"bit-identical: {torch.equal(got, ref['logits_bnb4'])}")
        torch.testing.assert_close(got, ref["logits_bnb4"], atol=LOGITS_ATOL, rtol=0)


def load_gpu(folder, config):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("tokens", [16, 2048])
def test_bnb_folder_against_live_bitsandbytes_gpu(fixtures, tokens):
    """The bnb-4bit fixture loaded twice in one process: by transformers + bitsandbytes, and by
    transformers + nf4 (install()). Every layer decodes to the same bits (exact). Logits: bnb
    0.50.2 runs its own fused kernel up to 1536 tokens and dequantize + F.linear above; nf4 runs
    its route (printed). Where both decode then call cuBLAS the logits are the same bits; where
    either runs a fused kernel only the summation order differs (LOGITS_ATOL's bound)."""
    import bitsandbytes

    folder = fixtures / "tiny_llama_bnb4"
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    nf4.hf.install()
    try:
        ours = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    finally:
        nf4.hf.uninstall()
    pairs = [(n, m, dict(ours.named_modules())[n]) for n, m in theirs.named_modules()
             if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(pairs) == LINEARS
    for name, a, b in pairs:
        want = bitsandbytes.functional.dequantize_4bit(a.weight.data, a.weight.quant_state)
        assert torch.equal(nf4.dequantize_4bit(b.weight, b.weight.quant_state), want), name
    ids = torch.randint(3, 1024, (1, tokens), generator=torch.Generator().manual_seed(2))
    got, ref = logits(ours, ids).float(), logits(theirs, ids).float()
    layer = pairs[0][2]
    route = nf4.backends.route(torch.device("cuda"), torch.bfloat16, tokens,
                               layer.out_features, layer.in_features, layer.weight.quant_state.blocksize)
    print(f"\n{tokens} tokens: nf4 route {route.kernel}, bnb {'fused' if tokens <= 1536 else 'dequant + F.linear'}: "
          f"max |nf4 - bnb| {(got - ref).abs().max().item():.4g}, bit-identical {torch.equal(got, ref)}")
    torch.testing.assert_close(got, ref, atol=LOGITS_ATOL, rtol=0)
