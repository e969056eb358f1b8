"""The Triton quantize kernel equals ``quantize_blocks`` bit for bit (qdata, scale codes, offsets).

Runs the kernel in Triton's interpreter on a CPU (TRITON_INTERPRET=1, set here before any kernel module is
imported) and natively on a GPU.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from quantize_cases import (  # noqa: E402
    assert_same_blocks,
    edge_input,
    importance_weighted_case,
    overflowing_errors_case,
    ragged_input,
    windows_case,
)

from scalesearch_compile.kernels.quantize import quantize_nvfp4_triton  # noqa: E402
from scalesearch_compile.search import QuantizeRequest, ScaleChoice, quantize_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_blocks(x, method, **kwargs):
    """The kernel's result for ``quantize_blocks(x, method, **kwargs)``'s request, on DEVICE."""
    kwargs = {key: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
    return quantize_nvfp4_triton(QuantizeRequest.of(x.to(DEVICE), ScaleChoice.of(method), **kwargs))


def check(x, method, **kwargs):
    """Kernel on DEVICE vs the reference on the CPU."""
    got = triton_blocks(x, method, **kwargs)
    ref = quantize_blocks(x, method, **kwargs)
    assert_same_blocks(got, ref)
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_tensor_scale", [True, None, "row", "tensor"])
@pytest.mark.parametrize("method", ["amax", "four_over_six", "search", "fast_search"])
def test_bitwise_equal_to_reference(method, per_tensor_scale, dtype):
    x = ragged_input(dtype)
    if per_tensor_scale == "tensor":
        per_tensor_scale = torch.tensor(0.37)
    ref = check(x, method, per_tensor_scale=per_tensor_scale)
    if method != "amax":  # the comparison covers real choices, not only the amax code
        assert (ref.offsets != 0).float().mean() > 0.05


@pytest.mark.parametrize("per_tensor_scale", [True, None])
@pytest.mark.parametrize("method", ["amax", "four_over_six", "search", "fast_search"])
def test_edge_blocks(method, per_tensor_scale):
    check(edge_input(), method, per_tensor_scale=per_tensor_scale)


@pytest.mark.parametrize("method", ["four_over_six", "search", "fast_search"])
def test_block_errors_past_float32(method):
    overflowing_errors_case(check, method)


def test_exhaustive_small():
    check(ragged_input(torch.float32, rows=5, k=48), "exhaustive")


@pytest.mark.parametrize("window", [(0, 0), (-4, 2), (3, 5), (-8, -1)])
def test_windows(window):
    windows_case(check, window)


def test_leading_dimensions_kept():
    x = ragged_input(torch.float32, rows=10, k=48).view(2, 5, 48)
    got = triton_blocks(x, "search")
    assert got.qdata.shape == (2, 5, 24) and got.scale_codes.shape == (2, 5, 3) and got.offsets.shape == (2, 5, 3)
    assert_same_blocks(got, quantize_blocks(x, "search"))


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 40),
    blocks=st.integers(1, 12),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["amax", "four_over_six", "search", "fast_search"]),
    per_tensor_scale=st.sampled_from([True, None]),
)
def test_random_shapes_and_scales(rows, blocks, log_scale, seed, method, per_tensor_scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16 * blocks, generator=g) * 2.0**log_scale
    check(x, method, per_tensor_scale=per_tensor_scale)


@pytest.mark.parametrize("per_tensor_scale", [True, "row"])
@pytest.mark.parametrize("method", ["amax", "search"])
def test_nan_and_inf_blocks_at_run_time(method, per_tensor_scale):
    """Unchecked (run-time) quantization: NaN/Inf blocks get the NaN code 127, offset 0, in both implementations;
    the global scales come from the finite values."""
    x = ragged_input(torch.float32, rows=6, k=64)
    x[1, 3], x[4, 40], x[4, 41] = float("nan"), float("inf"), -float("inf")
    ref = check(x, method, per_tensor_scale=per_tensor_scale, check_finite=False)
    assert ref.scale_codes[1, 0] == 127 and ref.scale_codes[4, 2] == 127
    assert (ref.offsets[1, 0], ref.offsets[4, 2]) == (0, 0)
    assert (ref.scale_codes == 127).sum() == 2
    finite = torch.where(torch.isfinite(x), x, 0.0)
    clean = quantize_blocks(finite, method, per_tensor_scale=per_tensor_scale)
    assert torch.equal(ref.qdata, clean.qdata)  # NaN/Inf values are coded as zeros, nothing else moves


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: native Triton build with FMA contraction")
@pytest.mark.parametrize("method", ["amax", "four_over_six", "search", "fast_search"])
def test_gpu_large_tensor_bitwise(method):
    """1M values on a GPU: any FMA contraction of |x| - q * s, or a non-IEEE division, would flip choices."""
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 4096)
    check(x.to(torch.bfloat16), method)


def quantize_job(method, capability, fp_fusion, weighted=False):
    signature = {"x_ptr": "*bf16", "pts_ptr": "*fp32", "weights_ptr": "*fp32", "qdata_ptr": "*u8", "scale_ptr": "*u8"}
    signature.update(offset_ptr="*i16", M="i32", K="i32", PTS_STRIDE="i32")
    constexprs = {"HAS_PTS": True, "HAS_WEIGHTS": weighted, "METHOD": method, "LO": -2, "HI": 6}
    constexprs.update(BLOCK_M=16, BLOCK_K=128)
    options = {"num_warps": 4, "enable_fp_fusion": fp_fusion}
    return ("scalesearch_compile.kernels.quantize", "_quantize_kernel", signature, constexprs, capability, options)


def test_compiles_for_hopper_and_blackwell_without_fma():
    """The kernel builds for sm_90 / sm_100 (no GPU needed), with IEEE divisions and no FMA once fusion is off.

    The same build with fusion on (Triton's GPU default) does contract, so the FMA check can fail.
    """
    from scalesearch_compile.kernels._nvfp4 import compile_for_gpu, contracted_fmas, int32_pointer_offsets

    jobs = [quantize_job("search", 90, fp_fusion=True)]
    jobs += [
        quantize_job(method, capability, fp_fusion=False)
        for method, capability in [("search", 90), ("fast_search", 90), ("amax", 100), ("four_over_six", 100)]
        + [("exhaustive", 100)]
    ]
    jobs.append(quantize_job("search", 100, fp_fusion=False, weighted=True))
    fused, *exact = compile_for_gpu(jobs)
    assert contracted_fmas(fused["ptx"])
    for code in exact:
        ptx = code["ptx"]
        assert not contracted_fmas(ptx)
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
        assert int32_pointer_offsets(code["ttir"]) == []  # 64-bit element offsets


@pytest.mark.parametrize("method", ["four_over_six", "search", "exhaustive"])
def test_importance_weighted_search(method):
    importance_weighted_case(check, method)


def test_autotune_key_holds_every_code_changing_constexpr():
    from scalesearch_compile.kernels._nvfp4 import autotune_key_gaps
    from scalesearch_compile.kernels.quantize import _quantize_kernel

    assert autotune_key_gaps(_quantize_kernel) == set()
