"""Building torchao ``NVFP4Tensor`` objects from searched block scales, and reading them back.

Layout (torchao's, unswizzled): ``qdata`` uint8 ``(..., K // 2)``, element 2i in the low nibble of byte i;
``scale`` float8_e4m3fn ``(..., K // 16)``; ``per_tensor_scale`` float32 0-d tensor or None;
``block_size`` 16; ``orig_dtype`` the input's dtype. The tensor dequantizes to
``e2m1_value(code) * (per_tensor_scale * scale)``, exactly :meth:`NVFP4Blocks.dequantize`.
"""

from collections.abc import Sequence

import torch
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

from scalesearch_compile.search import (
    BLOCK_SIZE,
    DEFAULT_WINDOW,
    NVFP4Blocks,
    PerTensorScale,
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
