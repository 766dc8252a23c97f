"""Build a transformers model whose linear layers are QuantLinear4bit, from a checkpoint folder.

The model is built with its parameters on the meta device (buffers such as rotary frequencies
are computed for real on the CPU), the linear layers are swapped, and then every tensor streams
from the shards into place one at a time: float weights of swapped layers are quantized on the
target device as they arrive, pre-quantized (bitsandbytes) ones are loaded as they are.
Every header, and config.json's sizes against them, is validated before a byte of data is read;
everything the checkpoint says is validated against the model before a byte is put in it. A
float checkpoint's linear weights are read and quantized on a worker thread while the model is
built (See Note: quantizing while the model is built).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from nf4 import codebook, functional
from nf4.functional import nonfinite
from nf4.loading import peft_dispatch
from nf4.loading.architectures import ARCHITECTURES, architecture, matches
from nf4.loading.checkpoint import Checkpoint, TensorEntry, concrete_device, read_quant_state_json
from nf4.loading.config_check import check_config_sizes
from nf4.loading.io import stream_tensors
from nf4.loading.resolve import resolve
from nf4.nn import Linear4bit, QuantLinear4bit
from nf4.quant_state import QuantState, check_blocksize, check_float_dtype, dtype_from_name

log = logging.getLogger(__name__)

# Keys of one bnb-quantized weight besides ``weight`` itself (bnb's names).
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Called for each quantized layer with (module name, module, float weight) while the float
# weight is still on the device (the CLI measures each layer's error this way).
Observer = Callable[[str, nn.Module, torch.Tensor], None]
# auto (CUDA devices only), 1 or 0: quantizing while the model is built (See Note: quantizing
# while the model is built).
OVERLAP_ENV = "NF4_LOAD_OVERLAP"


@dataclass
class QuantOptions:
    compute_dtype: Optional[torch.dtype] = None  # None: the checkpoint's (bnb), else bfloat16
    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True
    skip_modules: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    target_modules: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        if self.compute_dtype is not None:
            check_float_dtype(self.compute_dtype, "compute_dtype")
        codebook.check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be a non-negative int, got {self.lora_rank!r}")
        self.skip_modules = _names(self.skip_modules, "skip_modules")
        if self.target_modules is not None:
            self.target_modules = _names(self.target_modules, "target_modules")


def _names(value, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    value = tuple(value)
    if not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{what} must be module names (strings), got {value!r}")
    return value


def default_device(device=None) -> torch.device:
    """``device``, or the current CUDA device when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return concrete_device(device)


def _new_layer(linear: nn.Linear, opts: QuantOptions, quant_type: str, blocksize: int, double: bool,
               rank: int) -> QuantLinear4bit:
    """The 4-bit layer replacing ``linear``, on meta. Without a built-in adapter it is
    ``nf4.nn.Linear4bit``, an ``nn.Linear`` (peft's ``"all-linear"`` finds it; see Note: why
    Linear4bit is an nn.Linear); with one, ``QuantLinear4bit``."""
    if rank:
        return QuantLinear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=opts.compute_dtype, quant_type=quant_type, blocksize=blocksize,
                               compress_statistics=double, lora_rank=rank, lora_alpha=opts.lora_alpha,
                               device="meta")
    return Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                      compute_dtype=opts.compute_dtype, compress_statistics=double, quant_type=quant_type,
                      device="meta", blocksize=blocksize)


def _checkpoint_compute_dtype(bnb: Optional[dict]) -> torch.dtype:
    """A bnb checkpoint's ``bnb_4bit_compute_dtype`` when it names one nf4 computes in, else bf16."""
    name = (bnb or {}).get("bnb_4bit_compute_dtype")
    try:
        return dtype_from_name(name) if name is not None else torch.bfloat16
    except ValueError:
        log.warning("bnb_4bit_compute_dtype %r is not float32/float16/bfloat16; computing in bfloat16", name)
        return torch.bfloat16


def _transformers():
    try:
        import transformers  # optional dependency: the [hf] extra
    except ImportError as e:
        raise ImportError("nf4.from_pretrained builds transformers models: pip install 'nf4[hf]' "
                          "(transformers)") from e
    return transformers


# ------------------------------------------------------------------------------- building
# Note: parameters on meta, for the building thread only.
#     Layers allocate their weight with ``torch.empty`` (untouched pages, freed at once) and then
#     register it; registering moves it to meta, so their initializers run on meta at no cost,
#     while buffers (rotary frequencies, position ids) get their real computed values. The meta
#     device context (``with torch.device("meta")``) would be thread-local too, but puts buffers
#     on meta as well. So ``nn.Module.register_parameter`` is wrapped while at least one load is
#     building, and the wrapper moves parameters only for threads inside ``_parameters_on_meta``:
#     a module built by another thread meanwhile is untouched, overlapping loads count themselves
#     in and out under a lock, and the last one out restores the original on every exit path.
_meta_building = threading.local()
_meta_lock = threading.Lock()
_meta_users = 0
_original_register_parameter = nn.Module.register_parameter


