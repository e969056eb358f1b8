"""scalesearch::quantize_nvfp4 and scalesearch::nvfp4_linear: numerics against independent float64
dequantize-then-matmul, opcheck, implementation choice, routing of F.linear, and input errors."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

from scalesearch_compile import (
    NVFP4ActivationKwargs,
    NVFP4Weight,
    ScaleChoice,
    nvfp4_linear,
    nvfp4_quantize,
    quantize_blocks,
)
from scalesearch_compile.formats import e2m1_decode, unpack_nibbles
from scalesearch_compile.ops import dispatch
from scalesearch_compile.search import quantize_reference
from scalesearch_compile.tensor import quantize_weight

torch.manual_seed(0)


def _weight(n=48, k=64, act=None, method="search"):
    return quantize_weight(torch.randn(n, k), method, act_quant_kwargs=act)


def _float64_w4a16(x, weight, bias):
    w = weight.to_nvfp4_tensor().dequantize(torch.float64)  # torchao's dequantize, not ours
    return x.double() @ w.T + bias.double()


def _float64_w4a4(x, weight, bias):
    kw = weight.act_quant_kwargs
    rows = x.reshape(-1, x.shape[-1])
    x_hat = quantize_blocks(rows, kw).dequantize().double().view(x.shape)
    return _float64_w4a16(x_hat, weight, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_matches_float64_dequantize_then_matmul(dtype):
    weight, bias = _weight(), torch.randn(48)
    x = torch.randn(3, 5, 64).to(dtype)
    out = nvfp4_linear(x, weight, bias.to(dtype))
    expected = _float64_w4a16(x, weight, bias.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 5, 48)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.double() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("method", ["search", "amax"])
def test_w4a4_matches_float64_dequantize_then_matmul(method):
    act = NVFP4ActivationKwargs(method)
    weight, bias = _weight(act=act), torch.randn(48)
    x = torch.randn(7, 64) * torch.linspace(0.1, 4.0, 64)
    out = nvfp4_linear(x, weight, bias)
    expected = _float64_w4a4(x, weight, bias)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    # and activations really are quantized: the output differs from the weight-only product
    assert (out.double() - _float64_w4a16(x, weight, bias)).abs().max() > 1e-3


def test_searched_activation_scales_lower_the_output_error():
    w, x = torch.randn(64, 256), torch.randn(64, 256)
    exact = x.double() @ w.double().T
    errors = {}
    for method in ("amax", "search"):
        weight = quantize_weight(w, "amax", act_quant_kwargs=NVFP4ActivationKwargs(method))
        errors[method] = (nvfp4_linear(x, weight).double() - exact).square().mean()
    assert errors["search"] < 0.95 * errors["amax"]


def test_unscaled_weight_decodes_every_byte_exactly():
    qdata = torch.arange(256, dtype=torch.uint8).view(2, 128)  # every pair of E2M1 codes
    codes = torch.randint(1, 127, (2, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scales = codes.view(torch.float8_e4m3fn).float()  # torch's own float8 decode
    expected = (e2m1_decode(unpack_nibbles(qdata)).view(2, 16, 16) * scales[..., None]).view(2, 256)
    assert torch.equal(NVFP4Weight(qdata, codes).unscaled(), expected)


def test_quantize_op_is_quantize_blocks_bit_for_bit():
    x = torch.randn(4, 6, 64)
    importance = torch.rand(64)
    qdata, scale_codes, pts = nvfp4_quantize(x, ScaleChoice("search", (-1, 3)), importance=importance)
    blocks = quantize_blocks(x, ScaleChoice("search", (-1, 3)), importance=importance)
    assert torch.equal(qdata, blocks.qdata) and torch.equal(scale_codes, blocks.scale_codes)
    assert torch.equal(pts, blocks.per_tensor_scale)


def test_quantize_op_amax_is_torchao():
    x = torch.randn(32, 128)
    qdata, scale_codes, pts = nvfp4_quantize(x, "amax")
    ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
    assert torch.equal(qdata, ref.qdata) and torch.equal(scale_codes, ref.scale.view(torch.uint8))


def test_single_level_scaling_returns_unit_scale_with_the_same_bits():
    x = torch.randn(8, 32)
    qdata, scale_codes, pts = nvfp4_quantize(x, "search", per_tensor_scale=False)
    blocks = quantize_blocks(x, "search", per_tensor_scale=None)
    assert pts.item() == 1.0
    assert torch.equal(qdata, blocks.qdata) and torch.equal(scale_codes, blocks.scale_codes)


def _linear_args():
    weight = _weight()
    return (torch.randn(2, 3, 64), weight.qdata, weight.scale.view(torch.uint8), weight.per_tensor_scale)


@pytest.mark.parametrize("act_method", [None, "search"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_linear(act_method, with_bias):
    bias = torch.randn(48) if with_bias else None
    opcheck(torch.ops.scalesearch.nvfp4_linear.default, (*_linear_args(), bias, act_method, [-2, 6], "auto"))


@pytest.mark.parametrize("act_method", [None, "search"])
def test_backward_is_straight_through(act_method):
    weight = _weight(act=None if act_method is None else NVFP4ActivationKwargs(act_method))
    x = torch.randn(2, 3, 64, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    upstream = torch.randn(2, 3, 48)
    grad_x, grad_bias = torch.autograd.grad(nvfp4_linear(x, weight, bias), (x, bias), upstream)
    w = weight.to_nvfp4_tensor().dequantize(torch.float64)  # torchao's dequantize, not ours
    torch.testing.assert_close(grad_x.double(), upstream.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_bias, upstream.sum((0, 1)))
    opcheck(  # with inputs that require grad, opcheck also checks the autograd registration
        torch.ops.scalesearch.nvfp4_linear.default,
        (x, weight.qdata, weight.scale.view(torch.uint8), weight.per_tensor_scale, bias, act_method, [-2, 6], "auto"),
    )


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(4, 64), "search", [-2, 6], "tensor", None, None, "auto"),
        (torch.randn(2, 3, 32, dtype=torch.bfloat16), "amax", [0, 0], "none", None, None, "reference"),
        (torch.randn(4, 64), "exhaustive", [0, 0], "tensor", None, torch.rand(64), "auto"),
        (torch.randn(2, 3, 32), "search", [-1, 3], "row", None, None, "reference"),
        (torch.randn(4, 64), "four_over_six", [0, 0], "given", torch.tensor(0.01), None, "auto"),
    ],
)
def test_opcheck_quantize(args):
    opcheck(torch.ops.scalesearch.quantize_nvfp4.default, args)


FAKE_QUANTIZE = torch.ops.scalesearch.fake_quantize_nvfp4.default


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(4, 64), "search", [-2, 6], "auto"),
        (torch.randn(2, 3, 32, dtype=torch.bfloat16), "amax", [0, 0], "reference"),
        (torch.randn(4, 64, dtype=torch.float16), "four_over_six", [0, 0], "auto"),
    ],
)
def test_opcheck_fake_quantize(args):
    opcheck(FAKE_QUANTIZE, args)
    values, pts = FAKE_QUANTIZE(*args)
    assert values.shape == args[0].shape and values.dtype == torch.float32 and pts.shape == ()
    ref_values, ref_pts = FAKE_QUANTIZE(*args[:3], "reference")  # the C++ pass: the references' bits
    assert torch.equal(values.view(torch.int32), ref_values.view(torch.int32)) and torch.equal(pts, ref_pts)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 40), "search", [-2, 6], "auto"), "multiple of 16"),
        ((torch.ones(4, 32, dtype=torch.int32), "search", [-2, 6], "auto"), "dtype"),
        ((torch.randn(4, 32), "nearest", [0, 0], "auto"), "nearest"),
        ((torch.randn(4, 32), "search", [-2, 6], "fast"), "unknown impl 'fast'"),
        ((torch.randn(0, 32), "search", [-2, 6], "auto"), "empty"),
    ],
)
def test_fake_quantize_input_errors(args, message):
    for device in ("cpu", "meta"):  # the real op and its fake implementation say the same
        x = args[0].to(device)
        with pytest.raises(ValueError, match=message):
            FAKE_QUANTIZE(x, *args[1:])


def test_f_linear_and_matmul_route_to_the_op():
    weight, bias, x = _weight(act=NVFP4ActivationKwargs()), torch.randn(48), torch.randn(3, 5, 64)
    expected = nvfp4_linear(x, weight, bias, impl="reference")
    assert torch.equal(F.linear(x, weight, bias), expected)
    assert torch.equal(x @ weight.t(), nvfp4_linear(x, weight))
    assert torch.equal(torch.matmul(x, weight.T), nvfp4_linear(x, weight))
    # x @ W (what autograd computes for the input's gradient): the dequantized weight, straight through
    y = torch.randn(4, 48)
    torch.testing.assert_close(torch.mm(y, weight), y @ weight.nvfp4_weight().dequantize(), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="F.linear"):
        torch.mm(weight.t(), torch.randn(48, 4))  # the weight on the left: not a linear layer


def test_triton_impl_without_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "_load", lambda module, name: (None, f"no {name} here"))
    dispatch._warn_fallback.cache_clear()
    weight = _weight()
    with pytest.raises(NotImplementedError, match="impl='triton' is not available: no nvfp4_linear_triton here"):
        nvfp4_linear(torch.randn(2, 64), weight, impl="triton")
    with pytest.raises(NotImplementedError, match="no quantize_nvfp4_triton here"):
        nvfp4_quantize(torch.randn(2, 64), impl="triton")
    # "auto" on CPU is the reference when the C++ kernels cannot be loaded either, and says so once for each
    x = torch.ones(2, 64)
    with pytest.warns(RuntimeWarning, match="no decode_nvfp4_cpu here"):
        assert torch.equal(nvfp4_linear(x, weight), nvfp4_linear(x, weight, impl="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nvfp4_linear(x, weight)
    w4a4 = _weight(act=NVFP4ActivationKwargs())
    with pytest.warns(RuntimeWarning, match="no fake_quantize_nvfp4_cpu here"):
        assert torch.equal(nvfp4_linear(x, w4a4), nvfp4_linear(x, w4a4, impl="reference"))
    dispatch._warn_fallback.cache_clear()


def test_triton_impl_calls_the_kernel_launcher(monkeypatch):
    calls = []

    def launcher(request):
        calls.append(request)
        return quantize_reference(request)

    monkeypatch.setattr(dispatch, "_load", lambda module, name: (launcher, ""))
    x, importance = torch.randn(4, 64), torch.rand(64)
    assert torch.equal(nvfp4_quantize(x, impl="triton")[0], nvfp4_quantize(x, impl="reference")[0])
    assert calls[0].scales == ScaleChoice("search", (-2, 6)) and calls[0].per_tensor_scale is not None
    nvfp4_quantize(x, "amax", per_tensor_scale=False, importance=importance, impl="triton")
    assert calls[1].scales.method == "amax" and calls[1].per_tensor_scale is None
    assert torch.equal(calls[1].importance.flatten(), importance)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernels run on CUDA or under TRITON_INTERPRET=1 (as CI runs)",
)
@pytest.mark.parametrize("act_method", [None, "search"])
def test_triton_impl_agrees_with_the_reference(act_method):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    act = None if act_method is None else NVFP4ActivationKwargs(act_method)
    weight, bias = _weight(n=32, act=act).to(device), torch.randn(32, device=device)
    x = torch.randn(5, 64, device=device)
    out = nvfp4_linear(x, weight, bias, impl="triton")
    expected = nvfp4_linear(x, weight, bias, impl="reference")
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    importance = torch.rand(64, device=device)
    for per_tensor_scale, weights in ((True, None), (False, None), (True, importance)):
        got = nvfp4_quantize(x, per_tensor_scale=per_tensor_scale, importance=weights, impl="triton")
        want = nvfp4_quantize(x, per_tensor_scale=per_tensor_scale, importance=weights, impl="reference")
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_bad_input_errors():
    weight = _weight()
    qdata, scale = weight.qdata, weight.scale.view(torch.uint8)
    op = torch.ops.scalesearch.nvfp4_linear
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        nvfp4_linear(torch.randn(2, 64, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match="unsupported dtype torch.int64"):
        nvfp4_linear(torch.ones(2, 64, dtype=torch.long), weight)
    with pytest.raises(ValueError, match="has 80 features but the NVFP4 weight has in_features 64"):
        nvfp4_linear(torch.randn(2, 80), weight)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_linear(torch.randn(2, 60), weight)
    with pytest.raises(ValueError, match=r"bias must be None or a floating-point tensor of shape \(48,\)"):
        nvfp4_linear(torch.randn(2, 64), weight, torch.randn(47))
    with pytest.raises(ValueError, match=r"scales must be E4M3 codes \(uint8 or float8_e4m3fn\) of shape \(48, 4\)"):
        op(torch.randn(2, 64), qdata, scale[:, :3], None, None, None, [], "auto")
    with pytest.raises(ValueError, match="qdata must be a 2-D uint8"):
        op(torch.randn(2, 64), qdata.float(), scale, None, None, None, [], "auto")
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        nvfp4_linear(torch.randn(2, 64), weight, impl="cuda")
    with pytest.raises(ValueError, match="unknown method 'mse'"):
        op(torch.randn(2, 64), qdata, scale, None, None, "mse", [-2, 6], "auto")
    with pytest.raises(ValueError, match="must be a ScaleSearchNVFP4Tensor"):
        nvfp4_linear(torch.randn(2, 64), torch.randn(48, 64))
    with pytest.raises(ValueError, match="empty search window"):
        nvfp4_quantize(torch.randn(2, 64), ScaleChoice("search", (3, 1)))


@pytest.mark.parametrize("act_method", [None, "search", "amax"])
def test_run_time_ops_read_nothing_on_the_host(act_method, host_reads):
    weight = _weight(act=None if act_method is None else NVFP4ActivationKwargs(act_method))
    x, bias = torch.randn(3, 5, 64), torch.randn(48)
    assert host_reads(lambda: nvfp4_linear(x, weight, bias, impl="reference")) == []
    assert host_reads(lambda: F.linear(x, weight, bias)) == []
    assert host_reads(lambda: nvfp4_quantize(x, impl="reference")) == []
    # the counter does see a host read when there is one
    assert host_reads(lambda: bool(torch.isfinite(x).all())) != []


@pytest.mark.parametrize("act_method", [None, "search"])
def test_a_nan_activation_reaches_only_its_own_output_row(act_method):
    weight = _weight(act=None if act_method is None else NVFP4ActivationKwargs(act_method))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    bad = x.clone()
    bad[1, 7], bad[4, 60] = float("nan"), -float("inf")  # not where x has its amax: the global scale stays
    assert bad[[0, 2, 3, 5]].abs().amax() == x.abs().amax()
    clean, out = nvfp4_linear(x, weight), nvfp4_linear(bad, weight)
    assert torch.isnan(out[1]).all() and not torch.isfinite(out[4]).any()
    rows = [0, 2, 3, 5]
    assert torch.equal(out[rows], clean[rows])


@pytest.mark.parametrize("magnitude", [1e-30, 1e35, 1e37])
def test_w4a16_does_not_overflow_where_the_float_product_does_not(magnitude):
    weight, bias = _weight(), torch.randn(48)
    x = torch.randn(5, 64) * magnitude
    out = nvfp4_linear(x, weight, bias * magnitude)
    expected = _float64_w4a16(x, weight, bias * magnitude)
    assert torch.isfinite(expected).all() and torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_quantize_op_takes_row_and_given_scales():
    x = torch.randn(3, 4, 64)
    given = torch.tensor(0.02)
    qdata, codes, pts = nvfp4_quantize(x, per_tensor_scale=given)
    blocks = quantize_blocks(x, per_tensor_scale=given)
    assert torch.equal(pts, given) and torch.equal(qdata, blocks.qdata) and torch.equal(codes, blocks.scale_codes)
    qdata, codes, pts = nvfp4_quantize(x, per_tensor_scale="row")
    rows = quantize_blocks(x, per_tensor_scale="row")
    assert pts.shape == (3, 4, 1) and torch.equal(pts, rows.per_tensor_scale) and torch.equal(qdata, rows.qdata)
    for bad, message in ((torch.tensor(0.0), "positive and finite"), ("col", "unknown per_tensor_scale 'col'")):
        with pytest.raises(ValueError, match=message):
            nvfp4_quantize(x, per_tensor_scale=bad)
    with pytest.raises(ValueError, match="importance is on the meta device"):
        nvfp4_quantize(x, importance=torch.ones(64, device="meta"))
    with pytest.raises(ValueError, match="bias must be None or a floating-point tensor of shape"):
        nvfp4_linear(torch.randn(2, 64), _weight(), torch.ones(48, device="meta"))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("activations", [None, "nvfp4"])
def test_backward_through_a_quantized_linear_reaches_input_and_bias(activations, compiled):
    """Frozen NVFP4 weights, trainable everything else: the input's gradient goes straight through the
    dequantized weight (what adapters such as LoRA train through)."""
    from torchao.quantization import quantize_

    from scalesearch_compile import ScaleSearchConfig

    linear = torch.nn.Linear(64, 48)
    quantize_(linear, ScaleSearchConfig(activations=activations))
    layer = torch.compile(linear, fullgraph=True) if compiled else linear
    x = torch.randn(3, 5, 64, requires_grad=True)
    upstream = torch.randn(3, 5, 48)
    (layer(x) * upstream).sum().backward()
    w_hat = linear.weight.nvfp4_weight().dequantize()
    torch.testing.assert_close(x.grad, upstream @ w_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.bias.grad, upstream.sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert not linear.weight.requires_grad
