"""nf4 as a transformers quantizer: ``from_pretrained(..., quantization_config=Nf4Config())``.

    import nf4.hf
    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.1-8B",
                                                 quantization_config=nf4.hf.Nf4Config())

The model's ``nn.Linear`` layers (all but the output head and ``skip_modules``; GPT-2's
``Conv1D`` stays as it is) become ``nf4.nn.Linear4bit`` (an ``nn.Linear``, as bitsandbytes' is),
quantized by nf4 as each float weight arrives. The model then behaves like one of transformers' own 4-bit models:
``is_loaded_in_4bit``, ``hf_quantizer``, ``is_trainable``, device maps, ``Trainer`` checkpoints,
and ``save_pretrained`` writes a bitsandbytes 4-bit folder (``config.json`` carries bnb's
``quantization_config``; the weights are bnb's keys and bytes) that transformers + bitsandbytes
load as well as nf4 does.

Scripts written for bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True, ...)``) and folders
already quantized by it run on nf4 after one line, ``nf4.hf.install()``; see ``install``.

Importing this module registers the quantization method ``"nf4"`` with transformers
(``register_quantization_config`` / ``register_quantizer``) and, where peft is installed, makes
peft wrap nf4's layers (``nf4.peft.enable``). Works with transformers 5.17 to 5.23.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

import nf4.peft
from nf4 import codebook
from nf4.loading.save import bnb_quantization_config
from nf4.nn import Linear4bit, Params4bit, QuantLinear4bit
from nf4.quant_state import QuantState, check_blocksize, check_float_dtype, dtype_from_name

try:
    from transformers import BitsAndBytesConfig
    from transformers.core_model_loading import ConversionOps, WeightConverter
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # optional dependency: this module is the transformers integration
    raise ImportError(f"nf4.hf plugs nf4 into transformers 5 (tested 5.17 to 5.23): pip install 'nf4[train]' "
                      f"({e})") from e

log = logging.getLogger(__name__)

__all__ = ["Nf4Config", "Nf4HfQuantizer", "install", "uninstall", "installed"]

QUANT_METHOD = "nf4"
# transformers' key for BitsAndBytesConfig(load_in_4bit=True) in AUTO_QUANTIZER_MAPPING.
BNB_4BIT_KEY = "bitsandbytes_4bit"
# A bnb-4bit weight's checkpoint tensors, the packed bytes last (transformers 5.17's order).
SERIALIZED_WEIGHT = ["weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map",
                     "weight.absmax", "weight.quant_state.bitsandbytes__nf4",
                     "weight.quant_state.bitsandbytes__fp4", "weight"]


@dataclass(frozen=True)
class _Settings:
    quant_type: str
    compress_statistics: bool
    compute_dtype: Optional[torch.dtype]
    blocksize: int
    skip_modules: Optional[list[str]]
    quant_storage: torch.dtype


def _dtype(value, what: str) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    return dtype_from_name(value, what)


class Nf4Config(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes a float checkpoint with nf4.

    Args:
        quant_type: ``"nf4"`` (default) or ``"fp4"``.
        compress_statistics: double quantization of the block scales (bnb's
            ``bnb_4bit_use_double_quant``), default True.
        compute_dtype: the dtype the 4-bit layers compute in (bnb's ``bnb_4bit_compute_dtype``):
            a torch dtype or its name; None follows each input's dtype. Default bfloat16.
        blocksize: elements per scale, a power of two from 32 to 4096 (bnb: always 64).
        skip_modules: module names (or name suffixes) kept in high precision besides the output
            head (bnb's ``llm_int8_skip_modules``).
        patch: apply ``nf4.models.patch`` to the loaded model (the fused training path: Triton
            norms, RoPE, activation and loss, fused LoRA blocks; llama, mistral, qwen2, qwen3,
            gemma2, phi3, other types load unpatched with one log line). Default False. A choice
            of this load, not of the format: not saved.

    Saved as what it produces: ``to_dict`` is the ``BitsAndBytesConfig`` of the same format, so a
    saved model's ``config.json`` is a bitsandbytes one (``quant_method: "bitsandbytes"``).

    For a checkpoint already quantized by bitsandbytes (4-bit, uint8 storage: a Hub "bnb-4bit"
    model, or a folder nf4 saved) the checkpoint loads as stored: its quant type, double quant,
    block size and list of unquantized modules; ``compute_dtype`` and ``patch`` are this config's
    (a differing format option is logged and ignored). transformers itself refuses a config of
    another class than the checkpoint's; importing this module lets an Nf4Config through for
    these checkpoints only.
    """

    def __init__(self, quant_type: str = "nf4", compress_statistics: bool = True,
                 compute_dtype="bfloat16", blocksize: int = 64,
                 skip_modules: Optional[list[str]] = None, patch: bool = False, **kwargs):
        codebook.check_quant_type(quant_type)
        check_blocksize(blocksize)
        compute_dtype = _dtype(compute_dtype, "compute_dtype")
        if compute_dtype is not None:
            check_float_dtype(compute_dtype, "compute_dtype")
        if not isinstance(compress_statistics, bool):
            raise TypeError(f"compress_statistics must be a bool, got {compress_statistics!r}")
        if skip_modules is not None and (isinstance(skip_modules, str)
                                         or not all(isinstance(m, str) for m in skip_modules)):
            raise TypeError(f"skip_modules must be a list of module names, got {skip_modules!r}")
        _check_patch(patch)
        self.quant_method = QUANT_METHOD
        self.patch = patch
        self.quant_type = quant_type
        self.compress_statistics = compress_statistics
        self.compute_dtype = compute_dtype
        self.blocksize = blocksize
        self.skip_modules = None if skip_modules is None else list(skip_modules)
        # Set by _merge_configs for a bitsandbytes 4-bit checkpoint: skip_modules is then the
        # checkpoint's complete list (bnb's meaning), not an addition to the defaults.
        self._from_bnb = False
        unknown = sorted(k for k in kwargs if k != "quant_method")
        if unknown:
            raise TypeError(f"Nf4Config got unknown arguments {unknown}")

    def settings(self) -> _Settings:
        return _Settings(self.quant_type, self.compress_statistics, self.compute_dtype, self.blocksize,
                         self.skip_modules, torch.uint8)

    def to_dict(self) -> dict[str, Any]:
        return bnb_quantization_config(self.quant_type, self.compress_statistics,
                                       self.compute_dtype or torch.float32, self.skip_modules)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __repr__(self) -> str:
        return (f"Nf4Config(quant_type={self.quant_type!r}, compress_statistics={self.compress_statistics}, "
                f"compute_dtype={self.compute_dtype}, blocksize={self.blocksize}, "
                f"skip_modules={self.skip_modules}, patch={self.patch})")


