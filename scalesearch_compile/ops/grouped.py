"""Custom op ``scalesearch::nvfp4_grouped_linear``: the products of a mixture-of-experts layer's tokens with
their experts' NVFP4 weights in one call, and the routing of transformers' experts implementations
(``batched_mm``, ``grouped_mm``) on :class:`~scalesearch_compile.tensor.ScaleSearchNVFP4Experts` to it.

Layout, as ``torch.nn.functional.grouped_mm`` takes it: x ``(S, K)`` with its rows sorted by expert, ``offsets``
``(E,)`` int32/int64 the cumulative row counts (rows ``offsets[e-1]:offsets[e]`` belong to expert e), the
weights an :class:`~scalesearch_compile.layout.NVFP4Weight` of E experts ``(E, N, K)``; output ``(S, N)`` in x's
dtype, zero in the rows past ``offsets[-1]``.

Numerics (the Triton kernel ``kernels.gemm.nvfp4_grouped_linear_triton`` must agree within a stated tolerance):
each expert's rows are ``scalesearch::nvfp4_linear`` of those rows alone with that expert's weight (module
``ops.linear``): W4A4 quantizes them with the dynamic global scale ``amax / (448 * 6)`` over the expert's rows
(one per expert, as vLLM's fused-MoE layer keeps one input scale per expert), W4A16 divides them by the power of
two of that group; so the eager experts loop, ``batched_mm`` and ``grouped_mm`` compute the same numbers.
Backward is straight-through (``scalesearch::nvfp4_grouped_linear_backward``): ``grad_x = grad @ w_hat[e]``
with the dequantized weights; the weight bytes get no gradient. The references of both ops read ``offsets`` on
the host (a GPU synchronisation in the backward); the Triton kernel reads nothing there.
"""

import torch

from scalesearch_compile.layout import NVFP4Weight, expert_of_rows
from scalesearch_compile.ops.dispatch import check_impl, kernel, quantizer
from scalesearch_compile.ops.linear import activation_arguments
from scalesearch_compile.search import (
    QuantizeRequest,
    ScaleChoice,
    check_dtype_and_shape,
    group_scales,
    quantize_reference,
)
from scalesearch_compile.tensor import ScaleSearchNVFP4Experts

aten = torch.ops.aten


def _checked_arguments(x, offsets, weight_qdata, weight_scale, weight_per_tensor_scale, act_method, act_window, impl):
    """The op's arguments as (NVFP4Weight of E experts, activation ScaleChoice or None), after checking them."""
    check_dtype_and_shape(x, "grouped linear input")
    if x.dim() != 2:
        raise ValueError(f"grouped linear input must be 2-D (rows sorted by expert, in_features), got {x.dim()}-D")
    weight = NVFP4Weight(weight_qdata, weight_scale, weight_per_tensor_scale)
    if weight.num_experts is None or weight.per_tensor_scale is None:
        raise ValueError("grouped linear weights must be 3-D (experts, out_features, in_features) with global scales")
    weight.check_operands(x.shape[-1], x.device, None)
    if (
        not isinstance(offsets, torch.Tensor)
        or offsets.dtype not in (torch.int32, torch.int64)
        or tuple(offsets.shape) != (weight.num_experts,)
        or offsets.device != x.device
    ):
        raise ValueError(
            f"offsets must be an int32/int64 tensor of shape ({weight.num_experts},) (cumulative rows per expert) "
            f"on {x.device}; got {offsets!r}"
        )
    check_impl(impl)
    return weight, None if act_method is None else ScaleChoice(act_method, act_window)


def _expert_rows(offsets: torch.Tensor):
    """``(expert, rows slice)`` of each expert with rows (reads ``offsets`` on the host)."""
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            yield e, slice(start, end)
        start = max(start, end)


