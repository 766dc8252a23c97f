"""End-to-end QLoRA fine-tuning step on Llama-3-8B shapes: nf4 against bitsandbytes, same run.

Model: transformers ``LlamaForCausalLM`` with Llama-3-8B's config (hidden 4096, intermediate
14336, 32 layers, 32 heads, 8 KV heads, vocab 128256), random bf16 weights from one seed, so every
setup starts from the same float model. Step: 2048 tokens, batch 1, gradient checkpointing
(non-reentrant), bf16 autocast, LoRA rank 16 / alpha 32 on all seven projections, AdamW on the
adapters only; embeddings, norms and ``lm_head`` stay bf16 and frozen. Setups:

    nf4             ``nf4.quantize_model(..., lora_rank=16, target_modules=...)``: fused layer,
                    float32 adapters (the default, and the quality reference under bf16 autocast)
    nf4 bf16        the same with the adapters cast to bf16 (as bnb + LoRA trains them)
    nf4 + peft      ``nf4.quantize_model(lora_rank=0)`` + peft's ``get_peft_model`` through
                    ``nf4.peft.register`` (float32 adapters, peft's default)
    bnb + peft      ``bnb.nn.Linear4bit`` (nf4, double quant, bf16 compute) + peft (float32 adapters)
    bnb + LoRA      ``bnb.nn.Linear4bit`` + a plain bf16 LoRA module (``x A^T B^T * s`` added)
    nf4 patched     "nf4" + ``nf4.models.patch`` (Triton norms, RoPE, SwiGLU, chunked lm_head +
                    cross-entropy) + ``nf4.models.checkpointing`` per layer (inputs kept on GPU)
    nf4 patched offload  the same with the checkpointed layer inputs offloaded to pinned CPU memory
    nf4 patched unfused LoRA  "nf4 patched" with ``fused_lora=False``: one autograd call per layer
                    instead of the fused MLP and q/k/v blocks (``nf4.models.lora_blocks``)
    nf4 patched MLP keeps gate+up  "nf4 patched" with ``recompute_mlp=False``: the MLP block keeps
                    gate and up for backward instead of recomputing them (two fewer 4-bit matmuls
                    a layer, 2 x intermediate values a token more in the layer's backward)
    bf16 LoRA       no quantization: the bf16 nn.Linear layers + the plain bf16 LoRA module (the
                    ceiling reference for speed)

"nf4 patched offload" also keeps the frozen input embedding table in pinned CPU memory
(``nf4.models.checkpointing.offload_embeddings``: the step's rows are gathered on the CPU and
copied over, 1.05 GB less on the GPU).
Weights GB: ``memory_allocated`` once the model is converted (1e9 bytes). Peak GB:
``max_memory_allocated`` over the training steps (weights included). tokens/s: timed steps after
warm-up, synchronized at both ends. All setups train on the same token batch from the same seed,
so their loss curves are comparable (the first loss is the same quantized model's).
tokens/s is the median of ``--repeats`` timed windows (default 3) of ``--steps`` steps each, with
their min and max. ``--max-seq``: for each setup, one step at 4096 tokens (``--max-seq-start``),
then 8192, ... doubling until CUDA runs out of memory, ``--max-seq-limit`` (262,144) or the time
``--budget-s`` (540 s for all setups, builds included: one GPU call); reports the longest that
trained, its peak memory, and the ratio to bnb + peft's. ``--memory``: for each setup, GB allocated
and peak per phase of one step (forward, backward, optimizer) and the lines of code holding the
step's peak (CUDA's allocator history), into ``$OUT/memory_<setup>.txt``.
Goals (issue 7): nf4 >= 1.3x bnb + peft and >= 1.05x bnb + LoRA tokens/s, peak <= both.
Goals (issue 19): nf4 patched >= 2.0x bnb + peft, >= 1.6x bnb + LoRA, >= 0.95x bf16 LoRA tokens/s;
peak <= 0.6x bnb + peft; longest sequence >= 4x bnb + peft's.

    python -m bench.bench_qlora              # the table, into bench/RESULTS.md (GPU)
    python -m bench.bench_qlora --max-seq --setups "nf4 patched offload,bnb + peft"
    python -m bench.bench_qlora --memory --setups "nf4 patched,bnb + peft"   # where the peak is
    python -m bench.bench_qlora --profile    # plus torch.profiler summaries in $OUT (or the cwd)
    python -m bench.bench_qlora --tiny       # a 2-layer model on the CPU: checks the script only
"""
from __future__ import annotations

