"""Custom op ``scalesearch::nvfp4_linear`` and the routing of ``F.linear`` on a ``ScaleSearchNVFP4Tensor``.

Numerics of the reference (the Triton GEMM ``kernels.gemm.nvfp4_linear_triton`` must agree within a stated
tolerance): with ``w_hat = e2m1(w_code) * e4m3(w_scale)`` (per-tensor scale left out, exact in float32),

    W4A16 (act_method None): out = (x @ w_hat.T) * pts_w + bias
    W4A4:                    out = (x_hat @ w_hat.T) * (pts_x * pts_w) + bias

where ``x_hat`` is x quantized per 16 values along K by ``quantize_blocks(x, act_method, window=act_window)``
with the dynamic per-tensor scale ``pts_x = amax(x) / (448 * 6)``, also left out of ``x_hat``. Everything
runs in float32 (fp32 accumulation, as the tensor cores' block-scaled MMA followed by the global scales) and
the result is cast to x's dtype. A missing per-tensor scale counts as 1.0. Backward is straight-through:
``grad_x = grad @ (w_hat * pts_w)``, ``grad_bias = grad`` summed over rows; the weight bytes get no gradient.

Layouts: x ``(..., K)`` float32/bfloat16/float16; ``weight_qdata`` uint8 ``(N, K // 2)``;
``weight_scale`` uint8 ``(N, K // 16)``, float8_e4m3fn bit patterns (see ``ops.quantize``);
``weight_per_tensor_scale`` float32 0-d or None; bias ``(N,)`` or None; output ``(..., N)`` in x's dtype.
"""

import torch

from scalesearch_compile.formats import e2m1_value_table, unpack_nibbles
from scalesearch_compile.ops.quantize import IMPLS, select_impl
from scalesearch_compile.search import BLOCK_SIZE, check_dtype_and_shape, check_method, check_window, quantize_blocks
from scalesearch_compile.tensor import ScaleSearchNVFP4Tensor

aten = torch.ops.aten


def _byte_value_bits() -> list:
    """For each byte 0..255, the float32 values of its two E2M1 codes (low nibble first) as the 8 bytes of one
    int64, so that a single gather decodes both nibbles."""
    codes = unpack_nibbles(torch.arange(256, dtype=torch.uint8))
    return e2m1_value_table()[codes.long()].view(torch.int64).tolist()


# Python ints, not a cached tensor: the table is rebuilt per call (256 values) so that it is a fresh constant
# when AOTAutograd traces the op's backward with fake tensors.
_BYTE_VALUE_BITS = _byte_value_bits()


def dequantize_unscaled(qdata: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """float32 ``e2m1(code) * e4m3(scale)`` of (rows, K // 2) codes and (rows, K // 16) uint8 E4M3 scale codes,
    shape (rows, K); exact in float32 (a product of at most 2 and 4 significant bits).

    One 8-byte gather per byte of codes: 2-4x faster on the 2-core CI machine than unpacking the nibbles and
    gathering each (1536 x 384 weight: 13-25 ms against 47-82 ms, under varying load).
    """
    table = torch.tensor(_BYTE_VALUE_BITS, dtype=torch.int64, device=qdata.device)
    values = table[qdata.long()].view(torch.float32).view(*scale_codes.shape, BLOCK_SIZE)
    return (values * scale_codes.view(torch.float8_e4m3fn).float().unsqueeze(-1)).flatten(-2)


def _check_linear_args(x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl):
    check_dtype_and_shape(x, "linear input")
    if weight_qdata.dtype != torch.uint8 or weight_qdata.dim() != 2:
        raise ValueError(
            f"weight_qdata must be 2-D uint8 (out_features, in_features // 2), got {weight_qdata.dim()}-D "
            f"{weight_qdata.dtype}"
        )
    n, k = weight_qdata.shape[0], weight_qdata.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"linear input has {x.shape[-1]} features but the NVFP4 weight has in_features {k}")
    if weight_scale.dtype != torch.uint8 or tuple(weight_scale.shape) != (n, k // BLOCK_SIZE):
        raise ValueError(
            f"weight_scale must be uint8 E4M3 codes of shape ({n}, {k // BLOCK_SIZE}), "
            f"got {weight_scale.dtype} of shape {tuple(weight_scale.shape)}"
        )
    if weight_per_tensor_scale is not None and (
        weight_per_tensor_scale.dim() != 0 or weight_per_tensor_scale.dtype != torch.float32
    ):
        raise ValueError("weight_per_tensor_scale must be a 0-d float32 tensor or None")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if act_method is not None:
        check_method(act_method)
        check_window(act_window)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")


def _reference_linear(x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window):
    rows = x.reshape(-1, x.shape[-1])
    scale = torch.ones((), dtype=torch.float32, device=x.device)
    if weight_per_tensor_scale is not None:
        scale = scale * weight_per_tensor_scale
    if act_method is None or rows.shape[0] == 0:
        x_hat = rows.float()
    else:
        blocks = quantize_blocks(rows, act_method, window=act_window, per_tensor_scale=True)
        x_hat = dequantize_unscaled(blocks.qdata, blocks.scale_codes)
        scale = scale * blocks.per_tensor_scale
    out = (x_hat @ dequantize_unscaled(weight_qdata, weight_scale).t()) * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], weight_qdata.shape[0])


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
    args = (x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window)
    _check_linear_args(*args, impl)
    launcher = select_impl(impl, x.device, "gemm", "nvfp4_linear_triton")
    if launcher is None:
        return _reference_linear(*args)
    act = {"act": None} if act_method is None else {"act": "nvfp4", "method": act_method, "window": act_window}
    return launcher(*args[:5], **act)