def reference_grouped_linear(
    x: torch.Tensor, offsets: torch.Tensor, weight: NVFP4Weight, act: ScaleChoice | None, quantize=quantize_reference
):
    """The module docstring's numerics in PyTorch (reads ``offsets`` on the host); activations quantized by
    ``quantize`` (:func:`quantize_reference` or what computes the same bits)."""
    rows = x.float()
    out = rows.new_zeros((x.shape[0], weight.out_features))
    if x.shape[0] == 0:
        return out.to(x.dtype)
    scales = group_scales(rows, expert_of_rows(offsets, x.shape[0]), weight.num_experts, act)
    if act is None:
        x_hat = rows / scales
    else:
        x_hat = quantize(QuantizeRequest.of(rows, act, per_tensor_scale=scales, check_finite=False)).unscaled()
    w_hat = weight.unscaled()
    for e, mine in _expert_rows(offsets):
        out[mine] = (x_hat[mine] @ w_hat[e].t()) * weight.per_tensor_scale[e] * scales[mine]
    return out.to(x.dtype)


@torch.library.custom_op("scalesearch::nvfp4_grouped_linear", mutates_args=())
def _grouped_linear_op(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight_qdata: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_per_tensor_scale: torch.Tensor,
    act_method: str | None,
    act_window: list[int],
    impl: str,
) -> torch.Tensor:
    args = (x, offsets, weight_qdata, weight_scale, weight_per_tensor_scale, act_method, act_window, impl)
    weight, act = _checked_arguments(*args)
    grouped = kernel("grouped_linear", impl, x.device)
    if grouped is not None:
        return grouped(x, offsets, weight, act)
    return reference_grouped_linear(x, offsets, weight, act, quantize=quantizer(impl, x))


@_grouped_linear_op.register_fake
def _grouped_linear_fake(x, offsets, weight_qdata, weight_scale, weight_per_tensor_scale, act_method, act_window, impl):
    args = (x, offsets, weight_qdata, weight_scale, weight_per_tensor_scale, act_method, act_window, impl)
    weight, _ = _checked_arguments(*args)
    return x.new_empty((x.shape[0], weight.out_features))


@torch.library.custom_op("scalesearch::nvfp4_grouped_linear_backward", mutates_args=())
def _grouped_backward_op(
    grad: torch.Tensor,
    offsets: torch.Tensor,
    weight_qdata: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_per_tensor_scale: torch.Tensor,
) -> torch.Tensor:
    """The input's gradient (module docstring): ``grad @ w_hat[e]`` on each expert's rows, zero past
    ``offsets[-1]``, float32 products cast to grad's dtype (reads ``offsets`` on the host)."""
    w_hat = NVFP4Weight(weight_qdata, weight_scale, weight_per_tensor_scale).dequantize()
    grad_x = grad.new_zeros((grad.shape[0], w_hat.shape[-1]), dtype=torch.float32)
    for e, mine in _expert_rows(offsets):
        grad_x[mine] = grad[mine].float() @ w_hat[e]
    return grad_x.to(grad.dtype)


@_grouped_backward_op.register_fake
def _grouped_backward_fake(grad, offsets, weight_qdata, weight_scale, weight_per_tensor_scale):
    return grad.new_empty((grad.shape[0], weight_qdata.shape[-1] * 2))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:5])


def _backward(ctx, grad):
    grad_x = torch.ops.scalesearch.nvfp4_grouped_linear_backward(grad, *ctx.saved_tensors)
    return grad_x, None, None, None, None, None, None, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: torch.Tensor, offsets: torch.Tensor, weight: ScaleSearchNVFP4Experts, *, impl: str = "auto"):
    """``scalesearch::nvfp4_grouped_linear`` on experts' weights (W4A16 when they record no activation
    quantization, W4A4 otherwise): x ``(S, K)`` sorted by expert, ``offsets`` as ``grouped_mm`` takes them."""
    w = weight.nvfp4_weight()
    act_args = activation_arguments(weight.act_quant_kwargs)
    return torch.ops.scalesearch.nvfp4_grouped_linear(
        x, offsets, w.qdata, w.scale_codes, w.per_tensor_scale, *act_args, impl
    )


