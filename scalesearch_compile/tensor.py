"""NVFP4 weights with searched block scales: stock torchao ``NVFP4Tensor`` objects built from them, and
``ScaleSearchNVFP4Tensor``, the same layout plus a record of how the linear quantizes its activations.

Layout (torchao's, unswizzled): ``qdata`` uint8 ``(..., K // 2)``, element 2i in the low nibble of byte i;
``scale`` float8_e4m3fn ``(..., K // 16)``; ``per_tensor_scale`` float32 0-d tensor or None;
``block_size`` 16; ``orig_dtype`` the input's dtype. The tensor dequantizes to
``e2m1_value(code) * (per_tensor_scale * scale)``, exactly :meth:`NVFP4Blocks.dequantize`.

Importing this module allow-lists ``ScaleSearchNVFP4Tensor`` and ``NVFP4ActivationKwargs`` for
``torch.load(weights_only=True)`` and for torchao's safetensors helpers (which transformers saves through).
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
from torchao.prototype.mx_formats.utils import from_blocked
from torchao.prototype.safetensors.safetensors_utils import ALLOWED_CLASSES, ALLOWED_TENSORS_SUBCLASSES
from torchao.quantization.quantize_.common import QuantizeTensorKwargs
from torchao.utils import TorchAOBaseTensor

from scalesearch_compile.search import (
    BLOCK_SIZE,
    DEFAULT_WINDOW,
    NVFP4Blocks,
    PerTensorScale,
    check_method,
    check_window,
    quantize_blocks,
)


def blocks_to_nvfp4_tensor(blocks: NVFP4Blocks, orig_dtype: torch.dtype) -> NVFP4Tensor:
    """Pack ``blocks`` into a stock torchao ``NVFP4Tensor`` (2-D or 3-D), as torchao's GPTQ code does."""
    if blocks.qdata.dim() not in (2, 3):
        raise ValueError(f"NVFP4Tensor holds 2-D or 3-D tensors, got {blocks.qdata.dim()}-D")
    return NVFP4Tensor(
        blocks.qdata,
        blocks.scale_codes.view(torch.float8_e4m3fn),
        BLOCK_SIZE,
        orig_dtype,
        per_tensor_scale=blocks.per_tensor_scale,
    )


def nvfp4_tensor_to_blocks(tensor: NVFP4Tensor) -> NVFP4Blocks:
    """Unpack an unswizzled, untransposed ``NVFP4Tensor``; offsets are unknown there and returned as zeros."""
    if tensor.is_swizzled_scales:
        raise ValueError("swizzled NVFP4Tensor scales are not supported here; build it with is_swizzled_scales=False")
    if tensor.qdata.stride(-2) < tensor.qdata.stride(-1):
        raise ValueError("a transposed NVFP4Tensor cannot be unpacked; unpack the tensor before .t()")
    scale_codes = tensor.scale.view(torch.uint8)
    return NVFP4Blocks(
        tensor.qdata,
        scale_codes,
        tensor.per_tensor_scale,
        torch.zeros(scale_codes.shape, dtype=torch.int16, device=scale_codes.device),
    )


def quantize_nvfp4(
    x: torch.Tensor,
    method: str = "search",
    *,
    window: Sequence[int] = DEFAULT_WINDOW,
    per_tensor_scale: PerTensorScale = True,
    importance: torch.Tensor | None = None,
) -> NVFP4Tensor:
    """Quantize a 2-D or 3-D float tensor to a torchao ``NVFP4Tensor`` with block scales chosen by ``method``.

    ``method``: "search" (E4M3 codes at ``window`` offsets around amax/6, lowest block error wins; default
    -2..+6), "amax" (torchao's numbers bit for bit), "four_over_six" or "exhaustive" (all 126 codes).
    ``per_tensor_scale``: True (default) uses torchao's two-level scaling with ``amax / (448 * 6)``; a
    one-element tensor is used as given; None for single-level scaling. ``importance``: optional
    per-input-channel weights of shape (K,) for the block error (e.g. the mean of x**2 of calibration
    activations), so the search minimises the layer's output error instead of the weight error.
    """
    blocks = quantize_blocks(x, method, window=window, per_tensor_scale=per_tensor_scale, importance=importance)
    return blocks_to_nvfp4_tensor(blocks, x.dtype)


