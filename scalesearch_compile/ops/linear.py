"""Custom op ``scalesearch::nvfp4_linear`` and the routing of ``F.linear`` on a ``ScaleSearchNVFP4Tensor``.

Numerics of the reference (the Triton GEMM ``kernels.gemm.nvfp4_linear_triton`` must agree within a stated
tolerance): with ``w_hat = e2m1(w_code) * e4m3(w_scale)`` (per-tensor scale left out, exact in float32),

    W4A16 (act_method None): out = ((x / 2**e) @ w_hat.T) * pts_w * 2**e + bias
    W4A4:                    out = (x_hat @ w_hat.T) * pts_w * pts_x + bias

where ``x_hat`` is x quantized per 16 values along K with the block scales ``ScaleChoice(act_method,
act_window)`` picks and the dynamic per-tensor scale ``pts_x = amax(x) / (448 * 6)`` (over x's finite
values), also left out of ``x_hat``; ``2**e`` is ``search.power_of_two_scale(x)`` (dividing by it is exact and
keeps ``x @ w_hat`` from overflowing where the output does not). Everything runs in float32 (fp32
accumulation, as the tensor cores' block-scaled MMA followed by the global scales) and the result is cast to
x's dtype. A missing per-tensor scale counts as 1.0. Nothing is read on the host (no GPU synchronisation): an
activation row holding NaN or Inf gets NaN outputs, as in a float matmul, and leaves the other rows as they
would be without it. Backward is straight-through: ``grad_x = grad @ (w_hat * pts_w)``, ``grad_bias = grad``
summed over rows; the weight bytes get no gradient.

Arguments: x ``(..., K)`` float32/bfloat16/float16; the weight as an
:class:`~scalesearch_compile.layout.NVFP4Weight`'s three tensors; bias ``(N,)`` or None; output ``(..., N)``
in x's dtype.
"""

import functools
import threading
import weakref

import torch

from scalesearch_compile.layout import NVFP4Weight, unscaled_values
from scalesearch_compile.ops.dispatch import check_impl, decoder, kernel, lowers
from scalesearch_compile.ops.quantize import fake_quantize
from scalesearch_compile.search import (
    ScaleChoice,
    check_dtype_and_shape,
    power_of_two_scale,
)
from scalesearch_compile.tensor import ScaleSearchNVFP4Tensor

aten = torch.ops.aten


def activation_arguments(act: ScaleChoice | None) -> tuple:
    """``(act_method, act_window)`` as the linear ops take an activation scale choice (None: weight only)."""
    return (None, []) if act is None else (act.method, list(act.window))


def _checked_arguments(x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl):
    """The op's arguments as (NVFP4Weight, activation ScaleChoice or None), after checking all of them."""
    check_dtype_and_shape(x, "linear input")
    weight = NVFP4Weight(weight_qdata, weight_scale, weight_per_tensor_scale)
    weight.check_operands(x.shape[-1], x.device, bias)
    check_impl(impl)
    return weight, None if act_method is None else ScaleChoice(act_method, act_window)


# activations quantized and decoded by the references (ops.quantize.fake_quantize's contract)
REFERENCE_ACTIVATION = functools.partial(fake_quantize, impl="reference")


