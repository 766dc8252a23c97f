"""Modules: the QLoRA layer ``QuantLinear4bit`` and bitsandbytes-compatible names.

    layer = nf4.nn.QuantLinear4bit.from_linear(linear, lora_rank=16, lora_alpha=32)
    y = layer(x)            # x W^T + b + (alpha / r) * dropout(x) A^T B^T, W in 4 bits
    layer.merge()           # a float nn.Linear with the adapter folded in

``Params4bit``, ``Linear4bit``, ``LinearNF4`` and ``LinearFP4`` take bitsandbytes' constructor
arguments and produce and accept its ``state_dict`` keys::

    weight                                    packed uint8 [ceil(out*in/2), 1]
    weight.absmax, weight.quant_map           (+ weight.nested_absmax, weight.nested_quant_map)
    weight.quant_state.bitsandbytes__nf4      uint8 UTF-8 JSON (shape, blocksize, dtype, ...)
    bias
    lora_A, lora_B                            only when lora_rank > 0

The module holds state only; the maths is ``nf4.autograd.QuantLoraLinear``.

Note: when quantization happens.
    As in bitsandbytes, a float weight is quantized the first time it reaches a device: at
    construction when ``device`` names one, at ``.to(device)``/``.cuda()``/``.cpu()`` when it was
    built without one, or eagerly in ``from_linear``/``quantize_weight_``. A layer built with no
    device and used before any move quantizes on the input's device at its first forward. Once
    quantized, moving the layer moves the packed bytes and its ``QuantState`` (in place, as
    bitsandbytes does) and never quantizes again; ``.to(dtype)`` leaves the packed bytes alone.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Optional

import torch
from torch import nn

from nf4 import codebook, functional
from nf4.autograd import dropout_mask, lora_linear, quant_lora_linear, resolve_dtypes
from nf4.quant_state import QuantState, check_blocksize, check_float_dtype
from nf4.weight import check_storage_dtype, eager, packed_weight

__all__ = ["QuantLinear4bit", "Params4bit", "Linear4bit", "LinearNF4", "LinearFP4"]


class Params4bit(nn.Parameter):
    """A frozen weight that is either a float [out, in] tensor awaiting quantization or the
    packed 4-bit bytes ``[ceil(n/2) / itemsize(quant_storage), 1]`` with ``.quant_state``.

    bitsandbytes' constructor (``quant_type="fp4"`` by default, as there). Attributes:
    ``quant_state`` (None until quantized), ``blocksize``, ``compress_statistics``,
    ``quant_type``, ``quant_storage``, ``bnb_quantized`` (True once the data are packed),
    ``module`` (optional owner whose ``quant_state`` is kept in sync).
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = False,
                quant_state: Optional[QuantState] = None, blocksize: int = 64,
                compress_statistics: bool = True, quant_type: str = "fp4",
                quant_storage: torch.dtype = torch.uint8, module: Optional[nn.Module] = None,
                bnb_quantized: bool = False) -> "Params4bit":
        if data is None:
            data = torch.empty(0)
        blocksize = 64 if blocksize is None else blocksize
        check_blocksize(blocksize)
        codebook.check_quant_type(quant_type)
        check_storage_dtype(quant_storage)
        if quant_state is not None and not isinstance(quant_state, QuantState):
            raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict, requires_grad: bool = False,
                          device="cuda", module: Optional[nn.Module] = None) -> "Params4bit":
        """Wrap packed bytes and their serialized state (``weight.*`` keys without the prefix,
        as ``QuantState.from_dict`` takes them), both moved to ``device``. Validated."""
        quant_state = QuantState.from_dict(quantized_stats, device=device)
        self = cls(data.to(device), requires_grad, quant_state, quant_state.blocksize, quant_state.nested,
                   quant_state.quant_type, data.dtype, module, bnb_quantized=True)
        packed_weight(self, quant_state)  # checked now, cached for the calls: See Note: validate once
        if module is not None:
            module.quant_state = quant_state
        return self

    def _quantize(self, device: torch.device) -> "Params4bit":
        w = self.data.contiguous().to(device)
        packed, state = functional.quantize_4bit(w, blocksize=self.blocksize,
                                                 compress_statistics=self.compress_statistics,
                                                 quant_type=self.quant_type,
                                                 quant_storage=self.quant_storage)
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        packed_weight(self, state)
        if self.module is not None:
            self.module.quant_state = state
        return self

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return self._quantize(device)
        if self.bnb_quantized:
            dtype = None  # packed bytes are never cast: See Note: when quantization happens.
            if self.quant_state is not None and device is not None:
                self.quant_state.to(device)
        moved = torch.Tensor.to(self.data, device=device, dtype=dtype, non_blocking=non_blocking)
        return Params4bit(moved, self.requires_grad, self.quant_state, self.blocksize,
                          self.compress_statistics, self.quant_type, self.quant_storage,
                          self.module, self.bnb_quantized)

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self):
        return self.to(device="cpu")

    def __reduce_ex__(self, protocol):
        # Pickling (torch.save of a module, multiprocessing) keeps the class and its attributes;
        # nn.Parameter's own reduction would rebuild a plain Parameter, whose next cast would
        # then convert the packed bytes as if they were numbers.
        return (_rebuild_params4bit, (self.data, self.requires_grad, self.quant_state, self.blocksize,
                                      self.compress_statistics, self.quant_type, self.quant_storage,
                                      self.bnb_quantized))

    def __deepcopy__(self, memo):
        new = Params4bit(self.data.clone(), self.requires_grad, copy.deepcopy(self.quant_state, memo),
                         self.blocksize, self.compress_statistics, self.quant_type,
                         self.quant_storage, copy.deepcopy(self.module, memo), self.bnb_quantized)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        if not self.bnb_quantized:
            return f"Params4bit(float {list(self.shape)} {self.dtype}, not yet quantized, {self.device})"
        return f"Params4bit({self.quant_state!r}, packed {list(self.shape)} {self.dtype})"

    def __copy__(self):
        """A new ``Params4bit`` over the same data and the same ``quant_state`` (bnb's shallow copy;
        ``torch.Tensor``'s default would return a plain ``Parameter`` without the state)."""
        return Params4bit(self.data, self.requires_grad, self.quant_state, self.blocksize,
                          self.compress_statistics, self.quant_type, self.quant_storage, self.module,
                          self.bnb_quantized)

    # bitsandbytes' views of the quantization state as attributes of the weight (its 0.50 names,
    # properties rather than __getattr__ so torch.compile traces them); AttributeError before the
    # weight is quantized, or for the nested_* names without double quantization.
    def _state_field(self, name: str, nested: bool = False):
        state = self.__dict__.get("quant_state")
        if state is None or (nested and state.state2 is None):
            raise AttributeError(f"'Params4bit' object has no attribute {name!r}"
                                 + (" (not quantized)" if state is None else " (no double quantization)"))
        return state.state2 if nested else state

    absmax = property(lambda self: self._state_field("absmax").absmax)
    code = property(lambda self: self._state_field("code").code)
    quant_map = property(lambda self: self._state_field("quant_map").code)
    offset = property(lambda self: self._state_field("offset").offset)
    state2 = property(lambda self: self._state_field("state2").state2)
    nested_absmax = property(lambda self: self._state_field("nested_absmax", True).absmax)
    nested_blocksize = property(lambda self: self._state_field("nested_blocksize", True).blocksize)
    nested_quant_map = property(lambda self: self._state_field("nested_quant_map", True).code)
    nested_dtype = property(lambda self: self._state_field("nested_dtype", True).dtype)
    nested_offset = property(lambda self: self._state_field("nested_offset").offset)


