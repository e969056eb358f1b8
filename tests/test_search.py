"""Scale selection: torchao equality for amax, ScaleSearch error properties and published reductions."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, nvfp4_quantize, per_tensor_amax_to_scale

import scalesearch_compile.search as search
from scalesearch_compile.attention import AttentionRecipe, nvfp4_attention_reference, quantize_probabilities
from scalesearch_compile.formats import E2M1_MAX, E2M1_VALUES, E4M3_MAX
from scalesearch_compile.search import ScaleChoice, chosen_offsets, quantize_blocks
from scalesearch_compile.tensor import quantize_nvfp4


def block_errors(x: torch.Tensor, blocks, importance=None) -> torch.Tensor:
    """Per-block squared error in float64, computed from the dequantized values (independent of the search)."""
    err = (x.double() - blocks.dequantize().double()).square()
    if importance is not None:
        err = err * importance.double()
    return err.unflatten(-1, (-1, 16)).sum(-1)


def mse(x: torch.Tensor, method: str, **kwargs) -> float:
    return (x.double() - quantize_blocks(x, method, **kwargs).dequantize().double()).square().mean().item()


def random_tensor(seed: int, rows: int, cols: int, log_scale: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g)) * 10.0**log_scale
    return x.to(dtype)


shapes = st.tuples(st.integers(1, 9), st.integers(1, 8).map(lambda b: 16 * b))


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**16),
    log_scale=st.floats(-6, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_amax_matches_torchao_bit_for_bit(shape, seed, log_scale, dtype):
    x = random_tensor(seed, *shape, log_scale, dtype)
    # Two-level: the reference call.
    ours = quantize_blocks(x, "amax")
    ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
    assert torch.equal(ours.qdata, ref.qdata)
    assert torch.equal(ours.scale_codes, ref.scale.view(torch.uint8))
    assert torch.equal(ours.per_tensor_scale, ref.per_tensor_scale)
    # Single-level: no global scale.
    ours = quantize_blocks(x, "amax", per_tensor_scale=None)
    ref_scale, ref_qdata = nvfp4_quantize(x)
    assert ours.per_tensor_scale is None
    assert torch.equal(ours.qdata, ref_qdata)
    assert torch.equal(ours.scale_codes, ref_scale.view(torch.uint8))


FLOAT32_MAX = torch.finfo(torch.float32).max
finite_blocks = st.lists(
    st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX, allow_nan=False, width=32), min_size=16, max_size=64
).map(lambda v: v[: len(v) // 16 * 16])


@settings(max_examples=150, deadline=None)
@given(
    values=finite_blocks, two_level=st.booleans(), method=st.sampled_from(["search", "fast_search", "four_over_six"])
)
def test_search_never_worse_than_amax_per_block(values, two_level, method):
    x = torch.tensor(values, dtype=torch.float32).view(1, -1)
    amax_err = block_errors(x, quantize_blocks(x, "amax", per_tensor_scale=two_level))
    err = block_errors(x, quantize_blocks(x, method, per_tensor_scale=two_level))
    # The search compares float32 errors; float64 may order near-ties differently by a rounding step.
    assert (err <= amax_err * (1 + 1e-5)).all()


@settings(max_examples=150, deadline=None)
@given(values=finite_blocks, two_level=st.booleans(), method=st.sampled_from(search.METHODS))
def test_finite_input_gives_finite_output_on_the_grid(values, two_level, method):
    x = torch.tensor(values, dtype=torch.float32).view(1, -1)
    blocks = quantize_blocks(x, method, per_tensor_scale=two_level)
    deq = blocks.dequantize()
    assert torch.isfinite(deq).all()
    assert (blocks.scale_codes >= 1).all() and (blocks.scale_codes <= 126).all()
    # Every dequantized value is an E2M1 grid value times its block's scale (up to the float32 rounding of
    # that product: 6 * s needs one bit more than s).
    scales = blocks.block_scales().unsqueeze(-1).double()
    ratio = (deq.unflatten(-1, (-1, 16)).double() / scales).abs()
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    nearest = grid[(ratio.unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.allclose(ratio, nearest, rtol=2**-23, atol=0)


def test_zero_tensor_and_zero_blocks_quantize_to_zero():
    for method in search.METHODS:
        for two_level in (True, False):
            blocks = quantize_blocks(torch.zeros(4, 32), method, per_tensor_scale=two_level)
            assert torch.equal(blocks.dequantize(), torch.zeros(4, 32))
            assert not torch.isnan(blocks.block_scales()).any()
    x = torch.randn(2, 48)
    x[1, 16:32] = 0
    deq = quantize_blocks(x, "search").dequantize()
    assert torch.equal(deq[1, 16:32], torch.zeros(16))


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))  # 2**20 samples


@pytest.fixture(scope="module")
def laplace():
    u = torch.rand(1024, 1024, generator=torch.Generator().manual_seed(1)) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1) by inverse CDF


def test_gaussian_reduction_matches_the_paper(gaussian):
    amax, searched, exhaustive = (mse(gaussian, m) for m in ("amax", "search", "exhaustive"))
    assert 1 - searched / amax >= 0.265  # ScaleSearch reports 26-27% on Gaussian data
    assert searched <= exhaustive * 1.005  # the -2..+6 window reaches the per-block optimum
    assert exhaustive <= searched


def test_laplace_reduction(laplace):
    assert 1 - mse(laplace, "search") / mse(laplace, "amax") >= 0.20


def test_four_over_six_sits_between_amax_and_search(gaussian):
    amax, four_six, searched = (mse(gaussian, m) for m in ("amax", "four_over_six", "search"))
    assert searched < four_six < amax
    assert 0.14 <= 1 - four_six / amax <= 0.19  # about 16% reported on Gaussian data


def test_fast_search_keeps_the_best_of_amax_one_below_and_four_over_six(gaussian):
    # Independent of fast_search's candidate loop: each of its codes is tried against the amax code alone (a
    # one-offset window, four_over_six), and the float64 block errors of those results bound its own.
    x = gaussian[:256]
    fast = quantize_blocks(x, "fast_search")
    amax = quantize_blocks(x, "amax")
    below = quantize_blocks(x, ScaleChoice("search", (-1, -1)))
    forced = [amax, below, quantize_blocks(x, "four_over_six")]
    errors = torch.stack([block_errors(x, b) for b in forced])
    codes = torch.stack([b.scale_codes.view(-1) for b in forced]).long()
    assert (block_errors(x, fast) <= errors.min(0).values * (1 + 1e-5)).all()
    chosen, amax_codes, four_codes = fast.scale_codes.view(-1).tolist(), codes[0].tolist(), codes[2].tolist()
    assert all(c in {a, a - 1, f} for c, a, f in zip(chosen, amax_codes, four_codes, strict=True))
    # fast_search keeps most of the window's gain: 84% on Gaussian blocks (benchmarks/RESULTS.md)
    full, quick, base = mse(gaussian, "search"), mse(gaussian, "fast_search"), mse(gaussian, "amax")
    assert 0.80 <= (base - quick) / (base - full) <= 0.90
    assert torch.equal(fast.offsets.view(-1).long(), fast.scale_codes.view(-1).long() - codes[0])


def test_window_controls_the_candidates(gaussian):
    x = gaussian[:64]
    assert torch.equal(quantize_blocks(x, ScaleChoice("search", (0, 0))).qdata, quantize_blocks(x, "amax").qdata)
    offsets = chosen_offsets(x, ScaleChoice("search", (-1, 3)))
    assert offsets.min() >= -1 and offsets.max() <= 3
    wide, narrow = ScaleChoice("search", (-4, 8)), ScaleChoice("search", (0, 6))
    assert mse(x, wide) <= mse(x, "search") <= mse(x, narrow)


def test_chosen_offsets_are_two_peaked(gaussian):
    counts = torch.bincount((chosen_offsets(gaussian) + 2).flatten().long(), minlength=9)
    # Peaks near 0 and near +4..+5 (the paper's observation), with a dip between.
    assert counts[2] > counts[4] and counts[7] > counts[4]
    assert counts[1:4].sum() > 0.3 * counts.sum() and counts[6:9].sum() > 0.3 * counts.sum()


def test_importance_weights_the_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g)
    importance = torch.rand(256, generator=g) ** 4 * 10  # a few input channels dominate
    plain = quantize_blocks(w, "search")
    weighted = quantize_blocks(w, "search", importance=importance)
    amax_err = block_errors(w, quantize_blocks(w, "amax"), importance)
    weighted_err = block_errors(w, weighted, importance)
    assert (weighted_err <= amax_err * (1 + 1e-5)).all()
    assert weighted_err.sum() < 0.95 * block_errors(w, plain, importance).sum()
    # Uniform importance is the unweighted search, bit for bit.
    uniform = quantize_blocks(w, "search", importance=torch.ones(256))
    assert torch.equal(uniform.qdata, plain.qdata) and torch.equal(uniform.scale_codes, plain.scale_codes)


def test_importance_lowers_the_output_error_of_a_linear_layer():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(128, 256, generator=g)
    channel_scale = torch.exp(2 * torch.randn(256, generator=g))  # outlier input channels, as in LLMs
    x = torch.randn(512, 256, generator=g) * channel_scale
    importance = x.square().mean(0)
    exact = x @ w.T

    def out_err(blocks):
        return (x @ blocks.dequantize().T - exact).square().mean()

    assert out_err(quantize_blocks(w, "search", importance=importance)) < out_err(quantize_blocks(w, "search"))


def test_overflow_policy_skips_scales_above_448():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    x[3, 17] = 50.0  # this block holds the tensor's amax, so its amax code is 126 (448)
    blocks = quantize_blocks(x, "search")
    assert blocks.scale_codes[3, 1] <= 126 and blocks.offsets[3, 1] <= 0
    # Single-level scaling of large values saturates the scale at 448 instead of overflowing.
    big = quantize_blocks(x * 1e4, "search", per_tensor_scale=None)
    assert big.scale_codes.max() == 126 and torch.isfinite(big.dequantize()).all()


def test_per_row_global_scale_equals_quantizing_each_row():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(6))
    rows = quantize_blocks(x, "search", per_tensor_scale="row")
    assert rows.per_tensor_scale.shape == (3, 5, 1)
    one = quantize_blocks(x[1, 2], "search")
    assert torch.equal(rows.qdata[1, 2], one.qdata) and torch.equal(rows.scale_codes[1, 2], one.scale_codes)
    given_scales = quantize_blocks(x, "search", per_tensor_scale=rows.per_tensor_scale)
    assert torch.equal(given_scales.qdata, rows.qdata)


@pytest.mark.parametrize("method", search.METHODS)
def test_chunking_does_not_change_the_result(monkeypatch, method):
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    importance = torch.rand(96)
    whole = quantize_blocks(x, method, importance=importance)
    monkeypatch.setattr(search, "CHUNK_ELEMENTS", 200)  # 2 rows a chunk
    chunked = quantize_blocks(x, method, importance=importance)
    for name in ("qdata", "scale_codes", "offsets"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))


def test_peak_memory_stays_within_twice_the_input():
    benchmark = Path(__file__).parent.parent / "benchmarks" / "quantize.py"
    cmd = [sys.executable, str(benchmark), "--memory-of", "search", "--rows", "4096", "--cols", "4096"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    extra_over_input = float(out.stdout.split()[-1])
    assert 0 < extra_over_input <= 2.0, extra_over_input


@pytest.mark.parametrize(
    "x,kwargs,message",
    [
        (torch.randn(4, 20), {}, "multiple of 16"),
        (torch.tensor(3.0), {}, "multiple of 16"),
        (torch.full((2, 16), float("nan")), {}, "NaN or Inf"),
        (torch.tensor([[1.0] * 15 + [float("inf")]]), {}, "NaN or Inf"),
        (torch.ones(2, 16, dtype=torch.int32), {}, "unsupported dtype torch.int32"),
        (torch.ones(2, 16, dtype=torch.float64), {}, "unsupported dtype torch.float64"),
        (torch.ones(0, 16), {}, "empty"),
        (torch.ones(2, 16), {"method": "mse"}, "unknown method 'mse'"),
        (torch.ones(2, 16), {"importance": torch.ones(8)}, "one weight per input channel"),
        (torch.ones(2, 16), {"importance": -torch.ones(16)}, "non-negative"),
        (torch.ones(2, 16), {"per_tensor_scale": torch.tensor(0.0)}, "positive and finite"),
        (torch.ones(2, 16), {"per_tensor_scale": "col"}, "unknown per_tensor_scale"),
        (torch.ones(2, 16), {"per_tensor_scale": torch.ones(3)}, "per_tensor_scale must be"),
    ],
)
def test_bad_input_names_the_problem(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_blocks(x, **kwargs)


@pytest.mark.parametrize(
    "method,window,message",
    [
        ("mse", (-2, 6), "unknown method 'mse'"),
        (None, (-2, 6), "unknown method None"),
        ("search", (3, 1), "empty search window"),
        ("search", 5, "pair of integer"),
        ("search", "ab", "pair of integer"),
        ("search", (-1.5, 2), "pair of integer"),
        ("search", (True, 2), "pair of integer"),
        ("search", (1, 2, 3), "pair of integer"),
    ],
)
def test_scale_choice_is_validated_once(method, window, message):
    with pytest.raises(ValueError, match=message):
        ScaleChoice(method, window)


def test_scale_choice_normalises_and_reduces():
    assert ScaleChoice("search", [-1, 3]).window == (-1, 3)  # JSON gives lists back
    assert ScaleChoice.of("amax") == ScaleChoice("amax", (-2, 6))
    recipe = AttentionRecipe(method="four_over_six", window=(0, 2), hadamard=False)
    assert ScaleChoice.of(recipe) == ScaleChoice("four_over_six", (0, 2))  # an option object reduced to its choice
    assert type(ScaleChoice.of(recipe)) is ScaleChoice


class CudaScalarDivision(TorchDispatchMode):
    """CPU emulation of how CUDA divides a tensor by a Python number: a multiplication by the float32
    reciprocal (PyTorch's BinaryDivTrueKernel.cu), which can differ from a division in the last bit."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.div.Tensor and isinstance(args[1], float | int) and args[0].is_floating_point():
            reciprocal = torch.tensor(1.0) / torch.tensor(float(args[1]))  # float32, as CUDA's opmath
            return (args[0].float() * reciprocal).to(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_global_scales_are_the_same_bits_on_cpu_and_cuda():
    g = torch.Generator().manual_seed(8)
    amax = torch.rand(4096, generator=g) * torch.exp2(torch.randint(-40, 40, (4096,), generator=g).float())

    def old(a):  # how the global and per-row scales used to be computed
        return a / (E4M3_MAX * E2M1_MAX)

    with CudaScalarDivision():
        old_on_cuda, new_on_cuda = old(amax), search.global_scale(amax)
    assert (old_on_cuda != old(amax)).sum() > 100  # the emulation is real: the old arithmetic differed
    assert torch.equal(new_on_cuda, search.global_scale(amax))  # the new one does not
    assert torch.equal(search.global_scale(amax), old(amax))  # and it keeps the CPU's (torchao's) numbers


@pytest.mark.parametrize("per_tensor_scale", [True, "row"])
def test_quantization_is_the_same_bits_under_cuda_division(per_tensor_scale):
    x = random_tensor(9, 37, 144, 0.0, torch.float32)
    expected = quantize_blocks(x, "search", per_tensor_scale=per_tensor_scale)
    with CudaScalarDivision():
        got = quantize_blocks(x, "search", per_tensor_scale=per_tensor_scale)
    for field in ("qdata", "scale_codes", "per_tensor_scale", "offsets"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_attention_is_the_same_bits_under_cuda_division():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 150, 64, generator=g) for _ in range(3))
    p = torch.exp(-3 * torch.rand(37, 64, generator=g))  # the per-row first level of P
    expected = nvfp4_attention_reference(q, k, v, is_causal=True), quantize_probabilities(p, AttentionRecipe())
    with CudaScalarDivision():
        got = nvfp4_attention_reference(q, k, v, is_causal=True), quantize_probabilities(p, AttentionRecipe())
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_tensors_that_require_grad_quantize():
    weight = torch.nn.Linear(64, 32).weight  # what a user holds: a parameter that requires grad
    assert weight.requires_grad
    blocks = quantize_blocks(weight)
    assert not blocks.qdata.requires_grad and not blocks.per_tensor_scale.requires_grad
    assert torch.equal(blocks.qdata, quantize_blocks(weight.detach()).qdata)
    assert torch.equal(chosen_offsets(weight), blocks.offsets)
    q = quantize_nvfp4(weight)
    assert not q.requires_grad and torch.equal(q.qdata, blocks.qdata)


def _grid_errors(x, method):
    """Relative L2 error of the NVFP4 round trip."""
    deq = quantize_blocks(x, method).dequantize()
    return ((deq.double() - x.double()).norm() / x.double().norm()).item()


@pytest.mark.parametrize("method", ["amax", "search"])
def test_tiny_and_huge_magnitudes_keep_their_accuracy(method):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    unscaled = _grid_errors(x, method)
    for j in (-130, -120, -100, 60, 100, 124):  # global scale subnormal (clamped) to near float32's top
        assert _grid_errors(x * 2.0**j, method) <= 1.05 * unscaled + 1e-3, j


@pytest.mark.parametrize("method", search.METHODS)
@pytest.mark.parametrize("importance", [False, True])
def test_scaling_by_a_power_of_two_scales_exactly(method, importance):
    """x and x * 2**j give the same codes wherever the global scale is a normal number (both ways exact)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 96, generator=g)
    x = torch.where(x.abs() < 2.0**-10, 2.0**-10, x)  # a bounded range, so every x * 2**j below is exact
    weights = torch.rand(96, generator=g) * 1e6 if importance else None
    method = search.ScaleChoice(method) if method != "exhaustive" else method
    reference = quantize_blocks(x, method, importance=weights)
    for j in (-110, -80, -40, -7, 9, 40, 80, 120):
        scaled = quantize_blocks(x * 2.0**j, method, importance=weights)
        assert torch.equal(scaled.qdata, reference.qdata), j
        assert torch.equal(scaled.scale_codes, reference.scale_codes), j
        assert torch.equal(scaled.per_tensor_scale, reference.per_tensor_scale * 2.0**j), j


def test_the_global_scale_never_underflows():
    assert search.global_scale(torch.tensor(1e-40)).item() == 2.0**-126
    assert search.global_scale(torch.tensor(0.0)).item() == 2.0**-126  # an all-zero tensor: zeros, not NaN
    assert search.global_scale(torch.tensor(2688.0)).item() == 1.0
    tiny = quantize_blocks(torch.randn(4, 64) * 1e-40)
    assert tiny.per_tensor_scale.item() == 2.0**-126 and torch.isfinite(tiny.dequantize()).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"importance": [1.0] * 16}, "importance must be a tensor"),
        ({"importance": torch.ones(16, dtype=torch.int64)}, "real floating-point tensor, got dtype torch.int64"),
        ({"importance": torch.ones(16, dtype=torch.bool)}, "real floating-point tensor"),
        ({"importance": torch.ones(16, dtype=torch.complex64)}, "real floating-point tensor"),
        ({"importance": torch.ones(16, device="meta")}, "importance is on the meta device"),
        ({"per_tensor_scale": torch.ones((), device="meta")}, "per_tensor_scale is on the meta device"),
        ({"per_tensor_scale": torch.ones((), dtype=torch.int32)}, "real floating-point tensor"),
    ],
)
def test_bad_importance_and_given_scales(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_blocks(torch.randn(2, 16), **kwargs)


def test_meta_tensors_have_nothing_to_quantize():
    with pytest.raises(ValueError, match="meta device: it has no values"):
        quantize_blocks(torch.empty(4, 64, device="meta"))
    with pytest.raises(ValueError, match="meta device: it has no values"):
        quantize_nvfp4(torch.empty(4, 64, device="meta"))


@pytest.mark.parametrize("window", [(-(10**6), 10**6), (-(2**40), 2**40), (-126, 0), (0, 126)])
def test_windows_beyond_any_valid_code_are_refused_at_once(window):
    with pytest.raises(ValueError, match="reaches past -125..125"):
        ScaleChoice("search", window)
    assert ScaleChoice("search", (-125, 125)).window == (-125, 125)