def gathered_linear(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weight_qdata: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_per_tensor_scale: torch.Tensor,
    act_method: str | None,
    act_window: list[int],
    impl: str,
) -> torch.Tensor:
    """Row i of x ``(S, K)`` times expert ``expert_ids[i]``'s weight, ``(S, N)``, the product ``batched_mm``
    computes on gathered weights: the rows are sorted by expert (stably), run through
    ``scalesearch::nvfp4_grouped_linear`` and put back. Ids outside 0..E-1 give zero rows (expert-parallel
    sentinels). Reads nothing on the host."""
    num_experts = weight_qdata.shape[0]
    ids = expert_ids.long()
    ids = torch.where((ids < 0) | (ids >= num_experts), num_experts, ids)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device).scatter_add(
        0, ids, torch.ones_like(ids)
    )
    offsets = torch.cumsum(counts[:num_experts], 0)
    out = torch.ops.scalesearch.nvfp4_grouped_linear(
        x[order], offsets, weight_qdata, weight_scale, weight_per_tensor_scale, act_method, act_window, impl
    )
    return out[torch.argsort(order)]


def _gathered(x: torch.Tensor, weight: ScaleSearchNVFP4Experts) -> torch.Tensor:
    w = weight.nvfp4_weight()
    act_args = activation_arguments(weight.act_quant_kwargs)
    return gathered_linear(x, weight.expert_ids, w.qdata, w.scale_codes, w.per_tensor_scale, *act_args, "auto")


def _dense(func, args, kwargs):
    """``func`` on the dequantized weights (in the other operand's dtype): the products that are not ``x @ W^T``,
    which autograd computes for the input's gradient (straight through)."""
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and not isinstance(a, ScaleSearchNVFP4Experts))
    args = [
        a.dequantize(dtype)
        if isinstance(a, ScaleSearchNVFP4Experts)
        else a.contiguous()
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    ]
    return func(*args, **kwargs)


@ScaleSearchNVFP4Experts.implements([aten.bmm.default])
def _bmm(func, types, args, kwargs):
    """``batched_mm``'s products: ``w[ids] @ x.unsqueeze(-1)`` and ``x.unsqueeze(1) @ w[ids].transpose(-2, -1)``
    run the NVFP4 op; any other orientation multiplies the dequantized weights."""
    a, b = args
    if isinstance(a, ScaleSearchNVFP4Experts) and not isinstance(b, ScaleSearchNVFP4Experts):
        if a.expert_ids is not None and not a.transposed and b.shape[-1] == 1:
            return _gathered(b.squeeze(-1), a).unsqueeze(-1)
    elif isinstance(b, ScaleSearchNVFP4Experts) and not isinstance(a, ScaleSearchNVFP4Experts):
        if b.expert_ids is not None and b.transposed and a.shape[1] == 1:
            return _gathered(a.squeeze(1), b).unsqueeze(1)
    return _dense(func, args, kwargs)


def _grouped_product(func, args, kwargs):
    """``grouped_mm(x, w.transpose(-2, -1), offs)`` runs the NVFP4 op; other products multiply dequantized
    weights."""
    x, weight, offsets, bias, out_dtype = (*args, *[None] * 5)[:5]
    offsets, bias, out_dtype = (
        kwargs.get(k, v) for k, v in (("offs", offsets), ("bias", bias), ("out_dtype", out_dtype))
    )
    if (
        isinstance(weight, ScaleSearchNVFP4Experts)
        and not isinstance(x, ScaleSearchNVFP4Experts)
        and weight.transposed
        and weight.expert_ids is None
        and x.dim() == 2
        and offsets is not None
        and bias is None
        and out_dtype in (None, x.dtype)
    ):
        return grouped_linear(x, offsets, weight)
    return _dense(func, args, kwargs)


@ScaleSearchNVFP4Experts.implements([aten._grouped_mm.default])
def _aten_grouped_mm(func, types, args, kwargs):
    return _grouped_product(func, args, kwargs)


# transformers' own op for grouped_mm under torch.compile with weights other than bfloat16, and its backward.
ScaleSearchNVFP4Experts.EXTERNAL_OPS["transformers::grouped_mm_fallback"] = _grouped_product
ScaleSearchNVFP4Experts.EXTERNAL_OPS["transformers::grouped_mm_fallback_backward"] = _dense
