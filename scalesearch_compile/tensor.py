"""NVFP4 weights with searched block scales: stock torchao ``NVFP4Tensor`` objects built from them, and
``ScaleSearchNVFP4Tensor``, the same layout plus a record of how the linear quantizes its activations.

Layout (torchao's, unswizzled; see :mod:`scalesearch_compile.layout`): ``qdata`` uint8 ``(..., K // 2)``,
``scale`` float8_e4m3fn ``(..., K // 16)``, ``per_tensor_scale`` float32 0-d tensor or None, ``block_size`` 16,
``orig_dtype`` the input's dtype. The tensor dequantizes to ``e2m1_value(code) * (per_tensor_scale * scale)``.

Importing this module allow-lists ``ScaleSearchNVFP4Tensor`` and ``NVFP4ActivationKwargs`` for
``torch.load(weights_only=True)`` and for torchao's safetensors helpers (which transformers saves through).
"""

import hashlib
from dataclasses import dataclass

import torch
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
from torchao.prototype.mx_formats.utils import from_blocked
from torchao.prototype.safetensors.safetensors_utils import ALLOWED_CLASSES, ALLOWED_TENSORS_SUBCLASSES
from torchao.quantization.quantize_.common import QuantizeTensorKwargs
from torchao.utils import TorchAOBaseTensor

from scalesearch_compile.layout import BLOCK_SIZE, NVFP4Weight, is_transposed
from scalesearch_compile.search import PerTensorScale, QuantizeRequest, ScaleChoice, quantize_blocks, quantize_reference
from scalesearch_compile.stamp import source_stamp

ACTIVATIONS = ("nvfp4", None)


def quantize_nvfp4(
    x: torch.Tensor,
    method: str | ScaleChoice = "search",
    *,
    per_tensor_scale: PerTensorScale = True,
    importance: torch.Tensor | None = None,
) -> NVFP4Tensor:
    """Quantize a 2-D or 3-D float tensor to a torchao ``NVFP4Tensor`` with block scales chosen by ``method``.

    ``method``: "search" (E4M3 codes at -2..+6 offsets around amax/6, lowest block error wins), "amax"
    (torchao's numbers bit for bit), "four_over_six", "exhaustive" (all 126 codes), or a :class:`ScaleChoice`
    (another search window: ``ScaleChoice("search", (-1, 4))``). ``per_tensor_scale``: True (default) uses
    torchao's two-level scaling with ``amax / (448 * 6)``; a one-element tensor is used as given; None for
    single-level scaling.
    ``importance``: optional per-input-channel weights of shape (K,) for the block error (e.g. the mean of x**2
    of calibration activations), so the search minimises the layer's output error instead of the weight error.
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"NVFP4Tensor holds 2-D or 3-D tensors, got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(per_tensor_scale, str):
        raise ValueError("NVFP4Tensor holds one global scale: per_tensor_scale must be True, None or a tensor")
    blocks = quantize_blocks(x, method, per_tensor_scale=per_tensor_scale, importance=importance)
    return NVFP4Tensor(
        blocks.qdata,
        blocks.scale_codes.view(torch.float8_e4m3fn),
        BLOCK_SIZE,
        x.dtype,
        per_tensor_scale=blocks.per_tensor_scale,
    )


def nvfp4_weight(tensor: NVFP4Tensor) -> NVFP4Weight:
    """The :class:`NVFP4Weight` of a 2-D, untransposed torchao ``NVFP4Tensor`` (swizzled scales are unswizzled,
    which is exact); ValueError for what a linear weight cannot be (a static activation scale included)."""
    if not isinstance(tensor, NVFP4Tensor):
        raise ValueError(f"expected a torchao NVFP4Tensor, got {type(tensor).__name__}")
    if tensor.qdata.dim() != 2:
        raise ValueError(f"only 2-D NVFP4Tensors are linear weights; got qdata shape {tuple(tensor.qdata.shape)}")
    if tensor.block_size != BLOCK_SIZE:
        raise ValueError(f"NVFP4 block size must be {BLOCK_SIZE}, got {tensor.block_size}")
    if tensor.act_per_tensor_scale is not None:
        raise ValueError(
            "NVFP4Tensor has a static activation scale (act_per_tensor_scale); only dynamic "
            "activation scales are supported"
        )
    scale = tensor.scale
    if tensor.is_swizzled_scales:
        rows, k = tensor.shape
        scale = from_blocked(scale, rows, k // BLOCK_SIZE).contiguous()
    return NVFP4Weight(tensor.qdata, scale, tensor.per_tensor_scale)


@dataclass(frozen=True)
class NVFP4ActivationKwargs(ScaleChoice, QuantizeTensorKwargs):
    """How a linear quantizes its activations at run time (W4A4): NVFP4 blocks of 16 along K with block scales
    chosen by this scale choice, and a dynamic per-tensor scale ``amax(x) / (448 * 6)`` computed from each
    input's finite values."""


