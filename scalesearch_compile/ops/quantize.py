"""Custom ops ``scalesearch::quantize_nvfp4`` (NVFP4 quantization at run time: reference, Triton or C++) and
``scalesearch::fake_quantize_nvfp4`` (run-time activations quantized and decoded, as a W4A4 product reads them).

Numerics: exactly :func:`scalesearch_compile.search.quantize_reference` at run time (``check_finite=False``:
no value is read on the host; a block holding NaN or Inf gets the NaN scale code 127); the Triton kernel
matches it bit for bit. Outputs: ``qdata`` uint8 ``(..., K // 2)`` (element 2i in the low nibble);
``scale_codes`` uint8 ``(..., K // 16)``, the float8_e4m3fn bit patterns; the global scale float32, 0-d or one
per row ``(..., 1)``. Single-level scaling returns a global scale of 1.0, which gives the same bits
(multiplying and dividing by 1.0 is exact), so the op always returns three tensors. The schema carries
``per_tensor_scale`` as a mode ("tensor", "row", "none" or "given") and the given scale.

``fake_quantize_nvfp4``: exactly :func:`quantized_activation` of ``QuantizeRequest.of(x, ScaleChoice(method,
window), check_finite=False)``: float32 values ``(..., K)``, ``e2m1(code) * e4m3(scale code)`` (the global scale
left out, exact), and the global scale of x's finite amax (0-d). On a CPU ``impl="auto"`` runs it as one C++ pass
(``kernels.nvfp4_cpu``), the codes never stored; elsewhere quantize, then decode.
"""

import torch
from torch._subclasses.fake_tensor import is_fake

from scalesearch_compile.layout import BLOCK_SIZE, unscaled_values
from scalesearch_compile.ops.dispatch import check_impl, decoder, kernel, quantizer
from scalesearch_compile.search import (
    PerTensorScale,
    QuantizeRequest,
    ScaleChoice,
    check_dtype_and_shape,
    global_scale,
    quantize_reference,
)

# per_tensor_scale as the op's schema carries it: a mode, and the scale itself when one is given
_SCALE_MODES = {True: "tensor", "row": "row", None: "none", False: "none"}


def _per_tensor_scale(scale_mode: str, given_scale: torch.Tensor | None):
    """The ``per_tensor_scale`` argument of :meth:`QuantizeRequest.of` for the op's mode and given scale."""
    return given_scale if scale_mode == "given" else {"tensor": True, "row": "row", "none": None}[scale_mode]


def _run_time_scale(x: torch.Tensor, scale_mode: str, given_scale: torch.Tensor | None, impl: str):
    """:func:`_per_tensor_scale`, with the "tensor" mode's global scale resolved here when ``impl`` has an amax
    kernel for x's device (a C++ pass on a CPU; the same value as ``search.finite_amax``)."""
    amax = kernel("finite_amax", impl, x.device) if scale_mode == "tensor" else None
    return global_scale(amax(x)) if amax is not None else _per_tensor_scale(scale_mode, given_scale)


