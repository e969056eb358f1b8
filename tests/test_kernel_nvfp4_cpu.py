"""The C++ kernels (``kernels.nvfp4_cpu``) equal the references bit for bit (quantization: ``quantize_blocks``;
decode: ``unscaled_values``; quantize-and-decode: quantize, then decode), and their build is cached, atomic and
fails with a clear reason."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from quantize_cases import (
    assert_same_blocks,
    edge_input,
    importance_weighted_case,
    overflowing_errors_case,
    ragged_input,
    windows_case,
)

from scalesearch_compile.kernels import nvfp4_cpu
from scalesearch_compile.kernels.nvfp4_cpu import (
    decode_nvfp4_cpu,
    fake_quantize_nvfp4_cpu,
    finite_amax_cpu,
    load_library,
    quantize_nvfp4_cpu,
)
from scalesearch_compile.layout import unscaled_values
from scalesearch_compile.ops.quantize import nvfp4_quantize, quantized_activation
from scalesearch_compile.search import METHODS, QuantizeRequest, ScaleChoice, finite_amax, quantize_blocks


def check(x, method, **kwargs):
    """The C++ kernel vs the PyTorch reference on the same request."""
    ref = quantize_blocks(x, method, **kwargs)
    assert_same_blocks(quantize_nvfp4_cpu(QuantizeRequest.of(x, ScaleChoice.of(method), **kwargs)), ref)
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_tensor_scale", [True, None, "row", "tensor", "per row"])
@pytest.mark.parametrize("method", METHODS)
def test_bitwise_equal_to_reference(method, per_tensor_scale, dtype):
    x = ragged_input(dtype)
    if per_tensor_scale == "tensor":
        per_tensor_scale = torch.tensor(0.37)
    elif per_tensor_scale == "per row":
        per_tensor_scale = torch.rand(x.shape[0], 1, generator=torch.Generator().manual_seed(3)) + 0.01
    ref = check(x, method, per_tensor_scale=per_tensor_scale)
    if method != "amax":  # the comparison covers real choices, not only the amax code
        given = isinstance(per_tensor_scale, torch.Tensor)  # a given scale saturates the widest blocks
        assert (ref.offsets != 0).float().mean() > (0.02 if given else 0.05)


@pytest.mark.parametrize("per_tensor_scale", [True, None])
@pytest.mark.parametrize("method", METHODS)
def test_edge_blocks(method, per_tensor_scale):
    check(edge_input(), method, per_tensor_scale=per_tensor_scale)


@pytest.mark.parametrize("method", METHODS)
def test_block_errors_past_float32(method):
    overflowing_errors_case(check, method)


@pytest.mark.parametrize("window", [(0, 0), (-4, 2), (3, 5), (-8, -1), (-125, 125)])
def test_windows(window):
    windows_case(check, window)


def test_leading_dimensions_and_strides():
    x = ragged_input(torch.float32, rows=10, k=48).view(2, 5, 48)
    got = quantize_nvfp4_cpu(QuantizeRequest.of(x.transpose(0, 1), ScaleChoice()))  # not contiguous
    assert got.qdata.shape == (5, 2, 24) and got.scale_codes.shape == (5, 2, 3) and got.offsets.shape == (5, 2, 3)
    assert_same_blocks(got, quantize_blocks(x.transpose(0, 1), "search"))


@pytest.mark.parametrize("method", ["four_over_six", "search", "fast_search", "exhaustive"])
def test_importance_weighted_search(method):
    importance_weighted_case(check, method)


@pytest.mark.parametrize("per_tensor_scale", [True, "row"])
@pytest.mark.parametrize("method", ["amax", "search"])
def test_nan_and_inf_blocks_at_run_time(method, per_tensor_scale):
    x = ragged_input(torch.float32, rows=6, k=64)
    x[1, 3], x[4, 40], x[4, 41], x[5] = float("nan"), float("inf"), -float("inf"), float("nan")
    ref = check(x, method, per_tensor_scale=per_tensor_scale, check_finite=False)
    assert (ref.scale_codes == 127).sum() == 2 + 4 and (ref.offsets[ref.scale_codes == 127] == 0).all()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 70),
    blocks=st.integers(1, 20),
    log_scale=st.floats(-60, 60),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["amax", "four_over_six", "search", "fast_search"]),
    per_tensor_scale=st.sampled_from([True, None, "row"]),
    weighted=st.booleans(),
)
def test_random_shapes_scales_and_weights(rows, blocks, log_scale, seed, method, per_tensor_scale, weighted):
    """Any number of blocks (a partial last group of vector lanes), magnitudes from 1e-18 to 1e18, with and
    without a global scale: the same bits (an FMA contraction or a reassociated sum would flip choices)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16 * blocks, generator=g) * 2.0**log_scale
    importance = torch.rand(16 * blocks, generator=g) if weighted else None
    check(x, method, per_tensor_scale=per_tensor_scale, importance=importance)