def _check_patch(patch) -> None:
    if not isinstance(patch, bool):
        raise TypeError(f"patch must be a bool, got {type(patch).__name__}")


def _bnb_as_nf4(stored: BitsAndBytesConfig, asked: Nf4Config) -> Nf4Config:
    """The Nf4Config that loads a bitsandbytes 4-bit checkpoint (``stored``) for a caller who passed
    ``asked``: the checkpoint's format (quant type, double quant, block size 64, its skip list), the
    caller's compute dtype and patch switch."""
    if not stored.load_in_4bit:
        raise ValueError("this checkpoint is bitsandbytes 8-bit; nf4 serves 4-bit checkpoints only "
                         "(load it with bitsandbytes, without quantization_config=Nf4Config)")
    settings = _bnb_settings(stored)
    if settings.quant_storage != torch.uint8:
        raise ValueError(f"this bitsandbytes checkpoint stores its 4-bit codes as {settings.quant_storage} "
                         "(bnb_4bit_quant_storage), which Nf4Config does not express: call nf4.hf.install() and "
                         "load it without quantization_config")
    differ = [f"{name} {mine!r} (stored: {theirs!r})" for name, mine, theirs in (
        ("quant_type", asked.quant_type, settings.quant_type),
        ("compress_statistics", asked.compress_statistics, settings.compress_statistics),
        ("blocksize", asked.blocksize, settings.blocksize)) if mine != theirs]
    if differ:
        log.warning("nf4.hf: the checkpoint is already 4-bit and loads as stored; ignoring Nf4Config's %s",
                    ", ".join(differ))
    if asked.skip_modules is not None:
        log.warning("nf4.hf: the checkpoint is already 4-bit: its own list of unquantized modules applies, "
                    "not Nf4Config's skip_modules %s", asked.skip_modules)
    merged = Nf4Config(settings.quant_type, settings.compress_statistics, asked.compute_dtype, settings.blocksize,
                       settings.skip_modules, asked.patch)
    merged._from_bnb = True
    return merged


def _merge_configs(merge):
    """Wraps transformers' ``AutoHfQuantizer.merge_quantization_configs`` (the checkpoint's config
    against the one passed to ``from_pretrained``), which refuses a config of another class than
    the checkpoint's: an Nf4Config for a bitsandbytes 4-bit checkpoint becomes ``_bnb_as_nf4``.
    Every other pair goes to transformers unchanged."""

    def merge_quantization_configs(cls, stored, passed):
        if isinstance(passed, Nf4Config):
            config = stored
            if isinstance(config, dict) and config.get("quant_method") == "bitsandbytes":
                config = BitsAndBytesConfig.from_dict(config)
            if isinstance(config, BitsAndBytesConfig):
                return _bnb_as_nf4(config, passed)
        return merge.__func__(cls, stored, passed)

    merge_quantization_configs._nf4_wrapped = merge
    return classmethod(merge_quantization_configs)


