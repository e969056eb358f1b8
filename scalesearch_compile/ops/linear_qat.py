"""Custom op ``scalesearch::nvfp4_linear_qat``: a linear layer whose float weight is quantized to NVFP4 on every
call, with straight-through gradients: quantization-aware training through the compile backend.

Forward: the weight (``(N, K)``, or ``(K, N)`` stored transposed as transformers' ``Conv1D`` keeps it, with
``transposed``) is quantized with the block scales ``ScaleChoice(method, window)`` and a global scale from its
current values (at run time: nothing read on the host, a NaN or Inf makes its block NaN), then
``scalesearch::nvfp4_linear``'s numerics run (``ops.linear``): W4A16, or W4A4 with ``act_method``.
Backward, straight through both quantizers as torchao's QAT fake quantizers: ``grad_x = grad @ w_hat``,
``grad_w = grad^T @ x_hat`` (``x_hat`` the quantized activation for W4A4, x itself for W4A16), ``grad_bias =
grad`` summed over rows.
"""

import torch

from scalesearch_compile.layout import NVFP4Weight
from scalesearch_compile.ops.dispatch import check_impl, quantizer
from scalesearch_compile.ops.linear import run_linear
from scalesearch_compile.search import QuantizeRequest, ScaleChoice, check_dtype_and_shape


def _quantize(x: torch.Tensor, scales: ScaleChoice, impl: str):
    """Run-time quantization of ``x`` (..., K) by the implementation ``impl`` picks."""
    request = QuantizeRequest.of(x, scales, check_finite=False)
    return quantizer(impl, x)(request)


def _weight(weight: torch.Tensor, transposed: bool, scales: ScaleChoice, impl: str) -> NVFP4Weight:
    return NVFP4Weight.from_blocks(_quantize(weight.t() if transposed else weight, scales, impl))


def _activation_scales(act_method, act_window):
    return None if act_method is None else ScaleChoice(act_method, act_window)


def _check(x, weight, bias, transposed, impl) -> None:
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D, got shape {tuple(weight.shape)}")
    check_dtype_and_shape(x, "linear input")
    check_dtype_and_shape(weight.t() if transposed else weight, "linear weight")
    check_impl(impl)
    n, k = weight.shape[::-1] if transposed else weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear input has {x.shape[-1]} features but the weight has in_features {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


@torch.library.custom_op("scalesearch::nvfp4_linear_qat", mutates_args=())
def _qat_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transposed: bool,
    method: str,
    window: list[int],
    act_method: str | None,
    act_window: list[int],
    impl: str,
) -> torch.Tensor:
    _check(x, weight, bias, transposed, impl)
    nvfp4 = _weight(weight, transposed, ScaleChoice(method, window), impl)
    return run_linear(x, nvfp4, bias, _activation_scales(act_method, act_window), impl)


@_qat_op.register_fake
def _qat_fake(x, weight, bias, transposed, method, window, act_method, act_window, impl):
    _check(x, weight, bias, transposed, impl)
    return x.new_empty((*x.shape[:-1], weight.shape[1] if transposed else weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, transposed, method, window, act_method, act_window, impl = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.options = transposed, ScaleChoice(method, window), _activation_scales(act_method, act_window), impl


def _backward(ctx, grad):
    """Straight through both quantizers (module docstring)."""
    x, weight = ctx.saved_tensors
    transposed, scales, act, impl = ctx.options
    rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]).float()
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        w_hat = _weight(weight, transposed, scales, impl).dequantize()
        grad_x = (grads @ w_hat).to(x.dtype).view(x.shape)
    if ctx.needs_input_grad[1]:
        x_hat = rows.float() if act is None else _quantize(rows, act, impl).dequantize()
        grad_w = grads.t() @ x_hat
        grad_w = (grad_w.t() if transposed else grad_w).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_bias, None, None, None, None, None, None


_qat_op.register_autograd(_backward, setup_context=_setup_context)
