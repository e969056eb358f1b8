"""Custom op ``scalesearch::quantize_nvfp4``: NVFP4 quantization at run time, reference or Triton.

Numerics: exactly :func:`scalesearch_compile.search.quantize_reference` with a per-tensor scale or none, at
run time (``check_finite=False``: no value is read on the host; a block holding NaN or Inf gets the NaN scale
code 127); the Triton kernel matches it bit for bit. Outputs: ``qdata`` uint8 ``(..., K // 2)`` (element 2i
in the low nibble); ``scale_codes`` uint8 ``(..., K // 16)``, the float8_e4m3fn bit patterns;
``per_tensor_scale`` float32 0-d. Single-level scaling returns a per-tensor scale of 1.0, which gives the same
bits (multiplying and dividing by 1.0 is exact), so the op always returns three tensors.
"""

import torch

from scalesearch_compile.layout import BLOCK_SIZE
from scalesearch_compile.ops.dispatch import check_impl, kernel
from scalesearch_compile.search import QuantizeRequest, ScaleChoice, check_dtype_and_shape, quantize_reference


@torch.library.custom_op("scalesearch::quantize_nvfp4", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    method: str,
    window: list[int],
    per_tensor_scale: bool,
    importance: torch.Tensor | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    request = QuantizeRequest.of(
        x,
        ScaleChoice(method, window),
        per_tensor_scale=per_tensor_scale,
        importance=importance,
        check_finite=False,
    )
    blocks = (kernel("quantize", impl, x.device) or quantize_reference)(request)
    pts = blocks.per_tensor_scale
    if pts is None:
        pts = torch.ones((), dtype=torch.float32, device=x.device)
    return blocks.qdata, blocks.scale_codes, pts


@_quantize_op.register_fake
def _quantize_fake(x, method, window, per_tensor_scale, importance, impl):
    check_dtype_and_shape(x, "input")
    ScaleChoice(method, window)
    check_impl(impl)
    lead, k = x.shape[:-1], x.shape[-1]
    return (
        x.new_empty((*lead, k // 2), dtype=torch.uint8),
        x.new_empty((*lead, k // BLOCK_SIZE), dtype=torch.uint8),
        x.new_empty((), dtype=torch.float32),
    )


def nvfp4_quantize(
    x: torch.Tensor,
    method: str | ScaleChoice = "search",
    *,
    per_tensor_scale: bool = True,
    importance: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., K) through ``scalesearch::quantize_nvfp4``: (qdata, scale codes, per-tensor scale).

    ``method`` and ``importance`` as :func:`quantize_blocks`; ``per_tensor_scale`` True for torchao's
    ``amax / (448 * 6)``, False for single-level scaling (returned as 1.0). ``impl``: "auto" (Triton on CUDA,
    reference elsewhere), "reference" or "triton".
    """
    scales = ScaleChoice.of(method)
    return torch.ops.scalesearch.quantize_nvfp4(
        x, scales.method, list(scales.window), bool(per_tensor_scale), importance, check_impl(impl)
    )
