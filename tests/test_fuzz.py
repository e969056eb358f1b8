"""Fuzzing NVFP4 quantization over the whole float32 range (magnitudes 1e-38 to 1e38), every dtype and method,
with and without importance weights (zeros among them): the invariants hold for every tensor.

CI runs the default profile (a few hundred tensors over these tests, derandomised: the same every run);
``pytest tests/test_fuzz.py --hypothesis-profile=long --hypothesis-show-statistics`` runs 10,000 per test.
"""

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

from scalesearch_compile.search import GLOBAL_SCALE_MIN, METHODS, quantize_blocks

DTYPES = {torch.float32: (-38, 38), torch.bfloat16: (-38, 38), torch.float16: (-4, 4)}  # log10 magnitudes


@st.composite
def tensors(draw):
    """(x, importance or None): rows x 16..64 values with a magnitude drawn over the dtype's range, a per-row
    spread, some exact zeros; importance non-negative with zeros."""
    dtype = draw(st.sampled_from(list(DTYPES)))
    rows, blocks = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    low, high = DTYPES[dtype]
    log10 = draw(st.floats(low, high))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(rows, 16 * blocks, generator=g, dtype=torch.float64)
    x *= torch.exp(draw(st.floats(0, 3)) * torch.randn(rows, 1, generator=g, dtype=torch.float64))
    x[torch.rand(x.shape, generator=g) < draw(st.floats(0, 0.3))] = 0
    finfo = torch.finfo(dtype)
    x = (x * 10.0**log10).clamp(-finfo.max, finfo.max).to(dtype)
    importance = None
    if draw(st.booleans()):
        importance = torch.rand(16 * blocks, generator=g) ** 3 * 10.0 ** draw(st.floats(-10, 10))
        importance[torch.rand(16 * blocks, generator=g) < 0.2] = 0
    return x, importance


def block_errors(x, blocks, importance):
    err = (x.double() - blocks.dequantize().double()).square()
    if importance is not None:
        err = err * importance.double()
    return err.unflatten(-1, (-1, 16)).sum(-1)


@settings(deadline=None)
@given(case=tensors(), method=st.sampled_from(METHODS), two_level=st.booleans())
def test_invariants(case, method, two_level):
    x, importance = case
    event(f"{x.dtype}, amax 1e{int(torch.log10(x.abs().amax().float().clamp_min(1e-45)).floor())}")
    blocks = quantize_blocks(x, method, per_tensor_scale=two_level, importance=importance)
    # no NaN or Inf from finite input, and never the NaN scale code
    assert torch.isfinite(blocks.dequantize()).all()
    assert (blocks.scale_codes != 127).all()
    if two_level:
        assert blocks.per_tensor_scale >= GLOBAL_SCALE_MIN  # the global scale never underflows
    # the search never does worse than amax on any block (float64 may order float32 near-ties otherwise)
    amax = quantize_blocks(x, "amax", per_tensor_scale=two_level, importance=importance)
    assert (block_errors(x, blocks, importance) <= block_errors(x, amax, importance) * (1 + 1e-5)).all()


def torchao_is_exact(x: torch.Tensor) -> bool:
    """Whether torchao's own arithmetic is exact on x: its multiplier ``(1 / pts) / s`` stays finite (with the
    smallest amax scale 2**-6: pts >= 2**-122, amax above about 5.1e-34) and every nonzero block amax / 6 is a
    normal float32 (below, torchao rounds it as a subnormal). It takes float32 and bfloat16."""
    block_amax = x.float().abs().unflatten(-1, (-1, 16)).amax(-1)
    nonzero = block_amax[block_amax > 0]
    return (
        x.dtype != torch.float16
        and block_amax.max() / 2688.0 >= 2.0**-122
        and bool((nonzero / 6.0 >= GLOBAL_SCALE_MIN).all())
    )


@settings(deadline=None)
@given(case=tensors())
def test_amax_is_torchao_wherever_its_arithmetic_is_exact(case):
    x, _ = case
    if not torchao_is_exact(x):
        event("not compared: torchao's own arithmetic is not exact there")
        return
    event("compared with torchao")
    ours = quantize_blocks(x, "amax")
    ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
    assert torch.equal(ours.qdata, ref.qdata)
    assert torch.equal(ours.scale_codes, ref.scale.view(torch.uint8))
    assert torch.equal(ours.per_tensor_scale, ref.per_tensor_scale)


@settings(deadline=None)
@given(case=tensors(), method=st.sampled_from(METHODS), shift=st.integers(-60, 60))
def test_scaling_by_a_power_of_two_is_exact(case, method, shift):
    """x and x * 2**shift: the same codes, and the global scale times 2**shift, wherever both global scales are
    normal and the scaling is exact both ways."""
    x, importance = case
    scaled = x * 2.0**shift
    exact = torch.equal(scaled / 2.0**shift, x) and torch.isfinite(scaled).all()
    scales = torch.stack([x.abs().amax(), scaled.abs().amax()]).float() / 2688.0
    if not exact or (scales < GLOBAL_SCALE_MIN).any():
        event("not compared: the scaling is not exact, or a global scale is not normal")
        return
    event("compared")
    a = quantize_blocks(x, method, importance=importance)
    b = quantize_blocks(scaled, method, importance=importance)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale_codes, b.scale_codes)
    assert torch.equal(a.per_tensor_scale * 2.0**shift, b.per_tensor_scale)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_range_ends_quantize_finitely(dtype):
    finfo = torch.finfo(dtype)
    for value in (finfo.max, finfo.smallest_normal, finfo.tiny, 2.0**-149 if dtype != torch.float16 else 2.0**-24):
        x = torch.full((2, 32), value, dtype=dtype)
        x[0, ::3] *= -1
        for method in METHODS:
            blocks = quantize_blocks(x, method)
            assert torch.isfinite(blocks.dequantize()).all(), (value, method)
