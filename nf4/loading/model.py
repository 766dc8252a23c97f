"""Build a transformers model whose linear layers are QuantLinear4bit, from a checkpoint folder.

The model is built with its parameters on the meta device (buffers such as rotary frequencies
are computed for real on the CPU), the linear layers are swapped, and then every tensor streams
from the shards into place one at a time: float weights of swapped layers are quantized on the
target device as they arrive, pre-quantized (bitsandbytes) ones are loaded as they are.
Everything the checkpoint says is validated against the model before a byte of data is read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from nf4 import codebook
from nf4.functional import nonfinite
from nf4.loading.architectures import architecture, matches
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


def _enable_peft() -> None:
    # peft is optional: when installed, it wraps these layers without a per-config register().
    if importlib.util.find_spec("peft") is not None:
        from nf4 import peft as nf4_peft  # optional dependency (imports peft)
        nf4_peft.enable()


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


def load_folder(folder: Path, *, device, opts: QuantOptions, observer: Optional[Observer] = None,
                progress: bool = True):
    """Load ``folder`` (already resolved) as a quantized transformers model; see from_pretrained."""
    device = default_device(device)
    start = time.perf_counter()
    ckpt = Checkpoint(folder)
    check_config_sizes(ckpt.config, ckpt.entries, f"{ckpt.folder / 'config.json'}")
    bnb = _bnb_config(ckpt.config)
    if opts.compute_dtype is None:
        opts = dataclasses.replace(opts, compute_dtype=_checkpoint_compute_dtype(bnb))
    headers = time.perf_counter()
    model = _build_meta_model(ckpt.folder)
    built = time.perf_counter()

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
    plan = _make_plan(model, ckpt, quantized, prequantized=bnb is not None)
    planned = time.perf_counter()
    _load(model, plan, quantized, device, opts, observer, progress)
    done = time.perf_counter()
    nbytes = sum(e.nbytes for e in plan.entries)
    log.info("%s: headers %.2f s, meta model %.2f s, plan %.2f s, %d tensors (%.2f GB) streamed and "
             "%s in %.2f s (%.2f GB/s)", ckpt.folder, headers - start, built - headers, planned - built,
             len(plan.entries), nbytes / 1e9, "loaded" if bnb else f"{len(quantized)} quantized",
             done - planned, nbytes / 1e9 / max(done - planned, 1e-9))
    model.nf4_source_dir = ckpt.folder
    _enable_peft()
    return model


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


def _load(model: nn.Module, plan: _Plan, quantized: dict[str, QuantLinear4bit], device: torch.device,
          opts: QuantOptions, observer: Optional[Observer], progress: bool) -> None:
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
    checks: list[tuple[TensorEntry, torch.Tensor]] = []

    def check(entry: TensorEntry, t: torch.Tensor) -> None:
        if t.is_floating_point() and t.numel():
            checks.append((entry, nonfinite(t)))

    trace_memory = device.type == "cuda" and log.isEnabledFor(logging.DEBUG)
    peak = torch.cuda.max_memory_allocated(device) if trace_memory else 0
    total = sum(e.nbytes for e in plan.entries)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="nf4: loading",
              disable=None if progress else True, postfix=f"0/{len(plan.entries)} tensors") as bar:
        for count, (entry, t) in enumerate(stream_tensors(plan.entries, device, destination, bar.update), 1):
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
            if count % 16 == 0 or count == len(plan.entries):
                bar.set_postfix_str(f"{count}/{len(plan.entries)} tensors", refresh=False)
    if checks:
        bad = torch.stack([flag for _, flag in checks]).cpu()
        if bool(bad.any()):
            entry = checks[int(bad.nonzero()[0, 0])][0]
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
    folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    model = load_folder(folder, device=device, opts=opts, progress=progress)
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
    _enable_peft()
    return model