@torch.library.custom_op("scalesearch::quantize_nvfp4", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    method: str,
    window: list[int],
    scale_mode: str,
    given_scale: torch.Tensor | None,
    importance: torch.Tensor | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_dtype_and_shape(x)  # before the amax kernel reads x
    request = QuantizeRequest.of(
        x,
        ScaleChoice(method, window),
        per_tensor_scale=_run_time_scale(x, scale_mode, given_scale, impl),
        importance=importance,
        check_finite=False,
    )
    blocks = quantizer(impl, x)(request)
    pts = blocks.per_tensor_scale
    if pts is None:
        pts = torch.ones((), dtype=torch.float32, device=x.device)
    elif scale_mode == "given":
        pts = pts.clone()  # an output may not alias an input
    return blocks.qdata, blocks.scale_codes, pts


@_quantize_op.register_fake
def _quantize_fake(x, method, window, scale_mode, given_scale, importance, impl):
    # the real op's validation (it reads no value); a meta argument beside real ones also lands here
    per_tensor_scale = _per_tensor_scale(scale_mode, given_scale)
    QuantizeRequest.of(
        x, ScaleChoice(method, window), per_tensor_scale=per_tensor_scale, importance=importance, check_finite=False
    )
    check_impl(impl)
    lead, k = x.shape[:-1], x.shape[-1]
    per_row = scale_mode == "row" or (given_scale is not None and given_scale.numel() != 1)
    return (
        x.new_empty((*lead, k // 2), dtype=torch.uint8),
        x.new_empty((*lead, k // BLOCK_SIZE), dtype=torch.uint8),
        x.new_empty((*lead, 1) if per_row else (), dtype=torch.float32),
    )


def nvfp4_quantize(
    x: torch.Tensor,
    method: str | ScaleChoice = "search",
    *,
    per_tensor_scale: PerTensorScale = True,
    importance: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., K) through ``scalesearch::quantize_nvfp4``: (qdata, scale codes, global scale).

    ``method`` and ``importance`` as :func:`quantize_blocks`. ``per_tensor_scale``: True for torchao's
    ``amax / (448 * 6)``; "row" for one such scale per row (returned ``(..., 1)``); a tensor (one element, or
    ``(..., 1)``) used as given, after checking that it is positive and finite (one read on the host); None or
    False for single-level scaling (returned as 1.0). ``impl``: "auto" (Triton on CUDA, the C++ kernel on a CPU,
    the same bits; ``ops.dispatch``), "reference" or "triton". At run time nothing else is read: NaN/Inf in x
    give NaN blocks (``search``).
    """
    scales = ScaleChoice.of(method)
    if isinstance(per_tensor_scale, torch.Tensor):
        mode, given = "given", per_tensor_scale  # its shape, dtype and device are checked by the op
        checkable = given.is_floating_point() and given.device.type != "meta"
        if checkable and not bool(((given > 0) & given.isfinite()).all()):
            raise ValueError("per_tensor_scale must be positive and finite")
    elif isinstance(per_tensor_scale, bool | str | None) and per_tensor_scale in _SCALE_MODES:
        mode, given = _SCALE_MODES[per_tensor_scale], None
    else:
        raise ValueError(
            f"unknown per_tensor_scale {per_tensor_scale!r}; expected True, None, False, 'row' or a tensor"
        )
    return torch.ops.scalesearch.quantize_nvfp4(
        x, scales.method, list(scales.window), mode, given, importance, check_impl(impl)
    )


def quantized_activation(
    request: QuantizeRequest, quantize=quantize_reference, decode=unscaled_values
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The activations of ``request`` as the W4A4 product reads them: float32 ``e2m1 * e4m3`` values and their
    global scale, quantized by ``quantize`` (:func:`quantize_reference`, or what computes the same bits: the C++
    kernel, the op) and decoded by ``decode`` (:func:`unscaled_values`, or the same bits: the C++ kernel)."""
    blocks = quantize(request)
    return decode(blocks.qdata, blocks.scale_codes), blocks.per_tensor_scale


def fake_quantize(x: torch.Tensor, scales: ScaleChoice, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-time activations ``x`` (..., K) as the W4A4 product reads them (module docstring), by the fused kernel
    ``impl`` picks for x's device, else by its quantize and decode kernels (or references)."""
    fused = None if is_fake(x) else kernel("fake_quantize", impl, x.device)
    if fused is not None:
        values, pts = fused(x, scales)
        return values.view(x.shape), pts
    request = QuantizeRequest.of(x, scales, check_finite=False)
    return quantized_activation(request, quantize=quantizer(impl, x), decode=decoder(impl, x))


def _checked_activation(x: torch.Tensor, method: str, window: list[int], impl: str) -> ScaleChoice:
    """The scale choice of a ``fake_quantize_nvfp4`` call, after checking its arguments (no value is read)."""
    scales = ScaleChoice(method, window)
    QuantizeRequest.of(x, scales, per_tensor_scale=None, check_finite=False)
    check_impl(impl)
    return scales


@torch.library.custom_op("scalesearch::fake_quantize_nvfp4", mutates_args=())
def _fake_quantize_op(x: torch.Tensor, method: str, window: list[int], impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return fake_quantize(x, _checked_activation(x, method, window, impl), impl)


@_fake_quantize_op.register_fake
def _fake_quantize_fake(x, method, window, impl):
    _checked_activation(x, method, window, impl)
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty((), dtype=torch.float32)
