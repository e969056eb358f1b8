"""Custom op ``scalesearch::quantize_nvfp4`` and the choice between the PyTorch reference and Triton.

Numerics: exactly :func:`scalesearch_compile.search.quantize_blocks` with a per-tensor scale or none (the
reference); the Triton launcher ``kernels.quantize.quantize_nvfp4_triton`` must match it bit for bit.
Outputs: ``qdata`` uint8 ``(..., K // 2)`` (element 2i in the low nibble); ``scale_codes`` uint8
``(..., K // 16)``, the float8_e4m3fn bit patterns (the scalesearch ops pass E4M3 scales as uint8 because
CPU PyTorch cannot compare float8 tensors, which opcheck does); ``per_tensor_scale`` float32 0-d.
Single-level scaling returns a per-tensor scale of 1.0, which gives the same bits (multiplying and dividing
by 1.0 is exact), so the op always returns three tensors.
"""

import functools
import importlib
from collections.abc import Callable, Sequence

import torch

from scalesearch_compile.search import (
    BLOCK_SIZE,
    DEFAULT_WINDOW,
    check_dtype_and_shape,
    check_method,
    check_window,
    quantize_blocks,
)

IMPLS = ("auto", "reference", "triton")


@functools.cache
def _find_launcher(module: str, name: str) -> tuple[Callable | None, str]:
    """``scalesearch_compile.kernels.<module>.<name>`` and '' if importable, else None and the reason."""
    path = f"scalesearch_compile.kernels.{module}"
    try:
        launcher = getattr(importlib.import_module(path), name, None)
    except ImportError as error:  # no Triton here, or the kernel module is not written yet
        return None, f"importing {path} failed: {error}"
    return launcher, "" if launcher is not None else f"{path} has no {name}"


def select_impl(impl: str, device: torch.device, module: str, name: str):
    """The Triton launcher to call, or None for the PyTorch reference.

    "reference": always the reference. "triton": the launcher, or NotImplementedError saying why it is
    missing. "auto": the launcher on CUDA when it exists, otherwise the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl == "reference":
        return None
    launcher, missing = _find_launcher(module, name)
    if impl == "auto":
        return launcher if device.type == "cuda" else None
    if launcher is None:
        raise NotImplementedError(f"impl='triton' is not available: {missing}; use impl='reference'")
    return launcher


@torch.library.custom_op("scalesearch::quantize_nvfp4", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    method: str,
    window: list[int],
    per_tensor_scale: bool,
    importance: torch.Tensor | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_dtype_and_shape(x, "input")
    quantize = select_impl(impl, x.device, "quantize", "quantize_nvfp4_triton") or quantize_blocks
    scale = True if per_tensor_scale else None
    blocks = quantize(x, method, window=window, per_tensor_scale=scale, importance=importance)
    pts = blocks.per_tensor_scale
    if pts is None:
        pts = torch.ones((), dtype=torch.float32, device=x.device)
    return blocks.qdata, blocks.scale_codes, pts


@_quantize_op.register_fake
def _quantize_fake(x, method, window, per_tensor_scale, importance, impl):
    check_dtype_and_shape(x, "input")
    check_method(method)
    check_window(window)
    lead, k = x.shape[:-1], x.shape[-1]
    return (
        x.new_empty((*lead, k // 2), dtype=torch.uint8),
        x.new_empty((*lead, k // BLOCK_SIZE), dtype=torch.uint8),
        x.new_empty((), dtype=torch.float32),
    )


def nvfp4_quantize(
    x: torch.Tensor,
    method: str = "search",
    *,
    window: Sequence[int] = DEFAULT_WINDOW,
    per_tensor_scale: bool = True,
    importance: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (..., K) through ``scalesearch::quantize_nvfp4``: (qdata, scale codes, per-tensor scale).

    ``method``/``window``/``importance`` as :func:`quantize_blocks`; ``per_tensor_scale`` True for torchao's
    ``amax / (448 * 6)``, False for single-level scaling (returned as 1.0). ``impl``: "auto" (Triton on CUDA,
    reference elsewhere), "reference" or "triton".
    """
    check_method(method)
    return torch.ops.scalesearch.quantize_nvfp4(
        x, method, list(check_window(window)), bool(per_tensor_scale), importance, impl
    )