def _bnb_settings(config: BitsAndBytesConfig) -> _Settings:
    if not config.load_in_4bit:
        raise ValueError("nf4 serves BitsAndBytesConfig(load_in_4bit=True) only; 8-bit is bitsandbytes' own")
    storage = _dtype(getattr(config, "bnb_4bit_quant_storage", None), "bnb_4bit_quant_storage") or torch.uint8
    return _Settings(config.bnb_4bit_quant_type, bool(config.bnb_4bit_use_double_quant),
                     _dtype(config.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype"), 64,
                     config.llm_int8_skip_modules, storage)


class _Quantize(ConversionOps):
    """A float weight as it arrives from the checkpoint -> nf4's 4-bit weight of its layer."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict, full_layer_name: Optional[str] = None, model=None, **kwargs) -> dict:
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module = model.get_submodule(name.rpartition(".")[0])
            module.quantize_weight_(value)
            module._is_hf_initialized = True
            out[name] = module.weight
        return out


class _Deserialize(ConversionOps):
    """A bnb-4bit weight's checkpoint tensors (bytes + state) -> the weight of its layer.

    Note: saving a model loaded from 4-bit bytes.
        transformers keeps the converters a load used (``model._weight_conversions``) and runs
        their reverse on ``save_pretrained``; this op has none to give (``reverse_op`` raises
        NotImplementedError), and needs none: the 4-bit layers' state dict already holds the
        checkpoint's names and bytes. So the quantizer drops its converters from that list once
        the weights are in (transformers 5.23 failed ``save_pretrained`` of any pre-quantized
        load without this).
    """

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict, full_layer_name: Optional[str] = None, model=None, **kwargs) -> dict:
        tensors = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        if len(tensors) == 1:
            return tensors  # a weight with no state: not quantized in this checkpoint
        packed = tensors.pop("weight")
        module = model.get_submodule(full_layer_name.rpartition(".")[0])
        try:
            module.load_quantized(packed, QuantState.from_dict(tensors, device=packed.device))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{full_layer_name}: its quantization state does not fit its data: {e}") from e
        module._is_hf_initialized = True
        return {"weight": module.weight}


def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """``PreTrainedModel.num_parameters`` counting each packed byte as the two weights it holds.

    Note: num_parameters of a 4-bit model.
        transformers' own method imports bitsandbytes whenever ``is_loaded_in_4bit`` is set (to
        recognise its ``Params4bit``), and ``Trainer`` calls it every step (FLOPs estimate), so a
        4-bit model without bitsandbytes would fail there. The quantizer binds this method on the
        model instead; the count is the same as transformers' for a bnb model.
    """
    embeddings = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
    total = 0
    for name, param in self.named_parameters():
        if (exclude_embeddings and name in embeddings) or (only_trainable and not param.requires_grad):
            continue
        total += param.numel() * 2 * param.element_size() if isinstance(param, Params4bit) else param.numel()
    return total


class Nf4HfQuantizer(HfQuantizer):
    """transformers' quantizer for ``Nf4Config`` (and, after ``install()``, for
    ``BitsAndBytesConfig(load_in_4bit=True)`` and bnb-4bit checkpoints)."""

    requires_calibration = False
    serialized_names = {"weight": SERIALIZED_WEIGHT}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if isinstance(quantization_config, Nf4Config):
            self.settings = quantization_config.settings()
            self.patch = quantization_config.patch
        elif isinstance(quantization_config, BitsAndBytesConfig):
            self.settings = _bnb_settings(quantization_config)
            self.patch = _patch_installed
        else:
            raise TypeError(f"nf4's quantizer takes an Nf4Config or a BitsAndBytesConfig, got "
                            f"{type(quantization_config).__name__}")
        self.modules_to_not_convert: list[str] = []

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("nf4 keeps 4-bit weights on a device or the CPU; device_map places some on 'disk'")

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        s = self.settings
        # Nf4Config's skip_modules add to the defaults (the output head); bnb's replace them.
        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, s.skip_modules, getattr(model, "_keep_in_fp32_modules", None) or [],
            add_default_skips=isinstance(config, Nf4Config) and not config._from_bnb)
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear or not should_convert_module(name, self.modules_to_not_convert):
                continue
            new = Linear4bit(module.in_features, module.out_features, module.bias is not None,
                             compute_dtype=s.compute_dtype, compress_statistics=s.compress_statistics,
                             quant_type=s.quant_type, quant_storage=s.quant_storage, device="meta",
                             blocksize=s.blocksize)
            if self.pre_quantized:
                # The checkpoint holds bytes: the placeholder says so, so nothing casts them.
                new.weight.data = new.weight.data.to(torch.uint8)
            new.requires_grad_(False)
            model.set_submodule(name, new)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, QuantLinear4bit) and name == "weight"

    def get_quantize_ops(self):
        return _Quantize(self)

    def get_weight_conversions(self):
        if not self.pre_quantized:
            return []
        return [WeightConverter(source_patterns=list(SERIALIZED_WEIGHT), target_patterns="weight",
                                operations=[_Deserialize(self)])]

    def get_load_operations(self) -> dict:
        return {"deserialize": _Deserialize}

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.is_loaded_in_4bit = True
        model.is_4bit_serializable = True
        # See Note: num_parameters of a 4-bit model.
        model.num_parameters = types.MethodType(_num_parameters, model)
        config = self.quantization_config
        if isinstance(config, Nf4Config) and not config._from_bnb and self.settings.skip_modules is not None:
            # A saved config lists every module left in high precision: bnb's loader reads the
            # list as complete (it would otherwise make the output head 4-bit too).
            c = self.quantization_config
            self.quantization_config = model.config.quantization_config = Nf4Config(
                c.quant_type, c.compress_statistics, c.compute_dtype, c.blocksize,
                sorted(self.modules_to_not_convert), c.patch)
        # See Note: saving a model loaded from 4-bit bytes.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions
                                         if not any(isinstance(op, _Deserialize) for op in getattr(c, "operations", ()))]
        unquantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear4bit) and not m.quantized]
        if unquantized:
            raise ValueError(f"{len(unquantized)} layer(s) got no weight from the checkpoint, e.g. {unquantized[:3]}")
        nf4.peft.enable_if_available()
        if self.patch:
            from nf4 import models  # needs Triton: imported only when asked for
            models.patch(model)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear4bit):
                weight = module.dequantize()
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   device=weight.device, dtype=dtype or weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                model.set_submodule(name, linear)
        return model


def _register() -> None:
    # transformers refuses a second registration of a name: an entry from an earlier import of
    # this module (importlib.reload) is replaced by this one's classes.
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not Nf4Config:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(Nf4Config)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not Nf4HfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(Nf4HfQuantizer)


_register()
# Wrapped once: a reload of this module wraps transformers' own function again, not its wrapper.
_merge = getattr(AutoHfQuantizer, "merge_quantization_configs", None)
if _merge is not None:
    AutoHfQuantizer.merge_quantization_configs = _merge_configs(getattr(_merge, "_nf4_wrapped", _merge))
nf4.peft.enable_if_available()

# transformers' quantizer for BitsAndBytesConfig(load_in_4bit=True) while install() is in effect.
_replaced: Optional[type] = None
# install(patch=...): whether models loaded from a BitsAndBytesConfig get nf4.models.patch.
_patch_installed = False


def install(patch: bool = False) -> None:
    """Serve bitsandbytes 4-bit configs and checkpoints with nf4 (no bitsandbytes needed).

    Exactly one registry entry changes: ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING
    ["bitsandbytes_4bit"]`` (the quantizer transformers picks for ``BitsAndBytesConfig(
    load_in_4bit=True)``, passed in or read from a checkpoint's ``config.json``) becomes
    ``nf4.hf.Nf4HfQuantizer``. The config class stays transformers' ``BitsAndBytesConfig``, so a
    saved folder is still a bitsandbytes one. 8-bit (``load_in_8bit``) is untouched. peft is made
    to wrap nf4's layers (``nf4.peft.enable``). Idempotent; ``uninstall()`` undoes it. Models
    loaded meanwhile keep nf4's layers.

    Served: ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``, ``bnb_4bit_compute_dtype``,
    ``bnb_4bit_quant_storage``, ``llm_int8_skip_modules``; block size 64 as in bitsandbytes.

    ``patch=True``: models loaded this way also get ``nf4.models.patch`` (as ``Nf4Config(patch=
    True)``); a later ``install()`` sets it again (False by default).
    """
    global _replaced, _patch_installed
    _check_patch(patch)
    _patch_installed = patch
    if _replaced is None:
        _replaced = AUTO_QUANTIZER_MAPPING[BNB_4BIT_KEY]
        AUTO_QUANTIZER_MAPPING[BNB_4BIT_KEY] = Nf4HfQuantizer
    nf4.peft.enable_if_available()


def uninstall() -> None:
    """Undo ``install()``: transformers' bitsandbytes 4-bit quantizer again (``nf4.peft.enable``
    stays: it changes nothing for layers that are not nf4's)."""
    global _replaced, _patch_installed
    _patch_installed = False
    if _replaced is not None:
        AUTO_QUANTIZER_MAPPING[BNB_4BIT_KEY] = _replaced
        _replaced = None


def installed() -> bool:
    return _replaced is not None
