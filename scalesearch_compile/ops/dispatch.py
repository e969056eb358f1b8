"""Implementation dispatch: whether an op runs its PyTorch reference, its Triton kernel or its C++ kernel (decided
here only).

``impl``: "reference" always runs the reference; "triton" runs the Triton kernel or raises NotImplementedError
saying why it cannot be loaded; "auto" runs the Triton kernel on CUDA tensors, the C++ kernel on CPU tensors where
the op has one (quantization and decode: ``kernels.nvfp4_cpu``, built on first use with the system C++ compiler),
and the reference elsewhere; when the kernel it would run cannot be loaded it warns once (with the reason) and runs the
reference. Every kernel computes the reference's codes and scales bit for bit.
Kernel modules are imported on first use, so the package imports without Triton, a GPU or a C++ compiler.
Where the reference runs on a CPU, a compiled graph gets the reference itself traced in instead of the opaque
op (:func:`lowers`, :mod:`scalesearch_compile.ops.lowering`), so that Inductor fuses it.
"""

import functools
import importlib
import warnings
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from scalesearch_compile.layout import NVFP4Blocks, unscaled_values
from scalesearch_compile.search import QuantizeRequest, quantize_reference

IMPLS = ("auto", "reference", "triton")

# op name -> (kernel module, launcher) of the Triton kernels
KERNELS = {
    "quantize": ("scalesearch_compile.kernels.quantize", "quantize_nvfp4_triton"),
    "linear": ("scalesearch_compile.kernels.gemm", "nvfp4_linear_triton"),
    "grouped_linear": ("scalesearch_compile.kernels.gemm", "nvfp4_grouped_linear_triton"),
    "attention": ("scalesearch_compile.kernels.attention", "nvfp4_attention_triton"),
}
# op name -> (kernel module, launcher) of the C++ kernels "auto" runs on CPU tensors ("decode":
# layout.unscaled_values; "fake_quantize": ops.quantize.fake_quantize; "finite_amax": search.finite_amax, the
# run-time global scale's amax)
CPU_KERNELS = {
    "quantize": ("scalesearch_compile.kernels.nvfp4_cpu", "quantize_nvfp4_cpu"),
    "decode": ("scalesearch_compile.kernels.nvfp4_cpu", "decode_nvfp4_cpu"),
    "fake_quantize": ("scalesearch_compile.kernels.nvfp4_cpu", "fake_quantize_nvfp4_cpu"),
    "finite_amax": ("scalesearch_compile.kernels.nvfp4_cpu", "finite_amax_cpu"),
}


def check_impl(impl) -> str:
    """``impl`` if it is one of :data:`IMPLS`, else ValueError naming it."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")
    return impl


@functools.cache
def _load(module: str, name: str) -> tuple[Callable | None, str]:
    """The launcher ``name`` of kernel ``module`` and '' if it can be imported, else None and the reason."""
    try:
        launcher = getattr(importlib.import_module(module), name, None)
    except Exception as error:  # no Triton (or one too old or broken for the module), or no C++ compiler
        return None, f"importing {module} failed: {type(error).__name__}: {error}"
    return launcher, "" if launcher is not None else f"{module} has no {name}"


@functools.cache
def _warn_fallback(module: str, device_type: str, reason: str) -> None:
    """Say once per kernel module that its ops run their references instead."""
    remedy = "fix the Triton install"
    if device_type != "cuda":
        remedy = "install a C++ compiler, or set CXX or SCALESEARCH_CACHE_DIR as the reason says"
    warnings.warn(
        f"scalesearch: impl='auto' runs the slow PyTorch reference on {device_type} because {module} cannot be "
        f"loaded ({reason}); pass impl='reference' to silence this, or {remedy}",
        RuntimeWarning,
        stacklevel=3,
    )


def kernel(op: str, impl: str, device: torch.device) -> Callable | None:
    """The kernel launcher ``op`` (a key of :data:`KERNELS` or :data:`CPU_KERNELS`) should run for tensors on
    ``device``, or None for the PyTorch reference (module docstring; an op without a kernel for the device, or for
    Triton, runs its reference)."""
    check_impl(impl)
    if impl == "reference":
        return None
    if impl == "auto" and device.type != "cuda":
        kernels = CPU_KERNELS if device.type == "cpu" else {}
    else:
        kernels = KERNELS
    if op not in kernels:
        return None
    module, name = kernels[op]
    launcher, reason = _load(module, name)
    if launcher is None:
        if impl == "triton":
            raise NotImplementedError(f"impl='triton' is not available: {reason}; use impl='reference'")
        _warn_fallback(module, device.type, reason)
    return launcher


def quantizer(impl: str, x: torch.Tensor) -> Callable[[QuantizeRequest], NVFP4Blocks]:
    """What quantizes a :class:`QuantizeRequest` of ``x`` for ``impl``: the kernel :func:`kernel` picks for x's
    device, or :func:`~scalesearch_compile.search.quantize_reference` (the same bits either way); the reference
    for a fake tensor, as in a backward traced for a compiled graph, since a kernel reads real memory."""
    return (None if is_fake(x) else kernel("quantize", impl, x.device)) or quantize_reference


def decoder(impl: str, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What decodes NVFP4 codes ``(qdata, scale_codes)`` on x's device for ``impl`` (unscaled, as
    :func:`~scalesearch_compile.layout.unscaled_values`): the kernel :func:`kernel` picks, or the reference (the
    same bits); the reference for a fake tensor."""
    return (None if is_fake(x) else kernel("decode", impl, x.device)) or unscaled_values


def lowers(op: str, x: torch.Tensor, impl: str) -> bool:
    """Whether ``op`` on ``x`` is being traced for a compiled graph by AOTAutograd (fake tensors; not by Dynamo,
    whose graph keeps the op for the backend, nor by torch.export) on a CPU, where ``impl`` runs the reference:
    then the graph gets the reference's own operations, which Inductor fuses, instead of an opaque call of the op
    (:mod:`scalesearch_compile.ops.lowering`)."""
    if torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting():
        return False
    return x.device.type == "cpu" and is_fake(x) and kernel(op, impl, x.device) is None
