"""Implementation dispatch: whether an op runs its PyTorch reference or its Triton kernel (decided here only).

``impl``: "reference" always runs the reference; "triton" runs the kernel or raises NotImplementedError saying
why it cannot be loaded; "auto" runs the kernel on CUDA tensors and the reference elsewhere, and when the
kernel cannot be loaded on CUDA it warns once (with the reason) and runs the reference.
Kernel modules are imported on first use, so the package imports without Triton or a GPU.
Where the reference runs on a CPU, a compiled graph gets the reference itself traced in instead of the opaque
op (:func:`lowers`, :mod:`scalesearch_compile.ops.lowering`), so that Inductor fuses it.
"""

import functools
import importlib
import warnings
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

IMPLS = ("auto", "reference", "triton")

# op name -> (kernel module, launcher)
KERNELS = {
    "quantize": ("scalesearch_compile.kernels.quantize", "quantize_nvfp4_triton"),
    "linear": ("scalesearch_compile.kernels.gemm", "nvfp4_linear_triton"),
    "grouped_linear": ("scalesearch_compile.kernels.gemm", "nvfp4_grouped_linear_triton"),
    "attention": ("scalesearch_compile.kernels.attention", "nvfp4_attention_triton"),
}


def check_impl(impl) -> str:
    """``impl`` if it is one of :data:`IMPLS`, else ValueError naming it."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")
    return impl


@functools.cache
def _load(op: str) -> tuple[Callable | None, str]:
    """The launcher of ``op`` and '' if it can be imported, else None and the reason."""
    module, name = KERNELS[op]
    try:
        launcher = getattr(importlib.import_module(module), name, None)
    except Exception as error:  # no Triton, or a Triton too old or broken for the kernel module
        return None, f"importing {module} failed: {type(error).__name__}: {error}"
    return launcher, "" if launcher is not None else f"{module} has no {name}"


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(
        f"scalesearch {op}: impl='auto' runs the slow PyTorch reference on CUDA because the Triton kernel "
        f"cannot be loaded ({reason}); pass impl='reference' to silence this, or fix the Triton install",
        RuntimeWarning,
        stacklevel=3,
    )


def kernel(op: str, impl: str, device: torch.device) -> Callable | None:
    """The Triton launcher ``op`` ("quantize", "linear" or "attention") should run for tensors on ``device``,
    or None for the PyTorch reference (module docstring)."""
    check_impl(impl)
    if impl == "reference" or (impl == "auto" and device.type != "cuda"):
        return None
    launcher, reason = _load(op)
    if launcher is not None:
        return launcher
    if impl == "triton":
        raise NotImplementedError(f"impl='triton' is not available: {reason}; use impl='reference'")
    _warn_fallback(op, reason)
    return None


def lowers(op: str, x: torch.Tensor, impl: str) -> bool:
    """Whether ``op`` on ``x`` is being traced for a compiled graph by AOTAutograd (fake tensors; not by Dynamo,
    whose graph keeps the op for the backend, nor by torch.export) on a CPU, where ``impl`` runs the reference:
    then the graph gets the reference's own operations, which Inductor fuses, instead of an opaque call of the op
    (:mod:`scalesearch_compile.ops.lowering`)."""
    if torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting():
        return False
    return x.device.type == "cpu" and is_fake(x) and kernel(op, impl, x.device) is None