def _rebuild_params4bit(data, requires_grad, quant_state, blocksize, compress_statistics, quant_type,
                        quant_storage, bnb_quantized) -> Params4bit:
    return Params4bit(data, requires_grad, quant_state, blocksize, compress_statistics, quant_type,
                      quant_storage, bnb_quantized=bnb_quantized)


class QuantLinear4bit(nn.Module):
    """A linear layer with a frozen 4-bit weight and an optional trainable LoRA adapter.

    ``y = x W^T + b + scaling * dropout(x) A^T B^T``, computed in ``compute_dtype`` (the input's
    dtype when None; the autocast dtype under autocast), returned in the input's dtype (the
    autocast dtype under autocast, as ``nn.Linear`` does).

    Args:
        in_features, out_features: the weight is [out_features, in_features].
        bias: whether there is a (frozen) bias.
        compute_dtype: float16, bfloat16, float32 or None (follow the input).
        quant_type: ``"nf4"`` or ``"fp4"``; blocksize: 32..4096, a power of two;
        compress_statistics: double quantization of the absmax values.
        lora_rank: r; 0 disables the adapter. lora_alpha: scaling = lora_alpha / r (None: r).
        lora_dropout: dropout probability on the adapter's input in training mode.
        device: None (CPU, quantized on the first move), ``"meta"`` (nothing allocated) or a
            device (quantized there at once). See Note: when quantization happens.

    Attributes:
        weight: ``Params4bit``, frozen, carrying ``.quant_state``.
        bias: frozen ``Parameter`` [out] or None.
        lora_A: trainable [r, in] float32, Kaiming-uniform (as ``nn.Linear`` initializes weights).
        lora_B: trainable [out, r] float32, zeros (the adapter starts as a no-op).
        scaling: ``lora_alpha / r``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = torch.bfloat16, quant_type: str = "nf4",
                 blocksize: int = 64, compress_statistics: bool = True, lora_rank: int = 0,
                 lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, device=None,
                 quant_storage: torch.dtype = torch.uint8):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank must be a non-negative int, got {lora_rank!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if compute_dtype is not None:
            check_float_dtype(compute_dtype, "compute_dtype")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        self.scaling = self.lora_alpha / lora_rank if lora_rank else 0.0
        self.lora_dropout = float(lora_dropout)
        device = None if device is None else torch.device(device)
        self.weight = Params4bit(torch.empty(out_features, in_features, device=device),
                                 requires_grad=False, blocksize=blocksize,
                                 compress_statistics=compress_statistics, quant_type=quant_type,
                                 quant_storage=quant_storage)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if lora_rank:
            self.lora_A = nn.Parameter(torch.empty(lora_rank, in_features, device=device))
            self.lora_B = nn.Parameter(torch.empty(out_features, lora_rank, device=device))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        if device is None or device.type != "meta":
            self._init_base()
            if device is not None:
                self.weight._quantize(device)
        self.reset_lora_parameters()

    # ------------------------------------------------------------------ construction
    def _init_base(self) -> None:
        """nn.Linear's initialization of a fresh float weight and bias."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight.data, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear4bit":
        """Quantize ``linear``'s weight now, on its device; the bias is copied (frozen) and the
        adapter created there. ``kwargs`` are the constructor's (``device`` is not accepted)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if "device" in kwargs:
            raise TypeError("from_linear places the layer on linear.weight.device; do not pass device")
        device = linear.weight.device
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", **kwargs)
        layer.quantize_weight_(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if layer.lora_rank:
            layer.lora_A = nn.Parameter(torch.empty_like(layer.lora_A, device=device))
            layer.lora_B = nn.Parameter(torch.empty_like(layer.lora_B, device=device))
            layer.reset_lora_parameters()
        return layer

    def reset_lora_parameters(self) -> None:
        """(Re)initialize the adapter in place: A Kaiming-uniform like nn.Linear, B zeros."""
        if not self.lora_rank:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def load_quantized(self, packed: torch.Tensor, quant_state: QuantState) -> None:
        """Install a pre-quantized weight (kept on ``packed``'s device, not copied).

        ``quant_state.shape`` must be (out_features, in_features) and the state must fit
        ``packed`` (size, devices); otherwise ValueError/TypeError and the layer is unchanged.
        """
        if not isinstance(quant_state, QuantState):
            raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
        expected = (self.out_features, self.in_features)
        if quant_state.shape is None or tuple(quant_state.shape) != expected:
            raise ValueError(f"quant_state.shape is {None if quant_state.shape is None else tuple(quant_state.shape)}, "
                             f"expected {expected} (out_features, in_features)")
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
        weight = Params4bit(packed.detach().reshape(-1, 1), False, quant_state, quant_state.blocksize,
                            quant_state.nested, quant_state.quant_type, packed.dtype, bnb_quantized=True)
        packed_weight(weight, quant_state)  # checked now, cached for the calls: See Note: validate once
        self.weight = weight

    def quantize_weight_(self, weight: torch.Tensor, check_finite: bool = True) -> None:
        """Quantize a float [out_features, in_features] weight on its own device into the layer
        (NaN or Inf refused unless the caller checked already: ``quantize_4bit``'s ``check_finite``)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected "
                             f"{(self.out_features, self.in_features)} (out_features, in_features)")
        check_float_dtype(weight.dtype, "weight.dtype")
        w = self.weight
        packed, state = functional.quantize_4bit(weight.detach(), blocksize=w.blocksize,
                                                 compress_statistics=w.compress_statistics,
                                                 quant_type=w.quant_type, quant_storage=w.quant_storage,
                                                 check_finite=check_finite)
        self.load_quantized(packed, state)

    # ------------------------------------------------------------------ state
    @property
    def quant_state(self) -> Optional[QuantState]:
        return self.weight.quant_state

    @quant_state.setter
    def quant_state(self, state: Optional[QuantState]) -> None:
        self.weight.quant_state = state

    @property
    def quantized(self) -> bool:
        return self.weight.bnb_quantized

    def dequantize(self) -> torch.Tensor:
        """The base weight decoded to a float [out, in] tensor in the original weight's dtype."""
        self._require_quantized("dequantize")
        return functional.dequantize_4bit(self.weight, self.weight.quant_state)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A float ``nn.Linear`` (the original weight's dtype and device) computing the same
        function as this layer in eval mode: ``W + scaling * B A`` (summed in float32), ``b``."""
        self._require_quantized("merge")
        W = self.dequantize()
        dtype = W.dtype
        merged = W.float()
        if self.lora_rank:
            merged.addmm_(self.lora_B.float(), self.lora_A.float(), alpha=self.scaling)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=W.device, dtype=dtype)
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def _require_quantized(self, what: str) -> None:
        if not self.weight.bnb_quantized:
            raise RuntimeError(f"{what}() needs a quantized weight; move the layer to a device "
                               f"(.to(device)) or call quantize_weight_ first")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self.weight.quant_state
        if self.weight.bnb_quantized and state is not None:
            for k, v in state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        qkeys = [k for k in state_dict if k.startswith(wkey + ".")]
        # The default loader would copy_ ``weight`` (its shape differs between the float and the
        # packed form); it loads everything else while the weight is hidden from it.
        params = self._parameters
        for name in ("bias", "lora_A", "lora_B"):
            # A layer built on meta takes these tensors as they come (assign), as it does the weight.
            p, key = params.get(name), prefix + name
            if p is not None and p.is_meta and key in state_dict:
                value = state_dict[key].detach()
                params[name] = nn.Parameter(value.to(dtype=p.dtype, copy=True), requires_grad=p.requires_grad)
        saved = dict(params)
        del params["weight"]
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            params.clear()
            params.update(saved)
        ours = {wkey, *qkeys}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]
        if wkey not in state_dict:
            if strict:
                missing_keys.append(wkey)
            return
        value = state_dict[wkey]
        if qkeys:
            stats = {k[len(wkey) + 1:]: state_dict[k] for k in qkeys}
            device = self.weight.device if self.weight.device.type != "meta" else value.device
            state = QuantState.from_dict(stats, device=device)
            try:
                self.load_quantized(value.detach().to(device), state)
            except ValueError as e:
                error_msgs.append(f"while loading {wkey}: {e}")
            return
        expected = (self.out_features, self.in_features)
        if tuple(value.shape) != expected:
            error_msgs.append(f"size mismatch for {wkey}: copying a param with shape "
                              f"{tuple(value.shape)}, the float weight of this layer is {expected}")
            return
        if self.weight.bnb_quantized:
            self.quantize_weight_(value.to(self.weight.device))
        elif self.weight.device.type == "meta":
            self.weight.data = value.detach().clone()
        else:
            with torch.no_grad():
                self.weight.data.copy_(value)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The hot path (See Note: validate once in nf4/weight.py): the weight checked when it
        # was built, still current, and an input whose type, dtype, width and device fit it.
        # Everything else, first calls included, takes _forward_checked.
        params = self._parameters
        weight = params["weight"]
        state = getattr(weight, "quant_state", None)
        w = state._packed_weight if state is not None else None
        if (w is None or not eager(x) or not w.current(weight) or not x.dtype.is_floating_point
                or x.shape[-1] != w.in_features or x.get_device() != w.device_index
                or (w.device_index < 0 and x.is_meta)):
            return self._forward_checked(x)
        compute_dtype, out_dtype = resolve_dtypes(x, self.compute_dtype)
        lora_A = params["lora_A"]
        mask, dropout_scale = None, 1.0
        if lora_A is not None and self.training and self.lora_dropout > 0:
            mask, dropout_scale = dropout_mask(x, self.lora_dropout), 1.0 / (1.0 - self.lora_dropout)
        return lora_linear(x, w, weight, params["bias"], lora_A, params["lora_B"], self.scaling, mask,
                           dropout_scale, compute_dtype, out_dtype)

    def _forward_checked(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with every check: the input, parameters left on the meta device, a weight
        still to be quantized (See Note: when quantization happens); then the weight is checked
        and cached (eager calls) or the traced maths runs (``quant_lora_linear``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {list(x.shape)}, expected last dimension "
                             f"{self.in_features} (in_features)")
        params = self._parameters
        meta = [n for n in ("weight", "bias", "lora_A", "lora_B")
                if params.get(n) is not None and params[n].is_meta]
        if meta:
            # A custom op given a meta tensor runs its fake kernel and returns garbage, silently.
            raise RuntimeError(f"parameters {meta} are still on the meta device: load them "
                               f"(load_state_dict / load_quantized) or materialize them with "
                               f"to_empty() + reset_lora_parameters() before calling the layer")
        weight = params["weight"]
        if not weight.bnb_quantized:
            # See Note: when quantization happens.
            weight._quantize(x.device)
            if self.bias is not None and self.bias.device != x.device:
                self.bias = nn.Parameter(self.bias.data.to(x.device), requires_grad=False)
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device}, the layer's weight on {weight.device}")
        compute_dtype, out_dtype = resolve_dtypes(x, self.compute_dtype)
        mask = None
        if self.lora_rank and self.training and self.lora_dropout > 0:
            mask = dropout_mask(x, self.lora_dropout)
        return quant_lora_linear(x, weight, weight.quant_state, self.bias, params.get("lora_A"),
                                 params.get("lora_B"), self.scaling, mask, self.lora_dropout,
                                 compute_dtype, out_dtype)

    def _apply(self, fn, recurse: bool = True):
        # Module.to / cuda / half / float / to_empty reach parameters through _apply(fn). The
        # packed bytes are never cast (See Note: when quantization happens): fn is applied to an
        # empty probe of the weight's dtype and device to learn where it sends tensors, and the
        # weight (with its QuantState) only moves there. The other parameters take fn as usual.
        weight = self._parameters.get("weight")
        if not isinstance(weight, Params4bit) or not weight.bnb_quantized or weight.is_meta:
            return super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        del self._parameters["weight"]
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight.to(probe.device) if probe.device != weight.device else weight
        return self

    def extra_repr(self) -> str:
        w = self.weight
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, quant_type={w.quant_type}, blocksize={w.blocksize}, "
             f"compute_dtype={self.compute_dtype}")
        if self.lora_rank:
            s += f", lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}"
        return s

    # ------------------------------------------------------------------ bitsandbytes' attributes
    @property
    def quant_storage(self) -> torch.dtype:
        """The dtype the packed bytes are viewed as (bnb's ``Linear4bit.quant_storage``)."""
        return self.weight.quant_storage

    def set_compute_type(self, x: torch.Tensor) -> None:
        """bnb's rule for a layer built with ``compute_dtype=None``: an fp32 or bf16 input sets the
        compute dtype to its own; an fp16 input keeps the configured one (warning when that is
        None or fp32, which bnb flags as slow)."""
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        elif x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32):
            warnings.warn("input to Linear4bit is float16 but compute_dtype is "
                          f"{self.compute_dtype}; compute_dtype=torch.float16 is faster")


class Linear4bit(nn.Linear, QuantLinear4bit):
    """bitsandbytes' ``Linear4bit`` signature (no adapter; ``compute_dtype=None`` follows the input).

    Note: why Linear4bit is an nn.Linear.
        bitsandbytes' ``Linear4bit`` subclasses ``nn.Linear``, and the ecosystem relies on it: peft's
        ``target_modules="all-linear"`` and transformers' module utilities look for ``nn.Linear``.
        So does this one; only ``QuantLinear4bit``'s state and maths are used (``nn.Linear.__init__``
        never runs: ``QuantLinear4bit.__init__`` is next in line after it in the MRO, and
        ``forward``/``extra_repr``/``reset_parameters`` are pinned to QuantLinear4bit's below).
        ``blocksize`` is keyword-only and nf4's own (bnb fixes 64 here).
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8, device=None,
                 *, blocksize: int = 64):
        QuantLinear4bit.__init__(self, input_features, output_features, bias=bias,
                                 compute_dtype=compute_dtype, quant_type=quant_type,
                                 blocksize=blocksize, compress_statistics=compress_statistics,
                                 device=device, quant_storage=quant_storage)

    forward = QuantLinear4bit.forward
    extra_repr = QuantLinear4bit.extra_repr

    def reset_parameters(self) -> None:
        """nn.Linear's initialization while the weight is still float; a packed weight is data,
        not something to re-draw (transformers' init hooks reach this through nn.Linear)."""
        if not self.weight.bnb_quantized and self.weight.device.type != "meta":
            self._init_base()


class LinearNF4(Linear4bit):
    """``Linear4bit`` with ``quant_type="nf4"`` (bitsandbytes' signature)."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics,
                         "nf4", quant_storage, device)


class LinearFP4(Linear4bit):
    """``Linear4bit`` with ``quant_type="fp4"`` (bitsandbytes' signature)."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_storage: torch.dtype = torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics,
                         "fp4", quant_storage, device)