def _register_parameter(module, name, param):
    if (getattr(_meta_building, "depth", 0) and param is not None
            and param.device.type != "meta"):
        param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    _original_register_parameter(module, name, param)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every nn.Parameter on the meta device while this thread builds modules, buffers
    for real (See Note: parameters on meta, for the building thread only)."""
    global _meta_users
    with _meta_lock:
        if _meta_users == 0:
            nn.Module.register_parameter = _register_parameter
        _meta_users += 1
    _meta_building.depth = getattr(_meta_building, "depth", 0) + 1
    try:
        yield
    finally:
        _meta_building.depth -= 1
        with _meta_lock:
            _meta_users -= 1
            # Restore only our own wrapper: a patch someone installed on top of it stays theirs.
            if _meta_users == 0 and nn.Module.register_parameter is _register_parameter:
                nn.Module.register_parameter = _original_register_parameter


def _build_meta_model(folder: Path):
    transformers = _transformers()
    # Never run code shipped in the folder (a config.json ``auto_map`` naming its .py files):
    # transformers would otherwise prompt on stdin, and a "y" there executes the repository.
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model_cls = None
    for name in getattr(config, "architectures", None) or ():  # checked by read_config
        candidate = getattr(transformers, name, None)
        if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
            model_cls = candidate
            break
    with _parameters_on_meta():
        if model_cls is not None:
            model = model_cls(config)
        else:
            try:
                model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            except ValueError:
                model = transformers.AutoModel.from_config(config, trust_remote_code=False)
    model.eval()
    return model


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def _shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name -> every name it has (tied weights share one Parameter)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values()}


def _quantize_plan(model: nn.Module, opts: QuantOptions) -> tuple[list[str], list[str]]:
    """(linear modules to quantize, linear modules kept) under the architecture table + options."""
    arch = architecture(_model_type(model))
    keep_patterns = arch.keep + opts.skip_modules
    tied = {n.rsplit(".", 1)[0] for names in _shared_parameters(model).values() if len(names) > 1
            for n in names}
    quantize, keep = [], []
    for name in _linear_names(model):
        (keep if matches(name, keep_patterns) or name in tied else quantize).append(name)
    return quantize, keep


def _lora_targets(model: nn.Module, opts: QuantOptions) -> tuple[str, ...]:
    if opts.target_modules is not None:
        return opts.target_modules
    return architecture(_model_type(model)).lora_targets


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ------------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    """What each checkpoint tensor becomes: ``float_params`` name -> every alias in the model,
    ``quantize`` name -> module name (float weight to quantize), ``prequantized`` module name ->
    {suffix: entry} (a bnb-quantized weight's pieces)."""

    entries: list[TensorEntry] = field(default_factory=list)
    float_params: dict[str, list[str]] = field(default_factory=dict)
    buffers: dict[str, str] = field(default_factory=dict)
    quantize: dict[str, str] = field(default_factory=dict)
    prequantized: dict[str, dict[str, TensorEntry]] = field(default_factory=dict)


def _key_mapper(model: nn.Module, ckpt_names: Iterable[str], expected: set[str]) -> Callable[[str], str]:
    """Map checkpoint names to model names across a ``base_model_prefix`` difference
    (a ``BertModel`` checkpoint loaded into ``BertForMaskedLM``, or the reverse)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = list(ckpt_names)
    if not prefix or sum(n in expected for n in names) * 2 >= len(names):
        return lambda n: n
    add = sum(f"{prefix}.{n}" in expected for n in names)
    strip = sum(n.startswith(prefix + ".") and n[len(prefix) + 1:] in expected for n in names)
    if add >= strip and add:
        return lambda n: f"{prefix}.{n}" if f"{prefix}.{n}" in expected else n
    if strip:
        return lambda n: n[len(prefix) + 1:] if n.startswith(prefix + ".") and n[len(prefix) + 1:] in expected else n
    return lambda n: n


def _make_plan(model: nn.Module, ckpt: Checkpoint, quantized: dict[str, QuantLinear4bit],
               prequantized: bool) -> _Plan:
    plan = _Plan()
    lora = {f"{m}.{p}" for m in quantized for p in ("lora_A", "lora_B")}
    aliases = {first: names for first, names in _shared_parameters(model).items() if first not in lora}
    alias_of = {n: first for first, names in aliases.items() for n in names}
    quant_weights = {f"{m}.weight": m for m in quantized}
    persistent = {}
    for mod_name, module in model.named_modules():
        for b in module._buffers:
            if b not in module._non_persistent_buffers_set and module._buffers[b] is not None:
                persistent[f"{mod_name}.{b}" if mod_name else b] = mod_name
    expected = set(alias_of) | set(persistent) | set(quant_weights)
    to_model = _key_mapper(model, ckpt.names(), expected)

    # bnb pieces: "<module>.weight.<suffix>" for each quantized module
    piece_names = {}
    if prequantized:
        for m in quantized:
            for suffix in QUANT_SUFFIXES:
                piece_names[f"{m}.weight.{suffix}"] = (m, suffix)

    loaded: set[str] = set()
    unused: list[str] = []
    for ckpt_name, entry in ckpt.entries.items():
        name = to_model(ckpt_name)
        if name in quant_weights:
            module = quantized[quant_weights[name]]
            if prequantized:
                plan.prequantized.setdefault(quant_weights[name], {})["weight"] = entry
            else:
                _check_float(entry, (module.out_features, module.in_features))
                plan.quantize[ckpt_name] = quant_weights[name]
        elif name in piece_names:
            mod, suffix = piece_names[name]
            plan.prequantized.setdefault(mod, {})[suffix] = entry
        elif prequantized and name.rpartition(".quant_state.")[0] in quant_weights:
            plan.prequantized.setdefault(quant_weights[name.rpartition(".quant_state.")[0]], {})[
                name.rpartition(".weight.")[2]] = entry
        elif name in alias_of:
            first = alias_of[name]
            if first in loaded:
                continue  # a tied weight saved twice: the first copy serves every alias
            param = model.get_parameter(first)
            _check_float(entry, tuple(param.shape))
            plan.float_params[ckpt_name] = aliases[first]
            loaded.add(first)
        elif name in persistent:
            buf = model.get_buffer(name)
            if tuple(buf.shape) != entry.shape:
                raise ValueError(f"{entry.shard}: tensor {entry.name!r} has shape {list(entry.shape)}, "
                                 f"the model's buffer is {list(buf.shape)}")
            plan.buffers[ckpt_name] = name
            loaded.add(name)
        else:
            unused.append(ckpt_name)
            continue
        plan.entries.append(entry)
    _refuse_unused(model, ckpt, unused, to_model)

    missing = [a for a in aliases if a not in loaded and not any(n in quant_weights for n in aliases[a])]
    missing += [b for b in persistent if b not in loaded]
    if prequantized:
        missing += [f"{m}.weight" for m in quantized if "weight" not in plan.prequantized.get(m, {})]
        for m, pieces in plan.prequantized.items():
            for needed in ("absmax", "quant_map"):
                if needed not in pieces:
                    raise ValueError(f"{ckpt.folder}: quantized weight {m}.weight has no {m}.weight.{needed} "
                                     f"tensor (incomplete bitsandbytes checkpoint)")
    else:
        missing += [f"{m}.weight" for m in quantized if f"{m}.weight" not in plan.quantize.values()
                    and not any(v == m for v in plan.quantize.values())]
    if missing:
        raise ValueError(f"{ckpt.folder}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
                         f"e.g. {sorted(missing)[:5]}")
    # Read in file order, each quantized module's small pieces just before its packed weight.
    group_key = {}
    for m, pieces in plan.prequantized.items():
        w = pieces.get("weight")
        for e in pieces.values():
            group_key[e.name] = (str(w.shard), w.offset, e.offset)
    plan.entries.sort(key=lambda e: group_key.get(e.name, (str(e.shard), e.offset, e.offset)))
    return plan


def _layer_pattern(name: str) -> str:
    """``model.layers.7.mlp.up_proj.weight`` -> ``model.layers.#.mlp.up_proj.weight``."""
    return re.sub(r"\.\d+\.", ".#.", name)


def _refuse_unused(model: nn.Module, ckpt: Checkpoint, unused: list[str], to_model) -> None:
    """Raise if the checkpoint holds tensors that show the config describes another model; warn,
    naming them, about other tensors the model has no place for.

    A config.json with fewer layers than the weights, or naming another architecture, builds a
    model that would silently drop weights: a different model than the checkpoint's. Refused:
    a dropped tensor that is a numbered layer's tensor of this very model (fewer layers), or
    dropped tensors outweighing the loaded ones (another architecture). Extra heads are common
    and harmless (bert-base-uncased carries the pretraining heads cls.* that BertForMaskedLM
    drops), so, as transformers does, those are named in a WARNING. Not even that for the extras
    transformers ignores silently: the model's ``_keys_to_ignore_on_load_unexpected`` patterns,
    and ``position_ids`` / ``rotary_emb.inv_freq``, persistent buffers in older versions."""
    buffers = [name for name, _ in model.named_buffers()]
    patterns = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.append(re.compile(r"rotary_emb\.inv_freq$"))
    if any(b.endswith("position_ids") for b in buffers):
        patterns.append(re.compile(r"(^|\.)position_ids$"))
    dropped = [n for n in unused if not any(p.search(n) or p.search(to_model(n)) for p in patterns)]
    if not dropped:
        return
    layers = {_layer_pattern(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    truncated = [n for n in dropped if _layer_pattern(to_model(n)) != to_model(n)
                 and _layer_pattern(to_model(n)) in layers]
    if truncated:
        raise ValueError(f"{ckpt.folder}: config.json describes fewer layers than the checkpoint holds: "
                         f"{len(truncated)} tensor(s) of layers the {type(model).__name__} lacks would "
                         f"be dropped, e.g. {sorted(truncated)[:5]}")
    dropped_bytes = sum(ckpt[n].nbytes for n in dropped)
    if 2 * dropped_bytes > ckpt.total_bytes:
        raise ValueError(f"{ckpt.folder}: {len(dropped)} tensor(s) ({dropped_bytes} of {ckpt.total_bytes} "
                         f"bytes) have no place in the {type(model).__name__} that config.json describes "
                         f"(another architecture?), e.g. {sorted(dropped)[:5]}")
    log.warning("%s: %d tensor(s) of the checkpoint have no place in the %s and are not loaded: %s",
                ckpt.folder, len(dropped), type(model).__name__,
                ", ".join(sorted(dropped)[:10]) + (", ..." if len(dropped) > 10 else ""))


def _check_float(entry: TensorEntry, shape: tuple[int, ...]) -> None:
    if entry.shape != tuple(shape):
        raise ValueError(f"{entry.shard}: tensor {entry.name!r} has shape {list(entry.shape)}, "
                         f"the model (from config.json) expects {list(shape)}")
    if entry.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{entry.shard}: tensor {entry.name!r} is {entry.dtype}, expected a float "
                         f"tensor (float32, float16 or bfloat16)")


# ------------------------------------------------------------------------------- loading
def _bnb_config(config: dict) -> Optional[dict]:
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"quantization_config.quant_method is {method!r}; nf4 loads float checkpoints "
                         f"and bitsandbytes 4-bit ones")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError("this bitsandbytes checkpoint is not 4-bit (load_in_4bit is false); nf4 reads 4-bit only")
    return qc


def _prequantized_modules(model: nn.Module, ckpt: Checkpoint) -> dict[str, dict]:
    """Linear modules the bnb checkpoint stores quantized -> their parsed quant-state JSON."""
    linears = set(_linear_names(model))
    found = {}
    for name, entry in ckpt.entries.items():
        module, sep, _ = name.rpartition(".weight." + QUANT_STATE_PREFIX)
        if not sep:
            continue
        if module not in linears:
            raise ValueError(f"{entry.shard}: tensor {name!r} quantizes {module!r}, which is not a "
                             f"linear layer of this {type(model).__name__}")
        found[module] = entry
    return found


def _module_options(entry: TensorEntry, linear: nn.Linear) -> tuple[str, int, bool]:
    """(quant_type, blocksize, double quant) from a bnb weight's JSON, checked against the layer."""
    try:
        meta = read_quant_state_json(entry)
        quant_type = meta.get("quant_type")
        codebook.check_quant_type(quant_type)
        blocksize = check_blocksize(meta.get("blocksize"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{entry.shard}: tensor {entry.name!r}: {e}") from e
    want = [linear.out_features, linear.in_features]
    if meta.get("shape") != want:
        raise ValueError(f"{entry.shard}: tensor {entry.name!r} describes a weight of shape "
                         f"{meta.get('shape')}, the model (from config.json) expects {want}")
    return quant_type, blocksize, "nested_offset" in meta


# ------------------------------------------------------------------------------- phases
class LoadPhases:
    """When each phase of one load ran: ``spans`` maps a phase to (start, end), seconds since the
    load began. Left on the model as ``model.nf4_load_phases``; bench/bench_load.py prints them.
    Spans may overlap (See Note: quantizing while the model is built)."""

    def __init__(self):
        self.origin = time.perf_counter()
        self.spans: dict[str, tuple[float, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.mark(name, start)

    def mark(self, name: str, start: float) -> None:
        """Record phase ``name`` as running from ``start`` (a perf_counter value) until now."""
        self.spans[name] = (start - self.origin, time.perf_counter() - self.origin)

    def __str__(self) -> str:
        return ", ".join(f"{name} {a:.2f}-{b:.2f} s" for name, (a, b) in self.spans.items())


# ------------------------------------------------------------------------------- early quantization
# Note: quantizing while the model is built.
#     Of a float checkpoint, the linear weights (14.0 of Llama-3-8B's 16.1 GB) become the same
#     bytes whatever the model is: the tensor, the compute dtype and the quantization options
#     decide them. So once every header is validated and config.json's sizes are checked against
#     them, a worker thread streams and quantizes the tensors that the architecture table names as
#     projections, while this thread imports transformers, builds the meta model and makes the plan
#     (and, in a fresh process, while CUDA initializes: on the worker). The plan still decides: an
#     early result is attached only where the plan quantizes that very tensor, after the plan has
#     checked its shape against the model, and with the options the layer was built with; any
#     other is dropped and its tensor read again as the plan says. A wrong guess costs time,
#     never different bytes: the state is bit for bit the sequential load's
#     (tests/test_loading_overlap.py).
#     Errors: when this thread fails, the worker stops before its next tensor and is joined, and
#     this thread's exception propagates (the worker's own, if any, is logged); a worker's
#     exception is raised, as raised there, when this thread joins it after the plan. The
#     non-finite check stays batched and reports the first bad tensor in the plan's order.
#     Memory: the worker holds one float tensor at a time and what it keeps are final weights, so
#     peak device memory stays within final + the largest tensor (plus any results the plan drops:
#     none for the table's architectures). It runs on the caller's device and CUDA stream, and
#     waits for its queued work before it returns.
#     Where: on CUDA devices (NF4_LOAD_OVERLAP=auto, the default), where the worker mostly waits
#     for the page cache, the copy engine and the kernels, with the GIL released. Not on the CPU
#     unless NF4_LOAD_OVERLAP=1: there the worker's quantization needs the cores the import needs
#     (2-core development VM, 0.3 GB Llama, fresh process: 8.41 s with, 6.46 s without). Nor with
#     an observer (the CLI needs each layer with its float weight), for bitsandbytes checkpoints
#     (nothing to quantize), for model types outside the table, or with NF4_LOAD_OVERLAP=0.
#     The GIL: the worker's threads take it back after each blocking call, which a thread running
#     Python (an import) may make wait up to the 5 ms switch interval; a simulated worker of 1,920
#     such calls (0.57 s alone) took 1.5-1.8 s beside `import transformers` (2.9-4.3 s) on the
#     VM, so it progresses at about a third of its speed during an import and at full speed
#     after. The switch interval is left alone: it is the whole process's (0.5 ms gave 1.3 s).
#     In a fresh process the worker's first quantize also waits for torch._dynamo (1.0 s on the VM),
#     which the first call of any torch.library custom op imports (torch._disable_dynamo) and
#     transformers imports too: imported once, by whichever thread comes first.
def _overlap_enabled(device: torch.device) -> bool:
    value = os.environ.get(OVERLAP_ENV, "auto").strip()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{OVERLAP_ENV} must be auto, 0 or 1, got {value!r}")
    return value == "1" or (value == "auto" and device.type == "cuda")


def _early_entries(ckpt: Checkpoint, opts: QuantOptions) -> list[TensorEntry]:
    """The float checkpoint's tensors the plan will most likely quantize, in file order: 2-D float
    weights of the architecture's projections (its LoRA targets), minus kept and skipped modules."""
    arch = ARCHITECTURES.get(ckpt.config.get("model_type"))
    if arch is None:
        return []
    keep = arch.keep + opts.skip_modules
    entries = []
    for name, e in ckpt.entries.items():
        module, _, last = name.rpartition(".")
        if (last == "weight" and len(e.shape) == 2 and e.dtype in _FLOAT_DTYPES and e.nbytes
                and matches(module, arch.lora_targets) and not matches(module, keep)):
            entries.append(e)
    return sorted(entries, key=lambda e: (str(e.shard), e.offset))


@dataclass
class _Early:
    """One tensor quantized by the worker: the layer's packed bytes and state, its non-finite flag."""

    packed: torch.Tensor
    state: QuantState
    nonfinite: torch.Tensor


def _quantize_tensor(t: torch.Tensor, opts: QuantOptions) -> _Early:
    # What _load does for a weight it quantizes: flag on the checkpoint's values, then quantize the
    # weight cast to the compute dtype (QuantLinear4bit.quantize_weight_'s call, uint8 storage).
    flag = nonfinite(t)
    packed, state = functional.quantize_4bit(t.to(opts.compute_dtype), blocksize=opts.blocksize,
                                             compress_statistics=opts.compress_statistics,
                                             quant_type=opts.quant_type, check_finite=False)
    return _Early(packed, state, flag)


class _EarlyQuantizer:
    """Streams and quantizes ``entries`` on a worker thread (See Note: quantizing while the model
    is built). ``result()`` joins it: checkpoint name -> _Early, or the worker's exception."""

    def __init__(self, entries: list[TensorEntry], device: torch.device, opts: QuantOptions,
                 progress: Callable[[int], None], phases: LoadPhases):
        self.entries = entries
        self._cancel = threading.Event()
        # The caller's stream, when CUDA is up already (a stream needs a context); before that,
        # every thread's current stream is the device's default one, and the worker creates the
        # context itself.
        stream = torch.cuda.current_stream(device) if device.type == "cuda" and torch.cuda.is_initialized() else None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nf4-early")
        self._future = self._pool.submit(self._run, device, stream, opts, progress, phases)

    def _run(self, device, stream, opts, progress, phases) -> dict[str, _Early]:
        start = time.perf_counter()
        results: dict[str, _Early] = {}
        with contextlib.ExitStack() as stack:
            if device.type == "cuda":
                stack.enter_context(torch.cuda.device(device))  # a new thread's device is 0
                if stream is not None:
                    stack.enter_context(torch.cuda.stream(stream))
            tensors = stack.enter_context(contextlib.closing(
                stream_tensors(self.entries, device, progress=progress)))
            for entry, t in tensors:
                if self._cancel.is_set():
                    break
                results[entry.name] = _quantize_tensor(t, opts)
                del t
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # the caller may use another stream
        phases.mark("quantize (worker)", start)
        return results

    def result(self) -> dict[str, _Early]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown()

    def stop(self) -> None:
        """Stop after the tensor in hand and wait for the worker (this thread's load has failed)."""
        self._cancel.set()
        try:
            self._future.result()
        except Exception as e:  # the caller's exception propagates; this one is only reported
            log.warning("the early quantization worker failed too: %s: %s", type(e).__name__, e)
        finally:
            self._pool.shutdown()


def _load_device(device) -> torch.device:
    """``default_device(device)`` without creating a CUDA context, so that the worker can create it
    while this thread builds the model: before CUDA is initialized no thread has picked a device
    (``torch.cuda.set_device`` and ``torch.cuda.device`` initialize it), so ``cuda`` means cuda:0."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and not torch.cuda.is_initialized():
        return torch.device("cuda", 0)
    return concrete_device(device)


def load_folder(folder: Path, *, device, opts: QuantOptions, observer: Optional[Observer] = None,
                progress: bool = True, phases: Optional[LoadPhases] = None):
    """Load ``folder`` (already resolved) as a quantized transformers model; see from_pretrained.
    ``phases`` (default: a new one) records when each step ran (``model.nf4_load_phases``)."""
    phases = phases if phases is not None else LoadPhases()
    with phases("device"):
        device = _load_device(device)
    with phases("headers"):
        ckpt = Checkpoint(folder)
        check_config_sizes(ckpt.config, ckpt.entries, f"{ckpt.folder / 'config.json'}")
        bnb = _bnb_config(ckpt.config)
        if opts.compute_dtype is None:
            opts = dataclasses.replace(opts, compute_dtype=_checkpoint_compute_dtype(bnb))
    overlap = bnb is None and observer is None and _overlap_enabled(device)
    early_entries = _early_entries(ckpt, opts) if overlap else []
    with tqdm(total=sum(e.nbytes for e in early_entries), unit="B", unit_scale=True, unit_divisor=1024,
              desc="nf4: loading", disable=None if progress else True) as bar:
        # Only the worker touches the bar until it is joined.
        early = _EarlyQuantizer(early_entries, device, opts, bar.update, phases) if early_entries else None
        try:
            with phases("meta model"):
                model = _build_meta_model(ckpt.folder)
            with phases("plan"):
                quantized, plan = _swap_and_plan(model, ckpt, bnb, opts)
        except BaseException:
            if early is not None:
                early.stop()
            raise
        done_early = early.result() if early is not None else {}
        n_early = _load(model, plan, quantized, device, opts, observer, bar, phases, done_early)
    with phases("peft"):
        # peft wraps these layers without a per-config register(), imported before or after this
        # load (See Note: enabling peft without importing it).
        peft_dispatch.when_imported()
    nbytes = sum(e.nbytes for e in plan.entries)
    load = phases.spans["load"][1] - (phases.spans.get("quantize (worker)") or phases.spans["load"])[0]
    log.info("%s: %d tensors (%.2f GB) streamed and %s, %.2f GB/s from the first byte read to the "
             "last; %s", ckpt.folder, len(plan.entries), nbytes / 1e9,
             "loaded" if bnb else f"{len(quantized)} quantized ({n_early} while the model was built)",
             nbytes / 1e9 / max(load, 1e-9), phases)
    model.nf4_source_dir = ckpt.folder
    model.nf4_load_phases = dict(phases.spans)
    return model


def _swap_and_plan(model: nn.Module, ckpt: Checkpoint, bnb: Optional[dict],
                   opts: QuantOptions) -> tuple[dict[str, QuantLinear4bit], _Plan]:
    """Swap the linear layers to quantize for 4-bit ones (on meta); the plan of every tensor."""
    if bnb is not None:
        states = _prequantized_modules(model, ckpt)
        quantize_names = sorted(states)
        module_opts = {m: _module_options(states[m], model.get_submodule(m)) for m in quantize_names}
    else:
        quantize_names, _ = _quantize_plan(model, opts)
        module_opts = {m: (opts.quant_type, opts.blocksize, opts.compress_statistics) for m in quantize_names}
    targets = _lora_targets(model, opts)
    quantized: dict[str, QuantLinear4bit] = {}
    for name in quantize_names:
        linear = model.get_submodule(name)
        quant_type, blocksize, double = module_opts[name]
        rank = opts.lora_rank if opts.lora_rank and matches(name, targets) else 0
        q = _new_layer(linear, opts, quant_type, blocksize, double, rank)
        _swap(model, name, q)
        quantized[name] = q
    if opts.lora_rank and not any(q.lora_rank for q in quantized.values()):
        raise ValueError(f"lora_rank={opts.lora_rank} but no quantized layer matches target_modules "
                         f"{list(targets)}")
    return quantized, _make_plan(model, ckpt, quantized, prequantized=bnb is not None)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def _materialize_lora(module: QuantLinear4bit, device: torch.device) -> None:
    if module.lora_rank:
        module.lora_A = nn.Parameter(torch.empty_like(module.lora_A, device=device))
        module.lora_B = nn.Parameter(torch.empty_like(module.lora_B, device=device))
        module.reset_lora_parameters()


def _where(entry: TensorEntry) -> str:
    return f"{entry.shard}: tensor {entry.name!r}"


def _attach_early(plan: _Plan, quantized: dict[str, QuantLinear4bit], done_early: dict[str, _Early],
                  checks: dict[int, tuple[TensorEntry, torch.Tensor]]) -> set[str]:
    """Install the worker's results where the plan quantizes that tensor with the same options
    (See Note: quantizing while the model is built); returns the checkpoint names installed."""
    attached = set()
    for index, entry in enumerate(plan.entries):
        module_name = plan.quantize.get(entry.name)
        got = done_early.get(entry.name) if module_name is not None else None
        w = quantized[module_name].weight if got is not None else None
        if got is None or (w.quant_type, w.blocksize, w.compress_statistics, w.quant_storage) != \
                (got.state.quant_type, got.state.blocksize, got.state.nested, got.packed.dtype):
            continue
        del done_early[entry.name]
        quantized[module_name].load_quantized(got.packed, got.state)
        checks[index] = (entry, got.nonfinite)
        attached.add(entry.name)
    if done_early:
        log.debug("%d tensors quantized early are not quantized by the plan as they were; read again: %s",
                  len(done_early), sorted(done_early)[:5])
        done_early.clear()
    return attached


def _load(model: nn.Module, plan: _Plan, quantized: dict[str, QuantLinear4bit], device: torch.device,
          opts: QuantOptions, observer: Optional[Observer], bar: tqdm, phases: LoadPhases,
          done_early: dict[str, _Early]) -> int:
    """Stream what the worker did not quantize into place; returns how many tensors it did."""
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())

    def float_dtype(name: str) -> torch.dtype:
        return torch.float32 if any(k in name for k in keep_fp32) else opts.compute_dtype

    def destination(entry: TensorEntry) -> Optional[torch.Tensor]:
        # Parameters already in their final dtype are read straight into their final storage.
        names = plan.float_params.get(entry.name)
        if names is not None and entry.dtype == float_dtype(names[0]):
            return torch.empty(entry.shape, dtype=entry.dtype, device=device)
        # On the CPU a tensor without a destination may be a view of the mapped shard: only
        # weights quantized and then dropped may be (See Note: a file truncated while mapped).
        if device.type == "cpu" and entry.name not in plan.quantize:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return None

    pieces_of = {e.name: (m, suffix) for m, pieces in plan.prequantized.items() for suffix, e in pieces.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    # plan.entries index -> (entry, non-finite flag): reported in the plan's order, early or not.
    checks: dict[int, tuple[TensorEntry, torch.Tensor]] = {}
    index_of = {e.name: i for i, e in enumerate(plan.entries)}

    def check(entry: TensorEntry, t: torch.Tensor) -> None:
        if t.is_floating_point() and t.numel():
            checks[index_of[entry.name]] = (entry, nonfinite(t))

    with phases("attach"):
        attached = _attach_early(plan, quantized, done_early, checks)
    entries = [e for e in plan.entries if e.name not in attached]
    early_bytes = bar.total or 0
    bar.total = early_bytes + sum(e.nbytes for e in entries)
    bar.refresh()
    trace_memory = device.type == "cuda" and log.isEnabledFor(logging.DEBUG)
    peak = torch.cuda.max_memory_allocated(device) if trace_memory else 0
    with phases("load"):
        for count, (entry, t) in enumerate(stream_tensors(entries, device, destination, bar.update), 1):
            if entry.name in plan.float_params:
                names = plan.float_params[entry.name]
                check(entry, t)
                first = model.get_parameter(names[0])
                param = nn.Parameter(t.to(float_dtype(names[0])), requires_grad=first.requires_grad)
                for n in names:
                    _set_tensor(model, n, param)
            elif entry.name in plan.buffers:
                name = plan.buffers[entry.name]
                check(entry, t)
                _set_tensor(model, name, t.to(model.get_buffer(name).dtype))
            elif entry.name in plan.quantize:
                module_name = plan.quantize[entry.name]
                check(entry, t)
                weight = t.to(opts.compute_dtype)
                quantized[module_name].quantize_weight_(weight, check_finite=False)  # check() above, raised after the batch
                if observer is not None:
                    observer(module_name, quantized[module_name], weight)
                del weight, t
            else:
                module_name, suffix = pieces_of[entry.name]
                if suffix != "weight":
                    check(entry, t)
                got = pending.setdefault(module_name, {})
                got[suffix] = t
                if len(got) == len(plan.prequantized[module_name]):
                    _install_prequantized(quantized[module_name], pending.pop(module_name),
                                          plan.prequantized[module_name], device)
            if trace_memory and torch.cuda.max_memory_allocated(device) > peak + 32 * 2**20:
                peak = torch.cuda.max_memory_allocated(device)
                log.debug("after %s: peak GPU memory %.3f GB (now %.3f GB)", entry.name, peak / 1e9,
                          torch.cuda.memory_allocated(device) / 1e9)
            if count % 16 == 0 or count == len(entries):
                bar.set_postfix_str(f"{len(attached) + count}/{len(plan.entries)} tensors", refresh=False)
    with phases("finish"):
        if checks:
            ordered = [checks[i] for i in sorted(checks)]
            bad = torch.stack([flag for _, flag in ordered]).cpu()
            if bool(bad.any()):
                entry = ordered[int(bad.nonzero()[0, 0])][0]
                raise ValueError(f"{_where(entry)} holds non-finite values (NaN or Inf); refusing to load it")
        for module in quantized.values():
            _materialize_lora(module, device)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if leftover:
            raise RuntimeError(f"parameters left unloaded (an nf4 bug): {leftover[:5]}")
    return len(attached)


def _install_prequantized(module: QuantLinear4bit, tensors: dict[str, torch.Tensor],
                          entries: dict[str, TensorEntry], device: torch.device) -> None:
    packed = tensors.pop("weight")
    where = _where(entries["weight"])
    try:
        state = QuantState.from_dict(tensors, device=device)
        module.load_quantized(packed, state)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its quantization state does not fit its data: {e}") from e


def _options(compute_dtype, quant_type, blocksize, compress_statistics, skip_modules, lora_rank,
             lora_alpha, target_modules) -> QuantOptions:
    return QuantOptions(compute_dtype=compute_dtype, quant_type=quant_type, blocksize=blocksize,
                        compress_statistics=compress_statistics, skip_modules=skip_modules,
                        lora_rank=lora_rank, lora_alpha=lora_alpha, target_modules=target_modules)


def from_pretrained(name_or_path, *, device=None, compute_dtype: Optional[torch.dtype] = None,
                    quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                    skip_modules=None, lora_rank: int = 0, lora_alpha: Optional[float] = None,
                    target_modules=None, revision: Optional[str] = None, cache_dir=None,
                    token=None, progress: bool = True, patch: bool = False):
    """Load a Hub repository or local folder as a transformers model with 4-bit linear layers.

    ``device`` defaults to the current CUDA device when there is one, else the CPU;
    ``compute_dtype`` to a bnb checkpoint's ``bnb_4bit_compute_dtype``, else bfloat16.
    Float checkpoints (bf16/fp16/fp32 safetensors) are quantized while they load, tensor by tensor
    on ``device``; bitsandbytes 4-bit checkpoints (``quantization_config.quant_method ==
    "bitsandbytes"``) are loaded as stored, whatever ``quant_type``/``blocksize`` say. Which linear
    layers stay in high precision comes from ``config.model_type`` (``nf4.loading.architectures``)
    plus ``skip_modules``; LoRA adapters of rank ``lora_rank`` go on ``target_modules`` (default:
    the architecture's attention and MLP projections).

    Needs transformers (``pip install 'nf4[hf]'``). Resolution honours ``revision``,
    ``cache_dir``, ``token`` and ``HF_HUB_OFFLINE``. Only safetensors are read, and every header,
    shape and quantization state is validated before use (ValueError/FileNotFoundError naming
    the file and tensor); non-finite weights are refused.

    ``patch=True`` applies ``nf4.models.patch`` after loading: Triton kernels for the norms, RoPE,
    MLP activation and a loss that never builds the full logits, and fused LoRA blocks for the
    gated MLPs and q/k/v projections (llama, mistral, qwen2, qwen3, gemma2, phi3; other types load
    unpatched with one log line). Off by default until it is
    proven on the GPU benchmark (``bench/bench_qlora.py``).
    """
    if not isinstance(patch, bool):
        raise TypeError(f"patch must be a bool, got {type(patch).__name__}")
    opts = _options(compute_dtype, quant_type, blocksize, compress_statistics, skip_modules,
                    lora_rank, lora_alpha, target_modules)
    phases = LoadPhases()
    with phases("resolve"):
        folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    model = load_folder(folder, device=device, opts=opts, progress=progress, phases=phases)
    if patch:
        import nf4.models  # needs Triton (optional off Linux): imported only when asked for
        nf4.models.patch(model)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, *, device=None, compute_dtype: torch.dtype = torch.bfloat16,
                   quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                   skip_modules=None, lora_rank: int = 0, lora_alpha: Optional[float] = None,
                   target_modules=None) -> nn.Module:
    """Swap the linear layers of a model already in memory for QuantLinear4bit, in place.

    The same choices as ``from_pretrained`` (the architecture table needs ``model.config``;
    without one every linear layer but ``lm_head`` is quantized). Layers are moved to ``device``
    and quantized one at a time, then the remaining parameters follow (floats cast to
    ``compute_dtype``). Returns ``model``.
    """
    opts = _options(compute_dtype, quant_type, blocksize, compress_statistics, skip_modules,
                    lora_rank, lora_alpha, target_modules)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    device = default_device(device)
    names, _ = _quantize_plan(model, opts)
    targets = _lora_targets(model, opts)
    for name in names:
        linear = model.get_submodule(name)
        rank = opts.lora_rank if opts.lora_rank and matches(name, targets) else 0
        q = _new_layer(linear, opts, opts.quant_type, opts.blocksize, opts.compress_statistics, rank)
        q.quantize_weight_(linear.weight.detach().to(device=device, dtype=opts.compute_dtype))
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=opts.compute_dtype),
                                  requires_grad=False)
        _materialize_lora(q, device)
        _swap(model, name, q)
    for module in model.modules():
        if isinstance(module, QuantLinear4bit):
            continue
        for p in module._parameters.values():
            if p is not None:
                p.data = p.data.to(device=device, dtype=opts.compute_dtype if p.is_floating_point() else None)
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    peft_dispatch.when_imported()
    return model
