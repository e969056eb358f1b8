"""NVFP4 GEMM kernels against a float64 matmul of the dequantized operands, and fused == unfused bit for bit.

Runs in Triton's interpreter on a CPU (TRITON_INTERPRET=1, set here before any kernel module is imported)
and natively on a GPU; tests of the Blackwell ``tl.dot_scaled`` path need one.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from scalesearch_compile.kernels._nvfp4 import dequantize_pairs, dequantize_words, pair_order  # noqa: E402
from scalesearch_compile.kernels.gemm import (  # noqa: E402
    nvfp4_gemm_triton,
    nvfp4_grouped_linear_triton,
    nvfp4_linear_triton,
)
from scalesearch_compile.kernels.quantize import quantize_nvfp4_triton  # noqa: E402
from scalesearch_compile.layout import NVFP4Weight  # noqa: E402
from scalesearch_compile.search import QuantizeRequest, ScaleChoice, quantize_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLACKWELL = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (10, 12)
# M, N, K: single rows, ragged M and N, K with a partial K tile (the interpreter's tile is 32 x 32 x 64).
SHAPES = [(1, 40, 64), (5, 72, 144), (16, 33, 256), (37, 130, 112)]


def make_weight(n, k, seed=0, per_tensor_scale=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 2, k)
    return quantize_blocks(w, "search", per_tensor_scale=per_tensor_scale)


def make_input(m, k, seed=1, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def device_weight(w):
    """The NVFP4Weight of quantized blocks ``w``, on DEVICE."""
    pts = None if w.per_tensor_scale is None else w.per_tensor_scale.to(DEVICE)
    return NVFP4Weight(w.qdata.to(DEVICE), w.scale_codes.to(DEVICE), pts)


def relative_error(out, ref):
    return ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()


def reference(a_dequantized, w, bias=None):
    ref = a_dequantized.double() @ w.dequantize().double().T
    return ref if bias is None else ref + bias.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_decode_is_the_word_decode_in_pair_order(dtype):
    """``dequantize_pairs`` (two values a 32-bit operation, in 16 bits) gives :func:`dequantize_words`'s float32
    values bit for bit, columns in pair order (0, 4, 1, 5, 2, 6, 3, 7 within each eight): every code in every
    nibble of a word, every scale code (subnormal, normal, 448 and NaN)."""
    rows = 64  # 128 blocks: scale codes 0..127
    codes = (torch.arange(rows * 16).reshape(rows, 16) * 37 + torch.arange(rows)[:, None] * 11) % 256
    words = codes.to(torch.uint8).view(torch.int32)
    scales = torch.arange(128, dtype=torch.uint8).reshape(rows, 2)
    assert len(set((codes & 15).flatten().tolist())) == 16 and len(set((codes >> 4).flatten().tolist())) == 16
    pairs, words_out = (torch.empty(rows, 32, device=DEVICE) for _ in range(2))
    _decode_both_ways[(1,)](words.to(DEVICE), scales.to(DEVICE), pairs, words_out, getattr(tl, str(dtype)[6:]), rows)
    assert torch.equal(pairs.cpu().view(torch.int32), words_out.cpu().view(torch.int32))
    expected = dequantize_reference(codes, scales).mul(2.0**-8)  # e2m1 * e4m3 / DEQUANTIZED_SCALE, natural order
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    in_pair_order = expected.reshape(rows, 4, 8)[:, :, order].reshape(rows, 32)
    assert torch.equal(pairs.cpu().isnan(), in_pair_order.isnan()) and pairs.cpu().isnan()[-1, 16:].all()
    finite = ~in_pair_order.isnan()
    assert torch.equal(pairs.cpu()[finite], in_pair_order[finite])


@triton.jit
def _decode_both_ways(words_ptr, scales_ptr, pairs_ptr, words_out_ptr, DTYPE: tl.constexpr, ROWS: tl.constexpr):
    """float32 ``dequantize_pairs`` and ``pair_order(dequantize_words)`` of (ROWS, 4) words, (ROWS, 2) scale codes."""
    rows = tl.arange(0, ROWS)[:, None]
    words = tl.load(words_ptr + rows * 4 + tl.arange(0, 4)[None, :])
    scales = tl.load(scales_ptr + rows * 2 + tl.arange(0, 2)[None, :])
    columns = rows * 32 + tl.arange(0, 32)[None, :]
    tl.store(pairs_ptr + columns, dequantize_pairs(words, scales, DTYPE, ROWS, 32).to(tl.float32))
    tl.store(words_out_ptr + columns, pair_order(dequantize_words(words, scales, ROWS, 32), ROWS, 32))


def dequantize_reference(codes, scales):
    """float32 e2m1 * e4m3 of packed bytes ``codes`` (rows, K // 2) and scale codes (rows, K // 16), in torch."""
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    e2m1 = torch.cat([grid, -grid])[torch.stack([codes & 15, codes >> 4], -1).flatten(-2).long()]
    return e2m1 * scales.view(torch.float8_e4m3fn).float().repeat_interleave(16, -1)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_w4a16_matches_float64(m, n, k, split_k):
    w, x = make_weight(n, k), make_input(m, k)
    bias = torch.randn(n)
    out = nvfp4_linear_triton(x.to(DEVICE), device_weight(w), bias.to(DEVICE), act=None, split_k=split_k)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert relative_error(out, reference(x, w, bias)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_many_rows_dequantize_once(monkeypatch, dtype):
    """From DEQUANTIZE_MIN_M rows, W4A16 dequantizes the weight once (exact values) and multiplies with torch:
    the same numbers as the fused kernel to float32 rounding, bias and global scales included."""
    from scalesearch_compile.kernels import gemm

    m, n, k = 24, 40, 144
    w, x = make_weight(n, k), make_input(m, k, dtype=dtype)
    bias = torch.randn(n)
    args = (x.to(DEVICE), device_weight(w), bias.to(DEVICE))
    fused = nvfp4_linear_triton(*args, act=None, out_dtype=torch.float32)
    monkeypatch.setattr(gemm, "DEQUANTIZE_MIN_M", m)
    calls = []
    monkeypatch.setattr(gemm, "_launch", lambda *a, **kw: calls.append(a))  # the fused kernel must not run
    once = nvfp4_linear_triton(*args, act=None, out_dtype=torch.float32)
    assert calls == []
    assert relative_error(once, reference(x, w, bias)) < 1e-5
    assert relative_error(once, fused.double().cpu()) < 1e-6
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    e2m1 = torch.cat([grid, -grid])[torch.stack([w.qdata & 15, w.qdata >> 4], -1).flatten(-2).long()]
    e4m3 = w.scale_codes.view(torch.float8_e4m3fn).float().repeat_interleave(16, -1)
    assert torch.equal(gemm.dequantize_weight_triton(device_weight(w), dtype).cpu().float(), e2m1 * e4m3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_half_inputs(dtype):
    """bf16/fp16 activations: float32 output to 1e-5; in their own dtype to within the output rounding."""
    m, n, k = 9, 48, 128
    w, x = make_weight(n, k, per_tensor_scale=None), make_input(m, k, dtype=dtype)
    args = (x.to(DEVICE), device_weight(w))
    ref = reference(x, w)
    assert relative_error(nvfp4_linear_triton(*args, act=None, out_dtype=torch.float32), ref) < 1e-5
    out = nvfp4_linear_triton(*args, act=None)
    assert out.dtype == dtype
    # 2**-7: one unit in the last place of bf16 (the interpreter's cast truncates instead of rounding).
    assert ((out.double().cpu() - ref).abs() <= 2**-7 * ref.abs() + 1e-3 * ref.abs().max()).all()


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize(
    ("method", "act_pts"), [("search", True), ("amax", None), ("four_over_six", "row"), ("search", "tensor")]
)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES[1:])
def test_w4a4_matches_float64(m, n, k, method, act_pts, fuse):
    w, x = make_weight(n, k), make_input(m, k) * 3.0
    act_pts = torch.tensor(0.05) if act_pts == "tensor" else act_pts
    out = nvfp4_linear_triton(
        x.to(DEVICE), device_weight(w), act=ScaleChoice(method), act_per_tensor_scale=act_pts, fuse_act_quant=fuse
    )
    a = quantize_blocks(x, method, per_tensor_scale=act_pts)
    assert relative_error(out, reference(a.dequantize(), w)) < 1e-5


@pytest.fixture
def one_gemm_config(monkeypatch):
    """Pin the GEMM autotuner to one config, so launches with different A modes share tile shapes and so
    accumulation order (a no-op under the interpreter, which has a single config anyway)."""
    from scalesearch_compile.kernels import gemm

    monkeypatch.setattr(gemm._nvfp4_gemm_kernel, "configs", gemm._nvfp4_gemm_kernel.configs[-1:])
    monkeypatch.setattr(gemm._nvfp4_gemm_kernel, "cache", {})


@pytest.mark.usefixtures("one_gemm_config")
@pytest.mark.parametrize(
    ("m", "method", "window"),
    [(1, "search", (-2, 6)), (5, "four_over_six", (-2, 6)), (37, "search", (-3, 1)), (3, "exhaustive", (-2, 6))],
)
def test_fused_prologue_equals_quantize_then_gemm(m, method, window):
    n, k = 40, 144
    w, x = make_weight(n, k), make_input(m, k, dtype=torch.bfloat16)
    bias = torch.randn(n).to(DEVICE)
    args = (x.to(DEVICE), device_weight(w), bias, ScaleChoice(method, window))
    fused = nvfp4_linear_triton(*args, fuse_act_quant=True, out_dtype=torch.float32)
    split = nvfp4_linear_triton(*args, fuse_act_quant=False, out_dtype=torch.float32)
    assert torch.equal(fused, split)
    a = quantize_nvfp4_triton(QuantizeRequest.of(x.to(DEVICE), ScaleChoice(method, window)))
    assert torch.equal(nvfp4_gemm_triton(a, device_weight(w), bias), split)


@settings(max_examples=8, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 70),
    blocks=st.integers(1, 10),
    act=st.sampled_from(["search", None]),
    fuse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(m, n, blocks, act, fuse, seed):
    k = 16 * blocks
    w, x = make_weight(n, k, seed=seed), make_input(m, k, seed=seed + 1)
    act = None if act is None else ScaleChoice()
    out = nvfp4_linear_triton(x.to(DEVICE), device_weight(w), act=act, fuse_act_quant=fuse)
    a = x if act is None else quantize_blocks(x, "search").dequantize()
    assert out.shape == (m, n) and torch.isfinite(out).all()
    assert relative_error(out, reference(a, w)) < 1e-5


def test_torchao_weight_layout():
    """qdata / float8_e4m3fn scales / per-tensor scale straight from a torchao NVFP4Tensor."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    m, n, k = 7, 24, 96
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    t = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=per_tensor_amax_to_scale(w.abs().amax()))
    x = make_input(m, k)
    # float8_e4m3fn scales, as torchao keeps them
    weight = NVFP4Weight(t.qdata.to(DEVICE), t.scale.to(DEVICE), t.per_tensor_scale.to(DEVICE))
    out = nvfp4_linear_triton(x.to(DEVICE), weight, act=None)
    ref = x.double() @ t.dequantize(torch.float32).double().T
    assert relative_error(out, ref) < 1e-5


def test_split_k_and_bias_in_half_output():
    m, n, k = 3, 40, 256
    w, x = make_weight(n, k), make_input(m, k, dtype=torch.float16)
    bias = torch.randn(n).half()
    a = quantize_blocks(x, "search")
    for split_k in (1, 4):
        out = nvfp4_linear_triton(
            x.to(DEVICE), device_weight(w), bias.to(DEVICE), split_k=split_k, out_dtype=torch.float32
        )
        assert relative_error(out, reference(a.dequantize(), w, bias)) < 1e-5


def test_leading_dimensions_and_empty_batch():
    n, k = 24, 64
    w = make_weight(n, k)
    x = make_input(6, k).view(2, 3, k)
    out = nvfp4_linear_triton(x.to(DEVICE), device_weight(w), act=None)
    assert out.shape == (2, 3, n)
    assert relative_error(out, reference(x, w)) < 1e-5
    assert nvfp4_linear_triton(torch.zeros(0, k, device=DEVICE), device_weight(w)).shape == (0, n)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"act": "nvfp4"}, "act must be a ScaleChoice"),
        ({"x": torch.randint(0, 3, (4, 64))}, "x has unsupported dtype"),
        ({"x": torch.randn(4, 48)}, "linear input has 48 features but the NVFP4 weight has in_features 64"),
        ({"x": torch.randn(4, 40)}, "multiple of 16"),
        ({"weight": "w"}, "weight must be an NVFP4Weight"),
        ({"bias": torch.zeros(7)}, r"bias must be None or a floating-point tensor of shape \(8,\)"),
        ({"split_k": 0}, "split_k must be"),
        ({"out_dtype": torch.int32}, "out_dtype must be"),
    ],
)
def test_input_errors(change, message):
    """The launcher's own checks; the weight's layout is NVFP4Weight's (tests/test_layout.py)."""
    w = make_weight(8, 64)
    kwargs = {"x": torch.randn(4, 64), "weight": device_weight(w), "bias": None, **change}
    kwargs = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        nvfp4_linear_triton(**kwargs)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's NaN
def test_nan_activation_rows_stay_in_their_rows():
    """A NaN or Inf in an activation row gives NaN in that output row only, on the dequantizing paths (fused and
    unfused) and W4A16; the other rows equal the result without it."""
    m, n, k = 6, 24, 96
    w, x = make_weight(n, k), make_input(m, k)
    bad = x.clone()
    bad[2, 5], bad[4, 70] = float("nan"), float("inf")
    for act, fuse in ((ScaleChoice(), True), (ScaleChoice(), False), (None, None)):
        clean = nvfp4_linear_triton(x.to(DEVICE), device_weight(w), act=act, fuse_act_quant=fuse).cpu()
        out = nvfp4_linear_triton(bad.to(DEVICE), device_weight(w), act=act, fuse_act_quant=fuse).cpu()
        assert torch.isnan(out[2]).all() and not torch.isfinite(out[4]).any()
        rows = [0, 1, 3, 5]
        assert torch.equal(out[rows], clean[rows])


@pytest.mark.skipif(BLACKWELL, reason="checks the refusal on hardware without NVFP4 dot_scaled")
def test_dot_scaled_refused_without_blackwell():
    w = make_weight(8, 64)
    with pytest.raises(ValueError, match="compute capability 10.x or 12.x"):
        nvfp4_linear_triton(torch.randn(4, 64, device=DEVICE), device_weight(w), use_dot_scaled=True)
    with pytest.raises(ValueError, match="compute capability 10.x or 12.x"):
        x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
        nvfp4_linear_triton(x, device_weight(w), act=None, use_dot_scaled=True)


def test_dot_scaled_w4a16_refuses_float32_activations():
    w = make_weight(8, 64)
    with pytest.raises(ValueError, match="W4A16 needs bfloat16 or float16 activations, got float32"):
        nvfp4_linear_triton(torch.randn(4, 64, device=DEVICE), device_weight(w), act=None, use_dot_scaled=True)


@pytest.mark.skipif(not BLACKWELL, reason="needs a Blackwell GPU (compute capability 10.x / 12.x) for tl.dot_scaled")
@pytest.mark.parametrize(("m", "n", "k"), [(1, 256, 512), (200, 384, 1024)])
def test_dot_scaled_matches_float64(m, n, k):
    w, x = make_weight(n, k), make_input(m, k, dtype=torch.bfloat16)
    a = quantize_blocks(x, "search")
    for fuse in (False, True):
        out = nvfp4_linear_triton(
            x.to(DEVICE), device_weight(w), fuse_act_quant=fuse, use_dot_scaled=True, out_dtype=torch.float32
        )
        assert relative_error(out, reference(a.dequantize(), w)) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):  # W4A16: the weight converted in hardware
        x16 = x.to(dtype)
        out = nvfp4_linear_triton(
            x16.to(DEVICE), device_weight(w), act=None, use_dot_scaled=True, out_dtype=torch.float32
        )
        assert relative_error(out, reference(x16, w)) < 1e-5


@pytest.mark.usefixtures("interpreted_dot_scaled")
@pytest.mark.parametrize(("m", "tile"), [(1, (16, 128, 128)), (5, (16, 64, 256)), (37, (64, 32, 64))])
def test_blackwell_dot_scaled_paths_in_the_interpreter(monkeypatch, m, tile):
    """The sm_100 paths (``interpreted_dot_scaled``): W4A4 after the quantize kernel and with the fused prologue,
    computed transposed on 16-row tiles, and W4A16 with bf16 / fp16 activations, split or not, against the float64
    product of the dequantized operands; a NaN activation row stays in its row."""
    import triton

    from scalesearch_compile.kernels import gemm

    block_m, block_n, block_k = tile
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 1}, num_warps=4)
    monkeypatch.setattr(gemm._nvfp4_gemm_kernel, "configs", [config])
    monkeypatch.setattr(gemm._nvfp4_gemm_kernel, "cache", {})
    launches, launch = [], gemm._launch
    monkeypatch.setattr(gemm, "_launch", lambda *a, **kw: launches.append(kw["dot_scaled"]) or launch(*a, **kw))
    n, k = 160, 512
    w, x, bias = make_weight(n, k), make_input(m, k), torch.randn(n)
    weight = device_weight(w)
    for split in (1, 2):
        for fuse in (False, True):
            out = nvfp4_linear_triton(x.to(DEVICE), weight, bias.to(DEVICE), fuse_act_quant=fuse, split_k=split)
            assert relative_error(out, reference(quantize_blocks(x, "search").dequantize(), w, bias)) < 1e-5
        for dtype in (torch.bfloat16, torch.float16):
            x16 = x.to(dtype).to(DEVICE)
            out = nvfp4_linear_triton(x16, weight, bias.to(DEVICE), act=None, split_k=split, out_dtype=torch.float32)
            assert relative_error(out, reference(x16.cpu(), w, bias)) < 1e-5
    assert launches == [True] * 8
    counts = [2, 0, m + 1]  # a mixture of experts' grouped product, W4A4 and W4A16
    experts, rows = make_experts(len(counts), n, k), make_input(sum(counts), k)
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0)
    for act in (ScaleChoice(), None):
        rows_in = rows if act is not None else rows.to(torch.bfloat16)
        out = nvfp4_grouped_linear_triton(rows_in.to(DEVICE), offsets, experts, act)
        assert relative_error(out.float(), grouped_reference(rows_in, counts, experts, act)) < (1e-5 if act else 1e-2)
    assert launches[-2:] == [True, True]
    bad = x.clone()
    bad[m // 2, 3] = float("nan")
    out = nvfp4_linear_triton(bad.to(DEVICE), weight).cpu()
    rows = [r for r in range(m) if r != m // 2]
    assert torch.isnan(out[m // 2]).all() and torch.isfinite(out[rows]).all()


@pytest.mark.usefixtures("one_gemm_config")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: native Triton build with FMA contraction")
def test_gpu_llm_shape_fused_equals_unfused():
    """A decode-sized GEMM on a GPU: the fused prologue must pick the reference's scales despite FMA hardware."""
    m, n, k = 16, 2048, 4096
    w, x = make_weight(n, k), make_input(m, k, dtype=torch.bfloat16)
    args = (x.to(DEVICE), device_weight(w))
    fused = nvfp4_linear_triton(*args, fuse_act_quant=True, use_dot_scaled=False, out_dtype=torch.float32)
    split = nvfp4_linear_triton(*args, fuse_act_quant=False, use_dot_scaled=False, out_dtype=torch.float32)
    assert torch.equal(fused, split)
    assert relative_error(fused, reference(quantize_blocks(x, "search").dequantize(), w)) < 1e-5


def make_experts(num_experts, n, k, seed=0):
    """The NVFP4Weight of ``num_experts`` experts (n, k), each with its own global scale, on DEVICE."""
    experts = [device_weight(make_weight(n, k, seed=seed + e)) for e in range(num_experts)]
    return NVFP4Weight(
        *(torch.stack([getattr(w, f) for w in experts]) for f in ("qdata", "scale_codes", "per_tensor_scale"))
    )


def grouped_reference(x, counts, experts, act):
    """float64: each expert's rows alone, quantized as one tensor (W4A4) or as they are (W4A16), times that
    expert's dequantized weight; zero rows past the last group."""
    out, start = torch.zeros(x.shape[0], experts.out_features, dtype=torch.float64), 0
    for e, count in enumerate(counts):
        rows = x[start : start + count].float().cpu()
        if count:
            a = rows if act is None else quantize_blocks(rows, act).dequantize()
            out[start : start + count] = a.double() @ experts.expert(e).dequantize().double().cpu().T
        start += count
    return out


# counts per expert: empty experts first, in the middle and last; rows past the last expert; one expert per tile
GROUPS = [[10, 0, 17, 13], [0, 3, 0, 2, 0], [40], [2, 30, 1, 5]]


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("act", [None, ScaleChoice()], ids=["w4a16", "w4a4"])
@pytest.mark.parametrize("counts", GROUPS)
def test_grouped_matches_each_expert_alone(counts, act, fuse, split_k):
    experts = make_experts(len(counts), 40, 144)
    total = sum(counts)
    x = make_input(total + 3, 144).to(DEVICE)  # 3 rows past the last expert: zero
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0)
    out = nvfp4_grouped_linear_triton(x, offsets, experts, act, fuse_act_quant=fuse, split_k=split_k)
    ref = grouped_reference(x, counts, experts, act)
    assert out.shape == (total + 3, 40) and out.dtype == x.dtype
    assert relative_error(out, ref) < 1e-5
    assert torch.equal(out[total:].cpu(), torch.zeros(3, 40))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", [None, ScaleChoice()], ids=["w4a16", "w4a4"])
def test_grouped_half_inputs_match_the_reference_op(dtype, act):
    from scalesearch_compile.ops.grouped import reference_grouped_linear

    experts = make_experts(3, 48, 64)
    x = make_input(20, 64, dtype=dtype).to(DEVICE)
    offsets = torch.tensor([7, 7, 20], device=DEVICE, dtype=torch.int32)
    out = nvfp4_grouped_linear_triton(x, offsets, experts, act)
    ref = reference_grouped_linear(
        x.cpu(),
        offsets.cpu(),
        NVFP4Weight(*(t.cpu() for t in (experts.qdata, experts.scale_codes, experts.per_tensor_scale))),
        act,
    )
    assert out.dtype == dtype
    assert relative_error(out.float(), ref.double()) < 1e-2  # one rounding to the half output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, o, w: (x, o[:-1], w), r"offsets must be int32/int64 of shape \(4,\)"),
        (lambda x, o, w: (x, o.float(), w), "offsets must be int32/int64"),
        (lambda x, o, w: (x[None], o, w), "x must be 2-D"),
        (lambda x, o, w: (x, o, w.expert(0)), "weight must be the NVFP4Weight of experts"),
        (lambda x, o, w: (x[:, :32], o, w), "in_features"),
    ],
)
def test_grouped_input_errors(change, message):
    experts = make_experts(4, 32, 64)
    x, offsets = make_input(8, 64).to(DEVICE), torch.tensor([2, 4, 6, 8], device=DEVICE)
    with pytest.raises(ValueError, match=message):
        nvfp4_grouped_linear_triton(*change(x, offsets, experts))


def gemm_job(
    capability, a_mode, dot_scaled=False, dot_dtype="fp16", tile=(16, 64, 64, 1), warps=4, stages=3, grouped=False
):
    """A compile job for the GEMM kernel; the activation's pointer type follows A_MODE and the dot dtype."""
    import triton.language as tl

    a_type = "*u8" if a_mode == "nvfp4" else "*fp32" if dot_dtype == "fp32" else "*bf16"
    if a_mode == "float":
        a_type = f"*{dot_dtype}"
    signature = {"a_ptr": a_type, "a_scale_ptr": "*u8", "a_pts_ptr": "*fp32", "w_ptr": "*u8", "w_scale_ptr": "*u8"}
    signature.update(w_pts_ptr="*fp32", bias_ptr="*bf16", row_expert_ptr="*i32", out_ptr="*bf16")
    signature.update(partial_ptr="*fp32", ticket_ptr="*i32")
    signature.update(M="i32", N="i32", K="i32", K_WORDS="i32", K_BLOCKS="i32", M_BUCKET="i32", A_PTS_STRIDE="i32")
    signature.update(NUM_EXPERTS="i32")
    block_m, block_n, block_k, group_m = tile
    constexprs = {
        "A_MODE": a_mode,
        "METHOD": "search",
        "LO": -2,
        "HI": 6,
        "HAS_A_PTS": a_mode != "float",
        "HAS_W_PTS": True,
        "HAS_BIAS": not grouped,
        "DOT_DTYPE": getattr(tl, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dot_dtype]),
        "INPUT_PRECISION": "ieee" if dot_dtype == "fp32" else "tf32",
        "DOT_SCALED": dot_scaled,
        "SPLIT_K": 1,
        "GROUPED": grouped,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "GROUP_M": group_m,
    }
    options = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False}
    return ("scalesearch_compile.kernels.gemm", "_nvfp4_gemm_kernel", signature, constexprs, capability, options)


