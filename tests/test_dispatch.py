"""ops.dispatch: the one place that chooses between the PyTorch reference, a Triton kernel and a C++ kernel."""

import warnings

import pytest
import torch

from scalesearch_compile import backend, nvfp4_linear, nvfp4_quantize
from scalesearch_compile.ops import dispatch
from scalesearch_compile.ops.attention import nvfp4_attention
from scalesearch_compile.tensor import quantize_weight

CUDA = torch.device("cuda")  # only its type is read: no GPU is needed


@pytest.fixture
def broken_kernels(monkeypatch):
    """Kernel modules that fail to import, as on a machine with a broken Triton or no C++ compiler."""
    monkeypatch.setattr(dispatch, "_load", lambda module, name: (None, f"importing {module} failed: no toolchain"))
    dispatch._warn_fallback.cache_clear()
    yield
    dispatch._warn_fallback.cache_clear()


def test_reference_and_auto_without_a_kernel_for_the_device_load_nothing(monkeypatch):
    monkeypatch.setattr(dispatch, "_load", lambda module, name: pytest.fail("loaded a kernel"))
    for op in dispatch.KERNELS:
        for device in (CUDA, torch.device("cpu"), torch.device("meta")):
            assert dispatch.kernel(op, "reference", device) is None
        assert dispatch.kernel(op, "auto", torch.device("meta")) is None
        if op not in dispatch.CPU_KERNELS:
            assert dispatch.kernel(op, "auto", torch.device("cpu")) is None


def test_auto_on_cpu_runs_the_c_quantize_kernel():
    from scalesearch_compile.kernels.nvfp4_cpu import quantize_nvfp4_cpu
    from scalesearch_compile.search import quantize_reference

    assert dispatch.kernel("quantize", "auto", torch.device("cpu")) is quantize_nvfp4_cpu
    assert dispatch.quantizer("auto", torch.ones(1)) is quantize_nvfp4_cpu
    assert dispatch.quantizer("reference", torch.ones(1)) is quantize_reference
    with torch._subclasses.fake_tensor.FakeTensorMode():  # traced: the reference's operations go into the graph
        assert dispatch.quantizer("auto", torch.ones(1)) is quantize_reference


def test_auto_on_cpu_without_a_compiler_warns_once_and_runs_the_reference(broken_kernels):
    from scalesearch_compile.search import quantize_reference

    message = r"reference on cpu because .*no toolchain.*install a C\+\+ compiler, or set CXX"
    with pytest.warns(RuntimeWarning, match=message):
        assert dispatch.quantizer("auto", torch.ones(1)) is quantize_reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.randn(4, 32)
        codes, scales, pts = nvfp4_quantize(x)  # runs, the reference's bits
        assert torch.equal(codes, nvfp4_quantize(x, impl="reference")[0])


def test_auto_on_cuda_without_a_kernel_warns_once_with_the_reason(broken_kernels):
    with pytest.warns(RuntimeWarning, match=r"impl='auto' runs the slow PyTorch reference on cuda.*no toolchain"):
        assert dispatch.kernel("linear", "auto", CUDA) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call: no second warning
        assert dispatch.kernel("linear", "auto", CUDA) is None
    with pytest.warns(RuntimeWarning, match="kernels.attention cannot be loaded"):  # each kernel module once
        dispatch.kernel("attention", "auto", CUDA)


def test_triton_without_a_kernel_is_an_error_naming_why(broken_kernels):
    with pytest.raises(NotImplementedError, match="impl='triton' is not available: importing .*quantize failed"):
        dispatch.kernel("quantize", "triton", torch.device("cpu"))


def test_auto_on_cuda_returns_the_launcher():
    pytest.importorskip("triton")
    from scalesearch_compile.kernels.gemm import nvfp4_linear_triton

    assert dispatch.kernel("linear", "auto", CUDA) is nvfp4_linear_triton


def test_every_entry_point_rejects_an_unknown_impl_the_same_way():
    message = "unknown impl 'cuda'; expected one of auto, reference, triton"
    x, weight = torch.randn(2, 64), quantize_weight(torch.randn(16, 64))
    q = torch.randn(1, 1, 8, 64)
    calls = [
        lambda: nvfp4_linear(x, weight, impl="cuda"),
        lambda: nvfp4_quantize(x, impl="cuda"),
        lambda: nvfp4_attention(q, q, q, impl="cuda"),
        lambda: torch.ops.scalesearch.nvfp4_linear(x, weight.qdata, weight.scale, None, None, None, [], "cuda"),
        lambda: backend(impl="cuda"),
    ]
    for call in calls:
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == message