def activation_kwargs(
    activations: str | None, scales: ScaleChoice, activation_method: str | None = None
) -> NVFP4ActivationKwargs | None:
    """What a weight records for the ``activations`` option: "nvfp4" (W4A4, activations quantized at run time
    with ``scales.at_run_time(activation_method)``: "fast_search" for "search" unless ``activation_method``
    names a method) or None (weight only); ValueError for anything else."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be 'nvfp4' (W4A4) or None (weight only), got {activations!r}")
    try:
        run_time = scales.at_run_time(activation_method)
    except ValueError as error:
        raise ValueError(f"activation_method: {error}") from None
    return None if activations is None else NVFP4ActivationKwargs(run_time.method, run_time.window)


class ScaleSearchNVFP4Tensor(TorchAOBaseTensor):
    """A 2-D NVFP4 weight in torchao's ``NVFP4Tensor`` layout (module docstring) that also records how its
    linear quantizes activations: ``act_quant_kwargs`` None runs W4A16 (weight only), an
    :class:`NVFP4ActivationKwargs` runs W4A4. ``F.linear`` (``aten.t`` + ``aten.mm``/``aten.addmm``) on it
    runs ``scalesearch::nvfp4_linear`` (registered in ``scalesearch_compile.ops.linear``).

    A sibling of ``NVFP4Tensor``, not a subclass: several ``NVFP4Tensor`` ops rebuild ``NVFP4Tensor`` by
    name, which would silently drop a subclass. :meth:`to_nvfp4_tensor` and :meth:`from_nvfp4_tensor`
    convert without touching a byte. ``w.t()`` is a view with transposed storage (as ``NVFP4Tensor``).
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "orig_dtype"]
    optional_tensor_data_names = ["per_tensor_scale"]
    optional_tensor_attribute_names = ["act_quant_kwargs"]

    def __new__(cls, qdata, scale, block_size, orig_dtype, per_tensor_scale=None, act_quant_kwargs=None):
        if block_size != BLOCK_SIZE:
            raise ValueError(f"NVFP4 block size must be {BLOCK_SIZE}, got {block_size}")
        if act_quant_kwargs is not None and not isinstance(act_quant_kwargs, NVFP4ActivationKwargs):
            raise ValueError(f"act_quant_kwargs must be NVFP4ActivationKwargs or None, got {act_quant_kwargs!r}")
        transposed = isinstance(qdata, torch.Tensor) and qdata.dim() == 2 and is_transposed(qdata)
        storage = (qdata.t(), scale.t()) if transposed else (qdata, scale)
        weight = NVFP4Weight(*storage, per_tensor_scale)
        if weight.num_experts is not None:
            raise ValueError("a linear layer's NVFP4 weight is 2-D; experts' weights are ScaleSearchNVFP4Experts")
        shape = (weight.in_features, weight.out_features) if transposed else (weight.out_features, weight.in_features)
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=orig_dtype, device=qdata.device, requires_grad=False
        )
        self.qdata = qdata
        self.scale = scale.view(torch.float8_e4m3fn)
        self.block_size = block_size
        self.orig_dtype = orig_dtype
        self.per_tensor_scale = weight.per_tensor_scale
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
            source_stamp(),  # compiled CPU graphs trace the reference (ops.lowering)
        )
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    @property
    def is_transposed(self) -> bool:
        """Whether this is ``w.t()`` of a weight (shape (in_features, out_features))."""
        return is_transposed(self.qdata)

    def nvfp4_weight(self) -> NVFP4Weight:
        """The validated :class:`NVFP4Weight` (out_features, in_features); ValueError on a transposed view."""
        return NVFP4Weight(self.qdata, self.scale, self.per_tensor_scale)

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
        """Wrap a 2-D torchao ``NVFP4Tensor``'s bytes (as :func:`nvfp4_weight` reads them)."""
        return cls.from_weight(nvfp4_weight(tensor), tensor.orig_dtype, act_quant_kwargs)

    @classmethod
    def from_weight(
        cls, weight: NVFP4Weight, orig_dtype: torch.dtype, act_quant_kwargs: NVFP4ActivationKwargs | None = None
    ) -> "ScaleSearchNVFP4Tensor":
        return cls(weight.qdata, weight.scale_codes, BLOCK_SIZE, orig_dtype, weight.per_tensor_scale, act_quant_kwargs)


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
    method: str | ScaleChoice = "search",
    *,
    importance: torch.Tensor | None = None,
    act_quant_kwargs: NVFP4ActivationKwargs | None = None,
    quantize=quantize_reference,
) -> ScaleSearchNVFP4Tensor:
    """Quantize a 2-D linear weight (N, K) with torchao's two-level scaling and ``method``'s block scales
    (ValueError naming NaN/Inf, a bad shape or dtype), by ``quantize``: the reference, or a kernel computing the
    same bits (``ops.dispatch.quantizer``)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"a linear weight is 2-D (out_features, in_features), got shape {tuple(getattr(weight, 'shape', ()))}"
        )
    blocks = quantize(QuantizeRequest.of(weight, ScaleChoice.of(method), importance=importance))
    return ScaleSearchNVFP4Tensor.from_weight(NVFP4Weight.from_blocks(blocks), weight.dtype, act_quant_kwargs)


class ScaleSearchNVFP4Experts(TorchAOBaseTensor):
    """The weights of E experts ``(E, N, K)`` (a transformers MoE experts module's ``gate_up_proj`` /
    ``up_proj`` / ``down_proj``) in NVFP4: ``qdata`` uint8 ``(E, N, K // 2)``, ``scale`` float8_e4m3fn
    ``(E, N, K // 16)``, ``per_tensor_scale`` float32 ``(E,)``: one global scale per expert, so an expert's gate
    and up projections, one matrix, share it (as vLLM's fused-MoE layer wants). ``act_quant_kwargs`` as
    :class:`ScaleSearchNVFP4Tensor`'s.

    The views transformers' experts implementations take are views of the same bytes, never copies:
    ``w[e]`` (the eager loop) is expert e's :class:`ScaleSearchNVFP4Tensor`; ``w[ids]`` (``batched_mm``) is
    this class with ``expert_ids`` ``(S,)``, shape ``(S, N, K)``; ``w.transpose(-2, -1)`` (``grouped_mm``) has
    ``transposed`` set, shape ``(..., K, N)``. ``scalesearch_compile.ops.grouped`` runs their products.
    """

    tensor_data_names = ["qdata", "scale", "per_tensor_scale"]
    tensor_attribute_names = ["block_size", "orig_dtype", "transposed"]
    optional_tensor_data_names = ["expert_ids"]
    optional_tensor_attribute_names = ["act_quant_kwargs"]

    def __new__(
        cls, qdata, scale, per_tensor_scale, block_size, orig_dtype, transposed, expert_ids=None, act_quant_kwargs=None
    ):
        if block_size != BLOCK_SIZE:
            raise ValueError(f"NVFP4 block size must be {BLOCK_SIZE}, got {block_size}")
        if act_quant_kwargs is not None and not isinstance(act_quant_kwargs, NVFP4ActivationKwargs):
            raise ValueError(f"act_quant_kwargs must be NVFP4ActivationKwargs or None, got {act_quant_kwargs!r}")
        weight = NVFP4Weight(qdata, scale, per_tensor_scale)
        if weight.num_experts is None or per_tensor_scale is None:
            raise ValueError(
                "experts' NVFP4 weights are 3-D (experts, out_features, in_features // 2) with a global "
                "scale per expert"
            )
        if expert_ids is not None and (expert_ids.dim() != 1 or expert_ids.dtype.is_floating_point):
            raise ValueError(f"expert_ids must be a 1-D integer tensor, got {expert_ids.dim()}-D {expert_ids.dtype}")
        lead = weight.num_experts if expert_ids is None else expert_ids.shape[0]
        n, k = weight.out_features, weight.in_features
        shape = (lead, k, n) if transposed else (lead, n, k)
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=orig_dtype, device=qdata.device, requires_grad=False
        )
        self.qdata, self.scale, self.per_tensor_scale = (
            weight.qdata,
            scale.view(torch.float8_e4m3fn),
            weight.per_tensor_scale,
        )
        self.block_size, self.orig_dtype, self.transposed = block_size, orig_dtype, bool(transposed)
        self.expert_ids, self.act_quant_kwargs = expert_ids, act_quant_kwargs
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    # Handlers of ops outside aten that may not be loaded when this module is (transformers' grouped_mm
    # fallback), by qualified name: filled by scalesearch_compile.ops.grouped.
    EXTERNAL_OPS = {}

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = cls.EXTERNAL_OPS.get(func._schema.name)
        if handler is not None:
            return handler(func, args, kwargs or {})
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _stable_hash_for_caching(self) -> str:
        """Identity of the metadata (never the values) for AOTAutograd's compile cache."""
        ids = None if self.expert_ids is None else self.expert_ids.dtype
        key = (type(self).__name__, tuple(self.qdata.shape), str(self.device), self.orig_dtype, self.transposed, ids)
        key += (self.act_quant_kwargs,)
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    @property
    def num_experts(self) -> int:
        return self.qdata.shape[0]

    def nvfp4_weight(self) -> NVFP4Weight:
        """All the experts' validated weights, ``(E, N, K)`` (whatever the view)."""
        return NVFP4Weight(self.qdata, self.scale, self.per_tensor_scale)

    def view_of(self, *, transposed: bool, expert_ids: torch.Tensor | None) -> "ScaleSearchNVFP4Experts":
        """The same bytes seen another way."""
        return ScaleSearchNVFP4Experts(
            self.qdata,
            self.scale,
            self.per_tensor_scale,
            self.block_size,
            self.orig_dtype,
            transposed,
            expert_ids,
            self.act_quant_kwargs,
        )

    def expert(self, index: int) -> ScaleSearchNVFP4Tensor:
        """Expert ``index``'s weight ``(N, K)`` (transposed, ``(K, N)``, on a transposed view)."""
        w = self.nvfp4_weight().expert(index)
        weight = ScaleSearchNVFP4Tensor.from_weight(w, self.orig_dtype, self.act_quant_kwargs)
        return weight.t() if self.transposed else weight

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor this one stands for, in ``output_dtype`` (default the original dtype)."""
        weights = self.nvfp4_weight().dequantize()
        if self.expert_ids is not None:
            weights = weights[self.expert_ids]
        if self.transposed:
            weights = weights.transpose(-2, -1)
        return weights.to(output_dtype or self.orig_dtype)


@ScaleSearchNVFP4Experts.implements([torch.ops.aten.select.int])
def _select_expert(func, types, args, kwargs):
    """``w[e]``: expert e's weight (the eager experts loop)."""
    w, dim, index = args
    if dim % 3 != 0 or w.expert_ids is not None:
        raise NotImplementedError("NVFP4 experts' weights support w[expert], w[expert_ids] and w.transpose(-2, -1)")
    return w.expert(index)


@ScaleSearchNVFP4Experts.implements([torch.ops.aten.index.Tensor])
def _gather_experts(func, types, args, kwargs):
    """``w[ids]`` with a 1-D integer tensor (``batched_mm``): a view that records ``ids``."""
    w, indices = args
    ids = indices[0] if len(indices) == 1 else None
    if w.expert_ids is not None or ids is None or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise NotImplementedError("NVFP4 experts' weights support w[expert], w[expert_ids] and w.transpose(-2, -1)")
    return w.view_of(transposed=w.transposed, expert_ids=ids)


@ScaleSearchNVFP4Experts.implements([torch.ops.aten.transpose.int])
def _transpose_experts(func, types, args, kwargs):
    """``w.transpose(-2, -1)`` (``grouped_mm``): a view with ``transposed`` flipped."""
    w, dim0, dim1 = args
    if {dim0 % 3, dim1 % 3} != {1, 2}:
        raise NotImplementedError("NVFP4 experts' weights support w[expert], w[expert_ids] and w.transpose(-2, -1)")
    return w.view_of(transposed=not w.transposed, expert_ids=w.expert_ids)


def quantize_experts(
    weight: torch.Tensor,
    method: str | ScaleChoice = "search",
    *,
    act_quant_kwargs: NVFP4ActivationKwargs | None = None,
    quantize=quantize_reference,
) -> ScaleSearchNVFP4Experts:
    """Quantize experts' weights ``(E, N, K)``: each expert as a linear weight (its own global scale), block scales
    searched along K (ValueError naming NaN/Inf, a bad shape or dtype), by ``quantize`` as :func:`quantize_weight`
    takes it."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise ValueError(f"experts' weights are 3-D (experts, out, in), got {tuple(getattr(weight, 'shape', ()))}")
    scales = ScaleChoice.of(method)
    experts = [NVFP4Weight.from_blocks(quantize(QuantizeRequest.of(w, scales))) for w in weight]
    stacked = (
        torch.stack([getattr(e, name) for e in experts]) for name in ("qdata", "scale_codes", "per_tensor_scale")
    )
    return ScaleSearchNVFP4Experts(*stacked, BLOCK_SIZE, weight.dtype, False, act_quant_kwargs=act_quant_kwargs)


# transformers saves and reloads torchao tensors through torchao's safetensors helpers, which rebuild only the
# classes named here; torch.load(weights_only=True) likewise needs the classes allow-listed.
for _class in (ScaleSearchNVFP4Tensor, ScaleSearchNVFP4Experts, NVFP4ActivationKwargs):
    ALLOWED_CLASSES[_class.__name__] = _class
for _class in (ScaleSearchNVFP4Tensor, ScaleSearchNVFP4Experts):
    if _class.__name__ not in ALLOWED_TENSORS_SUBCLASSES:
        ALLOWED_TENSORS_SUBCLASSES.append(_class.__name__)
torch.serialization.add_safe_globals([ScaleSearchNVFP4Tensor, ScaleSearchNVFP4Experts, NVFP4ActivationKwargs])