def test_compiles_for_ampere_hopper_and_blackwell():
    """Every GPU autotune config and every A mode builds (no GPU needed): the interpreter misses compile errors.

    Blackwell's W4A4 lowers to tcgen05 block-scaled MMAs, its W4A16 to the hardware E2M1 conversion and 16-bit
    tcgen05 MMAs, and Hopper's large tiles to wgmma; the fused prologue keeps its block errors free of FMA
    contraction.
    """
    from scalesearch_compile.kernels._nvfp4 import compile_for_gpu, contracted_fmas, int32_pointer_offsets
    from scalesearch_compile.kernels.gemm import GPU_CONFIGS

    configs = [
        gemm_job(
            90,
            "nvfp4",
            tile=tuple(c.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")),
            warps=c.num_warps,
            stages=c.num_stages,
        )
        for c in GPU_CONFIGS
    ]
    modes = [
        gemm_job(90, "float", dot_dtype="bf16"),
        gemm_job(90, "float", dot_dtype="fp32"),
        gemm_job(80, "nvfp4"),
        gemm_job(90, "quantize"),
        gemm_job(100, "nvfp4", dot_scaled=True, tile=(128, 128, 128, 8)),
        gemm_job(100, "quantize", dot_scaled=True),
        gemm_job(90, "nvfp4", grouped=True, tile=(128, 128, 128, 8), warps=8),
        gemm_job(90, "float", dot_dtype="bf16", grouped=True),
        gemm_job(100, "nvfp4", dot_scaled=True, grouped=True, tile=(128, 128, 128, 8)),
        gemm_job(100, "float", dot_scaled=True, dot_dtype="bf16", tile=(16, 64, 256, 1), stages=2),
        gemm_job(100, "float", dot_scaled=True, dot_dtype="fp16", tile=(128, 128, 64, 8), warps=8),
    ]
    code = compile_for_gpu(configs + modes)
    assert all(int32_pointer_offsets(c["ttir"]) == [] for c in code)  # 64-bit element offsets
    ptx = [c["ptx"] for c in code]
    hopper_large = ptx[0]
    assert "wgmma" in hopper_large
    hopper_w4a16, hopper_w4a16_fp32, ampere = ptx[len(configs) : len(configs) + 3]
    *_, fused_hopper, blackwell, fused_blackwell, grouped_hopper, _, grouped_blackwell, w4a16_bf16, w4a16_fp16 = ptx
    # Hopper and Ampere dequantize two weight values a 16-bit FMA (subnormal inputs kept: no .ftz), float32 one a time
    assert "fma.rn.bf16x2" in hopper_w4a16 and "fma.rn.f16x2" in ampere and "fma.rn.f16x2" in hopper_large
    assert "x2" not in "".join(line for line in hopper_w4a16_fp32.splitlines() if "fma" in line or "mul" in line)
    assert ".ftz" not in hopper_w4a16 + ampere
    assert "wgmma" in grouped_hopper and "tcgen05.mma" in grouped_blackwell
    # W4A16 on sm_100: weight codes converted by the hardware, two a conversion, and a 16-bit tcgen05 MMA
    assert "cvt.rn.bf16x2.e2m1x2" in w4a16_bf16 and "cvt.rn.f16x2.e2m1x2" in w4a16_fp16
    assert "tcgen05.mma.cta_group::1.kind::f16" in w4a16_bf16 and "tcgen05.mma.cta_group::1.kind::f16" in w4a16_fp16
    assert "tcgen05.mma" in blackwell
    assert not contracted_fmas(fused_hopper) and not contracted_fmas(fused_blackwell)


def test_each_launch_autotunes_only_its_own_tiles():
    from scalesearch_compile.kernels.gemm import (
        CONVERTED_DECODE_CONFIGS,
        DECODE_CONFIGS,
        DEQUANTIZED_DECODE_CONFIGS,
        GPU_CONFIGS,
        LARGE_CONFIGS,
        _nvfp4_gemm_kernel,
        _prune_for_rows,
        configs_for_rows,
    )

    assert all(c.kwargs["BLOCK_M"] <= 16 for c in DECODE_CONFIGS + DEQUANTIZED_DECODE_CONFIGS)
    assert all(c.kwargs["BLOCK_M"] <= 16 for c in CONVERTED_DECODE_CONFIGS)
    for m_bucket in (1, 2, 16):
        native = [c for c in DECODE_CONFIGS if c.kwargs["BLOCK_N"] == 128]  # W4A4 on sm_100: 128 weight rows
        assert _prune_for_rows(GPU_CONFIGS, {"M_BUCKET": m_bucket, "DOT_SCALED": True}) == native and native
        w4a16 = {"M_BUCKET": m_bucket, "DOT_SCALED": True, "A_MODE": "float"}  # sm_100: converted in hardware
        assert _prune_for_rows(GPU_CONFIGS, w4a16) == CONVERTED_DECODE_CONFIGS
        # Hopper, Ampere: both operands dequantized to 16 bits also try K 256; float32 and the fused prologue not
        dequantized = DECODE_CONFIGS + DEQUANTIZED_DECODE_CONFIGS
        for a_mode in ("float", "nvfp4"):
            hopper = {"M_BUCKET": m_bucket, "A_MODE": a_mode, "DOT_DTYPE": tl.bfloat16}
            assert _prune_for_rows(GPU_CONFIGS, hopper) == dequantized
            assert _prune_for_rows(GPU_CONFIGS, hopper, DOT_DTYPE=tl.float32) == DECODE_CONFIGS
        assert _prune_for_rows(GPU_CONFIGS, {"M_BUCKET": m_bucket, "A_MODE": "quantize"}) == DECODE_CONFIGS
    assert _prune_for_rows(GPU_CONFIGS, {}, M_BUCKET=32) == LARGE_CONFIGS + DECODE_CONFIGS  # a keyword M_BUCKET
    assert _prune_for_rows(GPU_CONFIGS, {"A_MODE": "float"}, M_BUCKET=32) == LARGE_CONFIGS + DECODE_CONFIGS
    native = _prune_for_rows(GPU_CONFIGS, {"M_BUCKET": 2048}, DOT_SCALED=True)  # sm_100
    assert native == [c for c in GPU_CONFIGS if c.kwargs["BLOCK_M"] == 128] and len(native) == 2
    assert configs_for_rows(LARGE_CONFIGS, 1) == LARGE_CONFIGS  # never empty
    assert _nvfp4_gemm_kernel.early_config_prune is _prune_for_rows  # what the autotuner calls


def test_autotune_key_holds_every_code_changing_constexpr():
    from scalesearch_compile.kernels._nvfp4 import autotune_key_gaps
    from scalesearch_compile.kernels.gemm import _nvfp4_gemm_kernel

    assert autotune_key_gaps(_nvfp4_gemm_kernel) == set()


def test_dequantize_kernel_compiles_with_wide_loads():
    """The dequantize-once kernel builds for sm_90 with the launch's specialisation: 16-byte code loads."""
    from scalesearch_compile.kernels._nvfp4 import compile_for_gpu, launch_job

    args = dict(qdata_ptr="*u8", scale_ptr="*u8", out_ptr="*bf16", N=4096, K_WORDS=512, K_BLOCKS=256)
    options = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}
    job = launch_job(
        "scalesearch_compile.kernels.gemm", "_dequantize_kernel", args, {"BLOCK_N": 64, "BLOCK_K": 128}, 90, options
    )
    (code,) = compile_for_gpu([job])
    assert "ld.global.v4.b32" in code["ptx"]