def reference_linear(
    x: torch.Tensor,
    weight: NVFP4Weight,
    bias: torch.Tensor | None,
    act: ScaleChoice | None,
    activation=REFERENCE_ACTIVATION,
    decode=unscaled_values,
):
    """The module docstring's numerics in PyTorch: ``x @ W^T (+ bias)``, the weight decoded by ``decode``
    (:func:`unscaled_values`, or the same bits) and the activations quantized per ``act`` by ``activation(rows,
    act)`` (:func:`~scalesearch_compile.ops.quantize.fake_quantize`, or the same bits)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if rows.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], weight.out_features))
    if act is None:
        x_scale = power_of_two_scale(rows)
        x_hat = rows / x_scale
    else:
        x_hat, x_scale = activation(rows, act)
    out = x_hat @ decode(weight.qdata, weight.scale_codes).t()
    if weight.per_tensor_scale is not None:
        out = out * weight.per_tensor_scale
    out = out * x_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], weight.out_features)


@torch.library.custom_op("scalesearch::nvfp4_linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight_qdata: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_per_tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_method: str | None,
    act_window: list[int],
    impl: str,
) -> torch.Tensor:
    args = (x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl)
    weight, act = _checked_arguments(*args)
    return run_linear(x, weight, bias, act, impl)


def run_linear(x: torch.Tensor, weight: NVFP4Weight, bias: torch.Tensor | None, act: ScaleChoice | None, impl: str):
    """The linear numerics by the implementation ``impl`` picks for x's device (``ops.dispatch``): the Triton
    GEMM, or :func:`reference_linear` with the decode and the activation kernels ``impl`` picks."""
    linear = kernel("linear", impl, x.device)
    if linear is not None:
        return linear(x, weight, bias, act)
    activation = functools.partial(fake_quantize, impl=impl)
    return reference_linear(x, weight, bias, act, activation=activation, decode=decoder(impl, x))


def _activation_by_op(rows: torch.Tensor, act: ScaleChoice, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~scalesearch_compile.ops.quantize.fake_quantize` as one call of ``scalesearch::fake_quantize_nvfp4``
    with ``impl``."""
    return torch.ops.scalesearch.fake_quantize_nvfp4(rows, act.method, list(act.window), impl)


class _TracedQuantizations(threading.local):
    """The activation quantizations (decoded) a trace of :func:`lowered_linear` made (per thread): the q, k and v
    projections of an attention layer read the same activation, and the traced graph then quantizes it once
    (Inductor does not merge identical calls of an opaque op; the ``"scalesearch"`` backend's post-grad pass
    does, ``ops.lowering``). Held by the activation's storage, weakly: an entry lives as long as that (fake)
    storage, which a compiled graph's trace keeps until ``torch._dynamo.reset()``, and a new storage never matches
    an old entry. Within a storage an entry matches only the same offset, shape, strides (symbolic ones by their
    expression), dtype and version (an in-place change moves the version), the same scale choice and ``impl``."""

    def __init__(self):
        self.by_storage = weakref.WeakKeyDictionary()

    def quantize(self, rows: torch.Tensor, act: ScaleChoice, source: torch.Tensor, impl: str) -> tuple:
        """``rows`` (of the activation ``source``) quantized per ``act`` by :func:`_activation_by_op`, or the
        traced result of an identical earlier one."""
        storage, version = source.untyped_storage(), source._version
        # a symbolic size (dynamic shapes) by its expression: the same expression is the same size in one trace
        view = tuple(str(v) for v in (source.storage_offset(), *source.shape, *source.stride()))
        key = (version, view, source.dtype, act, impl)
        entries = self.by_storage.get(storage, {})
        if key not in entries:
            entries = {k: v for k, v in entries.items() if k[0] == version}  # an older version never matches again
            entries[key] = _activation_by_op(rows, act, impl)
            self.by_storage[storage] = entries
        return entries[key]


_TRACED = _TracedQuantizations()