import argparse
import functools
import gc
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import nf4
from bench.common import stamp, table, write_section
from nf4 import models as nf4_models
from nf4.models import checkpointing as nf4_checkpointing
from nf4.nn import QuantLinear4bit

try:
    import bitsandbytes as bnb
except ImportError:  # optional: its rows are left out without it
    bnb = None
try:
    import peft
    import nf4.peft as nf4_peft
except ImportError:  # optional: the peft rows are left out without it
    peft = nf4_peft = None

log = logging.getLogger(__name__)

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
ALPHA = 32.0
LR = 2e-4
SEED = 0
GB = 1e9


class PlainLoRA(nn.Module):
    """A frozen base layer plus a bf16 LoRA branch, added after the base product."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, device, dtype):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(RANK, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, RANK, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = ALPHA / RANK

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


# ------------------------------------------------------------------------------- building
def float_model(shape: dict, device: torch.device):
    """Llama with random bf16 weights built on ``device`` (16 GB for 8B: never measured, the peak
    counter is reset after conversion). Same seed, same device: identical weights every time."""
    import transformers  # optional dependency (the [hf] extra)

    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False, attention_bias=False,
                                      mlp_bias=False)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def to_bnb(model: nn.Module, device: torch.device, plain_lora: bool) -> nn.Module:
    """Replace each linear layer but lm_head by bnb's Linear4bit, one at a time (the bf16 weight
    is freed as its layer goes), wrapped in PlainLoRA when ``plain_lora``."""
    for name in linear_names(model):
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64, module=q).to(device)
        wrapped = PlainLoRA(q, linear.in_features, linear.out_features, device, torch.bfloat16) \
            if plain_lora and name.rpartition(".")[2] in TARGETS else q
        swap(model, name, wrapped)
        del linear
    model.is_loaded_in_4bit = True  # what peft's bitsandbytes dispatcher looks for
    return model


def to_plain_lora(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap each targeted bf16 nn.Linear (frozen) in PlainLoRA: LoRA without quantization."""
    for name in linear_names(model):
        if name.rpartition(".")[2] in TARGETS:
            linear = model.get_submodule(name)
            swap(model, name, PlainLoRA(linear, linear.in_features, linear.out_features, device, torch.bfloat16))
    return model


PATCHED = ("nf4 patched", "nf4 patched offload", "nf4 patched unfused LoRA", "nf4 patched MLP keeps gate+up")
# nf4.models.patch's switches per patched row (the others take its defaults).
PATCH_OPTIONS = {"nf4 patched unfused LoRA": dict(fused_lora=False),
                 "nf4 patched MLP keeps gate+up": dict(recompute_mlp=False)}


def build(setup: str, shape: dict, device: torch.device) -> nn.Module:
    model = float_model(shape, device)
    if setup in PATCHED:
        nf4.quantize_model(model, device=device, lora_rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
        if not nf4_models.patch(model, **PATCH_OPTIONS.get(setup, {})):
            raise RuntimeError("nf4.models.patch did not patch the Llama benchmark model")
    elif setup == "bf16 LoRA":
        to_plain_lora(model, device)
    elif setup in ("nf4", "nf4 bf16"):
        nf4.quantize_model(model, device=device, lora_rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
        if setup == "nf4 bf16":
            for m in model.modules():
                if isinstance(m, QuantLinear4bit) and m.lora_rank:
                    m.lora_A = nn.Parameter(m.lora_A.detach().to(torch.bfloat16))
                    m.lora_B = nn.Parameter(m.lora_B.detach().to(torch.bfloat16))
    elif setup == "nf4 + peft":
        nf4.quantize_model(model, device=device, lora_rank=0)
        config = nf4_peft.register(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                   target_modules=list(TARGETS)))
        model = peft.get_peft_model(model, config)
    elif setup == "bnb + peft":
        to_bnb(model, device, plain_lora=False)
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules=list(TARGETS)))
    elif setup == "bnb + LoRA":
        to_bnb(model, device, plain_lora=True)
    else:
        raise ValueError(f"unknown setup {setup!r}")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def bits_per_parameter(model: nn.Module) -> float:
    """Stored bits per quantized weight of the QuantLinear4bit layers: packed codes, absmax codes,
    nested absmax, offset and both tables (16 + 256 float32 per layer)."""
    nbytes = params = 0
    for m in model.modules():
        if isinstance(m, QuantLinear4bit):
            st = m.quant_state
            tensors = [m.weight, st.absmax, st.code]
            if st.nested:
                tensors += [st.state2.absmax, st.state2.code, st.offset]
            nbytes += sum(t.numel() * t.element_size() for t in tensors)
            params += m.in_features * m.out_features
    return 8 * nbytes / params