@dataclass(frozen=True)
class NVFP4ActivationKwargs(QuantizeTensorKwargs):
    """How a linear quantizes its activations at run time (W4A4): NVFP4 blocks of 16 along K, block scales
    chosen by ``method`` over E4M3 code offsets ``window`` (as :func:`quantize_blocks`), and a dynamic
    per-tensor scale ``amax(x) / (448 * 6)`` computed from each input."""

    method: str = "search"
    window: tuple = DEFAULT_WINDOW

    def __post_init__(self):
        check_method(self.method)
        object.__setattr__(self, "window", check_window(self.window))  # lists come back from JSON


def _is_transposed(qdata: torch.Tensor) -> bool:
    return qdata.stride(-2) < qdata.stride(-1)


class ScaleSearchNVFP4Tensor(TorchAOBaseTensor):
    """A 2-D NVFP4 weight in torchao's ``NVFP4Tensor`` layout (module docstring) that also records how its
    linear quantizes activations: ``act_quant_kwargs`` None runs W4A16 (weight only), an
    :class:`NVFP4ActivationKwargs` runs W4A4. ``F.linear`` (``aten.t`` + ``aten.mm``/``aten.addmm``) on it
    runs ``scalesearch::nvfp4_linear`` (registered in ``scalesearch_compile.ops.linear``).

    A sibling of ``NVFP4Tensor``, not a subclass: several ``NVFP4Tensor`` ops rebuild ``NVFP4Tensor`` by
    name, which would silently drop a subclass. :meth:`to_nvfp4_tensor` and :meth:`from_nvfp4_tensor`
    convert without touching a byte.
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "orig_dtype"]
    optional_tensor_data_names = ["per_tensor_scale"]
    optional_tensor_attribute_names = ["act_quant_kwargs"]

    def __new__(cls, qdata, scale, block_size, orig_dtype, per_tensor_scale=None, act_quant_kwargs=None):
        _check_layout(qdata, scale, block_size, per_tensor_scale, act_quant_kwargs)
        rows, packed = qdata.shape
        shape = (rows * 2, packed) if _is_transposed(qdata) else (rows, packed * 2)
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=orig_dtype, device=qdata.device, requires_grad=False
        )
        self.qdata = qdata
        self.scale = scale
        self.block_size = block_size
        self.orig_dtype = orig_dtype
        self.per_tensor_scale = per_tensor_scale
        self.act_quant_kwargs = act_quant_kwargs
        return self

    # Let F.linear decompose to aten.t + aten.mm/addmm, which __torch_dispatch__ routes (as NVFP4Tensor does).
    __torch_function__ = torch._C._disabled_torch_function_impl

    def _stable_hash_for_caching(self) -> str:
        """Identity of the metadata (never the values) for AOTAutograd's compile cache."""
        key = (
            type(self).__name__,
            tuple(self.qdata.shape),
            self.qdata.stride(),
            str(self.device),
            self.orig_dtype,
            self.per_tensor_scale is None,
            self.act_quant_kwargs,
        )
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``e2m1_value(code) * (per_tensor_scale * scale)`` in ``output_dtype`` (default the original dtype)."""
        return self.to_nvfp4_tensor().dequantize(output_dtype or self.orig_dtype)

    def to_nvfp4_tensor(self) -> NVFP4Tensor:
        """The same bytes as a stock, unswizzled torchao ``NVFP4Tensor`` (the activation record is dropped:
        torchao's ``NVFP4Tensor`` has no CPU W4A4 path and no searched activation scales)."""
        return NVFP4Tensor(self.qdata, self.scale, self.block_size, self.orig_dtype, self.per_tensor_scale)

    @classmethod
    def from_nvfp4_tensor(
        cls, tensor: NVFP4Tensor, act_quant_kwargs: NVFP4ActivationKwargs | None = None
    ) -> "ScaleSearchNVFP4Tensor":
        """Wrap a 2-D torchao ``NVFP4Tensor``'s bytes (swizzled scales are unswizzled, which is exact)."""
        if not isinstance(tensor, NVFP4Tensor):
            raise ValueError(f"expected a torchao NVFP4Tensor, got {type(tensor).__name__}")
        if tensor.qdata.dim() != 2 or _is_transposed(tensor.qdata):
            raise ValueError(
                f"only 2-D, untransposed NVFP4Tensors convert; got qdata shape {tuple(tensor.qdata.shape)}"
            )
        if tensor.act_per_tensor_scale is not None:
            raise ValueError(
                "NVFP4Tensor has a static activation scale (act_per_tensor_scale); only dynamic "
                "activation scales are supported"
            )
        rows, k = tensor.shape
        scale = tensor.scale
        if tensor.is_swizzled_scales:
            scale = from_blocked(scale, rows, k // tensor.block_size).contiguous()
        return cls(tensor.qdata, scale, tensor.block_size, tensor.orig_dtype, tensor.per_tensor_scale, act_quant_kwargs)


def _check_layout(qdata, scale, block_size, per_tensor_scale, act_quant_kwargs) -> None:
    if block_size != BLOCK_SIZE:
        raise ValueError(f"NVFP4 block size must be {BLOCK_SIZE}, got {block_size}")
    if qdata.dtype != torch.uint8 or qdata.dim() != 2:
        raise ValueError(f"qdata must be a 2-D uint8 tensor, got {qdata.dim()}-D {qdata.dtype}")
    if _is_transposed(qdata):
        qdata, scale = qdata.t(), scale.t()
    expected = (qdata.shape[0], qdata.shape[1] * 2 // BLOCK_SIZE)
    if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != expected:
        raise ValueError(
            f"scale must be float8_e4m3fn of shape {expected} (one per 16 values), "
            f"got {scale.dtype} of shape {tuple(scale.shape)}"
        )
    if per_tensor_scale is not None and (per_tensor_scale.dim() != 0 or per_tensor_scale.dtype != torch.float32):
        raise ValueError(
            f"per_tensor_scale must be a 0-d float32 tensor or None, got {per_tensor_scale.dim()}-D "
            f"{per_tensor_scale.dtype}"
        )
    if act_quant_kwargs is not None and not isinstance(act_quant_kwargs, NVFP4ActivationKwargs):
        raise ValueError(f"act_quant_kwargs must be NVFP4ActivationKwargs or None, got {act_quant_kwargs!r}")


@ScaleSearchNVFP4Tensor.implements(
    [torch.ops.aten.t.default, torch.ops.aten.transpose.int, torch.ops.aten.permute.default]
)
def _transpose(func, types, args, kwargs):
    """``w.t()``, ``w.T``, ``w.transpose(0, 1)``, ``w.permute(1, 0)``: the swap of the two dimensions, a view
    of qdata and scale (as ``NVFP4Tensor`` does); a transpose or permute that swaps nothing is an alias."""
    w, dims = args[0], args[1:]
    if func is torch.ops.aten.transpose.int:
        swap = dims[0] % 2 != dims[1] % 2
    elif func is torch.ops.aten.permute.default:
        swap = [d % 2 for d in dims[0]] == [1, 0]
    else:
        swap = True
    qdata, scale = (w.qdata.t(), w.scale.t()) if swap else (w.qdata, w.scale)
    return ScaleSearchNVFP4Tensor(qdata, scale, w.block_size, w.orig_dtype, w.per_tensor_scale, w.act_quant_kwargs)


def quantize_weight(
    weight: torch.Tensor,
    method: str = "search",
    *,
    window: Sequence[int] = DEFAULT_WINDOW,
    importance: torch.Tensor | None = None,
    act_quant_kwargs: NVFP4ActivationKwargs | None = None,
) -> ScaleSearchNVFP4Tensor:
    """Quantize a 2-D linear weight (N, K) with torchao's two-level scaling and ``method``'s block scales."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    nvfp4 = quantize_nvfp4(weight, method, window=window, importance=importance)
    return ScaleSearchNVFP4Tensor.from_nvfp4_tensor(nvfp4, act_quant_kwargs)


# transformers saves and reloads torchao tensors through torchao's safetensors helpers, which rebuild only the
# classes named here; torch.load(weights_only=True) likewise needs the classes allow-listed.
ALLOWED_CLASSES[ScaleSearchNVFP4Tensor.__name__] = ScaleSearchNVFP4Tensor
ALLOWED_CLASSES[NVFP4ActivationKwargs.__name__] = NVFP4ActivationKwargs
if ScaleSearchNVFP4Tensor.__name__ not in ALLOWED_TENSORS_SUBCLASSES:
    ALLOWED_TENSORS_SUBCLASSES.append(ScaleSearchNVFP4Tensor.__name__)
torch.serialization.add_safe_globals([ScaleSearchNVFP4Tensor, NVFP4ActivationKwargs])