@_linear_op.register_fake
def _linear_fake(x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl):
    _check_linear_args(x, weight_qdata, weight_scale, weight_per_tensor_scale, bias, act_method, act_window, impl)
    return x.new_empty((*x.shape[:-1], weight_qdata.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight_qdata, weight_scale, weight_per_tensor_scale, bias = inputs[:5]
    ctx.save_for_backward(weight_qdata, weight_scale, weight_per_tensor_scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Straight-through: ``grad_x = grad @ w_hat`` with the dequantized weight (activation quantization passes the
    gradient unchanged), ``grad_bias = grad`` summed over the leading dimensions; the weight bytes get none."""
    weight_qdata, weight_scale, weight_per_tensor_scale = ctx.saved_tensors
    w_hat = dequantize_unscaled(weight_qdata, weight_scale)
    if weight_per_tensor_scale is not None:
        w_hat = w_hat * weight_per_tensor_scale
    grad_x = (grad.float() @ w_hat).to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, grad_bias, None, None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def nvfp4_linear(
    x: torch.Tensor, weight: ScaleSearchNVFP4Tensor, bias: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through ``scalesearch::nvfp4_linear``: W4A16 when the weight records no
    activation quantization, W4A4 otherwise. ``impl``: "auto" (Triton on CUDA), "reference" or "triton"."""
    if not isinstance(weight, ScaleSearchNVFP4Tensor):
        raise ValueError(f"weight must be a ScaleSearchNVFP4Tensor, got {type(weight).__name__}")
    if weight.qdata.stride(-2) < weight.qdata.stride(-1):
        raise ValueError("weight is transposed; pass the (out_features, in_features) weight, as F.linear takes")
    act = weight.act_quant_kwargs
    return torch.ops.scalesearch.nvfp4_linear(
        x,
        weight.qdata,
        weight.scale.view(torch.uint8),
        weight.per_tensor_scale,
        bias,
        None if act is None else act.method,
        [] if act is None else list(act.window),
        impl,
    )


def _weight_of_transposed(operand) -> ScaleSearchNVFP4Tensor:
    """The (N, K) weight behind the (K, N) operand that ``F.linear`` passes to mm/addmm after ``aten.t``."""
    if not isinstance(operand, ScaleSearchNVFP4Tensor) or not operand.qdata.stride(-2) < operand.qdata.stride(-1):
        raise NotImplementedError(
            "ScaleSearchNVFP4Tensor supports only x @ weight.t() (what F.linear computes); "
            "dequantize() it for other products"
        )
    return operand.t()


@ScaleSearchNVFP4Tensor.implements([aten.mm.default])
def _mm(func, types, args, kwargs):
    x, weight_t = args
    return nvfp4_linear(x, _weight_of_transposed(weight_t))


@ScaleSearchNVFP4Tensor.implements([aten.addmm.default])
def _addmm(func, types, args, kwargs):
    bias, x, weight_t = args[:3]
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise NotImplementedError("addmm with beta or alpha other than 1 is not supported on an NVFP4 weight")
    return nvfp4_linear(x, _weight_of_transposed(weight_t), bias)
