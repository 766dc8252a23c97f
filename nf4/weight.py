"""One 4-bit weight as the hot path sees it: checked once, then called many times.

    w = packed_weight(packed, quant_state)      # validated, cached on quant_state
    y = w.matmul(x, bias)                        # x [..., in] -> [..., out], no autograd
    W = w.dequantize(torch.bfloat16)             # [out, in]

``PackedWeight`` gathers what used to travel as ten positional values (packed bytes, absmax, the
nested state, block sizes, quant type, shape) into one object, checked when it is built, and
holds the CUDA extension's ``QuantWeight`` (the same values as one struct of device pointers) and
the route (backend, kernel, config) for each token count it has seen.

Note: validate once.
    A weight's metadata is checked when a ``PackedWeight`` is built: by ``QuantState.validate``
    (sizes, dtypes, devices of every state tensor against the packed bytes) plus the alignment
    and contiguity the kernels need. It is built on first use and again whenever the weight may
    have changed, which is detected without re-checking:
      - any field of the ``QuantState`` (or of its nested ``state2``) assigned, as ``.to()``,
        loading and FSDP's resharding do: ``QuantState.__setattr__`` drops the cached weight;
      - the packed tensor replaced (``param.data = ...``, ``set_``, ``resize_``) or viewed
        differently: each call compares its data pointer, byte count and contiguity with the
        ones that were checked (``current``).
    The cached weight holds its own references to the tensors it checked, so memory it points at
    cannot be freed under it, and a tensor replaced by an attribute assignment is released with
    the cache. What is not detected: a state tensor's storage swapped through ``.data =``
    without assigning the field (assign the field instead); its values are then stale, never
    out of bounds (the old storage stays alive and keeps its size).

Note: eager calls skip the op dispatch.
    ``torch.ops.nf4.*`` custom ops cost ~40 µs of Python per call (torch.library's dispatch,
    autograd wrapper and redispatch), more than a 1-token kernel runs. Eager calls on plain
    tensors therefore launch through the ``PackedWeight`` directly: the CUDA extension with one
    struct and a dozen integers, or the Triton/reference backend's function. Traced calls
    (``torch.compile``, FakeTensor, tensor subclasses such as FSDP's DTensor) keep the ops, which
    have fake implementations and autograd formulas.

    Measured on the H200 machine (host µs per call, 1 token, 4096x4096 bf16, an eager loop the
    GPU waits on; F.linear 18.9 in the same run): ``nf4.matmul_4bit`` 100 at d3a16ab (custom op,
    state checked per call) -> 15.4; ``QuantLinear4bit`` without adapter 80 -> 17.3;
    bitsandbytes' ``matmul_4bit`` 32.1 and ``Linear4bit`` 40.2. What is left is the user's own
    ``packed.t()`` (1.5), the output allocation (3), the launch through pybind11 (5.5) and the
    freshness and input checks (~3). Registering the ops with PyTorch's C++ dispatcher was the
    other option; it was not taken because the extension would then have to be built against
    one torch's C++ ABI (today one build serves torch 2.11 and 2.13, since it includes no torch
    header), while the direct call already costs less than ``F.linear``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from nf4 import backends, codebook
from nf4.quant_state import QuantState

# The dtypes a matmul input may have, and their codes in the CUDA extension (csrc/common.cuh).
MATMUL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Routes remembered per weight: a decode step and a training step each see a few token counts;
# variable-length batches see many, and the dictionary must not grow with a run's length.
_MAX_ROUTES = 64
# Bytes the kernels load at a time from x and the packed weight (the wgmma kernel's TMA copies
# need 16); a view at another offset is copied to aligned memory.
_ALIGN = 16


# The dtypes packed bytes may be stored as (``quant_storage``): uint8, or a type of 1, 2 or 4 bytes
# that FSDP or a checkpoint viewed them as. bool would reinterpret bytes as 0/1, and 8-byte types
# cannot hold an odd number of 4-byte words.
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16,
                  torch.float32)


def check_storage_dtype(dtype) -> None:
    if dtype not in STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be one of {[str(d) for d in STORAGE_DTYPES]}, got {dtype!r}")


def as_uint8(packed: torch.Tensor) -> torch.Tensor:
    """The bytes of a packed weight as a flat uint8 tensor, whatever storage dtype (``STORAGE_DTYPES``)
    viewed them; other dtypes raise TypeError."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed weight must be a tensor, got {type(packed).__name__}")
    if packed.dtype == torch.uint8:
        return packed.reshape(-1)
    check_storage_dtype(packed.dtype)
    return packed.contiguous().reshape(-1).view(torch.uint8)