# ------------------------------------------------------------------------------- training
def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_step(model: nn.Module, input_ids: torch.Tensor, mark: Optional[Callable[[str], None]] = None
              ) -> tuple[Callable[[], torch.Tensor], list]:
    """(one training step, the trained parameters). ``mark(phase)`` is called as each phase of the
    step ends ("forward", "backward", "optimizer"): ``memory_breakdown``'s measuring points."""
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach AdamW (the default) on 448 adapter tensors: peft's and transformers' usual choice.
    opt = torch.optim.AdamW(params, lr=LR)
    device_type = input_ids.device.type

    def step() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        if mark is not None:
            mark("forward")
        loss.backward()
        if mark is not None:
            mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mark is not None:
            mark("optimizer")
        return loss.detach()

    return step, params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(setup: str, shape: dict, device: torch.device) -> nn.Module:
    model = build(setup, shape, device)
    model.train()
    if setup in PATCHED:
        offload = setup == "nf4 patched offload"
        nf4_checkpointing.enable(model, offload=offload)
        if offload and not nf4_checkpointing.offload_embeddings(model):
            raise RuntimeError("the benchmark model's frozen input embeddings were not offloaded")
    else:
        _enable_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return model


def run_setup(setup: str, shape: dict, device: torch.device, tokens: int, warmup: int, steps: int,
              profile_dir: Optional[Path], repeats: int = 3) -> dict:
    cuda = device.type == "cuda"
    start = time.perf_counter()
    model = prepare(setup, shape, device)
    sync(device)
    built = time.perf_counter() - start
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device) / GB if cuda else float("nan")
    g = torch.Generator(device="cpu").manual_seed(SEED + 1)
    input_ids = torch.randint(shape["vocab_size"], (1, tokens), generator=g).to(device)
    step, params = make_step(model, input_ids)
    adapter_dtype = params[0].dtype
    losses = [step() for _ in range(warmup)]
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        losses += [step() for _ in range(steps)]
        sync(device)
        rates.append(tokens * steps / (time.perf_counter() - t0))
    rate = sorted(rates)[len(rates) // 2]
    peak = torch.cuda.max_memory_allocated(device) / GB if cuda else float("nan")
    kernel_ms = profile(setup, step, device, profile_dir) if profile_dir is not None else None
    result = dict(kernel_ms=kernel_ms, setup=setup, weights=weights, peak=peak, tokens_per_s=rate,
                  tokens_per_s_min=min(rates), tokens_per_s_max=max(rates), step_ms=tokens / rate * 1e3, losses=[float(v) for v in torch.stack(losses).cpu()],
                  adapter_dtype=str(adapter_dtype).replace("torch.", ""), build_s=built,
                  trainable=sum(p.numel() for p in params),
                  bits=bits_per_parameter(model) if setup.startswith("nf4") else None, max_seq=None)
    log.info("%s: built in %.1f s, weights %.2f GB, peak %.2f GB, %.0f tokens/s (%.0f ms/step), "
             "losses %s", setup, built, weights, peak, result["tokens_per_s"], result["step_ms"],
             " ".join(f"{v:.4f}" for v in result["losses"]))
    del model, step, params, input_ids
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


# Out-of-memory errors that do not arrive as torch.cuda.OutOfMemoryError: cuBLAS's workspace and
# a failed pinned host allocation (the offloaded layer inputs) raise plain RuntimeErrors.
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
# A step at twice the tokens takes 2x (linear layers) to 4x (attention) as long: the search
# predicts 3x and does not start a length it expects to finish past its time.
_STEP_GROWTH = 3.0


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES))