@pytest.mark.parametrize("per_tensor_scale", [True, "row"])
def test_chunks_and_threads_give_the_same_bits(monkeypatch, per_tensor_scale):
    """Rows read in chunks (each its own global-scale slice) and blocks shared between threads: the same bits."""
    x = ragged_input(torch.bfloat16, rows=37, k=144)
    request = QuantizeRequest.of(x, ScaleChoice(), per_tensor_scale=per_tensor_scale)
    whole = quantize_nvfp4_cpu(request)
    monkeypatch.setattr(nvfp4_cpu, "CHUNK_VALUES", 5 * 144)  # 8 chunks, the last of 2 rows
    monkeypatch.setattr(nvfp4_cpu, "PARALLEL_WORK", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert nvfp4_cpu.threads_for(5 * 144, ScaleChoice()) == 3
    assert_same_blocks(quantize_nvfp4_cpu(request), whole)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4096 + 7])
def test_finite_amax_equals_the_reference(n):
    """Every length (vector body and scalar tail), NaN and +-Inf ignored, -0.0 and all-non-finite inputs."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)
    x[torch.randperm(n, generator=g)[: n // 3]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(n)[
        : n // 3
    ]
    for t in (x, -x, x[:, None].expand(n, 2).t(), torch.full((n,), float("nan")), torch.full((n,), -0.0)):
        assert torch.equal(finite_amax_cpu(t), finite_amax(t))
    assert torch.equal(finite_amax_cpu(x.bfloat16()), finite_amax(x.bfloat16()))  # the reference's ops


def test_run_time_op_takes_its_global_scale_from_the_amax_kernel():
    """``nvfp4_quantize`` at run time (impl "auto": the C++ amax and quantize kernels) equals the reference's op,
    global scale included, with a row of NaN and Inf values and in every dtype."""
    x = ragged_input(torch.float32, rows=9, k=64)
    x[2, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -3.0])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for method in ("amax", "search"):
            got, ref = nvfp4_quantize(x.to(dtype), method), nvfp4_quantize(x.to(dtype), method, impl="reference")
            assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_rejects_a_tensor_off_the_cpu():
    request = QuantizeRequest.of(torch.empty(4, 32, device="meta"), ScaleChoice(), check_finite=False)
    with pytest.raises(ValueError, match="on meta; the C\\+\\+ quantize kernel reads CPU tensors"):
        quantize_nvfp4_cpu(request)


def test_build_is_cached_by_source_and_flags(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SCALESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        first = load_library.__wrapped__()
    assert "building the C++ quantize kernel" in caplog.text  # a first use says why it takes seconds
    built = sorted(os.listdir(tmp_path / "cache"))
    assert len(built) == 1 and built[0].startswith("nvfp4_cpu_") and built[0].endswith(".so")  # no leftovers
    mtime = (tmp_path / "cache" / built[0]).stat().st_mtime_ns
    second = load_library.__wrapped__()
    assert (tmp_path / "cache" / built[0]).stat().st_mtime_ns == mtime  # found, not rebuilt
    assert first._name == second._name


@pytest.mark.parametrize(
    "compiler, message",
    [("/nonexistent/c++", "cannot run the C\\+\\+ compiler"), ("false", "building nvfp4_cpu.cpp failed")],
)
def test_build_failure_names_the_reason(tmp_path, monkeypatch, compiler, message):
    monkeypatch.setenv("SCALESEARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", compiler)
    with pytest.raises(RuntimeError, match=message):
        load_library.__wrapped__()
    assert os.listdir(tmp_path) == []  # nothing half-written left behind


def test_a_compiler_without_openmp_builds_a_one_thread_library(tmp_path, monkeypatch, caplog):
    """A compiler that refuses -fopenmp (Apple's clang) still gets a library, whose pragmas run on one thread, with
    a warning; the next process finds that build instead of failing again."""
    compiler = tmp_path / "cxx"
    compiler.write_text('#!/bin/sh\ncase "$*" in *-fopenmp*) echo "unsupported option -fopenmp" >&2; exit 1;; esac\n'
                        'exec c++ "$@"\n')  # fmt: skip
    compiler.chmod(0o755)
    monkeypatch.setenv("SCALESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    with caplog.at_level(logging.WARNING, logger="scalesearch_compile"):
        library = load_library.__wrapped__()
    assert "with OpenMP failed, so it runs on one thread" in caplog.text and "-fopenmp" in caplog.text
    assert library._name == str(nvfp4_cpu._library_path(tmp_path / "cache", parallel=False))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        assert load_library.__wrapped__()._name == library._name
    assert caplog.text == ""  # found, not rebuilt, no second warning
    monkeypatch.setattr(nvfp4_cpu, "load_library", lambda: library)
    monkeypatch.setattr(nvfp4_cpu, "PARALLEL_WORK", 1)  # the OpenMP pragmas, here ignored
    check(ragged_input(torch.float32, rows=19, k=112), "search")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_the_library_uses_pytorchs_openmp_runtime():
    """The threads come from the OpenMP runtime PyTorch loaded (one libgomp in the process, wherever PyTorch's
    build keeps it), not a second pool."""
    load_library()
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(runtimes) == 1
    assert "libgomp" in subprocess.run(["ldd", load_library()._name], capture_output=True, text=True).stdout


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SCALESEARCH_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: cannot exist
    with pytest.raises(RuntimeError, match="cannot write the kernel cache .*set SCALESEARCH_CACHE_DIR"):
        load_library.__wrapped__()


CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]  # each machine runs the builds up to its own


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_every_vector_width_gives_the_same_bits(tmp_path, monkeypatch, capability):
    """The 16-, 8- and 4-lane builds (AVX-512, AVX2, the compiler's default) all compute the reference's bits."""
    own = torch.backends.cpu.get_cpu_capability()
    if own not in CAPABILITIES or CAPABILITIES.index(capability) > CAPABILITIES.index(own):
        pytest.skip(f"this CPU runs {own} code")
    monkeypatch.setenv("SCALESEARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    library = load_library.__wrapped__()  # built for `capability`
    monkeypatch.setattr(nvfp4_cpu, "load_library", lambda: library)
    x = ragged_input(torch.float32, rows=19, k=112)  # 133 blocks: a partial last group at every width
    x[3, 5] = float("nan")
    for method in ("amax", "search"):
        check(x, method, per_tensor_scale="row", check_finite=False)
        check(x[:, 16:], method, importance=torch.rand(96), check_finite=False)


def reference_activation(x, scales):
    """``ops.quantize.fake_quantize`` by the PyTorch references: quantize, then decode."""
    return quantized_activation(QuantizeRequest.of(x, scales, check_finite=False))


def assert_same_activation(got, ref):
    (values, pts), (ref_values, ref_pts) = got, ref
    assert values.dtype == torch.float32 and pts.shape == ()
    assert torch.equal(values.reshape(ref_values.shape).view(torch.int32), ref_values.view(torch.int32))
    assert torch.equal(pts.view(torch.int32), ref_pts.view(torch.int32))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    blocks=st.integers(1, 12),
    log_scale=st.floats(-60, 60),
    seed=st.integers(0, 2**16),
    code_range=st.sampled_from([(0, 127), (0, 128)]),
)
def test_decode_equals_unscaled_values(rows, blocks, log_scale, seed, code_range):
    """Every byte and every scale code 0..126 (a partial last group of lanes too) decodes to the reference's bits;
    code 127 (NaN) to NaN."""
    g = torch.Generator().manual_seed(seed)
    qdata = torch.randint(0, 256, (rows, 8 * blocks), dtype=torch.uint8, generator=g)
    scale_codes = torch.randint(*code_range, (rows, blocks), dtype=torch.uint8, generator=g)
    assert torch.equal(
        decode_nvfp4_cpu(qdata, scale_codes).view(torch.int32), unscaled_values(qdata, scale_codes).view(torch.int32)
    )


def test_decode_on_two_threads_and_of_any_layout(monkeypatch):
    qdata = torch.arange(256, dtype=torch.uint8).repeat(18).view(2, 9, 256)  # every byte
    scale_codes = torch.arange(2 * 9 * 32).remainder(127).to(torch.uint8).view(2, 9, 32)
    ref = unscaled_values(qdata, scale_codes)
    monkeypatch.setattr(nvfp4_cpu, "DECODE_PARALLEL_VALUES", 1)
    assert torch.equal(decode_nvfp4_cpu(qdata, scale_codes).view(torch.int32), ref.view(torch.int32))
    transposed = decode_nvfp4_cpu(qdata.transpose(0, 1), scale_codes.transpose(0, 1))  # not contiguous
    assert torch.equal(transposed.view(torch.int32), ref.transpose(0, 1).contiguous().view(torch.int32))
    # negative scales (the sign bit), which no quantizer writes: NaN, never another block's value
    assert decode_nvfp4_cpu(qdata[0, :1, :8], torch.tensor([[200]], dtype=torch.uint8)).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["amax", "four_over_six", "search"])
def test_fake_quantize_equals_quantize_then_decode(method, dtype):
    """Run-time activations quantized and decoded in one pass: the reference's values and global scale, bit for bit,
    NaN and Inf rows included (NaN blocks, the global scale from the finite values)."""
    x = ragged_input(dtype, rows=9, k=96)
    x[2, 5], x[7, 60] = float("nan"), float("inf")
    scales = ScaleChoice.of(method)
    got = fake_quantize_nvfp4_cpu(x, scales)
    assert_same_activation(got, reference_activation(x, scales))
    assert got[0][2, :16].isnan().all() and not got[0][2, 16:].isnan().any()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 50),
    blocks=st.integers(1, 12),
    log_scale=st.floats(-130, 125),
    seed=st.integers(0, 2**16),
    window=st.sampled_from([(-2, 6), (0, 0), (-8, 8), (-1, 1)]),
)
def test_fake_quantize_random_shapes_and_magnitudes(rows, blocks, log_scale, seed, window):
    """Magnitudes from float32 subnormals to 2**125 (the global scale clamped at 2**-126), any number of blocks."""
    x = torch.randn(rows, 16 * blocks, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    scales = ScaleChoice("search", window)
    assert_same_activation(fake_quantize_nvfp4_cpu(x, scales), reference_activation(x, scales))


def test_fake_quantize_on_threads_and_of_zeros(monkeypatch):
    monkeypatch.setattr(nvfp4_cpu, "PARALLEL_WORK", 1)
    x = ragged_input(torch.float32, rows=33, k=80)
    assert_same_activation(fake_quantize_nvfp4_cpu(x, ScaleChoice()), reference_activation(x, ScaleChoice()))
    zeros = torch.zeros(3, 32)
    values, pts = fake_quantize_nvfp4_cpu(zeros, ScaleChoice())
    assert_same_activation((values, pts), reference_activation(zeros, ScaleChoice()))
    assert pts == 2.0**-126 and (values == 0).all()