_PLAIN_TORCH_FUNCTION = torch._C._disabled_torch_function_impl


def eager(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` may launch directly (See Note: eager calls skip the op dispatch):
    a plain tensor or parameter (``nn.Parameter``, ``Params4bit``) outside ``torch.compile``;
    FakeTensors, DTensors and other subclasses take the ``torch.ops.nf4`` ops."""
    cls = type(t)
    return ((cls is torch.Tensor or cls.__torch_function__ is _PLAIN_TORCH_FUNCTION)
            and not torch.compiler.is_compiling())


def kernel_tensors(packed, absmax, nested_absmax, nested_code, offset):
    """A weight's tensors as the kernels read them: contiguous, the packed bytes 16-byte aligned
    (the kernels read 8 bytes at a time, the wgmma kernel's TMA 16), the offset one element; the
    nested three None without double quantization. Tensors already so are returned as they are."""
    packed = packed.contiguous()
    if packed.data_ptr() % _ALIGN:
        packed = packed.clone()
    if nested_absmax is None:
        return packed, absmax.contiguous(), None, None, None
    return (packed, absmax.contiguous(), nested_absmax.contiguous(), nested_code.contiguous(),
            offset.reshape(1).contiguous())


def _check_storage(t: torch.Tensor, name: str) -> None:
    """A tensor's memory must hold its elements: FSDP frees an unsharded parameter's storage
    (resizing it to 0 bytes) while the tensor keeps its shape, and a kernel reading it then reads
    freed memory."""
    if t.is_meta or not t.numel():
        return
    need = (t.storage_offset() + t.numel()) * t.element_size()
    have = t.untyped_storage().nbytes()
    if have < need:
        raise ValueError(f"the {name}'s memory holds {have} bytes but the tensor needs {need}: its "
                         f"storage was freed or shrunk (an FSDP-resharded parameter used outside its "
                         f"module's forward/backward?)")


class PackedWeight:
    """A validated 4-bit weight (see Note: validate once). Build it with ``packed_weight``.

    Attributes:
        packed: flat uint8 [ceil(numel / 2)], contiguous and 16-byte aligned (the checked bytes).
        state: the ``QuantState`` it was built from.
        args: ``(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
            quant_type, rows, cols)``, the backends' positional weight arguments, with (rows,
            cols) = shape for a 2-D weight and (1, numel) otherwise.
        shape, dtype, device: the decoded tensor's.
    """

    __slots__ = ("packed", "state", "args", "shape", "dtype", "device", "device_index",
                 "out_features", "in_features", "matrix", "_source", "_native", "_routes")

    def __init__(self, packed: torch.Tensor, state: QuantState):
        if not isinstance(state, QuantState):
            raise TypeError(f"quant_state must be a QuantState, got {type(state).__name__}")
        # detach(): a view of ``packed`` itself would reference its TensorImpl, and the packed
        # parameter holds this weight (``quant_state`` -> ``_packed_weight``): a cycle through C++
        # that Python's gc cannot see, which kept every quantized model's weights alive after
        # ``del model`` (3.6 GB a Llama-3-8B on the GPU, counted into the next model's memory).
        flat = as_uint8(packed.detach())
        state.validate(flat)
        codebook.check_levels(state.code, state.quant_type)
        s2 = state.state2
        named = [("packed weight", flat), ("absmax", state.absmax)]
        if state.nested:
            named += [("nested_absmax", s2.absmax), ("nested_quant_map", s2.code), ("nested_offset", state.offset)]
        for name, t in named:
            _check_storage(t, name)
        tensors = kernel_tensors(flat, state.absmax, *((s2.absmax, s2.code, state.offset) if state.nested
                                                      else (None, None, None)))
        flat = tensors[0]
        # Where the checked bytes came from; ``current`` compares a call's tensor with it. A
        # copy (a non-contiguous source, another storage dtype's view, a misaligned offset) has
        # no source: it is correct for this call only and never cached.
        self._source = (packed.data_ptr(), packed.nbytes) if flat.data_ptr() == packed.data_ptr() \
            and packed.is_contiguous() else None
        self.shape = tuple(state.shape)
        self.matrix = len(self.shape) == 2
        rows, cols = self.shape if self.matrix else (1, math.prod(self.shape))
        self.out_features, self.in_features = rows, cols
        self.packed = flat
        self.state = state
        self.args = (*tensors, state.blocksize, s2.blocksize if state.nested else 0, state.quant_type,
                     rows, cols)
        self.dtype = state.dtype
        self.device = flat.device
        self.device_index = flat.get_device()
        self._native = None
        self._routes = {}  # (tokens, dtype, forced backend) -> Route; ("dequantize", forced) -> module

    @property
    def cacheable(self) -> bool:
        return self._source is not None

    def current(self, packed: torch.Tensor) -> bool:
        """Whether ``packed`` is still the tensor this weight was checked against (same memory,
        same byte count, contiguous): the per-call freshness check of Note: validate once."""
        return (self._source is not None and packed.data_ptr() == self._source[0]
                and packed.nbytes == self._source[1] and packed.is_contiguous())

    # ---------------------------------------------------------------- routing
    def route(self, tokens: int, dtype: torch.dtype) -> backends.Route:
        """The route (backend, kernel, config) for ``tokens`` rows of ``dtype`` input, from
        ``backends.route``, remembered per (tokens, dtype, forced backend)."""
        key = (tokens, dtype, backends.forced())
        r = self._routes.get(key)
        if r is None:
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            if not self.matrix:
                raise ValueError(f"matmul needs a 2-D weight, the quant state's shape is {list(self.shape)}")
            r = backends.route(self.device, dtype, tokens, self.out_features, self.in_features,
                               self.state.blocksize)
            self._routes[key] = r
        return r

    def native(self):
        """The CUDA extension's ``QuantWeight`` for this weight (built once)."""
        if self._native is None:
            from nf4 import cuda_backend  # optional: only where the extension was built

            self._native = cuda_backend.native_weight(*self.args)
        return self._native

    # ---------------------------------------------------------------- compute
    def check_input(self, A: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """What a call checks: the input's type, dtype, last dimension and device (and bias)."""
        if not isinstance(A, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(A).__name__}")
        if A.dtype not in MATMUL_DTYPES:
            raise TypeError(f"input must be float16, bfloat16 or float32, got {A.dtype}")
        if A.dim() == 0 or A.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {list(A.shape)}, expected last dimension "
                             f"{self.in_features} (in_features)")
        index = A.get_device()
        if index != self.device_index or (index < 0 and A.device != self.device):
            raise ValueError(f"input is on {A.device}, the weight on {self.device}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a tensor, got {type(bias).__name__}")
            if bias.dim() != 1 or bias.shape[0] != self.out_features:
                raise ValueError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
            if bias.device != self.device:
                raise ValueError(f"bias is on {bias.device}, the weight on {self.device}")
            if not bias.dtype.is_floating_point:
                raise TypeError(f"bias must be a float tensor, got {bias.dtype}")

    def matmul(self, A: torch.Tensor, bias: Optional[torch.Tensor] = None,
               r: Optional[backends.Route] = None) -> torch.Tensor:
        """``A @ W.T + bias`` in A's dtype, without autograd; A checked by ``check_input``. ``r``:
        the route, when the caller looked it up already."""
        A2 = A if A.dim() == 2 else A.reshape(-1, self.in_features)
        tokens = A2.shape[0]
        if bias is not None and bias.dtype != A.dtype:
            bias = bias.to(A.dtype)
        if tokens == 0:
            y = A2.new_empty((0, self.out_features))
        else:
            if r is None:
                r = self.route(tokens, A.dtype)
            if r.kernel == "dequant":
                y = F.linear(A2, self.dequantize(A.dtype), bias)
            elif r.backend == "cuda":
                y = r.module.launch_matmul(self, A2, tokens, bias, r.config)
            else:
                y = r.module.matmul(A2, *self.args, bias, config=r.config)
        return y if A.dim() == 2 else y.view(*A.shape[:-1], self.out_features)

    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """The decoded weight in ``dtype`` (default: the state's), of the state's shape."""
        dtype = dtype or self.dtype
        key = ("dequantize", backends.forced())
        module = self._routes.get(key)
        if module is None:
            module = self._routes[key] = backends.resolve(self.device, "dequantize")
        if module is backends.cuda_module():
            return module.launch_dequantize(self, dtype, out)
        return module.dequantize(*self.args[:-2], list(self.shape), dtype, out=out)


def packed_weight(packed: torch.Tensor, state: QuantState) -> PackedWeight:
    """The validated ``PackedWeight`` of ``packed`` + ``state``: the one cached on ``state`` when
    it is still current, else a new one (checked now, and cached when it can be)."""
    w = state._packed_weight
    if w is not None and w.current(packed):
        return w
    w = PackedWeight(packed, state)
    if w.cacheable:
        state.__dict__["_packed_weight"] = w  # not through __setattr__, which drops it
    return w