def longest_sequence(trial: Callable[[int], Optional[float]], start: int, limit: int, deadline: float,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
    """Double the sequence from ``start`` while ``trial(tokens)`` trains (returns its peak GB;
    None: out of memory), up to ``limit`` tokens and the ``clock()`` time ``deadline``: a length
    is not started when its predicted time (``_STEP_GROWTH`` x the last one's) would pass it.

    Returns {"tokens": longest that trained (0: not even ``start``), "peak": its GB, "stop":
    "oom" | "limit" | "time", "tried": [(tokens, seconds, peak GB or None)]}. With "limit" or
    "time" the longest is a lower bound."""
    best, best_peak, tokens, last, tried = 0, float("nan"), start, None, []
    stop = "limit"
    while tokens <= limit:
        if clock() + (0.0 if last is None else _STEP_GROWTH * last) > deadline:
            stop = "time"
            break
        t0 = clock()
        peak = trial(tokens)
        last = clock() - t0
        tried.append((tokens, last, peak))
        if peak is None:
            stop = "oom"
            break
        best, best_peak = tokens, peak
        tokens *= 2
    return dict(tokens=best, peak=best_peak, stop=stop, tried=tried)


def train_one_step(model: nn.Module, shape: dict, device: torch.device, tokens: int) -> Optional[float]:
    """One training step of ``tokens`` tokens: its peak GB (NaN on the CPU), or None when the
    device ran out of memory. Whatever the step allocated is freed before returning, failed or
    not (gradients, optimizer states, the partial graph the exception's frames held), so the next
    trial and the next setup start from the model's weights alone."""
    cuda = device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(SEED + 1)
    input_ids = torch.randint(shape["vocab_size"], (1, tokens), generator=g).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    oom = False
    try:
        step, _ = make_step(model, input_ids)
        step()
        sync(device)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if not out_of_memory(e):
            raise
        log.info("%d tokens: %s", tokens, str(e).splitlines()[0][:200])  # GPU or pinned host memory
        oom = True
    # Outside the except block: the exception (its traceback, the frames, their tensors) is gone.
    step = input_ids = None
    for p in model.parameters():
        p.grad = None
    peak = torch.cuda.max_memory_allocated(device) / GB if cuda else float("nan")
    free_cached_memory(device)
    return None if oom else peak


def free_cached_memory(device: torch.device) -> None:
    """Collect garbage and hand the allocators' cached blocks back: the GPU's, and the pinned host
    blocks of offloaded layer inputs, which the host allocator keeps by size class (after a 128k
    step, 34 GB of 1 GB blocks that a 256k step cannot use next to its own 68 GB of 2 GB ones)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) \
            or getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()


def _logged_step(setup: str, model: nn.Module, shape: dict, device: torch.device, tokens: int) -> Optional[float]:
    peak = train_one_step(model, shape, device, tokens)
    log.info("%s: %d tokens %s", setup, tokens, "ran out of memory" if peak is None else f"trained, peak {peak:.2f} GB")
    return peak


def max_sequence(setup: str, shape: dict, device: torch.device, start: int, limit: int, deadline: float) -> dict:
    """``longest_sequence`` for one setup (one model, built once; its build counts against the
    deadline). Everything is freed before returning, also after an out-of-memory error."""
    model = prepare(setup, shape, device)
    trial = functools.partial(_logged_step, setup, model, shape, device)
    found = longest_sequence(trial, start, limit, deadline)
    del model, trial
    free_cached_memory(device)
    return dict(found, setup=setup)


def max_sequences(setups: list[str], shape: dict, device: torch.device, start: int, limit: int,
                  budget_s: float, reserve_s: float) -> list[dict]:
    """``max_sequence`` for each setup within ``budget_s`` seconds in all: the baselines first,
    then the patched rows (which train longest and take longest), each with the time left minus
    ``reserve_s`` for every setup after it."""
    ordered = sorted(setups, key=lambda s: s in PATCHED)
    end = time.perf_counter() + budget_s
    found = []
    for i, setup in enumerate(ordered):
        deadline = end - reserve_s * (len(ordered) - 1 - i)
        found.append(max_sequence(setup, shape, device, start, limit, deadline))
    return found


# ------------------------------------------------------------------------------- memory
def _site(frames: list) -> str:
    """Where an allocation was made: its innermost Python frame outside torch itself (the line
    of nf4, transformers, peft or this script that asked for it)."""
    for f in frames:
        name = f.get("filename", "")
        if name and "/torch/" not in name and not name.startswith("??"):
            for cut in ("site-packages/", "/nf4/", "/kernels/", "/bench/"):
                if cut in name:
                    name = (cut.strip("/") + "/" if cut != "site-packages/" else "") + name.split(cut, 1)[1]
                    break
            return f"{name}:{f.get('line', '?')} {f.get('name', '')}"
    return "(no Python frame: the autograd engine or a C++ op)"


def peak_sites(trace: list[dict], top: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """Replay one device's allocator trace (``torch.cuda.memory._snapshot()["device_traces"]``):
    (the most bytes live at once among the allocations it records, [(site, bytes, count)] of
    those live at that moment, largest first, ``top`` of them). Blocks allocated before the
    recording started are not in the trace: the caller adds what was allocated then."""
    def replay(stop: Optional[int]):
        live, total, best, best_at = {}, 0, 0, -1
        for i, e in enumerate(trace):
            if stop is not None and i > stop:
                break
            action = e.get("action")
            if action == "alloc":
                live[e["addr"]] = e
                total += e["size"]
                if total > best:
                    best, best_at = total, i
            elif action in ("free_requested", "free_completed") and e["addr"] in live:
                total -= live.pop(e["addr"])["size"]
        return live, best, best_at

    _, best, best_at = replay(None)
    live, _, _ = replay(best_at)
    sites: dict[str, list[int]] = {}
    for e in live.values():
        entry = sites.setdefault(_site(e.get("frames", [])), [0, 0])
        entry[0] += e["size"]
        entry[1] += 1
    ranked = sorted(((k, v[0], v[1]) for k, v in sites.items()), key=lambda r: -r[1])
    return best, ranked[:top]


def memory_breakdown(setup: str, shape: dict, device: torch.device, tokens: int, out: Path,
                     snapshot: bool = False) -> str:
    """One warm-up step, then one measured step of ``setup``: GB allocated after setup, before
    the step (weights + optimizer states), at the end of each phase, and the peak within each
    phase; then the allocations live at the step's peak grouped by the line that made them
    (CUDA's allocator history). Writes ``out/memory_<setup>.txt`` (and the raw snapshot, for
    https://pytorch.org/memory_viz, with ``snapshot``); returns the text."""
    cuda = device.type == "cuda"
    model = prepare(setup, shape, device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    allocated = (lambda: torch.cuda.memory_allocated(device) / GB) if cuda else (lambda: float("nan"))
    peak = (lambda: torch.cuda.max_memory_allocated(device) / GB) if cuda else (lambda: float("nan"))
    rows = [["after setup (weights)", f"{allocated():.3f}", ""]]
    measuring = False  # the warm-up step (Adam's states appear, kernels compile) is not measured

    def mark(phase: str) -> None:
        if measuring:
            sync(device)
            rows.append([phase, f"{allocated():.3f}", f"{peak():.3f}"])
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)

    g = torch.Generator(device="cpu").manual_seed(SEED + 1)
    input_ids = torch.randint(shape["vocab_size"], (1, tokens), generator=g).to(device)
    step, _ = make_step(model, input_ids, mark)
    step()
    sync(device)
    measuring = True
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    before = allocated()
    rows.append(["before the step (+ optimizer states)", f"{before:.3f}", ""])
    step()
    sync(device)
    lines = [f"## {setup}: memory of one training step, {tokens} tokens", "",
             table(["phase", "allocated GB at its end", "peak GB during it"], rows), ""]
    if cuda:
        snap = torch.cuda.memory._snapshot()
        if snapshot:
            path = out / f"memory_{setup.replace(' + ', '_').replace(' ', '_')}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            lines += [f"Raw snapshot: {path} (drop it on https://pytorch.org/memory_viz)", ""]
        torch.cuda.memory._record_memory_history(enabled=None)
        index = device.index if device.index is not None else torch.cuda.current_device()
        traced, sites = peak_sites(snap["device_traces"][index])
        lines += [f"At the step's peak, {before + traced / GB:.3f} GB: {before:.3f} GB allocated before the "
                  f"step and {traced / GB:.3f} GB allocated during it, by the line that allocated it:", "",
                  table(["site", "GB", "blocks"], [[site, f"{b / GB:.3f}", str(n)] for site, b, n in sites]), ""]
    text = "\n".join(lines)
    (out / f"memory_{setup.replace(' + ', '_').replace(' ', '_')}.txt").write_text(text)
    log.info("%s", text)
    del model, step, input_ids
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return text


def profile(setup: str, step: Callable, device: torch.device, out: Path) -> float:
    """One profiled step: per-op device time and CPU time, into ``out/profile_qlora_<setup>.txt``.
    Returns the step's total kernel time in ms (the GPU's busy time; the rest of a step's wall
    time the GPU waits for the host to issue work)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    wall = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    wall = time.perf_counter() - wall
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    device_us = sum(e.self_device_time_total for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    text = (f"{setup}: one step, wall {wall * 1e3:.1f} ms under the profiler, kernel time "
            f"{device_us / 1e3:.1f} ms\n\nby device time:\n"
            + events.table(sort_by=sort, row_limit=30)
            + "\n\nby CPU time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=25))
    path = out / f"profile_qlora_{setup.replace(' + ', '_').replace(' ', '_')}.txt"
    path.write_text(text)
    log.info("%s profile -> %s (kernel time %.1f ms of %.1f ms wall)", setup, path, device_us / 1e3,
             wall * 1e3)
    return device_us / 1e3


# ------------------------------------------------------------------------------- report
def report(results: list[dict], tokens: int, warmup: int, steps: int, repeats: int, tiny: bool) -> str:
    by = {r["setup"]: r for r in results}
    ours = by["nf4"]
    rows = []
    for r in results:
        rows.append([r["setup"], r["adapter_dtype"], f"{r['weights']:.3f}", f"{r['peak']:.3f}",
                     f"{r['tokens_per_s']:,.0f}",
                     f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}", f"{r['step_ms']:.0f}",
                     "" if r["kernel_ms"] is None else f"{r['kernel_ms']:.0f}",
                     f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x",
                     "" if r["bits"] is None else f"{r['bits']:.4f}"])
    lines = [
        f"## QLoRA fine-tuning step, Llama-3-8B shapes{' (TINY CPU CHECK)' if tiny else ''} "
        "(`bench/bench_qlora.py`)",
        "",
        stamp(),
        "",
        f"Random bf16 weights (one seed), {tokens} tokens, batch 1, gradient checkpointing, bf16 "
        f"autocast, LoRA rank {RANK} / alpha {ALPHA:g} on q,k,v,o,gate,up,down, AdamW (lr {LR:g}) "
        f"on the adapters; {warmup} warm-up + {repeats} x {steps} timed steps per setup (tokens/s: "
        f"median of the {repeats} windows, min-max beside it), one setup at a time "
        "(everything freed between). Weights: GB allocated after conversion (1e9 B). Peak: max GB "
        "allocated over the steps. GPU busy: kernel time of one profiled step (--profile); the rest "
        "of ms/step the GPU waits for the host. nf4 speed-up: nf4 tokens/s over the row's. "
        "bits/param: stored "
        "bits per quantized weight (codes + absmax codes + nested absmax + tables).",
        "",
        table(["setup", "adapters", "weights GB", "peak GB", "tokens/s", "min-max", "ms/step", "GPU busy ms",
               "nf4 speed-up",
               "bits/param"], rows),
        "",
    ]
    for mine in ("nf4", "nf4 bf16"):
        goals = []
        for name, want in (("bnb + peft", 1.3), ("bnb + LoRA", 1.05)):
            if mine in by and name in by:
                r = by[mine]
                ratio = r["tokens_per_s"] / by[name]["tokens_per_s"]
                ok = ratio >= want and r["peak"] <= by[name]["peak"]
                goals.append(f"vs {name}: {ratio:.2f}x tokens/s (goal >= {want}x), peak {r['peak']:.3f} "
                             f"vs {by[name]['peak']:.3f} GB (goal <=): {'met' if ok else 'NOT met'}")
        if goals:
            lines += [f"Goals, {mine} ({by[mine]['adapter_dtype']} adapters): " + "; ".join(goals) + ".", ""]
    for mine in PATCHED:
        if mine not in by:
            continue
        r, goals = by[mine], []
        for name, want in (("bnb + peft", 2.0), ("bnb + LoRA", 1.6), ("bf16 LoRA", 0.95)):
            if name in by:
                ratio = r["tokens_per_s"] / by[name]["tokens_per_s"]
                goals.append(f"{ratio:.2f}x {name} tokens/s (goal >= {want}x: {'met' if ratio >= want else 'NOT met'})")
        if "bnb + peft" in by:
            ratio = r["peak"] / by["bnb + peft"]["peak"]
            goals.append(f"peak {ratio:.2f}x bnb + peft's (goal <= 0.6x: {'met' if ratio <= 0.6 else 'NOT met'})")
        if goals:
            lines += [f"Goals (issue 19), {mine}: " + "; ".join(goals) + ".", ""]
    for other in PATCH_OPTIONS:  # what the fused LoRA blocks (and their recomputation) change
        if other in by and "nf4 patched" in by:
            r, o = by["nf4 patched"], by[other]
            lines += [f"LoRA blocks: nf4 patched runs {r['tokens_per_s'] / o['tokens_per_s']:.2f}x the tokens/s "
                      f"of {other}, peak {r['peak']:.3f} vs {o['peak']:.3f} GB.", ""]
    lines += ["Loss per step (same token batch, same seed; the first value is the quantized model "
              "before any update):", ""]
    lines += [table(["setup"] + [str(i) for i in range(len(ours["losses"]))],
                    [[r["setup"]] + [f"{v:.4f}" for v in r["losses"]] for r in results])]
    return "\n".join(lines)


def max_seq_report(found: list[dict], start: int, limit: int, budget_s: float) -> str:
    """The --max-seq section: per setup the longest length that trained (a lower bound, marked
    ">=", where the search stopped at the limit or the time budget), and the issue's ratio."""
    why = {"oom": "out of memory at the next length", "limit": "reached --max-seq-limit",
           "time": "stopped by --budget-s"}

    def longest(r):
        if not r["tokens"]:
            return f"< {start:,}" if r["stop"] == "oom" else "not measured"
        return ("" if r["stop"] == "oom" else ">= ") + f"{r['tokens']:,}"

    rows = [[r["setup"], longest(r), f"{r['peak']:.2f}", why[r["stop"]],
             ", ".join(f"{t:,}: {s:.1f} s" + ("" if p is not None else " (OOM)") for t, s, p in r["tried"])]
            for r in found]
    lines = ["## QLoRA longest sequence, Llama-3-8B shapes (`bench/bench_qlora.py --max-seq`)", "", stamp(), "",
             f"Batch 1, one training step per length, doubling from {start:,} tokens until the GPU runs out of "
             f"memory (at most {limit:,} tokens, {budget_s:.0f} s for all setups); the rest as the QLoRA "
             "table. Peak: max GB allocated during the longest step that trained. '>=': the search "
             "stopped before running out of memory.", "",
             table(["setup", "longest sequence", "peak GB", "stopped", "lengths tried (step time)"], rows), ""]
    by = {r["setup"]: r for r in found}
    base = by.get("bnb + peft")
    if base is not None and base["tokens"]:
        for mine in PATCHED:
            if mine not in by:
                continue
            r = by[mine]
            ratio = r["tokens"] / base["tokens"]
            bound = r["stop"] != "oom" or base["stop"] != "oom"
            # Ours stopped early: the ratio is at least this; the baseline did: at most this.
            if ratio >= 4 and base["stop"] == "oom":
                verdict = "met"
            elif ratio < 4 and r["stop"] == "oom":
                verdict = "NOT met"
            else:
                verdict = "undecided"
            lines += [f"Goal (issue 19), {mine}: {'~' if bound else ''}{ratio:g}x bnb + peft's longest "
                      f"sequence ({longest(r)} vs {longest(base)}; goal >= 4x: {verdict}).", ""]
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU (checks the script)")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler summary per setup")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--setups", default=None, help="comma-separated subset of the setups")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per setup (median reported)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens a step (default 2048; 128 with --tiny)")
    parser.add_argument("--max-seq", action="store_true",
                        help="per setup, double the sequence from --max-seq-start until out of memory")
    parser.add_argument("--max-seq-start", type=int, default=4096, help="first length --max-seq tries")
    parser.add_argument("--max-seq-limit", type=int, default=262144, help="longest sequence --max-seq tries")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="--max-seq: seconds for all setups, model builds included (a length is not "
                             "started when it would end past them)")
    parser.add_argument("--reserve-s", type=float, default=120.0,
                        help="--max-seq: seconds kept for each setup still to run")
    parser.add_argument("--memory", action="store_true",
                        help="per setup, memory by phase of one step and the lines that hold its peak")
    parser.add_argument("--memory-snapshot", action="store_true",
                        help="with --memory, also dump the allocator snapshot (pickle) per setup")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        parser.error(f"--repeats and --steps must be >= 1 and --warmup >= 0, got {args.repeats}, "
                     f"{args.steps}, {args.warmup}")
    if args.max_seq_start < 1 or args.max_seq_limit < args.max_seq_start or args.budget_s <= 0 \
            or args.reserve_s < 0 or (args.tokens is not None and args.tokens < 2):
        parser.error(f"need 1 <= --max-seq-start <= --max-seq-limit, --budget-s > 0, --reserve-s >= 0 and "
                     f"--tokens >= 2, got {args.max_seq_start}, {args.max_seq_limit}, {args.budget_s}, "
                     f"{args.reserve_s}, {args.tokens}")
    if args.tiny:
        shape, device, tokens, steps = TINY, torch.device("cpu"), args.tokens or 128, args.steps or 2
    else:
        if not torch.cuda.is_available():
            parser.error("the 8B benchmark needs a CUDA GPU; use --tiny to check the script on CPU")
        shape, device, tokens, steps = LLAMA3_8B, torch.device("cuda"), args.tokens or 2048, args.steps or 8
    setups = ["nf4", "nf4 bf16"]
    # The patched rows run Triton kernels: on the GPU, or on the CPU under TRITON_INTERPRET=1.
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        setups += list(PATCHED)
    else:
        log.warning("nf4 patched rows skipped (CPU run without TRITON_INTERPRET=1)")
    setups.append("bf16 LoRA")
    if peft is not None:
        setups.append("nf4 + peft")
    if bnb is not None and device.type == "cuda":
        setups += (["bnb + peft"] if peft is not None else []) + ["bnb + LoRA"]
    else:
        log.warning("bitsandbytes rows skipped (%s)", "not installed" if bnb is None else "CPU run")
    if args.setups:
        wanted = [s.strip() for s in args.setups.split(",")]
        unknown = [s for s in wanted if s not in setups]
        if unknown:
            parser.error(f"unknown or unavailable setups {unknown}; available: {setups}")
        setups = [s for s in setups if s in wanted]
    out = Path(os.environ.get("OUT") or Path.cwd())
    if args.max_seq:
        # --tiny: the CPU never runs out of memory, so the search runs to the limit (a script check)
        shape = dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], args.max_seq_limit))
        found = max_sequences(setups, shape, device, args.max_seq_start, args.max_seq_limit, args.budget_s,
                              args.reserve_s)
        body = max_seq_report(found, args.max_seq_start, args.max_seq_limit, args.budget_s)
        if args.tiny:
            log.info("tiny run (not written to RESULTS.md):\n%s", body)
        else:
            write_section("qlora_max_seq", body)
        return
    if args.memory:
        shape = dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], tokens))
        for s in setups:
            memory_breakdown(s, shape, device, tokens, out, args.memory_snapshot)
        return
    if "nf4" not in setups:
        parser.error("the nf4 setup is the reference of the table; keep it in --setups")
    profile_dir = out if args.profile else None
    results = [run_setup(s, shape, device, tokens, args.warmup, steps, profile_dir, args.repeats) for s in setups]
    body = report(results, tokens, args.warmup, steps, args.repeats, args.tiny)
    if args.tiny:
        log.info("tiny run (not written to RESULTS.md):\n%s", body)
    else:
        write_section("qlora", body)


if __name__ == "__main__":
    main()