def lowered_linear(x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl):
    """``scalesearch::nvfp4_linear`` as a compiled CPU graph traces it in place of the op (``ops.lowering``): the
    same reference, with the activations' quantization (W4A4) kept as one call of an op.
    Traced, that search is about 200 operations a layer (120 for amax), and Inductor's compile time grew with them
    past any use (a tiny 2-layer Llama took about 10 minutes to compile on the loaded 2-core CI machine, where the
    opaque op takes seconds). Written with all of a block's candidates at once (about 30 operations), it compiled
    in 3-8 s alone, ran 2x faster than eager on a 192 x 384 input, but took the quickstart's compile from 29 to
    114 s for no gain end to end (Inductor's CPU loops recompute each block's scale per element). The op,
    ``scalesearch::fake_quantize_nvfp4``, runs the C++ kernel (``kernels.nvfp4_cpu``) with ``impl="auto"``, once
    for the linears of one activation (:class:`_TracedQuantizations`), and returns them decoded. The weight
    decode, the matmul's scaling and the bias are what Inductor fuses (the C++ decode as an op instead was no
    faster in a compiled MiniLM: there the decode's time goes to writing the float32 weight, whoever writes it)."""
    args = (x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl)
    weight, act = _checked_arguments(*args)
    activation = functools.partial(_TRACED.quantize, source=x, impl=impl)
    return reference_linear(x, weight, bias, act, activation=activation)


@_linear_op.register_fake
def _linear_fake(x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl):
    args = (x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl)
    weight, _ = _checked_arguments(*args)
    return x.new_empty((*x.shape[:-1], weight.out_features))


def _setup_context(ctx, inputs, output):
    x, weight_qdata, weight_scale, weight_per_tensor_scale, bias = inputs[:5]
    ctx.save_for_backward(weight_qdata, weight_scale, weight_per_tensor_scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Straight-through: ``grad_x = grad @ w_hat`` with the dequantized weight (activation quantization passes the
    gradient unchanged), ``grad_bias = grad`` summed over the leading dimensions; the weight bytes get none."""
    w_hat = NVFP4Weight(*ctx.saved_tensors).dequantize()
    grad_x = (grad.float() @ w_hat).to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, grad_bias, None, None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def nvfp4_linear(
    x: torch.Tensor, weight: ScaleSearchNVFP4Tensor, bias: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through ``scalesearch::nvfp4_linear``: W4A16 when the weight records no
    activation quantization, W4A4 otherwise. ``impl``: "auto" (Triton on CUDA; on a CPU the reference, its
    activations quantized by the C++ kernel), "reference" or "triton"."""
    if not isinstance(weight, ScaleSearchNVFP4Tensor):
        raise ValueError(f"weight must be a ScaleSearchNVFP4Tensor, got {type(weight).__name__}")
    w = weight.nvfp4_weight()
    args = (x, w.qdata, w.scale_codes, w.per_tensor_scale, bias, *activation_arguments(weight.act_quant_kwargs), impl)
    if lowers("linear", x, impl):  # a compiled CPU graph being traced: the reference itself, for Inductor to fuse
        return lowered_linear(*args)
    return torch.ops.scalesearch.nvfp4_linear(*args)


def _product(x, operand, bias=None) -> torch.Tensor:
    """``x @ operand (+ bias)`` for an NVFP4 weight operand: ``x @ W.t()`` (``F.linear``, and transformers'
    ``Conv1D`` whose weight is stored transposed) runs the NVFP4 linear; ``x @ W`` is what autograd computes
    for the input's gradient, ``grad @ W``: the product with the dequantized weight (straight through)."""
    if isinstance(x, ScaleSearchNVFP4Tensor) or not isinstance(operand, ScaleSearchNVFP4Tensor):
        raise NotImplementedError(
            "ScaleSearchNVFP4Tensor supports x @ weight.t() (what F.linear computes) and x @ weight; "
            "dequantize() it for other products"
        )
    if operand.is_transposed:
        return nvfp4_linear(x, operand.t(), bias)
    out = (x.float() @ operand.nvfp4_weight().dequantize()).to(x.dtype)
    return out if bias is None else out + bias


@ScaleSearchNVFP4Tensor.implements([aten.mm.default])
def _mm(func, types, args, kwargs):
    return _product(*args)


@ScaleSearchNVFP4Tensor.implements([aten.addmm.default])
def _addmm(func, types, args, kwargs):
    bias, x, operand = args[:3]
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise NotImplementedError("addmm with beta or alpha other than 1 is not supported on an NVFP4 weight")
    return _product(x, operand, bias)
